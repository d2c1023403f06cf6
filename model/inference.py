"""From a decoded image to model inputs, and from model logits back to a class map: written once, here, for
evaluation, training's validation and the service's engine alike.

    plan = make_plan(image, policy)           # (N, C, h, w) inputs: one resized image or N tiles
    logits = model(plan.inputs)               # (N, K, h, w), batched with other requests' items
    mask = finish(plan, logits)               # (H, W) uint8 class ids at the image's own size

The pieces the engine uses one at a time, on the model's device:

- ``resize_input`` (one uint8 input of ``size`` x ``size``) or ``TileGrid.cut`` (a uint8 tile, zero-padded
  where the image is smaller than a tile): what crosses to the device is uint8;
- ``normalize``: uint8 -> float32 ``(x / 255 - mean) / std``, padding set to 0 (the mean);
- ``resize_argmax`` (logits upsampled to the image's size, then the class map) or a ``Blender`` (tiles'
  logits summed with a Gaussian window into one accumulator, then the class map).

Logits are resized back to the image's size (or blended across tiles) *before* the argmax, never the class
map after it. A binary model needs only the difference of its two logits (``margin``): class 1 wins where
the upsampled or blended difference is > 0, exactly as the argmax of both would say, at half the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.card import InputPolicy
from model.pixels import as_hwc, resize_image, tile_origins

__all__ = [
    "BAND_PIXELS",
    "Blender",
    "Plan",
    "TileGrid",
    "as_hwc",
    "blended_logits",
    "classes_of",
    "finish",
    "gaussian_window",
    "make_plan",
    "margin",
    "normalize",
    "resize_argmax",
    "resize_image",
    "resize_input",
    "resize_logits",
    "statistics",
    "tile_origins",
    "to_tensor",
]

# A "resize" policy bounds the model's memory by its input size whatever the image; only the upsampling
# of the logits grows with the image, so ``resize_argmax`` does it in row bands of at most this many pixels.
BAND_PIXELS = 4_000_000


def normalize(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, valid: list[tuple[int, int]] | None = None
) -> torch.Tensor:
    """(B, C, h, w) uint8 -> float32 scaled to [0, 1] and normalised per channel (``mean``, ``std`` (1, C, 1, 1)
    on the same device). ``valid``: each input's (height, width) of real pixels (a padded tile); the rest is
    set to 0, the normalised mean, so an image smaller than a tile is seen on an average background."""
    out = x.float().div(255.0).sub_(mean).div_(std)  # a new tensor even when x is float already
    if valid is not None:
        t_h, t_w = out.shape[-2:]
        for i, (h, w) in enumerate(valid):
            if h < t_h:
                out[i, :, h:] = 0
            if w < t_w:
                out[i, :, :, w:] = 0
    return out


def statistics(policy: InputPolicy, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's mean and std as (1, C, 1, 1) float32 tensors on ``device``, for ``normalize``."""
    mean = torch.tensor(policy.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(policy.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def to_tensor(image: np.ndarray, policy: InputPolicy) -> torch.Tensor:
    """(H, W, C) or (H, W) uint8 -> (C, H, W) float32, scaled to [0, 1] and normalised."""
    x = torch.from_numpy(np.require(as_hwc(image, policy), np.uint8, ["C", "W"])).permute(2, 0, 1)
    return normalize(x[None], *statistics(policy))[0]


def resize_input(image: np.ndarray, policy: InputPolicy) -> torch.Tensor:
    """(H, W[, C]) uint8 -> (C, size, size) uint8: the whole image resized (``resize_image``) for a "resize"
    policy."""
    return torch.from_numpy(resize_image(image, policy)).permute(2, 0, 1)


def gaussian_window(h: int, w: int, sigma_scale: float = 0.125) -> torch.Tensor:
    """(h, w) weights, 1 at the centre and falling off towards the edges, never exactly 0."""
    ys = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
    gy = torch.exp(-(ys**2) / (2 * (sigma_scale * h) ** 2))
    gx = torch.exp(-(xs**2) / (2 * (sigma_scale * w) ** 2))
    win = gy[:, None] * gx[None, :]
    return win.clamp_min(1e-3)


class TileGrid:
    """The overlapping ``policy.size`` tiles that cover an (H, W) image at native scale.

    An axis shorter than a tile has one tile, padded (``cut``): every input has the one shape a model is
    warmed up (and compiled) for.
    """

    def __init__(self, height: int, width: int, policy: InputPolicy) -> None:
        t = policy.size
        self.height, self.width, self.tile = height, width, t
        self.origins = [
            (y, x) for y in tile_origins(height, t, policy.overlap) for x in tile_origins(width, t, policy.overlap)
        ]

    def __len__(self) -> int:
        return len(self.origins)

    def valid(self, index: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the image's pixels in tile ``index``."""
        y, x = self.origins[index]
        return y, x, min(self.tile, self.height - y), min(self.tile, self.width - x)

    def cut(self, image: np.ndarray, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tile ``index`` of the (H, W, C) uint8 image: (C, t, t) uint8 (zeros where it passes the image) and the
        (height, width) of its real pixels, for ``normalize``."""
        y, x, h, w = self.valid(index)
        crop = torch.from_numpy(np.array(image[y : y + h, x : x + w])).permute(2, 0, 1)  # a writable copy
        if (h, w) != (self.tile, self.tile):
            crop = F.pad(crop, (0, self.tile - w, 0, self.tile - h))
        return crop, (h, w)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """(K, ...) logits -> what decides the class map: a binary model's class-1-minus-class-0 difference
    (1, ...), the logits themselves otherwise. Resizing and blending are linear, so they commute with it."""
    return logits[1:2] - logits[0:1] if logits.shape[0] == 2 else logits


def classes_of(decisive: torch.Tensor) -> torch.Tensor:
    """``margin``'s (K', H, W) -> (H, W) uint8 class ids: > 0 for a binary difference, else the argmax."""
    if decisive.shape[0] == 1:
        return (decisive[0] > 0).to(torch.uint8)
    return decisive.argmax(0).to(torch.uint8)


class Blender:
    """Tiles' logits summed with a Gaussian window into one (K', H, W) float32 accumulator (K' = 1 for a binary
    model, see ``margin``) on ``device``, as they come; the class map and the blended logits once all are in.

    The accumulator is the only full-size float buffer: a tiled image is never held as all of its tiles.
    """

    def __init__(self, grid: TileGrid, classes: int, device: torch.device | str = "cpu") -> None:
        self.grid = grid
        self.classes = classes
        t = grid.tile
        self.window = gaussian_window(t, t).to(device)
        planes = 1 if classes == 2 else classes
        self.acc = torch.zeros(planes, grid.height, grid.width, device=device)

    def add(self, index: int, logits: torch.Tensor) -> None:
        """Take tile ``index``'s (K, t, t) logits (on the accumulator's device). Not thread-safe: tiles overlap."""
        y, x, h, w = self.grid.valid(index)
        part = margin(logits.float())[:, :h, :w]
        self.acc[:, y : y + h, x : x + w].addcmul_(part, self.window[:h, :w])

    def mask(self) -> torch.Tensor:
        """(H, W) uint8 class ids (dividing by the summed weights, > 0, keeps the decision)."""
        return classes_of(self.acc)

    def logits(self) -> torch.Tensor:
        """(K, H, W) float32 blended logits (the weighted mean of the tiles'). A binary model's come back as
        (0, class 1 minus class 0): the same argmax and softmax."""
        weight = torch.zeros(self.grid.height, self.grid.width, device=self.acc.device)
        for index in range(len(self.grid)):
            y, x, h, w = self.grid.valid(index)
            weight[y : y + h, x : x + w].add_(self.window[:h, :w])
        mean = self.acc / weight
        return torch.cat([torch.zeros_like(mean), mean]) if self.classes == 2 else mean


def resize_logits(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(K, h, w) -> (K, H, W) float32, bilinear (align_corners=False), on the logits' device."""
    return F.interpolate(logits[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]


def resize_argmax(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(K, h, w) -> (H, W) uint8 class ids on the logits' device: bilinear upsampling of the logits (of their
    ``margin``), then the decision, in row bands.

    Banding keeps memory at K' x band x W floats for very large images. Each band interpolates from the
    full low-resolution logits with align_corners=False geometry, so bands join without seams.
    """
    decisive = margin(logits.float())
    _, h, w = decisive.shape
    band = max(1, BAND_PIXELS // max(1, width))
    if band >= height:
        return classes_of(resize_logits(decisive, height, width))
    out = torch.empty((height, width), dtype=torch.uint8, device=decisive.device)
    # Sample rows explicitly with grid_sample so each band matches the single-shot interpolation.
    xs = (torch.arange(width, dtype=torch.float32, device=decisive.device) + 0.5) * (w / width) - 0.5
    gx = (xs + 0.5) / w * 2 - 1  # normalised, align_corners=False
    for top in range(0, height, band):
        rows = torch.arange(top, min(height, top + band), dtype=torch.float32, device=decisive.device)
        ys = (rows + 0.5) * (h / height) - 0.5
        gy = (ys + 0.5) / h * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
        part = F.grid_sample(decisive[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
        out[top : top + len(rows)] = classes_of(part[0])
    return out


@dataclass
class Plan:
    """Model inputs for one image and what is needed to assemble their logits."""

    inputs: torch.Tensor  # (N, C, h, w) float32, normalised
    height: int  # the image's size, which the mask will have
    width: int
    sizing: str
    grid: TileGrid | None  # the tiles, for "tile"; None for "resize"

    @property
    def origins(self) -> list[tuple[int, int]]:
        """Tile origins (top, left) in image pixels, one per input; empty for "resize"."""
        return self.grid.origins if self.grid is not None else []


def make_plan(image: np.ndarray, policy: InputPolicy, size: tuple[int, int] | None = None) -> Plan:
    """Turn an (H, W, C) or (H, W) uint8 image into all of its model inputs according to ``policy``.

    "resize": one input of ``size`` x ``size``. "tile": tiles of ``size`` x ``size`` at native scale
    (``TileGrid``), all of one shape so that they batch together.
    ``size``: (height, width) the mask must have when ``image`` is a reduced copy (resize policies only).
    """
    h, w = size or image.shape[:2]
    mean, std = statistics(policy)
    if policy.sizing == "resize":
        x = normalize(resize_input(image, policy)[None], mean, std)
        return Plan(inputs=x, height=h, width=w, sizing="resize", grid=None)
    if (h, w) != image.shape[:2]:
        raise ValueError("tiled inference needs the image at its full size")
    hwc = as_hwc(image, policy)
    grid = TileGrid(h, w, policy)
    tiles, valid = zip(*(grid.cut(hwc, i) for i in range(len(grid))), strict=True)
    return Plan(
        inputs=normalize(torch.stack(tiles), mean, std, list(valid)), height=h, width=w, sizing="tile", grid=grid
    )


def _blend(plan: Plan, logits: torch.Tensor) -> Blender:
    assert plan.grid is not None
    blender = Blender(plan.grid, int(logits.shape[1]))
    for index, tile in enumerate(logits):
        blender.add(index, tile.cpu())
    return blender


def finish(plan: Plan, logits: torch.Tensor) -> np.ndarray:
    """(N, K, h, w) logits for ``plan.inputs`` -> (H, W) uint8 class ids at the image's size."""
    if plan.sizing == "resize":
        return resize_argmax(logits[0].cpu(), plan.height, plan.width).numpy()
    return _blend(plan, logits).mask().numpy()


def blended_logits(plan: Plan, logits: torch.Tensor) -> torch.Tensor:
    """(K, H, W) float32 logits at the image's size: resized or Gaussian-blended across tiles."""
    if plan.sizing == "resize":
        return resize_logits(logits[0].cpu(), plan.height, plan.width)
    return _blend(plan, logits).logits()
