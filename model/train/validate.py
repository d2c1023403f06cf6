"""Validation during training, batched on the training device.

The service's pipeline (``model.evaluate.evaluate_model``) takes one image at a time: plan it on the host,
run its one input (or its tiles), bring the logits back, resize or blend them on the host, score. On a GPU
that leaves the device idle most of the time (on an H200, validating 88 polyp frames so took 7 s of a 10 s
epoch). Here the plans are made once per run and their inputs kept on the device; each validation runs
them in batches across images, resizes or blends each image's logits on the device and scores them there,
so that only the (K, K) confusion matrices come back (and, for instance models, the logits that the
watershed needs). The plans, the resizing and blending and the scoring are the service's (``make_plan``,
``Blender``, ``resize_logits``, ``model.evaluate.Scorer``): the numbers are ``evaluate_model``'s up to float
rounding.

The exported bundle's card is still scored through the serving pipeline itself (``model.train.export``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.bundle import InputPolicy, InstanceSpec
from model.data import Sample
from model.evaluate import Scorer
from model.inference import Blender, TileGrid, make_plan, resize_logits


@dataclass
class _Image:
    stem: str
    start: int  # its first input's index in ValSet.inputs
    height: int
    width: int
    grid: TileGrid | None  # its tiles; None under "resize"
    mask: torch.Tensor  # (H, W) uint8 class ids, on the device
    instances: np.ndarray | None  # (H, W) instance ids, for the instance metric (scored on the host)


class ValSet:
    """The validation samples as model inputs on ``device``, planned once as the service plans them.

    ``inputs`` is (N, C, h, w) float32, normalised: one resized input per image under "resize", every tile of
    every image under "tile" (all h x w = size x size, so any of them batch together).
    """

    def __init__(self, samples: Sequence[Sample], policy: InputPolicy, device: torch.device) -> None:
        self.policy, self.device = policy, device
        self.images: list[_Image] = []
        inputs: list[torch.Tensor] = []
        start = 0
        for s in samples:
            plan = make_plan(s.image, policy)
            mask = torch.from_numpy(np.ascontiguousarray(s.mask)).to(device)
            self.images.append(_Image(s.stem, start, plan.height, plan.width, plan.grid, mask, s.instances))
            inputs.append(plan.inputs)
            start += plan.inputs.shape[0]
        self.inputs = torch.cat(inputs).to(device) if inputs else torch.empty(0)

    def __len__(self) -> int:
        return len(self.images)

    def logits(self, outputs: torch.Tensor, image: _Image) -> torch.Tensor:
        """(K, H, W) float32 logits of ``image`` at its own size, from the (N, K, h, w) outputs of every
        input: resized bilinearly, or its tiles blended (``model.inference``, on the outputs' device). A binary
        model's come back as (0, class 1 minus class 0), as the service's: the same argmax and softmax."""
        if image.grid is None:
            return resize_logits(outputs[image.start], image.height, image.width)
        blender = Blender(image.grid, int(outputs.shape[1]), outputs.device)
        for i in range(len(image.grid)):
            blender.add(i, outputs[image.start + i])
        return blender.logits()


@torch.inference_mode()
def validate(
    model: torch.nn.Module,
    val: ValSet,
    class_names: Sequence[str],
    dtype: torch.dtype = torch.float32,
    instances: InstanceSpec | None = None,
    batch_size: int = 16,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Score ``model`` on ``val``: the report ``evaluate_model`` gives for the same samples and policy.

    ``dtype``: the autocast dtype of the forward (the logits are scored in float32). ``channels_last``:
    feed the inputs in that layout (as the training loop does where it pays).
    """
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, val.inputs.shape[0], batch_size):
        x = val.inputs[start : start + batch_size]  # (B, C, h, w)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(val.device.type, dtype=dtype, enabled=dtype != torch.float32):
            outs.append(model(x).float())  # (B, K, h, w)
    model.train(was_training)
    outputs = torch.cat(outs) if outs else torch.empty(0)
    scorer = Scorer(class_names, instances)
    for image in val.images:
        scorer.add(image.stem, val.logits(outputs, image), image.mask, image.instances)
    return scorer.report()
