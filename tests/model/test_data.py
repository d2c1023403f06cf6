from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data import MaskSpec, find_pairs, load_sample, pil_to_array, split


def test_mask_specs_parse_and_decode() -> None:
    gray = Image.fromarray(np.array([[0, 100, 128, 255]], dtype=np.uint8))
    assert MaskSpec.parse("binary").decode(gray).tolist() == [[0, 0, 1, 1]]
    assert MaskSpec.parse("binary:99").decode(gray).tolist() == [[0, 1, 1, 1]]
    assert MaskSpec.parse("binary-inverted").decode(gray).tolist() == [[1, 1, 0, 0]]
    idx = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8))
    assert MaskSpec.parse("index").decode(idx).tolist() == [[0, 1, 2]]
    rgb = Image.fromarray(np.array([[[0, 0, 0], [255, 0, 0], [0, 255, 0]]], dtype=np.uint8))
    spec = MaskSpec.parse("palette:000000,#ff0000,00ff00")
    assert spec.num_classes == 3
    assert spec.decode(rgb).tolist() == [[0, 1, 2]]
    assert str(spec) == "palette:000000,ff0000,00ff00"
    with pytest.raises(ValueError, match="not in the palette"):
        MaskSpec.parse("palette:000000,ff0000").decode(rgb)
    for bad in ("binary:x", "binary:300", "palette:12", "index:3", "rgb"):
        with pytest.raises(ValueError):
            MaskSpec.parse(bad)


def test_noisy_jpeg_masks_binarise_cleanly(tmp_path: Path) -> None:
    truth = np.zeros((64, 64), np.uint8)
    truth[16:48, 10:40] = 255
    Image.fromarray(truth).save(tmp_path / "m.jpg", quality=60)
    decoded = MaskSpec.parse("binary").decode(Image.open(tmp_path / "m.jpg"))
    assert (decoded == (truth > 127)).mean() > 0.995


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_every_mode_converts(mode: str) -> None:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(
        mode if mode not in ("I;16", "I", "F") else "L"
    )
    if mode in ("I;16", "I", "F"):
        im = Image.fromarray(
            (np.asarray(im).astype(np.float32) * 257).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
        )
    rgb = pil_to_array(im, 3)
    gray = pil_to_array(im, 1)
    assert rgb.shape == (9, 7, 3) and rgb.dtype == np.uint8
    assert gray.shape == (9, 7) and gray.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    im = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert pil_to_array(im, 1).tolist() == [[0, 128, 255]]


def test_palette_transparency_composites_over_black() -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 255, 255, 10, 20, 30] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    assert pil_to_array(im, 3).tolist() == [[[0, 0, 0], [10, 20, 30]]]


def test_pairs_split_and_samples(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(10):
        Image.new("RGB", (8, 6), (i, i, i)).save(tmp_path / "images" / f"s{i}.jpg")
        Image.new("L", (8, 6), 255 * (i % 2)).save(tmp_path / "masks" / f"s{i}.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "images" / "lonely.png")
    pairs = find_pairs(tmp_path)
    assert [p[0].stem for p in pairs] == [f"s{i}" for i in range(10)]
    train, val = split(len(pairs), 0.2, seed=3)
    assert sorted(train + val) == list(range(10)) and len(val) == 2
    assert split(len(pairs), 0.2, seed=3) == (train, val)
    assert split(len(pairs), 0.2, seed=4) != (train, val)
    s = load_sample(*pairs[1], MaskSpec.parse("binary"), 3)
    assert s.image.shape == (6, 8, 3) and s.mask.max() == 1
    with pytest.raises(FileNotFoundError):
        find_pairs(tmp_path / "images")
