from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.augment import IGNORE, AugmentConfig, augment, elastic_field, random_crops, rotate_hue


def _blobs(b: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(b, 3, 8, 8, generator=g), size=(size, size), mode="bilinear")
    return x, (x[:, 0] > 0.5).long()


def test_geometry_moves_image_and_mask_together() -> None:
    x, y = _blobs()
    cfg = AugmentConfig(brightness=0, contrast=0, hue_deg=0)
    xa, ya = augment(x, y, cfg, torch.Generator().manual_seed(1))
    assert xa.shape == x.shape and ya.shape == y.shape
    assert not torch.equal(ya, y)  # something moved
    agree = ((xa[:, 0] > 0.5).long() == ya).float().mean()
    assert agree > 0.95  # disagreement only where bilinear and nearest differ at edges


def test_masks_keep_their_labels_and_images_their_range() -> None:
    x, y = _blobs()
    y[:, :4] = 2
    xa, ya = augment(x, y, AugmentConfig(), torch.Generator().manual_seed(2))
    assert set(ya.unique().tolist()) <= {0, 1, 2}
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1


def test_same_seed_same_augmentation() -> None:
    x, y = _blobs()
    a = augment(x, y, AugmentConfig(), torch.Generator().manual_seed(5))
    b = augment(x, y, AugmentConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_hue_rotation_keeps_gray_and_full_turn_is_identity() -> None:
    gray = torch.full((1, 3, 2, 2), 0.4)
    assert torch.allclose(rotate_hue(gray, torch.tensor([0.7])), gray, atol=1e-5)
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(rotate_hue(x, torch.tensor([2 * torch.pi, 0.0])), x, atol=1e-5)


def test_crops_pad_small_images_with_ignore() -> None:
    imgs = [torch.ones(3, 10, 50, dtype=torch.uint8), torch.ones(3, 80, 90, dtype=torch.uint8)]
    masks = [torch.ones(10, 50, dtype=torch.uint8), torch.ones(80, 90, dtype=torch.uint8)]
    x, y = random_crops(imgs, masks, 32, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and y.shape == (2, 32, 32)
    assert (y[0] == IGNORE).sum() == 32 * 22
    assert (y[1] == 1).all()


def _corner_share(border: float, draws: int = 400) -> float:
    """How often a 16x16 crop of a 64x48 image holds the image's top-left pixel."""
    h, w = 64, 48
    img = torch.arange(h * w, dtype=torch.int32).reshape(1, h, w)
    gen = torch.Generator().manual_seed(1)
    hits = 0
    for _ in range(draws):
        x, _y = random_crops([img], [torch.zeros(h, w, dtype=torch.uint8)], 16, gen, border)
        hits += int((x == 0).any())
    return hits / draws


def test_border_crops_train_the_image_border() -> None:
    # Uniform origins hold the corner pixel in 1 of 49 x 33 crops; border 0.5 per axis in 1 of 16.
    assert _corner_share(0.0) < 0.01
    assert 0.04 < _corner_share(0.5) < 0.09
    assert 0.2 < _corner_share(1.0) < 0.3  # every crop in a corner
    # The default (0) draws the origins as before (two uniform integers), so a seed's crops do not change.
    img, msk = torch.rand(1, 40, 40), torch.zeros(40, 40, dtype=torch.uint8)
    x, _ = random_crops([img], [msk], 16, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    top, left = (int(torch.randint(0, 25, (1,), generator=gen).item()) for _ in range(2))
    assert torch.equal(x[0], img[:, top : top + 16, left : left + 16])


def test_elastic_field_moves_by_the_asked_pixels_and_smoothly() -> None:
    d = elastic_field(64, 128, 96, 10.0, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert d.shape == (64, 128, 96, 2)
    px = d * torch.tensor([96 / 2, 128 / 2])  # back to pixels
    corners = px[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # control points sit at the corners
    assert 8.5 < float(corners.std()) < 11.5
    step = (px[:, :, 1:] - px[:, :, :-1]).abs().max()
    assert float(step) < 2.0  # neighbours move together: no tearing


def test_elastic_deformation_moves_image_and_mask_together() -> None:
    x, y = _blobs()
    cfg = AugmentConfig(
        flip=False, rot90=False, scale=(1.0, 1.0), rotate_deg=0, brightness=0, contrast=0, hue_deg=0, elastic_px=4.0
    )
    xa, ya = augment(x, y, cfg, torch.Generator().manual_seed(3))
    assert not torch.equal(ya, y)
    assert ((xa[:, 0] > 0.5).long() == ya).float().mean() > 0.95
    off = AugmentConfig(flip=False, rot90=False, scale=(1.0, 1.0), rotate_deg=0, brightness=0, contrast=0, hue_deg=0)
    assert torch.equal(augment(x, y, off, torch.Generator().manual_seed(3))[1], y)  # identity when all off


_GEOMETRY_ONLY = dict(
    flip=False, rot90=False, scale=(1.0, 1.0), rotate_deg=0.0, brightness=0.0, contrast=0.0, hue_deg=0.0
)


def test_shear_slants_a_vertical_bar_in_image_and_mask_alike() -> None:
    x = torch.zeros(8, 3, 64, 64)
    x[..., 28:36] = 1.0  # a vertical bar
    y = (x[:, 0] > 0.5).long()
    xa, ya = augment(x, y, AugmentConfig(**_GEOMETRY_ONLY, shear_deg=30.0), torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    cols = torch.arange(64, dtype=torch.float)

    def centre(rows: torch.Tensor) -> torch.Tensor:  # (B, R, W) mask rows -> (B,) mean column of the bar
        w = rows.float().sum(1)
        return (w * cols).sum(1) / w.sum(1)

    slant = centre(ya[:, 48:56]) - centre(ya[:, 8:16])  # bottom minus top
    assert float(slant.abs().min()) > 1.0  # every sample is slanted, by its own angle
    assert float(slant.abs().max()) < 40 * math.tan(math.radians(30)) + 1  # never beyond the range
    assert ((xa[:, 0] > 0.5).long() == ya).float().mean() > 0.98


def test_saturation_scales_chroma_and_keeps_luma_and_gray() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g) * 0.6 + 0.2
    y = torch.zeros(6, 16, 16, dtype=torch.long)
    cfg = AugmentConfig(**_GEOMETRY_ONLY, saturation=0.5)  # type: ignore[arg-type]
    xa, _ = augment(x, y, cfg, torch.Generator().manual_seed(1))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((xa * luma).sum(1), (x * luma).sum(1), atol=1e-5)
    chroma = lambda t: (t - (t * luma).sum(1, keepdim=True)).abs().mean((1, 2, 3))  # noqa: E731
    ratio = chroma(xa) / chroma(x)
    assert float(ratio.min()) >= 0.5 - 1e-4 and float(ratio.max()) <= 1.5 + 1e-4
    assert float(ratio.max() - ratio.min()) > 0.1  # a factor per sample
    gray = x[:, :1].repeat(1, 3, 1, 1)
    assert torch.allclose(augment(gray, y, cfg, torch.Generator().manual_seed(1))[0], gray, atol=1e-5)
