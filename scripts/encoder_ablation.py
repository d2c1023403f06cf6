"""Plain encoder against EfficientNet-Lite0 (random and ImageNet-pretrained): the same recipe, the same
split, one short schedule each, then their validation Dice, its 10th percentile, GFLOP per image and the
forward's images/s on this machine.

    python scripts/encoder_ablation.py DATASETS_DIR/kvasir_seg [--epochs 6] [--size 256] [--runs runs/ablation]

Each variant trains with ``python -m model.train`` (resumed when its run folder has a checkpoint, skipped
once it has a bundle), is scored with ``unetseg evaluate --split val`` (the bundle's own validation split,
float32) and timed at batch 1 and 4 on one thread. The table goes to stdout and RUNS/ablation.md, the
numbers to RUNS/ablation.json. ``--epochs 1 --size 64 --steps 2`` makes a seconds-long dry run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import flops_per_image  # noqa: E402
from model.bundle import load_bundle  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "plain, random": ["--encoder", "plain", "--base-width", "24"],
    "EfficientNet-Lite0, random": ["--encoder", "efficientnet-lite0", "--base-width", "16"],
    "EfficientNet-Lite0, ImageNet": [
        "--encoder",
        "efficientnet-lite0",
        "--base-width",
        "16",
        "--pretrained",
        "--encoder-lr",
        "0.1",
    ],
}


def forward_rate(bundle: Path, batch: int, seconds: float = 3.0) -> float:
    """Images/s of the bundle's forward pass on one CPU thread, float32, at ``batch``."""
    b = load_bundle(bundle)
    p = b.card.input
    x = torch.zeros(batch, p.channels, p.size, p.size)
    torch.set_num_threads(1)
    with torch.inference_mode():
        b.model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            b.model(x)
            n += batch
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="the dataset folder (images/ and masks/), e.g. kvasir_seg")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=0, help="steps per epoch (0: one pass over the images)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    recipe = ["--data", str(a.data), "--mask", "binary:127", "--classes", "background,polyp", "--sizing", "resize"]
    recipe += ["--size", str(a.size), "--epochs", str(a.epochs), "--batch-size", "8", "--lr", "1e-3"]
    recipe += ["--warmup-epochs", "1", "--patience", "0", "--scale", "0.5,1.5", "--rotate", "180", "--shear", "22"]
    recipe += ["--brightness", "0.3", "--contrast", "0.3", "--saturation", "0.3", "--threads", str(a.threads)]
    recipe += ["--steps-per-epoch", str(a.steps)] if a.steps else []
    rows: list[dict[str, Any]] = []
    for i, (name, flags) in enumerate(VARIANTS.items()):
        run = a.runs / f"variant-{i}"
        bundle = run / "bundle"
        if not (bundle / "card.json").exists():
            resume = ["--resume"] if (run / "last.pt").exists() else []
            cmd = [sys.executable, "-m", "model.train", "--name", "polyp", "--run-dir", str(run), *recipe, *flags]
            subprocess.run([*cmd, *resume], cwd=ROOT, check=True)
        report = run / "val.json"
        cmd = [sys.executable, "-m", "app", "evaluate", str(a.data), "--model", str(bundle), "--split", "val"]
        subprocess.run([*cmd, "--json", str(report)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        dice = json.loads(report.read_text())["plain"]["per_image_dice"]  # mean, p10, median, ...
        card = load_bundle(bundle).card
        rows.append(
            {
                "variant": name,
                "epochs": a.epochs,
                "size": a.size,
                "val_dice": round(float(dice["mean"]), 4),
                "val_dice_p10": round(float(dice["p10"]), 4),
                "gflop_per_image": round(flops_per_image(bundle) / 1e9, 2),
                "images_per_s_batch1": round(forward_rate(bundle, 1), 2),
                "images_per_s_batch4": round(forward_rate(bundle, 4), 2),
                "train_seconds": card.training.get("train_seconds"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    (a.runs / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| encoder | val Dice | p10 | GFLOP/image | images/s, batch 1 | images/s, batch 4 | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['val_dice']} | {r['val_dice_p10']} | {r['gflop_per_image']} | "
            f"{r['images_per_s_batch1']} | {r['images_per_s_batch4']} | {r['train_seconds']} |"
        )
    (a.runs / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
