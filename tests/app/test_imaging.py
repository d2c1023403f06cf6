from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.errors import ImageTooLarge, InvalidImage
from app.imaging import decode, encode_mask_png, mask_summary, rle_decode, rle_encode
from model.bundle import InputPolicy
from model.inference import make_plan, resize_argmax


def jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(arr).save(buf, format="JPEG", quality=92, exif=exif)
    return buf.getvalue()


def test_reduced_jpeg_decode_keeps_the_full_size() -> None:
    full = decode(jpeg(1000, 600), 10**8)
    small = decode(jpeg(1000, 600), 10**8, reduce_to=224)
    assert (full.width, full.height) == (small.width, small.height) == (1000, 600)
    assert not full.reduced and small.reduced
    h, w = small.rgb.shape[:2]
    assert min(h, w) >= 224 and w < 1000  # decoded at 1/2, never below the requested side


def test_reduced_decode_with_exif_rotation_swaps_the_size() -> None:
    d = decode(jpeg(800, 300, orientation=6), 10**8, reduce_to=100)
    assert (d.width, d.height) == (300, 800)
    assert d.rgb.shape[0] > d.rgb.shape[1]  # the pixels are rotated too


def test_reduced_input_gives_nearly_the_same_plan() -> None:
    p = InputPolicy(3, (0.5,) * 3, (0.25,) * 3, "resize", 64)
    full = decode(jpeg(640, 480), 10**8)
    small = decode(jpeg(640, 480), 10**8, reduce_to=64)
    a = make_plan(full.rgb, p)
    b = make_plan(small.rgb, p, (small.height, small.width))
    assert (a.height, a.width) == (b.height, b.width) == (480, 640)
    assert float((a.inputs - b.inputs).abs().mean()) < 0.05  # in normalised units (std 0.25)


def test_other_formats_ignore_reduce() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 20, 30)).save(buf, format="PNG")
    d = decode(buf.getvalue(), 10**8, reduce_to=50)
    assert d.rgb.shape == (200, 300, 3) and not d.reduced


def test_binary_argmax_shortcut_equals_the_full_argmax() -> None:
    logits = torch.randn(2, 13, 17)
    fast = resize_argmax(logits, 101, 77).numpy()
    up = torch.nn.functional.interpolate(logits[None], size=(101, 77), mode="bilinear", align_corners=False)[0]
    assert (fast == up.argmax(0).numpy()).mean() > 0.999


def test_limits_and_garbage() -> None:
    with pytest.raises(InvalidImage, match="empty"):
        decode(b"", 100)
    with pytest.raises(ImageTooLarge, match="pixels"):
        decode(jpeg(100, 100), 9999)
    with pytest.raises(InvalidImage, match="truncated"):
        decode(jpeg(100, 100)[:300], 10**8)


def test_mask_png_is_palette_with_class_ids() -> None:
    mask = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    im = Image.open(io.BytesIO(encode_mask_png(mask, [(0, 0, 0), (255, 0, 0), (0, 0, 255)])))
    assert im.mode == "P" and np.array_equal(np.asarray(im), mask)
    assert im.getpalette()[:9] == [0, 0, 0, 255, 0, 0, 0, 0, 255]  # type: ignore[index]


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trip_is_column_major_and_starts_with_zeros(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = rng.random((7, 5)) > 0.6
    rle = rle_encode(m)
    assert np.array_equal(rle_decode(rle), m)
    assert sum(rle["counts"]) == 35
    if m[0, 0]:
        assert rle["counts"][0] == 0
    assert rle_encode(np.array([[1, 0], [1, 1]]))["counts"] == [0, 2, 1, 1]


def test_summary_areas_and_boxes() -> None:
    mask = np.zeros((10, 20), np.uint8)
    mask[2:5, 3:9] = 1
    s = mask_summary(mask, [(0, "bg"), (1, "fg"), (2, "none")])
    assert s[1]["pixels"] == 18 and s[1]["bbox"] == [3, 2, 6, 3]
    assert s[1]["fraction"] == pytest.approx(18 / 200)
    assert s[2]["pixels"] == 0 and s[2]["bbox"] is None
