"""``unetseg train`` and ``python -m model.train``: flags -> ``TrainConfig`` -> ``train`` (or ``export_run``).

    unetseg train --data DATA_DIR --name polyp --mask binary --sizing resize --size 256 --epochs 100

With ``--resume`` or ``--export`` the run's own ``config.json`` wins over the flags (so a resume cannot
silently change the recipe); only ``--device`` and ``--out`` are taken from the command line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from model.augment import AugmentConfig
from model.data import MaskSpec
from model.device import resolve_device
from model.encoders import ENCODERS
from model.train.config import TrainConfig
from model.train.export import export_run
from model.train.loop import train
from model.train.losses import LOSSES


def build_parser() -> argparse.ArgumentParser:
    """Every flag of ``unetseg train``; their defaults are ``TrainConfig``'s."""
    p = argparse.ArgumentParser(prog="unetseg train", description="Train a U-Net and write a model bundle.")
    p.add_argument("--data", required=True, help="folder with images/ and masks/ (matching stems)")
    p.add_argument("--name", required=True, help="bundle name (lowercase letters, digits, - and _)")
    p.add_argument("--out", help="bundle folder to write (default: RUN_DIR/bundle)")
    p.add_argument("--run-dir", help="checkpoints, metrics and plots (default: runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR/last.pt")
    p.add_argument(
        "--export",
        action="store_true",
        help="write the bundle from the run's best epoch so far (e.g. of a paused run) and exit",
    )
    p.add_argument("--max-epochs-this-run", type=int, default=0, help="pause after N epochs (resume later)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        metavar="S",
        help="end the run (validate, export) after the last epoch that fits in S seconds of wall clock from "
        "the start; the schedule is not shortened (0 = no budget)",
    )
    p.add_argument(
        "--mask",
        default="binary",
        help="binary[:T] | binary-inverted[:T] | index | palette:RRGGBB,... | instances[:boundary=W] "
        "(instances/ folder; with boundary=W: background, interior and a W-pixel boundary class)",
    )
    p.add_argument(
        "--min-area",
        type=int,
        default=16,
        metavar="PX",
        help="instance masks: drop predicted instances under PX pixels (recorded in the card)",
    )
    p.add_argument("--classes", default="background,foreground", help="comma-separated class names, id order")
    p.add_argument("--colors", default="", help="comma-separated RRGGBB colors, one per class")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3)
    p.add_argument("--sizing", choices=["resize", "tile"], default="resize")
    p.add_argument("--size", type=int, default=256, help="resize side, or tile/crop side for --sizing tile")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap at inference (tile sizing)")
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--depth", type=int, default=None, help="down-sampling steps (default 4; 5 with an EfficientNet)")
    p.add_argument("--norm", choices=["batch", "group", "instance", "none"], default="batch")
    p.add_argument("--upsample", choices=["transpose", "bilinear"], default="transpose")
    p.add_argument("--residual", action="store_true")
    p.add_argument("--no-skip", action="store_true", help="plain encoder-decoder (ablation)")
    p.add_argument(
        "--encoder",
        choices=ENCODERS,
        default="plain",
        help="plain (the paper's) or an EfficientNet-Lite (5 levels; --depth is 5)",
    )
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="start the encoder from ImageNet weights (the train extra's package) and use their normalisation",
    )
    p.add_argument(
        "--pretrained-weights",
        default="",
        metavar="FILE",
        help="the ImageNet checkpoint to start from (default: the package's; e.g. the trimmed copy that "
        "scripts/pack_datasets.py writes for a host without the package)",
    )
    p.add_argument(
        "--encoder-lr",
        type=float,
        default=1.0,
        metavar="F",
        help="the encoder's learning rate as a fraction F of --lr (e.g. 0.1 for a pretrained encoder)",
    )
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps-per-epoch", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument(
        "--loss",
        choices=sorted(LOSSES),
        default="dice_ce",
        help="dice_ce: cross-entropy + soft Dice of the foreground classes; ce: cross-entropy only; "
        "structure: boundary-weighted cross-entropy + weighted soft IoU (PraNet)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="validate and export an exponential moving average of the weights, e.g. 0.99 (0 = off)",
    )
    p.add_argument(
        "--deep-supervision",
        type=float,
        default=0.0,
        metavar="W",
        help="add W x the mean loss of 1x1 side outputs on the coarser decoder levels (training only; 0 = off)",
    )
    p.add_argument(
        "--patience", type=int, default=25, help="stop after N validations in a row without a better score (0 = never)"
    )
    p.add_argument(
        "--val-every",
        type=int,
        default=1,
        metavar="K",
        help="validate every K epochs (the last epoch always is); the best epoch is chosen among those",
    )
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="weights, batch order and augmentation")
    p.add_argument("--split-seed", type=int, default=None, help="train/validation split (default: --seed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--description", default="")
    p.add_argument("--dataset-name", default="")
    p.add_argument("--dataset-url", default="")
    p.add_argument("--dataset-license", default="")
    p.add_argument("--dataset-citation", default="")
    p.add_argument(
        "--scale",
        default="0.75,1.25",
        metavar="LO,HI",
        help="random zoom range (1,1 = off: keeps structures at their native size in pixels)",
    )
    p.add_argument("--rotate", type=float, default=15.0, metavar="DEG", help="random rotation within +-DEG")
    p.add_argument("--shear", type=float, default=0.0, metavar="DEG", help="random shear within +-DEG (0 = off)")
    p.add_argument("--brightness", type=float, default=0.2, metavar="F", help="brightness factor within 1 +- F")
    p.add_argument("--contrast", type=float, default=0.2, metavar="F", help="contrast factor within 1 +- F")
    p.add_argument("--hue", type=float, default=10.0, metavar="DEG", help="hue rotation within +-DEG (RGB)")
    p.add_argument(
        "--saturation", type=float, default=0.0, metavar="F", help="saturation factor within 1 +- F (RGB; 0 = off)"
    )
    p.add_argument(
        "--elastic",
        type=float,
        default=0.0,
        metavar="PX",
        help="elastic deformation: control-point displacement std in pixels (0 = off)",
    )
    p.add_argument(
        "--border-crops",
        type=float,
        default=0.0,
        metavar="P",
        help="tile sizing: probability per axis that a crop lies against the image border (0 = uniform)",
    )
    p.add_argument(
        "--extra-data",
        action="append",
        default=[],
        metavar="DIR",
        help="more images/ + masks/ for the training split only, never validated on (repeatable)",
    )
    p.add_argument("--extra-mask", default="", help="mask spec of --extra-data (default: --mask)")
    p.add_argument("--init", default="", help="start from this bundle's weights (same architecture): fine-tuning")
    return p


def parse_scale(text: str) -> tuple[float, float]:
    """``--scale LO,HI`` -> (LO, HI), refused unless 0 < LO <= HI."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--scale takes LO,HI (e.g. 0.75,1.25), not {text!r}") from None
    if not 0 < lo <= hi:
        raise SystemExit(f"--scale needs 0 < LO <= HI, got {text!r}")
    return lo, hi


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's recipe from parsed flags, each checked (a bad value exits with a message naming its flag)."""
    run_dir = args.run_dir or f"runs/{args.name}"
    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    colors = tuple(c.strip().lstrip("#").lower() for c in args.colors.split(",") if c.strip())
    if colors and len(colors) != len(classes):
        raise SystemExit(f"--colors names {len(colors)} colors for {len(classes)} classes")
    if not 0 <= args.ema < 1:
        raise SystemExit(f"--ema takes a decay in [0, 1), got {args.ema}")
    if min(args.elastic, args.rotate, args.shear, args.hue, args.deep_supervision) < 0:
        raise SystemExit("--elastic, --rotate, --shear, --hue and --deep-supervision take values >= 0")
    if not 0 <= args.shear < 90:
        raise SystemExit(f"--shear takes degrees in [0, 90), got {args.shear}")
    for flag in ("brightness", "contrast", "saturation"):
        if not 0 <= getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} takes a fraction in [0, 1), got {getattr(args, flag)}")
    if args.pretrained and args.encoder == "plain":
        raise SystemExit("--pretrained needs an --encoder with ImageNet weights (e.g. efficientnet-lite0)")
    if args.pretrained_weights and not args.pretrained:
        raise SystemExit("--pretrained-weights goes with --pretrained")
    if args.val_every < 1:
        raise SystemExit(f"--val-every takes a number of epochs >= 1, got {args.val_every}")
    if args.time_budget < 0:
        raise SystemExit(f"--time-budget takes seconds >= 0, got {args.time_budget}")
    try:
        resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if args.encoder_lr <= 0:
        raise SystemExit(f"--encoder-lr takes a fraction > 0, got {args.encoder_lr}")
    if args.min_area < 0:
        raise SystemExit(f"--min-area takes a number of pixels >= 0, got {args.min_area}")
    try:
        MaskSpec.parse(args.mask)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not 0 <= args.border_crops <= 1:
        raise SystemExit(f"--border-crops takes a probability in [0, 1], got {args.border_crops}")
    return TrainConfig(
        data_dir=str(args.data),
        name=args.name,
        run_dir=run_dir,
        out=args.out or f"{run_dir}/bundle",
        mask=args.mask,
        channels=args.channels,
        class_names=classes,
        colors=colors,
        sizing=args.sizing,
        size=args.size,
        overlap=args.overlap,
        base_width=args.base_width,
        depth=args.depth if args.depth is not None else (4 if args.encoder == "plain" else 5),
        norm=args.norm,
        upsample=args.upsample,
        residual=args.residual,
        skip=not args.no_skip,
        encoder=args.encoder,
        pretrained=args.pretrained,
        pretrained_weights=args.pretrained_weights,
        encoder_lr=args.encoder_lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        loss=args.loss,
        ema=args.ema,
        deep_supervision=args.deep_supervision,
        patience=args.patience,
        val_every=args.val_every,
        val_fraction=args.val_fraction,
        seed=args.seed,
        split_seed=args.split_seed,
        device=args.device,
        precision=args.precision,
        version=args.version,
        description=args.description,
        dataset_name=args.dataset_name,
        dataset_url=args.dataset_url,
        dataset_license=args.dataset_license,
        dataset_citation=args.dataset_citation,
        extra_data=tuple(args.extra_data),
        extra_mask=args.extra_mask,
        init=args.init,
        min_area=args.min_area,
        augment=AugmentConfig(
            scale=parse_scale(args.scale),
            rotate_deg=args.rotate,
            shear_deg=args.shear,
            brightness=args.brightness,
            contrast=args.contrast,
            hue_deg=args.hue,
            saturation=args.saturation,
            elastic_px=args.elastic,
            border_crops=args.border_crops,
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Train (or ``--export``) as the flags say; prints the run's summary (or the bundle's path) as JSON."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    if (args.resume or args.export) and (Path(cfg.run_dir) / "config.json").exists():
        # The run's own config wins, so a resume cannot silently change the recipe; only the pause may.
        saved = TrainConfig.from_dict(json.loads((Path(cfg.run_dir) / "config.json").read_text()))
        cfg = replace(saved, device=cfg.device, out=args.out or saved.out)
    if args.export:
        print(export_run(cfg))
        return 0
    summary = train(cfg, resume=args.resume, max_epochs_this_run=args.max_epochs_this_run, time_budget=args.time_budget)
    print(json.dumps({k: v for k, v in summary.items() if k != "grad_norms"}))
    return 0
