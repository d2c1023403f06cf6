"""The training losses, and the side outputs that deep supervision adds to the loss.

Every loss takes logits (B, K, H, W) in any dtype (they are scored in float32) and targets (B, H, W) of
class ids, where ``IGNORE`` (255) marks pixels that count for nothing (e.g. where a pseudo-label is unsure).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from model.augment import IGNORE
from model.unet import UNet

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice over foreground classes). logits (B, K, H, W), target (B, H, W)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    k = logits.shape[1]
    valid = (target != IGNORE).unsqueeze(1)  # (B, 1, H, W)
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(target.clamp_max(k - 1), k).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1.0) / (denom + 1.0)  # (K,)
    return ce + (1 - dice[1:].mean())


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy: the loss whose minimum is the most accurate per-pixel argmax."""
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE)


def structure_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PraNet's "structure loss" (Fan et al., MICCAI 2020): boundary-weighted cross-entropy + weighted soft
    IoU of the foreground classes. A pixel's weight is 1 + 5 |local mean of its class mask - mask| over a
    31x31 window, so pixels near a boundary count up to six times. logits (B, K, H, W), target (B, H, W).
    """
    logits = logits.float()
    k = logits.shape[1]
    valid = (target != IGNORE).float()  # (B, H, W)
    fg = F.one_hot(target.clamp_max(k - 1), k).permute(0, 3, 1, 2)[:, 1:].float() * valid[:, None]
    weight = (1 + 5 * (F.avg_pool2d(fg, 31, stride=1, padding=15) - fg).abs().amax(1)) * valid  # (B, H, W)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")  # 0 where ignored
    wce = (weight * ce).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1)
    probs = logits.softmax(1)[:, 1:] * valid[:, None]
    w = weight[:, None]
    inter = (probs * fg * w).sum((2, 3))
    union = ((probs + fg) * w).sum((2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)  # (B, K-1)
    return (wce + wiou.mean(1)).mean()


LOSSES: dict[str, Loss] = {"dice_ce": dice_ce_loss, "ce": ce_loss, "structure": structure_loss}


class SideOutputs(torch.nn.Module):
    """Deep supervision: a 1x1 head on the output of every decoder level but the last (which feeds the
    model's own head), so that coarse levels are trained to segment too (Lee et al., "Deeply-Supervised
    Nets", 2015; as in UNet++ and PraNet). Training only: the heads are not part of the bundle.

    Forward hooks collect the decoder outputs during the model's forward; ``logits`` then returns each
    level's logits upsampled to the input's size: a list of (B, K, H, W).
    """

    def __init__(self, model: UNet) -> None:
        super().__init__()
        cfg = model.config
        widths = [cfg.base_width * 2**i for i in reversed(range(1, cfg.depth))]  # outputs of ups[:-1]
        self.heads = torch.nn.ModuleList(torch.nn.Conv2d(w, cfg.num_classes, 1) for w in widths)
        self._features: list[torch.Tensor] = []
        for up in list(model.ups)[:-1]:
            up.register_forward_hook(self._collect)

    def _collect(self, module: torch.nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        if module.training:  # validation forwards (eval mode) leave nothing behind
            self._features.append(out)

    def logits(self, size: tuple[int, int]) -> list[torch.Tensor]:
        feats, self._features = self._features, []
        if not feats:  # no training-mode forward since the last call
            return []
        out: list[torch.Tensor] = []
        for head, f in zip(self.heads, feats, strict=True):
            y = head(f)  # (B, K, H_pad / 2^l, W_pad / 2^l)
            factor = 2 ** (len(self.heads) - len(out))
            y = F.interpolate(y, scale_factor=factor, mode="bilinear", align_corners=False)
            out.append(y[..., : size[0], : size[1]])
        return out
