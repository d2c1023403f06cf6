"""Slides read by region (tiled, striped, one huge strip; 8/16-bit, gray, RGB, RGBA; levels and their
microns per pixel) and pyramids written tile by tile, against whole-array reads and slicing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile

from app.errors import InvalidImage
from app.jobs.slide import Slide, is_tiff, palette, pyramid_shapes, to_model_input, write_pyramid
from tests.slides import write_slide

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (300, 410, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "layout",
    [
        {"tile": (64, 64), "compression": "zlib"},
        {"tile": (32, 48), "compression": "lzw"},
        {"rowsperstrip": 7, "compression": "zlib"},
        {"rowsperstrip": 300},  # one uncompressed strip: read row by row
        {"tile": (64, 64), "compression": "zstd"},
    ],
)
def test_regions_read_lazily_match_the_whole_image(tmp_path: Path, layout: dict[str, object]) -> None:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, RGB, photometric="rgb", **layout)  # type: ignore[arg-type]
    with Slide(path) as s:
        assert [(lv.width, lv.height) for lv in s.levels] == [(410, 300)]
        for y, x, h, w in [(0, 0, 300, 410), (5, 3, 100, 50), (250, 400, 50, 10), (63, 63, 2, 2)]:
            assert np.array_equal(s.read(0, y, x, h, w), RGB[y : y + h, x : x + w])
        with pytest.raises(ValueError, match="outside"):
            s.read(0, 299, 0, 2, 1)


def test_levels_and_their_microns_per_pixel(tmp_path: Path) -> None:
    path = tmp_path / "p.tif"
    write_slide(path, RGB, levels=3, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with Slide(path) as s:
        assert [(lv.width, lv.height) for lv in s.levels] == [(410, 300), (205, 150), (103, 75)]
        assert [lv.mpp for lv in s.levels] == pytest.approx([0.25, 0.5, 0.25 * 410 / 103])  # by the widths
        assert np.array_equal(s.read(1, 10, 20, 30, 40), RGB[::2, ::2][10:40, 20:60])
        assert s.pick_level(mpp=0.6).index == 1 and s.pick_level(mpp=5).index == 2
        assert s.pick_level(level=9).index == 2 and s.pick_level().index == 0
        assert s.pick_level(mpp=0.6, level=0).index == 0  # the request's level wins
    plain = tmp_path / "plain.tif"
    write_slide(plain, RGB, levels=2)
    with Slide(plain) as s:  # no resolution: the fallback
        assert s.levels[0].mpp is None and s.pick_level(mpp=0.5, fallback=1).index == 1


@pytest.mark.parametrize(("size", "mpp"), [(0.25, [0.25, 0.5]), (-0.5, [None, None]), (0.0, [None, None])])
def test_an_ome_size_that_is_not_a_length_is_unknown(tmp_path: Path, size: float, mpp: list[float | None]) -> None:
    path = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        opts = {"tile": (64, 64), "photometric": "rgb"}
        tw.write(RGB, subifds=1, metadata={"PhysicalSizeX": size, "PhysicalSizeY": size}, **opts)  # type: ignore[arg-type]
        tw.write(RGB[::2, ::2], subfiletype=1, **opts)  # type: ignore[arg-type]
    with Slide(path) as s:
        assert [lv.mpp for lv in s.levels] == mpp
        assert s.pick_level(mpp=0.5, fallback=0).index == (1 if size > 0 else 0)


def test_samples_become_the_models_uint8_channels(tmp_path: Path) -> None:
    wide = RGB[:, :, 0].astype(np.uint16) * 16  # 12-bit data in 16 bits
    path = tmp_path / "g16.tif"
    write_slide(path, wide[:, :, None], levels=2)
    with Slide(path) as s:
        assert s.scale(0) == float(wide[::2, ::2].max())  # the coarsest level's maximum
        x = to_model_input(s.read(0, 0, 0, 300, 410), 3, s.scale(0))
        assert x.shape == (300, 410, 3) and x.dtype == np.uint8
        assert abs(int(x[..., 0].max()) - 255) <= 1 and np.array_equal(x[..., 0], x[..., 2])
    rgba = np.dstack([RGB, np.full((300, 410), 128, np.uint8)])
    out = to_model_input(rgba, 3, 255.0)
    assert np.array_equal(out, (RGB.astype(np.uint16) * 128 // 255).astype(np.uint8))
    assert to_model_input(RGB, 1, 255.0).shape == (300, 410, 1)


def test_what_is_not_a_slide_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(InvalidImage):
        Slide(bad)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, RNG.integers(0, 255, (3, 40, 40, 3), dtype=np.uint8), photometric="rgb")
    with pytest.raises(InvalidImage, match="one image plane"):
        Slide(stack)
    assert is_tiff(b"II*\x00....") and is_tiff(b"II+\x00") and not is_tiff(b"\x89PNG")


@pytest.mark.parametrize(("height", "width"), [(700, 900), (1, 1), (257, 1000), (2000, 300)])
def test_pyramids_are_written_tile_by_tile(tmp_path: Path, height: int, width: int) -> None:
    ids = RNG.integers(0, 2**32 - 1, (height, width), dtype=np.uint32)
    asked: list[int] = []

    def band(y: int) -> np.ndarray:
        asked.append(y)
        return ids[y : y + 256]

    buf = io.BytesIO()
    write_pyramid(buf, height, width, np.dtype(np.uint32), band, scratch=tmp_path)
    assert asked == list(range(0, height, 256))  # each band once
    assert not list(tmp_path.iterdir())  # the reduced levels' temporary files are gone
    with tifffile.TiffFile(io.BytesIO(buf.getvalue())) as tif:
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == pyramid_shapes(height, width)
        assert tif.pages[0].is_tiled and tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        for k, lv in enumerate(levels):
            assert np.array_equal(lv.asarray(), ids[:: 2**k, :: 2**k])


def test_a_class_pyramid_has_the_palette(tmp_path: Path) -> None:
    mask = RNG.integers(0, 3, (300, 300), dtype=np.uint8)
    path = tmp_path / "m.tif"
    write_pyramid(path, 300, 300, np.dtype(np.uint8), lambda y: mask[y : y + 256], palette([(0, 0, 0), (255, 0, 0)]))
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
        assert page.colormap is not None and page.colormap[:, 1].tolist() == [65535, 0, 0]
        assert np.array_equal(tif.series[0].levels[0].asarray(), mask)
