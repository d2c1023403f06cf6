"""A run's images, loaded once: the training split on the training device, the validation split as samples.

Under "resize" the training images are resized to ``size`` x ``size`` when loaded; under "tile" they stay
at their native size and the loop cuts random crops from them. The validation samples stay at native size,
as the service would receive them (``model.train.validate`` makes their model inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.augment import IGNORE
from model.data import MaskSpec, Sample, find_pairs, load_sample, resize_pair, split
from model.encoders import IMAGENET_MEAN, IMAGENET_STD
from model.train.config import TrainConfig


@dataclass
class Data:
    train_x: list[torch.Tensor]  # each (C, H, W) uint8 on the device; all size x size under "resize"
    train_y: list[torch.Tensor]  # each (H, W) uint8
    val: list[Sample]  # native size, for the serving pipeline
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra_images: int = 0  # of train_x, those from extra_data (the last ones)


def load_data(cfg: TrainConfig, device: torch.device) -> Data:
    """The training split (and ``cfg.extra_data``) on ``device``, the validation split at native size, and
    the normalisation statistics: the training images', or ImageNet's for a pretrained encoder."""
    spec = MaskSpec.parse(cfg.mask)
    pairs = find_pairs(cfg.data_dir, spec.folder)
    train_idx, val_idx = split(len(pairs), cfg.val_fraction, cfg.split_seed_or_seed)
    extra_spec = cfg.extra_mask_spec
    training = [(*pairs[i], spec) for i in train_idx]
    for folder in cfg.extra_data:
        training += [(image, mask, extra_spec) for image, mask in find_pairs(folder, extra_spec.folder)]

    train_x, train_y = [], []
    sums = np.zeros(cfg.channels)
    sq = np.zeros(cfg.channels)
    count = 0
    for image_path, mask_path, mask_spec in training:
        s = load_sample(image_path, mask_path, mask_spec, cfg.channels)
        img, msk = resize_pair(s, cfg.size) if cfg.sizing == "resize" else (s.image, s.mask)
        img3 = img.reshape(img.shape[0], img.shape[1], -1).astype(np.float64) / 255
        sums += img3.sum((0, 1))
        sq += (img3**2).sum((0, 1))
        count += img3.shape[0] * img3.shape[1]
        train_x.append(torch.from_numpy(np.ascontiguousarray(img3.transpose(2, 0, 1) * 255).astype(np.uint8)))
        train_y.append(torch.from_numpy(np.array(msk, dtype=np.uint8)))
    if spec.num_classes is not None and spec.num_classes != len(cfg.class_names):
        raise ValueError(
            f"mask spec {cfg.mask} gives {spec.num_classes} classes, --classes names {len(cfg.class_names)}"
        )
    # IGNORE (255) in an index mask marks pixels the loss skips, e.g. where a pseudo-label is unsure.
    top = max(int(y.masked_fill(y == IGNORE, 0).max()) for y in train_y)
    if top >= len(cfg.class_names):
        raise ValueError(f"masks hold class id {top}, but only {len(cfg.class_names)} classes are named")
    mean = sums / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 1e-6))
    if cfg.pretrained:  # the statistics the pretrained encoder was trained with, not the dataset's
        mean, std = np.full(cfg.channels, IMAGENET_MEAN), np.full(cfg.channels, IMAGENET_STD)
    return Data(
        train_x=[x.to(device) for x in train_x],
        train_y=[y.to(device) for y in train_y],
        val=[load_sample(*pairs[i], spec, cfg.channels) for i in val_idx],
        mean=tuple(float(round(m, 5)) for m in mean),
        std=tuple(float(round(s, 5)) for s in std),
        extra_images=len(training) - len(train_idx),
    )
