from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data import MaskSpec, find_pairs, instance_targets, load_sample, pil_to_array, split
from tests.helpers import DATASETS
from tests.model.synthetic import write_touching_discs


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


def test_instance_specs_parse() -> None:
    plain, three = MaskSpec.parse("instances"), MaskSpec.parse("instances:boundary=2")
    assert (plain.num_classes, plain.folder, str(plain)) == (2, "instances", "instances")
    assert (three.num_classes, three.boundary, str(three)) == (3, 2, "instances:boundary=2")
    assert MaskSpec.parse(str(three)) == three
    assert MaskSpec.parse("binary").folder == "masks"
    for bad in ("instances:boundary=0", "instances:boundary=17", "instances:width=2", "instances:boundary=x"):
        with pytest.raises(ValueError, match="boundary=W"):
            MaskSpec.parse(bad)


def test_instance_targets_mark_the_pixels_next_to_another_id() -> None:
    ids = np.zeros((4, 8), dtype=np.int32)
    ids[1:, 0:4] = 1
    ids[1:, 4:8] = 2
    # Row 0 is background; ids 1 and 2 touch between columns 3 and 4; the image edge is no boundary.
    assert instance_targets(ids, 1).tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [2, 2, 2, 2, 2, 2, 2, 2],
        [1, 1, 1, 2, 2, 1, 1, 1],
        [1, 1, 1, 2, 2, 1, 1, 1],
    ]
    assert instance_targets(ids, 2)[3].tolist() == [1, 1, 2, 2, 2, 2, 1, 1]
    assert instance_targets(ids, 0).tolist() == (ids > 0).astype(np.uint8).tolist()
    # A bar 3 pixels thick loses every pixel to a 2-pixel boundary but keeps its middle row as interior.
    bar = np.zeros((7, 12), dtype=np.int32)
    bar[2:5, 1:11] = 1
    t = instance_targets(bar, 2)
    assert t[3, 3:9].tolist() == [1] * 6 and (t[2] != 1).all() and (t[4] != 1).all()
    assert set(np.unique(t[bar == 1]).tolist()) == {1, 2}


def test_sixteen_bit_instance_masks_load_with_their_ids(tmp_path: Path) -> None:
    root = write_touching_discs(tmp_path, n=2)
    pairs = find_pairs(root, "instances")
    assert [m.parent.name for _, m in pairs] == ["instances", "instances"]
    ids = np.zeros((5, 6), dtype=np.uint16)
    ids[1:4, 1:3], ids[1:4, 3:5] = 300, 7  # ids above 255 survive
    Image.fromarray(ids).save(pairs[0][1])
    Image.fromarray(np.zeros((5, 6, 3), dtype=np.uint8)).save(pairs[0][0])
    s = load_sample(*pairs[0], MaskSpec.parse("instances:boundary=1"), 3)
    assert s.instances is not None and s.instances.dtype == np.int32
    assert sorted(np.unique(s.instances).tolist()) == [0, 7, 300]
    assert s.mask.tolist() == instance_targets(s.instances, 1).tolist()
    # A binary mask with the instances read beside it (to score a binary model's components).
    b = load_sample(pairs[1][0], root / "masks" / "t01.png", MaskSpec.parse("binary"), 3, pairs[1][1])
    assert b.instances is not None and ((b.instances > 0) == (b.mask == 1)).all()
    assert load_sample(pairs[1][0], root / "masks" / "t01.png", MaskSpec.parse("binary"), 3).instances is None
    with pytest.raises(ValueError, match="single-channel"):
        MaskSpec.parse("instances").decode(Image.new("RGB", (2, 2)))
    with pytest.raises(FileNotFoundError, match="instances/"):
        find_pairs(tmp_path / "images", "instances")


@pytest.mark.data
def test_dsb2018_instances_match_the_binary_masks() -> None:
    root = DATASETS / "dsb2018_nuclei"
    if not (root / "instances").is_dir():
        pytest.skip(f"no DSB2018 instances/ under {DATASETS} (set UNETSEG_DATASETS)")
    pairs = find_pairs(root, "instances")
    assert [i.stem for i, _ in pairs] == [i.stem for i, _ in find_pairs(root)]  # so the splits agree
    for image_path, ids_path in pairs[:: len(pairs) // 5]:
        s = load_sample(image_path, ids_path, MaskSpec.parse("instances:boundary=2"), 3)
        binary = load_sample(image_path, root / "masks" / ids_path.name, MaskSpec.parse("binary"), 3).mask
        assert s.instances is not None and s.instances.max() > 0
        assert ((s.mask > 0) == (binary == 1)).all()
        assert (s.mask == 2).any() and (s.mask == 1).any()
