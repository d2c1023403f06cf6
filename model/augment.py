"""Augmentation on the model's device, for whole batches at once (a GPU must not wait on the CPU).

Geometry is applied to the image and the mask together (nearest for masks); color only to the image.
All randomness comes from one ``torch.Generator`` so that a resumed run draws the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = 255  # mask value excluded from the loss (padding outside small images)


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True
    rot90: bool = True
    scale: tuple[float, float] = (0.75, 1.25)
    rotate_deg: float = 15.0
    # Shear of the x axis along y, within +- degrees (0 = off; drawn only when on, so recipes without it
    # keep their random draws).
    shear_deg: float = 0.0
    brightness: float = 0.2  # +- fraction
    contrast: float = 0.2  # +- fraction
    hue_deg: float = 10.0  # +- degrees, RGB only
    saturation: float = 0.0  # +- fraction of the chroma, RGB only (0 = off, drawn only when on)
    # Elastic deformation as in the U-Net paper: random displacements on a coarse grid of control points
    # (standard deviation in pixels of the crop), interpolated bicubically to every pixel. 0 = off.
    elastic_px: float = 0.0
    elastic_grid: int = 3
    # Probability, per axis, that a tile-sizing crop is placed against the image border (either side, evenly)
    # instead of uniformly. Uniform origins cover a pixel d < size from the border in only (d + 1) of the
    # (L - size + 1) possible crops, so the image's outer frame is rarely trained on. 0 = uniform.
    border_crops: float = 0.0


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def _origin(span: int, border: float, gen: torch.Generator, device: torch.device) -> int:
    """A crop origin in [0, span]: with probability ``border`` 0 or ``span`` (evenly), else uniform.

    The draws are part of every training recipe's reproducibility: ``border == 0`` draws one integer (as
    before the option existed), otherwise a coin and an integer, the integer even when the coin picks a
    border, so that a seed's crops stay what the shipped bundles were trained on.
    """
    if not border:
        return int(torch.randint(0, span + 1, (1,), generator=gen, device=device).item())
    u = float(torch.rand(1, generator=gen, device=device).item())
    pick = int(torch.randint(0, span + 1, (1,), generator=gen, device=device).item())
    if u < border:
        return 0 if u < border / 2 else span
    return pick


def random_crops(
    images: list[torch.Tensor], masks: list[torch.Tensor], size: int, gen: torch.Generator, border: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop ``size`` x ``size`` at native scale from each (C, H, W) image and (H, W) mask.

    Smaller images are padded (image with 0, mask with IGNORE). ``border``: see
    ``AugmentConfig.border_crops``. Returns (B, C, S, S) and (B, S, S).
    """
    device = images[0].device
    out_x, out_y = [], []
    for img, msk in zip(images, masks, strict=True):
        h, w = msk.shape
        ph, pw = max(0, size - h), max(0, size - w)
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph))
            msk = F.pad(msk, (0, pw, 0, ph), value=IGNORE)
            h, w = msk.shape
        top = _origin(h - size, border, gen, device)
        left = _origin(w - size, border, gen, device)
        out_x.append(img[:, top : top + size, left : left + size])
        out_y.append(msk[top : top + size, left : left + size])
    return torch.stack(out_x), torch.stack(out_y)


def augment(
    x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random geometry and color for a batch.

    x: (B, C, H, W) float in [0, 1]; y: (B, H, W) int64 class ids (IGNORE allowed).
    Returns tensors of the same shapes; x stays in [0, 1].
    """
    b, c, h, w = x.shape
    dev = x.device
    if cfg.flip:
        fh = torch.rand(b, generator=gen, device=dev) < 0.5
        fv = torch.rand(b, generator=gen, device=dev) < 0.5
        x = torch.where(fh[:, None, None, None], x.flip(-1), x)
        y = torch.where(fh[:, None, None], y.flip(-1), y)
        x = torch.where(fv[:, None, None, None], x.flip(-2), x)
        y = torch.where(fv[:, None, None], y.flip(-2), y)
    if cfg.rot90 and h == w:
        k = torch.randint(0, 4, (b,), generator=gen, device=dev)
        xs, ys = [x], [y]
        for r in (1, 2, 3):
            xs.append(torch.rot90(x, r, (-2, -1)))
            ys.append(torch.rot90(y, r, (-2, -1)))
        x = torch.stack(xs)[k, torch.arange(b, device=dev)]
        y = torch.stack(ys)[k, torch.arange(b, device=dev)]
    if cfg.scale != (1.0, 1.0) or cfg.rotate_deg > 0 or cfg.elastic_px > 0 or cfg.shear_deg > 0:
        s = _uniform(b, cfg.scale[0], cfg.scale[1], gen, dev)
        a = _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, gen, dev) * (math.pi / 180)
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros_like(s)], 1), torch.stack([sin, cos, torch.zeros_like(s)], 1)], 1
        )  # (B, 2, 3): output -> input sampling; s > 1 zooms in
        if cfg.shear_deg > 0:
            k = torch.tan(_uniform(b, -cfg.shear_deg, cfg.shear_deg, gen, dev) * (math.pi / 180))
            shear = torch.eye(2, device=dev).repeat(b, 1, 1)
            shear[:, 0, 1] = k  # x_in = x + k * y
            theta = torch.cat([theta[:, :, :2] @ shear, theta[:, :, 2:]], 2)
        grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
        if cfg.elastic_px > 0:
            grid = grid + elastic_field(b, h, w, cfg.elastic_px, cfg.elastic_grid, gen, dev)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        yf = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="reflection", align_corners=False)
        y = yf[:, 0].round().long()
    if cfg.brightness > 0:
        x = x * _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, gen, dev)[:, None, None, None]
    if cfg.contrast > 0:
        f = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen, dev)[:, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * f + mean
    if cfg.hue_deg > 0 and c == 3:
        x = rotate_hue(x, _uniform(b, -cfg.hue_deg, cfg.hue_deg, gen, dev) * (math.pi / 180))
    if cfg.saturation > 0 and c == 3:
        f = _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, gen, dev)[:, None, None, None]
        gray = (x * _LUMA.to(x.device, x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = gray + (x - gray) * f
    return x.clamp_(0, 1), y


def elastic_field(
    b: int, h: int, w: int, std_px: float, points: int, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Smooth random displacements (B, H, W, 2) in grid_sample's normalised coordinates.

    Each of ``points`` x ``points`` control points moves by N(0, std_px) pixels along x and y; bicubic
    interpolation spreads the moves over the image, so neighbouring pixels move together.
    """
    d = torch.randn(b, 2, points, points, generator=gen, device=device) * std_px
    d = F.interpolate(d, size=(h, w), mode="bicubic", align_corners=True)
    scale = torch.tensor([2.0 / w, 2.0 / h], device=device)  # pixels -> normalised units (x, y)
    return d.permute(0, 2, 3, 1) * scale


_LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601, the Y row below

# RGB <-> YIQ: hue is the angle in the IQ plane, so a hue shift is a rotation there.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """x: (B, 3, H, W) RGB; angle: (B,) radians. Luma is kept, chroma rotated."""
    fwd = _RGB2YIQ.to(x.device, x.dtype)
    inv = torch.linalg.inv(fwd)
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack(
        [torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1), torch.stack([zero, sin, cos], 1)], 1
    )  # (B, 3, 3)
    m = inv @ rot @ fwd  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)
