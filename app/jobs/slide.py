"""Whole-slide images in and out: a TIFF read lazily by region at one pyramid level, and pyramidal TIFFs of
class or instance ids written tile by tile.

Reading goes through ``tifffile``'s parser and codecs (``imagecodecs`` for JPEG, JPEG 2000 and the rest),
but never ``asarray`` on a page: ``Slide.read`` decodes only the tiles (or strips) a region touches,
straight from their byte offsets, so a 100k x 100k slide costs what its regions cost. Any TIFF or BigTIFF
with one image plane (grayscale, RGB or RGBA, any integer or float sample type) is read: generic pyramids,
OME-TIFF (SubIFDs) and Aperio SVS (levels as pages) alike; a single plain image is a one-level slide.
"""

from __future__ import annotations

import math
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import tifffile

from app.errors import ImageTooLarge, InvalidImage

TILE = 256  # the side of the output TIFFs' tiles, and the height of the bands they are written from
# A segment (tile or strip) that would decode to more than this is refused: the file must be tiled or striped.
MAX_SEGMENT_BYTES = 256 * 1024 * 1024
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_tiff(head: bytes) -> bool:
    """Whether the first bytes of a file are a TIFF's or a BigTIFF's."""
    return head[:4] in TIFF_MAGIC


@dataclass(frozen=True)
class Level:
    index: int
    width: int
    height: int
    mpp: float | None  # microns per pixel, when the file says


def _length(text: str, scale: float = 1.0) -> float | None:
    """``text`` (a number) times ``scale``, when that is a length: finite and over 0; else None (unknown)."""
    try:
        value = float(text) * scale
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _base_mpp(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> float | None:
    """Microns per pixel of the full-resolution level: OME's PhysicalSizeX, SVS's ``MPP =``, else the TIFF
    resolution when its unit is a length (centimetre or inch) and the value is microscopic. None (unknown)
    when the file does not say, or says something that is not a length (0, negative)."""
    if tif.is_ome and tif.ome_metadata:
        found = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm")
        if found and scale:
            return _length(found.group(1), scale)
    if tif.is_svs:
        found = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
        if found:
            return _length(found.group(1))
    tags = page.tags
    res, unit_tag = tags.get("XResolution"), tags.get("ResolutionUnit")
    if res is not None and unit_tag is not None:
        num, den = res.value
        per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit_tag.value))
        if per_unit and num:
            mpp = per_unit * den / num
            return mpp if 0 < mpp < 100 else None
    return None


def _dtype(page: tifffile.TiffPage) -> np.dtype[Any]:
    if page.dtype is None:
        raise InvalidImage(f"unsupported TIFF samples ({page.bitspersample}-bit, format {page.sampleformat})")
    return page.dtype


class Slide:
    """A TIFF's first image series, read by region at any of its levels. Thread-safe (reads take a lock)."""

    def __init__(self, path: Path) -> None:
        """Open the file and read its levels; ``InvalidImage`` (415) for anything that is not a slide read here,
        damaged files included (tifffile's parser fails on them in many ways: struct errors, divisions by zero)."""
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file can make the parser raise almost anything
            raise InvalidImage(f"not a readable TIFF: {type(exc).__name__}: {exc}") from None
        try:
            series = self._tif.series[0]
            self._pages: list[tifffile.TiffPage] = []
            levels: list[Level] = []
            base: float | None = None
            base_width = 1
            for i, level in enumerate(series.levels):
                page = level.keyframe
                if not isinstance(page, tifffile.TiffPage):
                    page = level.pages[0]
                assert isinstance(page, tifffile.TiffPage)
                if int(np.prod(level.shape)) != page.imagelength * page.imagewidth * page.samplesperpixel:
                    raise InvalidImage(f"a slide must have one image plane; this one's shape is {level.shape}")
                if page.planarconfig == 2 and page.samplesperpixel > 1:
                    raise InvalidImage("planar-separate TIFFs are not read (store samples contiguously)")
                if page.samplesperpixel not in (1, 3, 4) or page.imagedepth != 1:
                    raise InvalidImage(f"a slide must be grayscale, RGB or RGBA, not {page.samplesperpixel} samples")
                if i == 0:
                    base, base_width = _base_mpp(self._tif, page), page.imagewidth
                mpp = base * base_width / page.imagewidth if base else None
                levels.append(Level(i, page.imagewidth, page.imagelength, mpp))
                self._pages.append(page)
        except InvalidImage:
            self._tif.close()
            raise
        except Exception as exc:  # noqa: BLE001 - as above
            self._tif.close()
            raise InvalidImage(f"not a readable TIFF: {type(exc).__name__}: {exc}") from None
        self.levels = levels
        self._lock = threading.Lock()
        self._scale: dict[int, float] = {}

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pick_level(self, level: int | None = None, mpp: float | None = None, fallback: int | None = None) -> Level:
        """``level`` when given (clamped to the coarsest); else the level nearest ``mpp`` microns per pixel
        when the file records its resolution; else ``fallback`` (clamped); else full resolution."""
        last = len(self.levels) - 1
        if level is not None:
            return self.levels[min(max(level, 0), last)]
        if mpp is not None and all(lv.mpp for lv in self.levels):
            return min(self.levels, key=lambda lv: abs(math.log((lv.mpp or mpp) / mpp)))
        if fallback is not None:
            return self.levels[min(max(fallback, 0), last)]
        return self.levels[0]

    def _segment_grid(self, page: tifffile.TiffPage) -> tuple[int, int, int]:
        """(segment height, segment width, segments across) of a tiled or striped page."""
        if page.is_tiled:
            return page.tilelength, page.tilewidth, math.ceil(page.imagewidth / page.tilewidth)
        rows = page.rowsperstrip or page.imagelength
        return min(rows, page.imagelength), page.imagewidth, 1

    def read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(h, w, S) of the level's samples at rows y.., columns x.. (the file's dtype), decoding only the
        segments the region touches. The region must lie inside the level."""
        page = self._pages[level]
        if y < 0 or x < 0 or y + h > page.imagelength or x + w > page.imagewidth:
            raise ValueError(f"region ({y}, {x}, {h}, {w}) is outside the {page.imagelength}x{page.imagewidth} level")
        sh, sw, across = self._segment_grid(page)
        samples = page.samplesperpixel
        out = np.zeros((h, w, samples), dtype=_dtype(page))
        if page.compression == 1 and sh * sw * samples * _dtype(page).itemsize > MAX_SEGMENT_BYTES:
            return self._read_uncompressed(page, y, x, h, w, out)
        if sh * sw * samples * _dtype(page).itemsize > MAX_SEGMENT_BYTES:
            raise ImageTooLarge("this TIFF is stored in segments too large to read by region: tile or stripe it")
        decode = page.decode
        fh = self._tif.filehandle
        for row in range(y // sh, (y + h - 1) // sh + 1):
            for col in range(x // sw, (x + w - 1) // sw + 1):
                index = row * across + col
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                with self._lock:
                    if count:
                        fh.seek(offset)
                        data: bytes | None = fh.read(count)
                    else:
                        data = None
                seg, _, _ = decode(data, index, jpegtables=page.jpegtables)
                if seg is None:
                    continue  # a sparse segment: zeros
                seg = seg.reshape(seg.shape[-3], seg.shape[-2], seg.shape[-1])  # (sh, sw, S)
                y0, x0 = row * sh, col * sw
                ys, ye = max(y, y0), min(y + h, y0 + seg.shape[0], page.imagelength)
                xs, xe = max(x, x0), min(x + w, x0 + seg.shape[1], page.imagewidth)
                if ye > ys and xe > xs:
                    out[ys - y : ye - y, xs - x : xe - x] = seg[ys - y0 : ye - y0, xs - x0 : xe - x0]
        return out

    def _read_uncompressed(
        self, page: tifffile.TiffPage, y: int, x: int, h: int, w: int, out: np.ndarray
    ) -> np.ndarray:
        """Rows of an uncompressed page stored as one huge strip, read row by row from the file."""
        if len(page.dataoffsets) != 1 or page.is_tiled:
            raise ImageTooLarge("this TIFF is stored in segments too large to read by region: tile or stripe it")
        samples, item = page.samplesperpixel, _dtype(page).itemsize
        pixel = samples * item
        base = page.dataoffsets[0]
        fh = self._tif.filehandle
        dtype = _dtype(page).newbyteorder("<" if self._tif.byteorder == "<" else ">")
        with self._lock:
            for r in range(h):
                fh.seek(base + ((y + r) * page.imagewidth + x) * pixel)
                row = np.frombuffer(fh.read(w * pixel), dtype=dtype)
                out[r] = row.reshape(w, samples)
        return out

    def scale(self, level: int) -> float:
        """The value that maps to 255 for this slide's samples: 255 for uint8; for wider integers, the
        maximum of the coarsest level (at least 255), read once; for floats in [0, 1], 1."""
        page = self._pages[level]
        if _dtype(page) == np.uint8:
            return 255.0
        if level not in self._scale:
            small = self.levels[-1]
            if small.width * small.height > 16_000_000:
                bits = page.bitspersample
                self._scale[level] = float(2**bits - 1) if _dtype(page).kind in "ui" else 1.0
            else:
                top = float(np.max(self.read(small.index, 0, 0, small.height, small.width), initial=0))
                self._scale[level] = top if _dtype(page).kind == "f" and top <= 1.0 else max(top, 255.0)
        return self._scale[level]


def to_model_input(region: np.ndarray, channels: int, scale: float) -> np.ndarray:
    """(h, w, S) slide samples -> (h, w, channels) uint8: scaled so ``scale`` is 255, RGBA composited over
    black, grayscale repeated for an RGB model, RGB averaged for a grayscale one."""
    x = region
    if x.dtype != np.uint8:
        x = np.clip(x.astype(np.float32) * (255.0 / scale), 0, 255).astype(np.uint8)
    if x.shape[2] == 4:
        alpha = x[:, :, 3:4].astype(np.uint16)
        x = (x[:, :, :3].astype(np.uint16) * alpha // 255).astype(np.uint8)
    if channels == 3 and x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    elif channels == 1 and x.shape[2] == 3:
        x = x.mean(axis=2, keepdims=True).round().astype(np.uint8)
    return np.ascontiguousarray(x)


# --- writing --------------------------------------------------------------------------------------------------


def pyramid_shapes(height: int, width: int, tile: int = TILE) -> list[tuple[int, int]]:
    """(height, width) of each level, halving until the level fits in one tile."""
    shapes = [(height, width)]
    while shapes[-1][0] > tile or shapes[-1][1] > tile:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _tiles(rows: Iterator[np.ndarray], width: int, tile: int) -> Iterator[np.ndarray]:
    """Bands of up to ``tile`` rows (full width) -> ``tile`` x ``tile`` tiles in row-major order, padded."""
    for band in rows:
        for x in range(0, width, tile):
            t = band[:, x : x + tile]
            if t.shape != (tile, tile):
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1])))
            yield t


def write_pyramid(
    target: Path | IO[bytes],
    height: int,
    width: int,
    dtype: np.dtype,
    band: Callable[[int], np.ndarray],
    colormap: np.ndarray | None = None,
    tile: int = TILE,
    scratch: Path | None = None,
) -> None:
    """Write a tiled, pyramidal TIFF (deflate, the reduced levels as SubIFDs, nearest-neighbour halving:
    labels are never blended) of the (height, width) image whose rows ``band(y)`` gives ``tile`` at a time
    (rows y .. y + tile, full width; fewer for the last), each band asked for once.

    While full resolution is written, every reduced level's rows are appended to a raw temporary file in
    ``scratch`` (a third of the full level's raw size in all), which its own level is then written from.
    Memory: one band and one tile row per level, whatever the image's size.

    ``colormap``: (3, 256) uint16, for a palette image of class ids (viewable as colors, readable as ids).
    """
    dtype = np.dtype(dtype)
    shapes = pyramid_shapes(height, width, tile)
    extra: dict[str, Any] = (
        {"photometric": "palette", "colormap": colormap} if colormap is not None else {"photometric": "minisblack"}
    )
    common: dict[str, Any] = {
        "tile": (tile, tile),
        "dtype": dtype,
        "compression": "zlib",
        "compressionargs": {"level": 1},
        **extra,
    }
    if dtype.itemsize > 1:
        common["predictor"] = True  # ids run in constant stretches: differences compress far better

    with tempfile.TemporaryDirectory(dir=scratch, prefix=".pyramid-") as tmp:
        reduced = [open(Path(tmp) / f"{k}.raw", "w+b") for k in range(1, len(shapes))]  # noqa: SIM115
        try:

            def full_rows() -> Iterator[np.ndarray]:
                for y in range(0, height, tile):
                    b = band(y)
                    for k, f in enumerate(reduced, start=1):
                        step = 2**k
                        f.write(np.ascontiguousarray(b[(-y) % step :: step, ::step]).tobytes())
                    yield b

            def level_rows(k: int) -> Iterator[np.ndarray]:
                h, w = shapes[k]
                f = reduced[k - 1]
                f.seek(0)
                for y in range(0, h, tile):
                    rows = min(tile, h - y)
                    yield np.frombuffer(f.read(rows * w * dtype.itemsize), dtype=dtype).reshape(rows, w)

            with tifffile.TiffWriter(target, bigtiff=height * width * dtype.itemsize > 2**31) as tw:
                tw.write(_tiles(full_rows(), width, tile), shape=shapes[0], subifds=len(shapes) - 1, **common)
                for k in range(1, len(shapes)):
                    tw.write(_tiles(level_rows(k), shapes[k][1], tile), shape=shapes[k], subfiletype=1, **common)
        finally:
            for f in reduced:
                f.close()


def palette(colors: list[tuple[int, int, int]]) -> np.ndarray:
    """(3, 256) uint16 TIFF colormap: class i gets ``colors[i]``, the rest black."""
    cmap = np.zeros((3, 256), dtype=np.uint16)
    for i, c in enumerate(colors[:256]):
        cmap[:, i] = [v * 257 for v in c]
    return cmap
