"""The skip-connection ablation: the same U-Net trained with and without its skips, on the same budget.

    python scripts/skip_ablation.py DATA_DIR [--size 128] [--base-width 16] [--epochs 10] [--runs runs/ablation]

Both runs share every setting (data split, seed, augmentation, schedule, epochs) except ``skip``. Writes
``docs/skip-ablation.png`` (validation Dice per epoch, and the gradient norm reaching the first encoder
layer over the first steps) and prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.plot import plot_curves  # noqa: E402
from model.train import TrainConfig, train  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-steps", type=int, default=50, help="early steps whose gradient norms are compared")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "skip-ablation.png")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()

    results = {}
    for skip in (True, False):
        name = "skips" if skip else "noskips"
        cfg = TrainConfig(
            data_dir=str(a.data_dir),
            name=f"ablation-{name}",
            run_dir=str(a.runs / name),
            out=str(a.runs / name / "bundle"),
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
            device=a.device,
            grad_log_steps=a.grad_steps,
        )
        resume = (a.runs / name / "last.pt").exists()
        train(cfg, resume=resume)
        rows = [json.loads(x) for x in (a.runs / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        grads = json.loads((a.runs / name / "grad_norms.json").read_text())
        results[name] = {"rows": rows, "grads": grads}

    on, off = results["skips"], results["noskips"]
    dice_rows = [
        {"epoch": r["epoch"], "with skips": r["val_dice"], "without skips": s["val_dice"]}
        for r, s in zip(on["rows"], off["rows"], strict=True)
    ]
    grad_on, grad_off = on["grads"][: a.grad_steps], off["grads"][: a.grad_steps]
    top = max(grad_on + grad_off) or 1.0
    # plot_curves puts "epoch" on the x axis; here it holds the training step.
    grad_rows = [
        {"epoch": i + 1, "with skips": g1 / top, "without skips": g2 / top}
        for i, (g1, g2) in enumerate(zip(grad_on, grad_off, strict=True))
    ]
    tmp = a.out.with_suffix(".parts")
    tmp.mkdir(parents=True, exist_ok=True)
    series = (("with skips", (30, 110, 220), "with skips"), ("without skips", (220, 60, 50), "without skips"))
    plot_curves(dice_rows, tmp / "dice.png", "validation Dice per epoch", series=series)
    plot_curves(
        grad_rows,
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

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    best_on = max(r["val_dice"] for r in on["rows"])
    best_off = max(r["val_dice"] for r in off["rows"])
    print("| | with skips | without skips |")
    print("|---|---:|---:|")
    print(f"| best validation Dice ({a.epochs} epochs) | {best_on:.3f} | {best_off:.3f} |")
    print(f"| final validation Dice | {on['rows'][-1]['val_dice']:.3f} | {off['rows'][-1]['val_dice']:.3f} |")
    print(f"| mean first-layer gradient norm, steps 1-{len(grad_on)} | {mean(grad_on):.3g} | {mean(grad_off):.3g} |")
    print(f"\nplot: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
