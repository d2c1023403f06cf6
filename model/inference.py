"""From a decoded image to model inputs, and from model logits back to a class map.

Inference is split into three steps so that a server can batch the middle one across requests:

    plan = make_plan(image, policy)           # (N, C, h, w) inputs: one resized image or N tiles
    logits = model(plan.inputs)               # (N, K, h, w), batched with other requests' items
    mask = finish(plan, logits)               # (H, W) uint8 class ids at the image's own size

Logits are resized back to the image's size (or blended across tiles) *before* the argmax, never the
class map after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.bundle import InputPolicy

# A "resize" policy bounds the model's memory by its input size whatever the image; only the upsampling
# of the logits grows with the image, so ``finish`` does it in row bands of at most this many pixels.
_BAND_PIXELS = 4_000_000


@dataclass
class Plan:
    """Model inputs for one image and what is needed to assemble their logits."""

    inputs: torch.Tensor  # (N, C, h, w) float32, normalised
    height: int  # the image's size, which the mask will have
    width: int
    sizing: str
    # Tile origins (top, left) in image pixels, one per input; empty for "resize".
    origins: list[tuple[int, int]]


def to_tensor(image: np.ndarray, policy: InputPolicy) -> torch.Tensor:
    """(H, W, C) or (H, W) uint8 -> (C, H, W) float32, scaled to [0, 1] and normalised."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] != policy.channels:
        raise ValueError(f"image has {image.shape[2]} channels, the model takes {policy.channels}")
    x = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(policy.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(policy.std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


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


def gaussian_window(h: int, w: int, sigma_scale: float = 0.125) -> torch.Tensor:
    """(h, w) weights, 1 at the centre and falling off towards the edges, never exactly 0."""
    ys = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
    gy = torch.exp(-(ys**2) / (2 * (sigma_scale * h) ** 2))
    gx = torch.exp(-(xs**2) / (2 * (sigma_scale * w) ** 2))
    win = gy[:, None] * gx[None, :]
    return win.clamp_min(1e-3)


def pad_tile(tile: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) normalised tile, h and w <= size -> (C, size, size), padded at the bottom and right with 0,
    the normalisation mean: an image smaller than a tile is seen as if it stood on an average background,
    and every input of a tile model has the one shape it was warmed up (and compiled) for."""
    h, w = tile.shape[-2:]
    if (h, w) == (size, size):
        return tile
    return F.pad(tile, (0, size - w, 0, size - h))


def make_plan(image: np.ndarray, policy: InputPolicy, size: tuple[int, int] | None = None) -> Plan:
    """Turn an (H, W, C) or (H, W) uint8 image into model inputs according to ``policy``.

    "resize": one input of ``size`` x ``size``. "tile": tiles of ``size`` x ``size`` at native scale (an
    axis shorter than a tile is padded, see ``pad_tile``), all of one shape so that they batch together.
    ``size``: (height, width) the mask must have when ``image`` is a reduced copy (resize policies only).
    """
    h, w = size or image.shape[:2]
    if policy.sizing == "resize":
        pil = Image.fromarray(image)
        if pil.size != (policy.size, policy.size):
            pil = pil.resize((policy.size, policy.size), Image.Resampling.BILINEAR)
        x = to_tensor(np.asarray(pil), policy)
        return Plan(inputs=x.unsqueeze(0), height=h, width=w, sizing="resize", origins=[])
    if (h, w) != image.shape[:2]:
        raise ValueError("tiled inference needs the image at its full size")
    full = to_tensor(image, policy)  # (C, H, W)
    t = policy.size
    origins = [(y, x) for y in tile_origins(h, t, policy.overlap) for x in tile_origins(w, t, policy.overlap)]
    tiles = torch.stack([pad_tile(full[:, y : y + t, x : x + t], t) for y, x in origins])
    return Plan(inputs=tiles, height=h, width=w, sizing="tile", origins=origins)


def finish(plan: Plan, logits: torch.Tensor) -> np.ndarray:
    """(N, K, h, w) logits for ``plan.inputs`` -> (H, W) uint8 class ids at the image's size."""
    if plan.sizing == "resize":
        return _resize_argmax(logits[0].float(), plan.height, plan.width)
    acc, _ = _blend(plan, logits)
    return acc.argmax(0).to(torch.uint8).numpy()  # dividing by the weights (> 0) keeps the argmax


def blended_logits(plan: Plan, logits: torch.Tensor) -> torch.Tensor:
    """(K, H, W) float32 logits at the image's size: resized or Gaussian-blended across tiles."""
    if plan.sizing == "resize":
        up = F.interpolate(logits.float().cpu(), size=(plan.height, plan.width), mode="bilinear", align_corners=False)
        return up[0]
    acc, weight = _blend(plan, logits)
    return acc / weight


def _blend(plan: Plan, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum (K, H, W) of the tiles' logits and the sum of weights (H, W), Gaussian window.

    A padded tile (an axis shorter than the tile) contributes its part inside the image only.
    """
    k, t = logits.shape[1], logits.shape[-1]
    th, tw = min(t, plan.height), min(t, plan.width)
    acc = torch.zeros(k, plan.height, plan.width)
    weight = torch.zeros(plan.height, plan.width)
    win = gaussian_window(t, t)[:th, :tw]
    for (y, x), tile in zip(plan.origins, logits, strict=True):
        acc[:, y : y + th, x : x + tw].addcmul_(tile[:, :th, :tw].float().cpu(), win)
        weight[y : y + th, x : x + tw].add_(win)
    return acc, weight


def _resize_argmax(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(K, h, w) -> (H, W) uint8: bilinear upsampling of the logits, then argmax, in row bands.

    Banding keeps memory at K x band x W floats for very large images. Each band interpolates from the
    full low-resolution logits with align_corners=False geometry, so bands join without seams.
    """
    if logits.shape[0] == 2:
        # Bilinear interpolation is linear: class 1 wins where the interpolated logit difference is > 0,
        # exactly as the argmax of both interpolated logits would say, at half the work.
        logits = logits[1:] - logits[:1]
    _, h, w = logits.shape
    out = np.empty((height, width), dtype=np.uint8)
    band = max(1, _BAND_PIXELS // max(1, width))
    if band >= height:
        up = F.interpolate(logits[None].cpu(), size=(height, width), mode="bilinear", align_corners=False)
        out[:] = _argmax(up[0]).numpy()
        return out
    # Sample rows explicitly with grid_sample so each band matches the single-shot interpolation.
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * (w / width) - 0.5
    gx = (xs + 0.5) / w * 2 - 1  # normalised, align_corners=False
    src = logits[None].cpu()
    for top in range(0, height, band):
        rows = torch.arange(top, min(height, top + band), dtype=torch.float32)
        ys = (rows + 0.5) * (h / height) - 0.5
        gy = (ys + 0.5) / h * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
        part = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out[top : top + len(rows)] = _argmax(part[0]).numpy()
    return out


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """(K, H, W) -> (H, W) uint8; K == 1 holds the class-1-minus-class-0 difference of a binary model."""
    if logits.shape[0] == 1:
        return (logits[0] > 0).to(torch.uint8)
    return logits.argmax(0).to(torch.uint8)
