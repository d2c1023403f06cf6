"""PNG compression level for mask responses, chosen by measurement.

    python -m bench.encoders [--masks DIR] [--repeat 20]

Encodes real masks (the Kvasir-SEG masks next to the repository when present, else generated blobs) as the
service does — palette PNG with the class colors — at every zlib level, and reports time and size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from app.imaging import encode_mask_png
from bench import DATASETS

DEFAULT_MASKS = DATASETS / "kvasir_seg" / "masks"


def load_masks(folder: Path, n: int) -> list[np.ndarray]:
    files = sorted(folder.glob("*"))[:n] if folder.is_dir() else []
    if files:
        return [(np.asarray(Image.open(f).convert("L")) > 127).astype(np.uint8) for f in files]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:512, 0:512]
        cx, cy, r = rng.uniform(100, 400, 3)
        out.append((((xx - cx) ** 2 + (yy - cy) ** 2) < r**2).astype(np.uint8))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--masks", type=Path, default=DEFAULT_MASKS)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    masks = load_masks(a.masks, a.count)
    pixels = sum(m.size for m in masks)
    colors = [(0, 0, 0), (255, 59, 48)]
    print(f"{len(masks)} masks, {pixels / len(masks) / 1e6:.2f} Mpx on average")
    print("| level | ms per Mpx | bytes per Mpx |")
    print("|---:|---:|---:|")
    for level in range(10):
        t0 = time.perf_counter()
        size = 0
        for _ in range(a.repeat):
            size = sum(len(encode_mask_png(m, colors, level)) for m in masks)
        ms = (time.perf_counter() - t0) / a.repeat * 1000
        print(f"| {level} | {ms / pixels * 1e6:.2f} | {size / pixels * 1e6:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
