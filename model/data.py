"""Folder datasets: ``images/`` and ``masks/`` with matching file stems, any of png, jpg, tif, bmp.

Masks are decoded to class ids by a ``MaskSpec``:

    binary[:T]            class 1 where the gray value is > T (default 127; JPEG masks are noisy)
    binary-inverted[:T]   class 1 where the gray value is <= T (e.g. membranes drawn black)
    index                 the pixel value is the class id (L or P mode PNG)
    palette:RRGGBB,...    the i-th color is class i; other colors are an error

Images of any size and mode are converted to the model's channels with ``pil_to_array``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class MaskSpec:
    kind: str  # "binary", "binary-inverted", "index" or "palette"
    threshold: int = 127
    colors: tuple[tuple[int, int, int], ...] = ()

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
        raise ValueError(
            f"unknown mask spec {text!r}: use binary[:T], binary-inverted[:T], index or palette:RRGGBB,..."
        )

    def __str__(self) -> str:
        if self.kind in ("binary", "binary-inverted"):
            return f"{self.kind}:{self.threshold}"
        if self.kind == "palette":
            return "palette:" + ",".join(f"{r:02x}{g:02x}{b:02x}" for r, g, b in self.colors)
        return self.kind

    @property
    def num_classes(self) -> int | None:
        """Classes the spec implies, or None for "index" (the data decides)."""
        if self.kind == "palette":
            return len(self.colors)
        return None if self.kind == "index" else 2

    def decode(self, mask: Image.Image) -> np.ndarray:
        """A mask image -> (H, W) uint8 class ids."""
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


def find_pairs(root: Path | str) -> list[tuple[Path, Path]]:
    """(image, mask) paths with matching stems under ``root/images`` and ``root/masks``, sorted by stem."""
    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"{root} must hold images/ and masks/ folders")

    def index(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for p in folder.iterdir():
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                if p.stem in found:
                    raise ValueError(f"{folder} has two files with the stem {p.stem!r}")
                found[p.stem] = p
        return found

    images, masks = index(img_dir), index(mask_dir)
    stems = sorted(set(images) & set(masks))
    if not stems:
        raise FileNotFoundError(f"{root}: no image and mask share a file stem")
    return [(images[s], masks[s]) for s in stems]


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


def load_sample(image_path: Path, mask_path: Path, spec: MaskSpec, channels: int) -> Sample:
    with Image.open(image_path) as im:
        image = pil_to_array(ImageOps.exif_transpose(im), channels)
    with Image.open(mask_path) as mk:
        mask = spec.decode(mk)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{mask_path}: mask is {mask.shape[::-1]}, image is {image.shape[1::-1]}")
    return Sample(image_path.stem, image, mask)


def resize_pair(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (bilinear, antialiased) and mask (nearest) resized to size x size."""
    img = Image.fromarray(sample.image).resize((size, size), Image.Resampling.BILINEAR)
    msk = Image.fromarray(sample.mask).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(img), np.asarray(msk)
