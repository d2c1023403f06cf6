"""A tiny synthetic dataset on disk (bright discs on a dark noisy background) and a short training config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from model.train import TrainConfig


def write_disc_dataset(root: Path, n: int = 12, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        cx, cy, r = rng.uniform(10, w - 10), rng.uniform(10, h - 10), rng.uniform(5, 9)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        img = rng.normal(60, 15, (h, w, 3))
        img[disc] += 120
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"d{i:02d}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(root / "masks" / f"d{i:02d}.png")
    return root


def config(tmp_path: Path, data: Path, run: str = "run", **kw: object) -> TrainConfig:
    """A seconds-long training run on the disc dataset in ``tmp_path/run``; ``kw`` overrides fields."""
    base: dict[str, object] = dict(
        data_dir=str(data),
        name="discs",
        run_dir=str(tmp_path / run),
        out=str(tmp_path / run / "bundle"),
        class_names=("background", "disc"),
        sizing="resize",
        size=32,
        base_width=4,
        depth=2,
        epochs=3,
        batch_size=4,
        lr=5e-3,
        warmup_epochs=0.5,
        val_fraction=0.25,
        device="cpu",
        precision="float32",
        patience=0,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def write_touching_discs(root: Path, n: int = 8, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """Images with two touching discs each: images/, masks/ (their union, binary) and instances/ (16-bit
    instance ids 1 and 2, the second disc drawn over the first where they overlap)."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "instances"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        r1, r2 = rng.uniform(6, 8), rng.uniform(6, 8)
        cx, cy = rng.uniform(9, w - 26), rng.uniform(10, h - 10)
        ids = np.zeros((h, w), dtype=np.uint16)
        ids[(xx - cx) ** 2 + (yy - cy) ** 2 < r1**2] = 1
        ids[(xx - cx - r1 - r2 + 1) ** 2 + (yy - cy) ** 2 < r2**2] = 2
        img = rng.normal(60, 15, (h, w, 3))
        img[ids > 0] += 120
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"t{i:02d}.png")
        Image.fromarray(((ids > 0) * 255).astype(np.uint8)).save(root / "masks" / f"t{i:02d}.png")
        Image.fromarray(ids).save(root / "instances" / f"t{i:02d}.png")
    return root
