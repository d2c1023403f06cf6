"""Folder datasets: ``images/`` and ``masks/`` with matching file stems, any of png, jpg, tif, bmp.

Masks are decoded to class ids by a ``MaskSpec``:

    binary[:T]            class 1 where the gray value is > T (default 127; JPEG masks are noisy)
    binary-inverted[:T]   class 1 where the gray value is <= T (e.g. membranes drawn black)
    index                 the pixel value is the class id (L or P mode PNG)
    palette:RRGGBB,...    the i-th color is class i; other colors are an error
    instances[:boundary=W]  read from ``instances/`` instead of ``masks/``: single-channel (e.g. 16-bit)
                          PNGs of instance ids, 0 = background. Alone: class 1 = any instance. With
                          ``boundary=W``: three classes, 0 background, 1 interior, 2 boundary, where the
                          boundary is every pixel of an instance within W pixels (a (2W+1)-square
                          window) of a pixel that is not that instance: background or another instance.
                          Touching instances are then 2W pixels of boundary apart, which the watershed
                          of ``model.instances`` uses to separate them (the DSB 2018 winners' targets).

Images of any size and mode are converted to the model's channels with ``pil_to_array``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage as ndi

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class MaskSpec:
    kind: str  # "binary", "binary-inverted", "index", "palette" or "instances"
    threshold: int = 127
    colors: tuple[tuple[int, int, int], ...] = ()
    boundary: int = 0  # "instances": boundary width in pixels; 0 = two classes (background, instance)

    @classmethod
    def parse(cls, text: str) -> MaskSpec:
        kind, _, arg = text.partition(":")
        if kind in ("binary", "binary-inverted"):
            try:
                threshold = int(arg) if arg else 127
            except ValueError:
                raise ValueError(f"mask spec {text!r}: threshold must be an integer 0..254") from None
            if not 0 <= threshold < 255:
                raise ValueError(f"mask spec {text!r}: threshold must be an integer 0..254")
            return cls(kind, threshold)
        if kind == "index" and not arg:
            return cls(kind)
        if kind == "palette" and arg:
            colors = []
            for item in arg.split(","):
                item = item.strip().lstrip("#")
                if len(item) != 6:
                    raise ValueError(f"mask spec {text!r}: colors are RRGGBB hex values")
                try:
                    colors.append((int(item[0:2], 16), int(item[2:4], 16), int(item[4:6], 16)))
                except ValueError:
                    raise ValueError(f"mask spec {text!r}: colors are RRGGBB hex values") from None
            return cls(kind, colors=tuple(colors))
        if kind == "instances":
            if not arg:
                return cls(kind)
            key, _, width = arg.partition("=")
            if key != "boundary" or not width.isdigit() or not 1 <= int(width) <= 16:
                raise ValueError(f"mask spec {text!r}: use instances or instances:boundary=W with W 1..16 pixels")
            return cls(kind, boundary=int(width))
        raise ValueError(
            f"unknown mask spec {text!r}: use binary[:T], binary-inverted[:T], index, palette:RRGGBB,... "
            "or instances[:boundary=W]"
        )

    def __str__(self) -> str:
        if self.kind in ("binary", "binary-inverted"):
            return f"{self.kind}:{self.threshold}"
        if self.kind == "palette":
            return "palette:" + ",".join(f"{r:02x}{g:02x}{b:02x}" for r, g, b in self.colors)
        if self.kind == "instances" and self.boundary:
            return f"instances:boundary={self.boundary}"
        return self.kind

    @property
    def num_classes(self) -> int | None:
        """Classes the spec implies, or None for "index" (the data decides)."""
        if self.kind == "palette":
            return len(self.colors)
        if self.kind == "instances":
            return 3 if self.boundary else 2
        return None if self.kind == "index" else 2

    @property
    def folder(self) -> str:
        """The dataset sub-folder the masks are read from."""
        return "instances" if self.kind == "instances" else "masks"

    def decode(self, mask: Image.Image) -> np.ndarray:
        """A mask image -> (H, W) uint8 class ids."""
        if self.kind == "instances":
            return instance_targets(instance_ids(mask), self.boundary)
        if self.kind in ("binary", "binary-inverted"):
            gray = np.asarray(_to_gray(mask))
            hit = gray > self.threshold if self.kind == "binary" else gray <= self.threshold
            return hit.astype(np.uint8)
        if self.kind == "index":
            if mask.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"index masks must be single-channel, got mode {mask.mode}")
            ids = np.asarray(mask)
            if ids.max(initial=0) > 255:
                raise ValueError("index masks must hold class ids below 256")
            return ids.astype(np.uint8)
        rgb = np.asarray(mask.convert("RGB")).astype(np.int32)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        out = np.full(code.shape, 255, dtype=np.uint8)
        for i, (r, g, b) in enumerate(self.colors):
            out[code == ((r << 16) | (g << 8) | b)] = i
        if (out == 255).any():
            raise ValueError("mask has colors that are not in the palette")
        return out


def instance_ids(mask: Image.Image) -> np.ndarray:
    """A single-channel instance mask (8-, 16- or 32-bit; 0 = background) -> (H, W) int32 instance ids."""
    if mask.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise ValueError(f"instance masks must be single-channel (8- or 16-bit ids), got mode {mask.mode}")
    ids = np.asarray(mask)
    if ids.min(initial=0) < 0:
        raise ValueError("instance masks must hold ids >= 0")
    return ids.astype(np.int32)


def instance_targets(ids: np.ndarray, boundary: int) -> np.ndarray:
    """(H, W) instance ids -> (H, W) uint8 classes: 0 background, 1 interior, 2 boundary (``boundary`` > 0).

    A pixel is boundary when its (2 boundary + 1)-square window holds another id (background or another
    instance): the window's maximum or minimum differs from it. Outside the image the edge pixels repeat, so
    an instance cut by the image border gets no boundary along it (its outline there is unknown). An
    instance too thin to keep an interior keeps its innermost pixels as interior (one marker per instance).
    ``boundary`` == 0: class 1 wherever there is an instance.
    """
    fg = ids > 0
    out = fg.astype(np.uint8)
    if boundary:
        size = 2 * boundary + 1
        hi = ndi.maximum_filter(ids, size=size, mode="nearest")
        lo = ndi.minimum_filter(ids, size=size, mode="nearest")
        out[fg & ((hi != ids) | (lo != ids))] = 2
        # An instance less than 2 boundary + 1 pixels thick has no interior left, so no watershed marker and
        # nothing to tell it from a touching neighbour: its innermost pixels (farthest from any other id)
        # stay interior.
        lost = np.setdiff1d(np.unique(ids[fg]), np.unique(ids[out == 1]))
        if lost.size:
            boxes = ndi.find_objects(ids)
            for i in lost.tolist():
                rows, cols = boxes[i - 1]
                window = (
                    slice(max(0, rows.start - 1), rows.stop + 1),
                    slice(max(0, cols.start - 1), cols.stop + 1),
                )
                inside = ids[window] == i
                depth = ndi.distance_transform_edt(inside)
                out[window][inside & (depth == depth.max())] = 1
    return out


def _to_gray(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image).astype(np.float64)
        scale = 255.0 / 65535.0 if arr.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8))
    return image.convert("L")


def pil_to_array(image: Image.Image, channels: int) -> np.ndarray:
    """Any PIL image -> (H, W, 3) RGB or (H, W) gray uint8, as the model takes it.

    Handles 1-bit, 16-bit and 32-bit gray (scaled to 8 bits), CMYK, YCbCr, LAB, palette with or without
    transparency, and alpha (composited over black, the background of the datasets' images).
    """
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image).astype(np.float64)
        hi = arr.max(initial=0)
        if mode == "F" or hi > 255:
            lo = 0.0 if mode != "F" else arr.min(initial=0)
            top = 65535.0 if mode != "F" else max(hi, lo + 1e-12)
            arr = (arr - lo) / (top - lo) * 255.0
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, (0, 0, 0))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = background
    target = "RGB" if channels == 3 else "L"
    if image.mode != target:
        image = image.convert(target)
    return np.asarray(image)


def index_folder(folder: Path) -> dict[str, Path]:
    """Image files in ``folder`` by stem; two files with one stem are an error."""
    found: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            if p.stem in found:
                raise ValueError(f"{folder} has two files with the stem {p.stem!r}")
            found[p.stem] = p
    return found


def find_pairs(root: Path | str, masks: str = "masks") -> list[tuple[Path, Path]]:
    """(image, mask) paths with matching stems under ``root/images`` and ``root/<masks>``, sorted by stem."""
    root = Path(root)
    img_dir, mask_dir = root / "images", root / masks
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"{root} must hold images/ and {masks}/ folders")
    images, masks_by_stem = index_folder(img_dir), index_folder(mask_dir)
    stems = sorted(set(images) & set(masks_by_stem))
    if not stems:
        raise FileNotFoundError(f"{root}: no image and mask share a file stem")
    return [(images[s], masks_by_stem[s]) for s in stems]


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A reproducible (train, validation) split of range(n) by ``seed``; at least one of each when n >= 2."""
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be between 0 and 1")
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = min(max(1, round(n * val_fraction)), n - 1) if n >= 2 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


@dataclass
class Sample:
    stem: str
    image: np.ndarray  # (H, W, C) or (H, W) uint8 at native size
    mask: np.ndarray  # (H, W) uint8 class ids
    instances: np.ndarray | None = None  # (H, W) int32 instance ids (0 = background), when known


def load_sample(
    image_path: Path, mask_path: Path, spec: MaskSpec, channels: int, instances_path: Path | None = None
) -> Sample:
    """One pair at native size. The instance ids come from the mask itself under an "instances" spec, or
    from ``instances_path`` (e.g. to score a binary model's connected components against them)."""
    with Image.open(image_path) as im:
        image = pil_to_array(ImageOps.exif_transpose(im), channels)
    ids = None
    with Image.open(mask_path) as mk:
        if spec.kind == "instances":
            ids = instance_ids(mk)
            mask = instance_targets(ids, spec.boundary)
        else:
            mask = spec.decode(mk)
    if instances_path is not None:
        with Image.open(instances_path) as ik:
            ids = instance_ids(ik)
        if ids.shape != mask.shape:
            raise ValueError(f"{instances_path}: instances are {ids.shape[::-1]}, the mask is {mask.shape[::-1]}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{mask_path}: mask is {mask.shape[::-1]}, image is {image.shape[1::-1]}")
    return Sample(image_path.stem, image, mask, ids)


def resize_pair(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (bilinear, antialiased) and mask (nearest) resized to size x size."""
    img = Image.fromarray(sample.image).resize((size, size), Image.Resampling.BILINEAR)
    msk = Image.fromarray(sample.mask).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(img), np.asarray(msk)
