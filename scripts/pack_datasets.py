"""Write a reduced copy of the three training datasets (and the ImageNet checkpoint the pretrained recipes
start from) that can travel with the working tree to a CUDA host that has neither the data nor internet.

    python scripts/pack_datasets.py DATASETS_DIR [--out artifacts/datasets]

What the copy keeps, and why it stays small (a tree sent to a GPU host is limited to 64 MiB, and the
shipped bundles in weights/ take about half of that):

- ``kvasir_seg/``: frames resized so that their long side is ``--polyp-side`` (352, the polyp recipes' input
  size: the model sees no less than before) as JPEG (``--polyp-quality``), masks resized from their gray
  values and thresholded at 127 as the ``binary:127`` spec reads them, then stored as lossless PNG;
- ``dsb2018_nuclei/``: images at native size (the nuclei recipes tile at native scale), as JPEG
  (``--nuclei-quality``), grayscale where all three channels are equal (the model sees the same pixels);
  ``instances/`` lossless (8-bit PNG where the ids fit); ``masks/`` (the union) is left out: the instance
  recipes read ``instances/``;
- ``isbi2012_em_membrane/``: images and masks as they are (PNG, small);
- ``efficientnet-lite0.pth``: the ImageNet checkpoint's tensors that our encoder reads (the classifier head
  is left out), in float16, for ``train --pretrained-weights``.

The copy goes to an ignored folder (``artifacts/``): never commit it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.data import find_pairs, instance_ids, pil_to_array

FOLDERS = ("kvasir_seg", "dsb2018_nuclei", "isbi2012_em_membrane")


def pack_polyps(src: Path, dst: Path, side: int, quality: int) -> None:
    """Frames with their long side at most ``side`` (JPEG), masks thresholded after the same resize (PNG)."""
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for image_path, mask_path in find_pairs(src):
        with Image.open(image_path) as im:
            rgb = Image.fromarray(pil_to_array(im, 3))
        scale = min(1.0, side / max(rgb.size))
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb.resize(size, Image.Resampling.LANCZOS).save(
            dst / "images" / f"{image_path.stem}.jpg", quality=quality, optimize=True
        )
        with Image.open(mask_path) as mk:
            gray = mk.convert("L").resize(size, Image.Resampling.BILINEAR)
        binary = (np.asarray(gray) > 127).astype(np.uint8) * 255
        Image.fromarray(binary).save(dst / "masks" / f"{mask_path.stem}.png", optimize=True)


def pack_nuclei(src: Path, dst: Path, quality: int) -> None:
    """Images at native size as JPEG (grayscale where the channels are equal), instance ids lossless."""
    for sub in ("images", "instances"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for image_path, ids_path in find_pairs(src, "instances"):
        with Image.open(image_path) as im:
            rgb = pil_to_array(im, 3)  # (H, W, 3): alpha composited as training does
        gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
        out = Image.fromarray(rgb[..., 0]) if gray else Image.fromarray(rgb)
        out.save(dst / "images" / f"{image_path.stem}.jpg", quality=quality, optimize=True)
        with Image.open(ids_path) as mk:
            ids = instance_ids(mk)
        stored = (
            Image.fromarray(ids.astype(np.uint8))
            if ids.max(initial=0) < 256
            else Image.fromarray(ids.astype(np.uint16))
        )
        stored.save(dst / "instances" / f"{ids_path.stem}.png", optimize=True)


def pack_membranes(src: Path, dst: Path) -> None:
    for image_path, mask_path in find_pairs(src):
        for path, sub in ((image_path, "images"), (mask_path, "masks")):
            (dst / sub).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst / sub / path.name)


def pack_checkpoint(dst: Path, name: str = "efficientnet-lite0", source: Path | None = None) -> None:
    """The tensors of the ImageNet checkpoint that ``model.encoders.load_imagenet`` reads, in float16."""
    import torch

    from model.encoders import EfficientNetLiteEncoder, checkpoint_keys, imagenet_checkpoint

    state = torch.load(source or imagenet_checkpoint(name), map_location="cpu", weights_only=True)
    wanted = set(checkpoint_keys(EfficientNetLiteEncoder(name)).values())
    kept = {}
    for key in sorted(wanted):
        t = state[key]
        if t.is_floating_point():
            if float(t.abs().max()) >= 65000:
                raise ValueError(f"{key} does not fit float16")
            t = t.half()
        kept[key] = t
    torch.save(kept, dst)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a reduced copy of the training datasets for a GPU host.")
    p.add_argument("datasets", type=Path, help="folder with kvasir_seg/, dsb2018_nuclei/ and isbi2012_em_membrane/")
    p.add_argument("--out", type=Path, default=Path("artifacts/datasets"), help="an ignored folder")
    p.add_argument("--polyp-side", type=int, default=352, help="long side of the polyp frames (<= 384)")
    p.add_argument("--polyp-quality", type=int, default=65, help="JPEG quality of the polyp frames")
    p.add_argument("--nuclei-quality", type=int, default=80, help="JPEG quality of the nuclei images")
    p.add_argument("--no-checkpoint", action="store_true", help="leave the ImageNet checkpoint out")
    p.add_argument("--max-mb", type=float, default=30.0, help="fail when the copy is larger (megabytes)")
    args = p.parse_args(argv)

    if not 16 <= args.polyp_side <= 384:
        p.error("--polyp-side takes 16..384 pixels")
    missing = [f for f in FOLDERS if not (args.datasets / f).is_dir()]
    if missing:
        p.error(f"{args.datasets} lacks {', '.join(missing)}")
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    pack_polyps(args.datasets / "kvasir_seg", args.out / "kvasir_seg", args.polyp_side, args.polyp_quality)
    pack_nuclei(args.datasets / "dsb2018_nuclei", args.out / "dsb2018_nuclei", args.nuclei_quality)
    pack_membranes(args.datasets / "isbi2012_em_membrane", args.out / "isbi2012_em_membrane")
    if not args.no_checkpoint:
        pack_checkpoint(args.out / "efficientnet-lite0.pth")
    for item in sorted(args.out.iterdir()):
        size = folder_bytes(item) if item.is_dir() else item.stat().st_size
        print(f"{item.name:<24}{size / 1e6:>8.1f} MB")
    total = folder_bytes(args.out) / 1e6
    print(f"{'total':<24}{total:>8.1f} MB in {args.out}")
    if total > args.max_mb:
        print(f"more than --max-mb {args.max_mb}: lower the qualities or the polyp side", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
