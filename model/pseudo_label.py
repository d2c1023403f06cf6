"""Pseudo-labels: a bundle's confident predictions on unlabelled images, as a training folder.

``python -m model.pseudo_label --model weights/membrane IMAGES_DIR OUT_DIR [--confidence 0.9]`` writes
``OUT_DIR/images/`` (the images, unchanged) and ``OUT_DIR/masks/`` (index PNGs: the predicted class id,
or 255 where the model's softmax probability of its own prediction is below ``--confidence``, which the
training loss skips). Train a new model on them beside the labelled data with
``unetseg train ... --extra-data OUT_DIR --extra-mask index`` (self-training): they join the training
split only, so the validation split stays labelled by hand.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from model.augment import IGNORE
from model.bundle import load_bundle
from model.data import IMAGE_SUFFIXES, pil_to_array
from model.evaluate import predict_logits


def pseudo_mask(logits: torch.Tensor, confidence: float) -> np.ndarray:
    """(K, H, W) logits -> (H, W) uint8 class ids, IGNORE where the top probability is below ``confidence``."""
    probs = logits.float().softmax(0)
    top, ids = probs.max(0)
    ids[top < confidence] = IGNORE
    return ids.to(torch.uint8).numpy()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.pseudo_label", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="bundle folder")
    p.add_argument("images", type=Path, help="folder of unlabelled images")
    p.add_argument("out", type=Path, help="new folder: images/ and masks/ are written here")
    p.add_argument("--confidence", type=float, default=0.9, help="below this probability a pixel is ignored")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if not 0 < args.confidence < 1:
        p.error("--confidence must be between 0 and 1")
    if not args.images.is_dir():
        p.error(f"{args.images} is not a folder")
    files = sorted(f for f in args.images.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        p.error(f"{args.images} holds no images")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"{args.out} exists and is not empty")
    bundle = load_bundle(args.model)
    device = torch.device(args.device)
    model = bundle.model.to(device).eval()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    (args.out / "masks").mkdir(parents=True, exist_ok=True)
    for f in files:
        with Image.open(f) as im:
            image = pil_to_array(ImageOps.exif_transpose(im), bundle.card.input.channels)
        mask = pseudo_mask(predict_logits(model, image, bundle.card.input, device), args.confidence)
        shutil.copyfile(f, args.out / "images" / f.name)
        Image.fromarray(mask).save(args.out / "masks" / f"{f.stem}.png")
        shares = ", ".join(f"{c.name} {float((mask == c.id).mean()):.1%}" for c in bundle.card.classes)
        print(f"{f.name}: {shares}, ignored {float((mask == IGNORE).mean()):.1%}")
    print(f"{len(files)} pseudo-labelled images in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
