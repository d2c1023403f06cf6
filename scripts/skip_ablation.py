"""The skip-connection ablation: the same U-Net trained with and without its skips, on the same budget.

    python scripts/skip_ablation.py DATA_DIR [--size 128] [--base-width 16] [--epochs 30] [--seeds 0,1,2]
        [--runs runs/ablation]

Every pair of runs shares every setting (data split, seed, augmentation, schedule, epochs) except ``skip``;
each seed changes the initial weights, the batch order and the augmentation, never the split. Writes
``docs/skip-ablation.png`` (validation Dice per epoch, and the gradient norm reaching the first encoder
layer over the first steps: the mean over seeds bold, each seed thin) and prints a Markdown table for
docs/training.md. Finished runs are reused and interrupted ones resumed, so the script can be stopped and
restarted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.plot import plot_curves  # noqa: E402
from model.train import TrainConfig, train  # noqa: E402

VARIANTS = (
    ("with skips", "skips", True, (30, 110, 220), (170, 200, 240)),
    ("without skips", "noskips", False, (220, 60, 50), (240, 185, 180)),
)


def run_pair(a: argparse.Namespace, seed: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for label, name, skip, _, _ in VARIANTS:
        run_dir = a.runs / f"seed{seed}" / name
        cfg = TrainConfig(
            data_dir=str(a.data_dir),
            name=f"ablation-{name}",
            run_dir=str(run_dir),
            out=str(run_dir / "bundle"),
            mask="binary:127",
            class_names=("background", "polyp"),
            sizing="resize",
            size=a.size,
            base_width=a.base_width,
            epochs=a.epochs,
            batch_size=a.batch_size,
            lr=2e-3,
            patience=0,
            skip=skip,
            seed=seed,
            split_seed=a.split_seed,
            device=a.device,
            grad_log_steps=a.grad_steps,
        )
        if not (run_dir / "bundle" / "card.json").exists():
            train(cfg, resume=(run_dir / "last.pt").exists())
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        grads = json.loads((run_dir / "grad_norms.json").read_text())[: a.grad_steps]
        out[label] = {"rows": rows, "grads": grads}
    return out


def mean_sd(xs: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.{digits}f} ± {sd:.{digits}f}"


def plot(results: dict[int, dict[str, dict[str, Any]]], a: argparse.Namespace) -> None:
    seeds = sorted(results)
    labels = [v[0] for v in VARIANTS]
    # Light per-seed series first, so the bold means are drawn over them.
    series = [(f"{label} s{s}", light, "") for label, _, _, _, light in VARIANTS for s in seeds]
    series += [(label, bold, label) for label, _, _, bold, _ in VARIANTS]

    def rows_of(values: dict[str, list[list[float]]]) -> list[dict[str, float]]:
        n = min(len(v) for vs in values.values() for v in vs)
        rows = []
        for i in range(n):
            row: dict[str, float] = {"epoch": i + 1}
            for label in labels:
                for s, v in zip(seeds, values[label], strict=True):
                    row[f"{label} s{s}"] = v[i]
                row[label] = statistics.fmean(v[i] for v in values[label])
            rows.append(row)
        return rows

    dice = {lb: [[r["val_dice"] for r in results[s][lb]["rows"]] for s in seeds] for lb in labels}
    grads = {lb: [results[s][lb]["grads"] for s in seeds] for lb in labels}
    top = max(g for lb in labels for gs in grads[lb] for g in gs) or 1.0
    scaled = {lb: [[g / top for g in gs] for gs in grads[lb]] for lb in labels}
    tmp = a.out.with_suffix(".parts")
    tmp.mkdir(parents=True, exist_ok=True)
    plot_curves(rows_of(dice), tmp / "dice.png", f"validation Dice per epoch ({len(seeds)} seeds)", series=series)
    # plot_curves puts "epoch" on the x axis; here it holds the training step.
    plot_curves(
        rows_of(scaled),
        tmp / "grad.png",
        f"first-layer gradient norm per step (scaled; max {top:.3g})",
        series=series,
        xlabel="step",
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    left, right = Image.open(tmp / "dice.png"), Image.open(tmp / "grad.png")
    both = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    both.save(a.out)
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds, one pair of runs each")
    ap.add_argument("--split-seed", type=int, default=0, help="the train/validation split every run shares")
    ap.add_argument("--grad-steps", type=int, default=50, help="early steps whose gradient norms are compared")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "skip-ablation.png")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    results = {s: run_pair(a, s) for s in seeds}
    plot(results, a)

    labels = [v[0] for v in VARIANTS]
    best = {lb: [max(r["val_dice"] for r in results[s][lb]["rows"]) for s in seeds] for lb in labels}
    final = {lb: [results[s][lb]["rows"][-1]["val_dice"] for s in seeds] for lb in labels}
    half = a.grad_steps // 2
    spans = ((0, half), (half, a.grad_steps), (0, a.grad_steps))
    grad = {
        span: {lb: [statistics.fmean(results[s][lb]["grads"][span[0] : span[1]]) for s in seeds] for lb in labels}
        for span in spans
    }
    secs = {lb: [sum(r["seconds"] for r in results[s][lb]["rows"]) for s in seeds] for lb in labels}
    wins = sum(b1 > b2 for b1, b2 in zip(best[labels[0]], best[labels[1]], strict=True))
    seed_list = "/".join(str(s) for s in seeds)
    print(f"| {len(seeds)} seeds, {a.epochs} epochs each | {labels[0]} | {labels[1]} |")
    print("|---|---:|---:|")
    print(f"| best validation Dice, mean ± sd | {mean_sd(best[labels[0]])} | {mean_sd(best[labels[1]])} |")
    print(
        f"| best validation Dice, seeds {seed_list} | "
        + " | ".join("/".join(f"{v:.3f}" for v in best[lb]) for lb in labels)
        + " |"
    )
    print(f"| final validation Dice, mean ± sd | {mean_sd(final[labels[0]])} | {mean_sd(final[labels[1]])} |")
    print(
        f"| final training loss, seeds {seed_list} | "
        + " | ".join("/".join(f"{results[s][lb]['rows'][-1]['train_loss']:.3f}" for s in seeds) for lb in labels)
        + " |"
    )
    for lo, hi in spans:
        g = grad[(lo, hi)]
        print(
            f"| mean first-layer gradient norm, steps {lo + 1}–{hi} | {mean_sd(g[labels[0]])} | "
            f"{mean_sd(g[labels[1]])} |"
        )
    print(
        f"| training time per run, mean | {statistics.fmean(secs[labels[0]]) / 60:.1f} min | "
        f"{statistics.fmean(secs[labels[1]]) / 60:.1f} min |"
    )
    print(f"\n{labels[0]} has the better best Dice in {wins} of {len(seeds)} seeds; plot: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
