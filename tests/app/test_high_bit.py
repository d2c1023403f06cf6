"""16-bit, 12-bit and float images are scaled by their range: they decode, and segment, like their 8-bit copies."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.imaging import decode

LIMIT = 10**8


def png(arr: np.ndarray) -> bytes:
    """uint16 -> a 16-bit gray PNG (I;16), uint8 -> 8-bit gray."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def tiff(arr: np.ndarray) -> bytes:
    """uint16 -> a 16-bit gray TIFF, float32 -> a float one (F)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    return buf.getvalue()


def data_of(bits: int, shape: tuple[int, int] = (48, 64), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(values of ``bits`` bits spanning 0..2**bits - 1 as uint16, their 8-bit copy as uint8)."""
    top = 2**bits - 1
    rng = np.random.default_rng(seed)
    values = rng.integers(0, top + 1, shape).astype(np.uint16)
    values.flat[0], values.flat[1] = 0, top  # the full range, as a detector's output would span
    copy = np.rint(values.astype(np.float64) * 255 / top).astype(np.uint8)
    return values, copy


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_integer_images_decode_like_their_8_bit_copy(bits: int) -> None:
    values, copy = data_of(bits)
    want = np.repeat(copy[..., None], 3, axis=2)
    for data in (png(values), tiff(values)):
        got = decode(data, LIMIT).rgb
        assert np.array_equal(got, want)


def test_no_jump_at_256() -> None:
    flat = np.full((16, 16), 255, np.uint16)
    bumped = flat.copy()
    bumped[0, 0] = 256
    a = decode(png(flat), LIMIT).rgb.astype(np.float64)
    b = decode(png(bumped), LIMIT).rgb.astype(np.float64)
    assert a.mean() == 255
    assert abs(a.mean() - b.mean()) <= 1  # one brighter pixel nudges the scale, it does not darken the image


def test_float_images_in_0_1_are_scaled_by_255_and_others_by_their_range() -> None:
    values, copy = data_of(8)
    unit = (values.astype(np.float32) / 255).astype(np.float32)
    assert np.array_equal(decode(tiff(unit), LIMIT).rgb[..., 0], copy)
    shifted = (values.astype(np.float32) * 10 - 1000).astype(np.float32)  # -1000 .. 1550
    got = decode(tiff(shifted), LIMIT).rgb[..., 0]
    assert got.min() == 0 and got.max() == 255
    assert np.array_equal(np.argsort(got.ravel(), kind="stable"), np.argsort(copy.ravel(), kind="stable"))


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_high_bit_images_get_the_mask_of_their_8_bit_copy(client: TestClient, bits: int) -> None:
    values, copy = data_of(bits, (70, 90), seed=bits)
    masks = []
    for data in (png(values), png(copy)):
        r = client.post("/v1/predict?model=tiles", files={"file": ("a.png", data, "image/png")})
        assert r.status_code == 200, r.text
        masks.append(np.asarray(Image.open(io.BytesIO(r.content))))
    assert np.array_equal(masks[0], masks[1])
