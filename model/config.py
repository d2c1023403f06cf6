"""A U-Net's architecture as data (``UNetConfig``): what a bundle's card stores so that loading never repeats
architecture flags. Plain Python, importable without torch (the service's front ends read cards too)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

# "plain" is the paper's encoder; the others are EfficientNet-Lite variants (model.encoders).
ENCODERS: tuple[str, ...] = ("plain", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")

Norm = Literal["batch", "group", "instance", "none"]
Upsample = Literal["transpose", "bilinear"]

NORMS: tuple[str, ...] = ("batch", "group", "instance", "none")
UPSAMPLES: tuple[str, ...] = ("transpose", "bilinear")


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild the architecture; stored in every bundle's card."""

    in_channels: int = 3
    num_classes: int = 2
    base_width: int = 32  # channels at the first level; level i has base_width * 2**i
    depth: int = 4  # number of down-sampling steps
    norm: Norm = "batch"
    upsample: Upsample = "transpose"
    residual: bool = False  # ResNet-style identity (or 1x1 projection) around each DoubleConv
    skip: bool = True  # False gives a plain encoder-decoder (no concatenation), for ablation
    encoder: str = "plain"  # "plain" or an EfficientNet-Lite ("efficientnet-lite0"); see model.encoders

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "base_width", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background + one class), got {self.num_classes}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {UPSAMPLES}, got {self.upsample!r}")
        for name in ("residual", "skip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder != "plain" and self.depth != 5:
            raise ValueError(f"the {self.encoder} encoder downsamples 5 times: depth must be 5, got {self.depth}")

    @property
    def multiple(self) -> int:
        """Spatial sizes the encoder divides without remainder."""
        return int(2**self.depth)

    def to_dict(self) -> dict[str, Any]:
        """The card's architecture. The plain encoder is left out, so that a plain model's card reads the same
        to servers older than the encoder field."""
        d = asdict(self)
        if d["encoder"] == "plain":
            del d["encoder"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown architecture field(s): {', '.join(unknown)}")
        return cls(**data)
