"""Generated whole-slide images for the tests: pyramidal tiled TIFFs written by tifffile, never from files."""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO

import numpy as np
import tifffile


def cells(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """(H, W, C) uint8: bright blobs on a dark, noisy background, something like stained nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    out = rng.normal(30, 8, (height, width)).astype(np.float32)
    for _ in range(max(1, height * width // 900)):
        y, x, r = rng.integers(0, height), rng.integers(0, width), rng.integers(4, 11)
        y0, y1, x0, x1 = max(0, y - r), min(height, y + r + 1), max(0, x - r), min(width, x + r + 1)
        disc = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 <= r * r
        out[y0:y1, x0:x1][disc] = rng.normal(200, 15)
    img = np.clip(out, 0, 255).astype(np.uint8)
    return np.repeat(img[:, :, None], channels, axis=2) if channels > 1 else img[:, :, None]


def write_slide(target: Path | IO[bytes], image: np.ndarray, levels: int = 3, tile: int = 64, **kw: object) -> None:
    """A tiled pyramidal TIFF (SubIFDs, zlib) of ``image`` (H, W[, C]) halved ``levels - 1`` times."""
    photometric = "rgb" if image.ndim == 3 and image.shape[2] == 3 else "minisblack"
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    opts = {"tile": (tile, tile), "compression": "zlib", "photometric": photometric, **kw}
    with tifffile.TiffWriter(target, bigtiff=True) as tw:
        tw.write(image, subifds=levels - 1, **opts)  # type: ignore[arg-type]
        for k in range(1, levels):
            tw.write(image[:: 2**k, :: 2**k], subfiletype=1, **opts)  # type: ignore[arg-type]


def slide_bytes(image: np.ndarray, levels: int = 3, tile: int = 64) -> bytes:
    buf = io.BytesIO()
    write_slide(buf, image, levels, tile)
    return buf.getvalue()
