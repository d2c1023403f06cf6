"""Pixel work before the model that needs no torch: the channel check and the resize of a "resize" policy.

The service's HTTP front ends run it (they load no torch); ``model.inference`` builds on it, so the pixels a
model sees are the same whoever prepared them.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from model.card import InputPolicy


def as_hwc(image: np.ndarray, policy: InputPolicy) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (H, W, C), checked to have the model's channels."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] != policy.channels:
        raise ValueError(f"image has {image.shape[2]} channels, the model takes {policy.channels}")
    return image


def resize_image(image: np.ndarray, policy: InputPolicy) -> np.ndarray:
    """(H, W[, C]) uint8 -> (size, size, C) uint8, resized with Pillow's bilinear filter (a writable copy).

    An image already at the size is copied as it is: what Pillow would give, without its round trip (with
    ``serve --workers`` the front end resizes, and the engine process, whose interpreter every request
    shares, only takes the copy)."""
    hwc = as_hwc(image, policy)
    if hwc.shape[:2] == (policy.size, policy.size):
        return np.array(hwc, dtype=np.uint8, order="C")
    pil = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if pil.size != (policy.size, policy.size):
        pil = pil.resize((policy.size, policy.size), Image.Resampling.BILINEAR)
    return np.array(pil).reshape(policy.size, policy.size, -1)


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` overlap.

    The last tile ends exactly at ``length``; if the image is shorter than a tile, one tile covers it.
    """
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    # Spread the tiles evenly so that every overlap is about the same.
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]
