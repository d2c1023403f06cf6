"""U-Net: the encoder-decoder of Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image
Segmentation" (MICCAI 2015), with a skip connection at every level.

The network is built from four small blocks that read like the paper's figure: ``DoubleConv`` (two 3x3
convolutions), ``Down`` (2x2 max-pool, then ``DoubleConv``), ``Up`` (2x upsampling, concatenation with the
encoder features of the same resolution, then ``DoubleConv``) and a 1x1 ``OutConv``.

The encoder is ``plain`` (the paper's: ``DoubleConv`` then ``depth`` times ``Down``) or an
EfficientNet-Lite (``model.encoders``; ImageNet-pretrained when trained with ``--pretrained``), whose five
stages replace the ``Down`` blocks: the decoder then has five levels, and a ``DoubleConv`` on the input gives
it the full-resolution skip that the EfficientNet (whose stem has stride 2) does not have.

Size contract: any input height and width. Inputs are padded (edge replication) to the next multiple of
``2**depth`` and the logits are cropped back, so the output always has the input's spatial size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import NORMS, UPSAMPLES, Norm, UNetConfig, Upsample
from model.encoders import EfficientNetLiteEncoder, EncoderSpec

__all__ = ["NORMS", "UPSAMPLES", "DoubleConv", "Down", "Norm", "OutConv", "UNet", "UNetConfig", "Up", "Upsample"]


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class DoubleConv(nn.Module):
    """(conv 3x3 -> norm -> ReLU) x 2, optionally with a residual connection.

    Shapes: (B, C_in, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, residual: bool) -> None:
        super().__init__()
        bias = norm == "none"
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            make_norm(norm, out_channels),
        )
        self.shortcut: nn.Module | None = None
        if residual:
            self.shortcut = (
                nn.Identity()
                if in_channels == out_channels
                else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=bias), make_norm(norm, out_channels))
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        out: torch.Tensor = self.act(y)
        return out


class Down(nn.Module):
    """Max-pool 2x2 then DoubleConv: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, residual: bool) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_channels, out_channels, norm, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(self.pool(x))
        return out


class Up(nn.Module):
    """Upsample 2x, concatenate the encoder features of the same level (if skips are on), DoubleConv.

    Shapes: x (B, C_in, H, W), skip (B, C_skip, 2H, 2W) -> (B, C_out, 2H, 2W).
    """

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, norm: str, residual: bool, upsample: str
    ) -> None:
        super().__init__()
        self.up: nn.Module
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, 1),
            )
        self.conv = DoubleConv(out_channels + skip_channels, out_channels, norm, residual)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([skip, x], dim=1)
        out: torch.Tensor = self.conv(x)
        return out


class OutConv(nn.Module):
    """1x1 convolution to class logits: (B, C, H, W) -> (B, num_classes, H, W)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out


class UNet(nn.Module):
    """U-Net with a configurable width, depth, normalisation, upsampling, residual blocks and skips.

    Input: (B, in_channels, H, W) float, any H and W >= 1.
    Output: (B, num_classes, H, W) logits (no softmax).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        widths = [c.base_width * 2**i for i in range(c.depth + 1)]  # the decoder's width at each level
        self.inc = DoubleConv(c.in_channels, widths[0], c.norm, c.residual)
        self.encoder: EfficientNetLiteEncoder | None = None
        if c.encoder == "plain":
            self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], c.norm, c.residual) for i in range(c.depth))
            skips = widths[:-1]
        else:
            self.encoder = EfficientNetLiteEncoder(c.encoder, c.in_channels)
            self.downs = nn.ModuleList()
            channels = EncoderSpec.of(c.encoder).channels
            skips, widths[-1] = [widths[0], *channels[:-1]], channels[-1]
        self.ups = nn.ModuleList(
            Up(widths[i + 1], skips[i] if c.skip else 0, widths[i], c.norm, c.residual, c.upsample)
            for i in reversed(range(c.depth))
        )
        self.outc = OutConv(widths[0], c.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input of shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = self.config.multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        features = [self.inc(x)]  # level 0: (B, w0, H, W)
        if self.encoder is not None:
            features += self.encoder(x)  # level i: (B, channels[i - 1], H/2^i, W/2^i)
        for down in self.downs:
            features.append(down(features[-1]))  # level i: (B, w_i, H/2^i, W/2^i)
        y = features.pop()
        for up in self.ups:
            skip = features.pop()
            y = up(y, skip if self.config.skip else None)
        logits: torch.Tensor = self.outc(y)  # (B, K, H_pad, W_pad)
        return logits[..., :h, :w]

    @property
    def first_layer(self) -> nn.Conv2d:
        """The first convolution at full resolution: where the ablation measures how much gradient arrives."""
        layer = self.inc.body[0]
        assert isinstance(layer, nn.Conv2d)
        return layer


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
