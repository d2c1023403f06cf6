"""The recipe of a training run: one frozen dataclass, written to ``RUN_DIR/config.json`` when a run starts.

A resumed or exported run reads its recipe back from that file (``TrainConfig.from_dict``), so keys that a
newer version adds take their defaults when an older run's file lacks them, and keys an older version wrote
that are gone are ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from model.augment import AugmentConfig
from model.bundle import InstanceSpec
from model.data import MaskSpec
from model.unet import UNetConfig

DEFAULT_COLORS = ("000000", "ff3b30", "34c759", "0a84ff", "ffd60a", "bf5af2", "64d2ff", "ff9f0a")


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str
    name: str
    run_dir: str
    out: str
    mask: str = "binary"
    channels: int = 3
    class_names: tuple[str, ...] = ("background", "foreground")
    colors: tuple[str, ...] = ()
    sizing: str = "resize"  # "resize": whole images at size x size; "tile": native-scale crops of size
    size: int = 256
    overlap: float = 0.25
    base_width: int = 32
    depth: int = 4
    norm: str = "batch"
    upsample: str = "transpose"
    residual: bool = False
    skip: bool = True
    encoder: str = "plain"  # or an EfficientNet-Lite (model.encoders)
    pretrained: bool = False  # start the encoder from its ImageNet weights (and normalise as they expect)
    pretrained_weights: str = ""  # that checkpoint's file; "" = the one in the train extra's package
    encoder_lr: float = 1.0  # the encoder's learning rate as a fraction of lr
    epochs: int = 100
    batch_size: int = 8
    steps_per_epoch: int = 0  # 0: one pass over the training images
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 2.0
    loss: str = "dice_ce"  # dice_ce (cross-entropy + soft Dice) | ce (cross-entropy only) | structure
    ema: float = 0.0  # decay of an exponential moving average of the weights (and BN statistics); 0 = off
    deep_supervision: float = 0.0  # weight of the decoder side outputs' mean loss; 0 = off
    patience: int = 25  # validations without a better score before stopping; 0 = never
    val_every: int = 1  # validate every K epochs (and always after the last one)
    val_fraction: float = 0.1
    seed: int = 0  # weights, batch order and augmentation
    split_seed: int | None = None  # train/validation split; None = seed
    device: str = "auto"
    precision: str = "auto"  # auto | float32 | bfloat16
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    grad_log_steps: int = 100  # first-encoder-layer gradient norm is logged for this many first steps
    version: str = "1.0.0"
    description: str = ""
    dataset_name: str = ""
    dataset_url: str = ""
    dataset_license: str = ""
    dataset_citation: str = ""
    extra_data: tuple[str, ...] = ()  # folders whose pairs join the training split only (e.g. pseudo-labels)
    extra_mask: str = ""  # their mask spec; "" = mask
    init: str = ""  # bundle folder whose weights start the run (fine-tuning); "" = random initialisation
    min_area: int = 16  # instance masks: predicted instances under this many pixels are dropped

    def instance_spec(self) -> InstanceSpec | None:
        """How the model's classes become instances, for an "instances" mask spec; None otherwise."""
        spec = MaskSpec.parse(self.mask)
        if spec.kind != "instances":
            return None
        if spec.boundary:
            return InstanceSpec("watershed", interior=1, boundary=2, min_area=self.min_area)
        return InstanceSpec("components", interior=1, min_area=self.min_area)

    @property
    def extra_mask_spec(self) -> MaskSpec:
        return MaskSpec.parse(self.extra_mask or self.mask)

    @property
    def split_seed_or_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    def architecture(self) -> UNetConfig:
        return UNetConfig(
            in_channels=self.channels,
            num_classes=len(self.class_names),
            base_width=self.base_width,
            depth=self.depth,
            norm=self.norm,  # type: ignore[arg-type]
            upsample=self.upsample,  # type: ignore[arg-type]
            residual=self.residual,
            skip=self.skip,
            encoder=self.encoder,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = asdict(self.augment)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        aug = d.pop("augment", {})
        aug["scale"] = tuple(aug.get("scale", (0.75, 1.25)))
        for key in ("class_names", "colors", "extra_data"):
            d[key] = tuple(d.get(key, ()))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}, augment=AugmentConfig(**aug))
