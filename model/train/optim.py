"""The optimiser's schedule and the moving average of the weights."""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.01."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def ema_warmup_fn(decay: float) -> Any:
    """The moving average's update with a warm-up (as timm's ``ModelEmaV2``): at the n-th update the
    decay is min(decay, (1 + n) / (10 + n)), so the first steps follow the weights closely instead of
    blending the random start into the average for hundreds of steps."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # batch norm's step counters: the model's own
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + n) / (10 + n)))

    return update
