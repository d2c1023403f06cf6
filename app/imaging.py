"""Bytes -> image (limits, formats, EXIF, modes) and mask -> PNG, overlay or JSON; instance ids -> 16-bit PNG.

Accepted formats: PNG (including APNG), JPEG, WebP, BMP, TIFF and GIF. Animated images (GIF, APNG, WebP,
multi-page TIFF) are segmented on their first frame. Anything else, SVG included, is 415.
The pixel limit is checked on the header's dimensions before any pixel is decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from app.errors import ImageTooLarge, InvalidImage, InvalidRequest
from model.data import pil_to_array
from model.instances import instance_properties

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
ORIENTATION = 0x0112  # EXIF tag
# The pixel limit is checked on the header's size before decoding, in ``decode``; Pillow's own guard
# (a process-wide warning, then an error) would only second-guess UNETSEG_MAX_PIXELS.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class Decoded:
    rgb: np.ndarray  # (h, w, 3) uint8, oriented as displayed; smaller than width x height if reduced
    width: int  # the image's size as displayed (EXIF orientation applied), which masks have
    height: int
    format: str  # lower-case: png, jpeg, webp, bmp, tiff, gif

    @property
    def reduced(self) -> bool:
        return self.rgb.shape[:2] != (self.height, self.width)

    def for_model(self, channels: int) -> np.ndarray:
        """(H, W, 3) RGB or (H, W) gray uint8, as the model takes it."""
        if channels == 3:
            return self.rgb
        return np.asarray(Image.fromarray(self.rgb).convert("L"))


# The TIFF tag BitsPerSample.
BITS_PER_SAMPLE = 258
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def declared_bits(im: Image.Image) -> int | None:
    """The bits per sample a file declares (TIFF ``BitsPerSample``), when it does."""
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(BITS_PER_SAMPLE) if tags is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return bits if isinstance(bits, int) else None


def to_8bit(im: Image.Image, bits: int | None = None) -> Image.Image:
    """16-bit, 32-bit integer and float images -> 8-bit gray ("L"), scaled linearly; others unchanged.

    Integers are divided by their declared range when the file declares one below 16 bits (TIFF
    ``BitsPerSample``, passed as ``bits``: 2**bits - 1), else by their actual maximum but never less than
    255: 12-bit data spanning 0..4095 in a 16-bit PNG maps onto 0..255 like its 8-bit copy, 8-bit values
    stored in 16 bits are kept as they are, and one value above 255 only nudges the scale (no jump).
    Floats within [0, 1] are scaled by 255; other floats from their range (the minimum, or 0 when it is
    above 0, to the maximum) onto 0..255. Negative integers are clipped to 0.
    """
    if im.mode not in HIGH_BIT_MODES:
        return im
    arr = np.asarray(im).astype(np.float64)
    finite = arr[np.isfinite(arr)]
    hi = float(finite.max()) if finite.size else 0.0
    if im.mode == "F":
        lo = min(0.0, float(finite.min())) if finite.size else 0.0
        if lo >= 0 and hi <= 1:
            lo, top = 0.0, 1.0
        else:
            top = max(hi, lo + 1e-12)
    else:
        lo = 0.0
        top = float(2**bits - 1) if bits is not None and 8 <= bits < 16 else max(hi, 255.0)
    scaled = (np.nan_to_num(arr, nan=lo, posinf=top, neginf=lo) - lo) * (255.0 / (top - lo))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def decode(data: bytes, max_pixels: int, reduce_to: int | None = None) -> Decoded:
    """Validate and decode an image file. Raises InvalidImage (415) or ImageTooLarge (413).

    ``reduce_to``: the caller only needs the pixels at ``reduce_to`` x ``reduce_to`` or more (a model that
    resizes its input). JPEGs are then decoded at a reduced scale in the DCT domain (1/2, 1/4 or 1/8, never
    below ``reduce_to``), several times faster; ``width`` and ``height`` stay those of the full image.
    """
    if not data:
        raise InvalidImage("the file is empty")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = im.size
        if width < 1 or height < 1:
            raise InvalidImage("the image has no pixels")
        if width * height > max_pixels:
            raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
        fmt = "jpeg" if im.format == "MPO" else (im.format or "").lower()
        # Animations are segmented on their first frame; later frames are never decoded (nor counted,
        # which for GIF would mean reading them all).
        if reduce_to and fmt == "jpeg":
            im.draft("RGB", (reduce_to, reduce_to))
        im.load()
        if im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):  # these orientations swap the axes
            width, height = height, width
        rgb = pil_to_array(to_8bit(ImageOps.exif_transpose(im), declared_bits(im)), 3)
    except (ImageTooLarge, InvalidImage):
        raise
    except UnidentifiedImageError:
        raise InvalidImage(
            "the file is not an image in a supported format (PNG, JPEG, WebP, BMP, TIFF or GIF)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError, ZeroDivisionError) as exc:
        # Pillow reports truncated and corrupt files through a variety of exception types.
        raise InvalidImage(f"the image is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    except MemoryError:
        raise ImageTooLarge("the image is too large to decode") from None
    return Decoded(rgb=rgb, width=width, height=height, format=fmt)


def palette_bytes(colors: list[tuple[int, int, int]]) -> list[int]:
    flat: list[int] = []
    for c in colors:
        flat.extend(c)
    return flat + [0] * (768 - len(flat))


def encode_mask_png(
    mask: np.ndarray, colors: list[tuple[int, int, int]], compress_level: int = 1, text: dict[str, str] | None = None
) -> bytes:
    """(H, W) uint8 class ids -> palette PNG: pixel values are class ids, the palette the class colors;
    ``text``: tEXt chunks to add (key -> value)."""
    h, w = mask.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    im.putpalette(palette_bytes(colors))
    info = None
    if text:
        info = PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=compress_level, pnginfo=info)
    return buf.getvalue()


def encode_overlay_png(
    rgb: np.ndarray, mask: np.ndarray, colors: list[tuple[int, int, int]], alpha: float, compress_level: int = 1
) -> bytes:
    """The image with each non-background class blended in its color at opacity ``alpha``."""
    lut = np.array(colors, dtype=np.float32)  # (K, 3)
    color = lut[mask]  # (H, W, 3)
    a = np.where(mask > 0, np.float32(alpha), np.float32(0))[..., None]
    out = rgb.astype(np.float32) * (1 - a) + color * a
    im = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def rle_encode(binary: np.ndarray) -> dict[str, Any]:
    """COCO-style uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    h, w = binary.shape
    flat = np.asarray(binary, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return {"size": [h, w], "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [h, w], "counts": counts}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of ``rle_encode``: (H, W) bool."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T


def mask_summary(mask: np.ndarray, classes: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Per class: pixel count, fraction of the image, bounding box [x, y, width, height] or null, RLE."""
    total = mask.size
    counts = np.bincount(mask.ravel(), minlength=len(classes))
    out = []
    for cid, name in classes:
        binary = mask == cid
        n = int(counts[cid])
        bbox = None
        if n:
            rows = np.flatnonzero(binary.any(1))
            cols = np.flatnonzero(binary.any(0))
            bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        out.append(
            {
                "id": cid,
                "name": name,
                "pixels": n,
                "fraction": n / total if total else 0.0,
                "bbox": bbox,
                "rle": rle_encode(binary),
            }
        )
    return out


# The most instances a 16-bit PNG of ids can hold.
MAX_PNG_INSTANCES = 65535


def encode_instances_png(ids: np.ndarray, compress_level: int = 1) -> tuple[bytes, int]:
    """(H, W) instance ids 0..N -> (16-bit grayscale PNG (Pillow mode "I;16") whose pixel values are the ids, N).

    Raises InvalidRequest (422) when N > 65535, which 16 bits cannot hold."""
    n = int(ids.max(initial=0))
    if n > MAX_PNG_INSTANCES:
        raise InvalidRequest(
            f"the image has {n} instances; a 16-bit PNG holds at most {MAX_PNG_INSTANCES}: ask for format=json"
        )
    im = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint16))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue(), n


def instance_rles(ids: np.ndarray) -> list[dict[str, Any]]:
    """COCO-style RLE (as ``rle_encode``) of each instance 1..N of (H, W) ids, in one pass over the image."""
    h, w = ids.shape
    n = int(ids.max(initial=0))
    flat = np.asarray(ids).ravel(order="F")
    order = np.argsort(flat, kind="stable")  # positions grouped by id, ascending within each id
    starts = np.searchsorted(flat[order], np.arange(n + 2))
    out: list[dict[str, Any]] = []
    for i in range(1, n + 1):
        pos = order[starts[i] : starts[i + 1]]
        if pos.size == 0:
            out.append({"size": [h, w], "counts": [flat.size]})
            continue
        breaks = np.flatnonzero(np.diff(pos) != 1)
        run_starts = np.concatenate(([pos[0]], pos[breaks + 1]))
        run_ends = np.concatenate((pos[breaks] + 1, [pos[-1] + 1]))
        # zeros before each run, then the run; the zeros after the last run close the image
        gaps = run_starts - np.concatenate(([0], run_ends[:-1]))
        counts = np.empty(2 * run_starts.size, dtype=np.int64)
        counts[0::2] = gaps
        counts[1::2] = run_ends - run_starts
        tail = flat.size - int(run_ends[-1])
        out.append({"size": [h, w], "counts": counts.tolist() + ([tail] if tail else [])})
    return out


def instance_summary(ids: np.ndarray, class_id: int) -> list[dict[str, Any]]:
    """Per instance of (H, W) ids 1..N: id, class_id (the model's object class), area, bbox [x, y, w, h],
    centroid [x, y] and COCO-style RLE."""
    props = instance_properties(ids)
    rles = instance_rles(ids)
    return [{**p, "class_id": class_id, "rle": rles[p["id"] - 1]} for p in props]
