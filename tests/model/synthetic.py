"""A tiny synthetic dataset on disk: bright discs on a dark noisy background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


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
