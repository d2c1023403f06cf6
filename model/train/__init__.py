"""Train a U-Net on a folder dataset and write a model bundle.

    unetseg train --data DATA_DIR --name polyp --mask binary --sizing resize --size 256 --epochs 100
    python -m model.train ...   (the same)

The package reads in the order a run goes:

    config.py    TrainConfig: the recipe, frozen, written to RUN_DIR/config.json
    data.py      load_data: the training split on the device, the validation split at native size
    losses.py    cross-entropy + soft Dice (default), cross-entropy, PraNet's structure loss; side outputs
    optim.py     warm-up + cosine schedule; the moving average's warm-up
    validate.py  validation batched on the training device, every K epochs
    loop.py      train(): epochs, checkpoints (RUN_DIR/last.pt, resumable), the best validated epoch
    export.py    the best epoch as a bundle, its card scored through the serving pipeline
    cli.py       the flags and main()

Loss: cross-entropy + soft Dice. AdamW with linear warm-up and cosine decay. bf16 autocast and
channels-last where the device runs bf16 natively (``model.device``; unless --precision float32).
Augmentation runs on the training device. Instance masks (``--mask instances:boundary=W``) train three
classes, background / interior / boundary; the card then says how to make instances from them (watershed,
``model.instances``), and the best epoch is the one with the highest validation mAP (the 2018 Data Science
Bowl metric) instead of Dice.
"""

from model.device import hardware
from model.train.cli import build_parser, config_from_args, main
from model.train.config import DEFAULT_COLORS, TrainConfig
from model.train.data import Data, load_data
from model.train.export import bf16_agreement, export, export_run, make_card
from model.train.loop import Progress, init_weights, train
from model.train.losses import LOSSES, SideOutputs, ce_loss, dice_ce_loss, structure_loss
from model.train.optim import ema_warmup_fn, lr_factor
from model.train.validate import ValSet, validate

__all__ = [
    "DEFAULT_COLORS",
    "LOSSES",
    "Data",
    "Progress",
    "SideOutputs",
    "TrainConfig",
    "ValSet",
    "bf16_agreement",
    "build_parser",
    "ce_loss",
    "config_from_args",
    "dice_ce_loss",
    "ema_warmup_fn",
    "export",
    "export_run",
    "hardware",
    "init_weights",
    "load_data",
    "lr_factor",
    "main",
    "make_card",
    "structure_loss",
    "train",
    "validate",
]
