"""From a run's best epoch to the bundle the service loads, and the card that describes it.

The card's metrics are measured on the stored bundle itself (float16 weights, loaded back) through the
serving pipeline (``model.evaluate.evaluate_model``), not taken from training's validation: they are the
numbers a user of the bundle will see on the same images.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from model.bundle import Card, ClassInfo, Dataset, DType, InputPolicy, load_bundle, save_bundle
from model.data import MaskSpec, Sample
from model.device import device_supports, hardware, resolve_device, training_dtype
from model.evaluate import evaluate_model, predict_logits
from model.train.config import DEFAULT_COLORS, TrainConfig
from model.train.data import Data, load_data


def make_card(
    cfg: TrainConfig,
    data: Data,
    metrics: dict[str, float],
    training: dict[str, Any],
    precisions: tuple[DType, ...] = ("float32",),
) -> Card:
    """The bundle's card: the recipe's architecture, classes and input policy, the data's normalisation,
    and what ``export`` measured (``metrics``) and records of the run (``training``)."""
    colors = cfg.colors or DEFAULT_COLORS[: len(cfg.class_names)]
    return Card(
        name=cfg.name,
        version=cfg.version,
        description=cfg.description,
        architecture=cfg.architecture(),
        classes=tuple(
            ClassInfo(i, n, (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)))
            for i, (n, c) in enumerate(zip(cfg.class_names, colors, strict=True))
        ),
        input=InputPolicy(cfg.channels, data.mean, data.std, cfg.sizing, cfg.size, cfg.overlap),  # type: ignore[arg-type]
        dataset=Dataset(
            cfg.dataset_name or Path(cfg.data_dir).name, cfg.dataset_url, cfg.dataset_license, cfg.dataset_citation
        ),
        precisions=precisions,
        metrics=metrics,
        training=training,
        instances=cfg.instance_spec(),
    )


def instance_metrics(report: dict[str, Any]) -> dict[str, float]:
    """An instance model's extra validation numbers (empty for a semantic model's report)."""
    out: dict[str, float] = {}
    if "foreground" in report:
        out.update(val_foreground_dice=report["foreground"]["dice"], val_foreground_iou=report["foreground"]["iou"])
    if "instances" in report:
        out.update(val_map=report["instances"]["map"], val_ap50=report["instances"]["ap50"])
    return out


def export(cfg: TrainConfig, data: Data, state: dict[str, Any], device: torch.device) -> Path:
    """Write the best epoch as the final bundle (float16 storage) with its measured validation metrics.

    The metrics are those of the stored bundle itself, through the serving pipeline, in float32; bfloat16
    is listed as a safe inference precision only when its masks agree with float32 on >= 99.5% of pixels.
    """
    best = load_bundle(Path(cfg.run_dir) / "best")
    out = Path(cfg.out)
    provisional = make_card(cfg, data, {}, {})
    save_bundle(out, provisional, best.model, "float16")
    served = load_bundle(out).model.to(device)
    names = list(cfg.class_names)
    rep32 = evaluate_model(
        served, data.val, provisional.input, names, device, torch.float32, instances=cfg.instance_spec()
    )
    precisions: tuple[DType, ...] = ("float32",)
    agree = bf16_agreement(served, data.val[:16], provisional.input, device)
    if agree >= 0.995:
        precisions = ("bfloat16", "float32")
    metrics = {
        "val_dice": round(rep32["dice"], 4),
        "val_iou": round(rep32["iou"], 4),
        "val_pixel_accuracy": round(rep32["pixel_accuracy"], 4),
        **{k: round(v, 4) for k, v in instance_metrics(rep32).items()},
    }
    training = {
        "data_dir": Path(cfg.data_dir).name,
        "mask": str(MaskSpec.parse(cfg.mask)),
        "seed": cfg.seed,
        "split_seed": cfg.split_seed_or_seed,
        "val_fraction": cfg.val_fraction,
        "train_images": len(data.train_x) - data.extra_images,
        **(
            {
                "extra_data": [Path(d).name for d in cfg.extra_data],
                "extra_mask": str(cfg.extra_mask_spec),
                "extra_images": data.extra_images,
            }
            if cfg.extra_data
            else {}
        ),
        "val_images": len(data.val),
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "loss": cfg.loss,
        **({"ema": cfg.ema} if cfg.ema else {}),
        **({"deep_supervision": cfg.deep_supervision} if cfg.deep_supervision else {}),
        **({"val_every": cfg.val_every} if cfg.val_every != 1 else {}),
        "augment": asdict(cfg.augment),
        "precision": str(training_dtype(cfg.precision, device)).removeprefix("torch."),
        "hardware": hardware(device),
        "train_seconds": round(state["elapsed"], 1),
        **({"init_from": state["init_from"]} if state.get("init_from") else {}),
        "bf16_mask_agreement": round(agree, 5),
        "val_report": {k: rep32[k] for k in ("per_image_dice", "classes", "foreground", "instances") if k in rep32},
        "torch": torch.__version__,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    save_bundle(out, make_card(cfg, data, metrics, training, precisions), best.model, "float16")
    return out


def export_run(cfg: TrainConfig) -> Path:
    """Export the best epoch of the run in ``cfg.run_dir`` as it stands (finished or paused)."""
    ckpt_path = Path(cfg.run_dir) / "last.pt"
    if not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path} does not exist: nothing to export")
    device = resolve_device(cfg.device)
    state = json.loads(torch.load(ckpt_path, map_location="cpu", weights_only=True)["state"])
    return export(cfg, load_data(cfg, device), state, device)


def bf16_agreement(model: torch.nn.Module, samples: list[Sample], policy: InputPolicy, device: torch.device) -> float:
    """The share of pixels whose class is the same in bfloat16 as in float32 (0 where ``device`` has no
    native bfloat16: the card then lists float32 alone, as the service would refuse emulated bf16 anyway)."""
    if not device_supports(torch.bfloat16, device):
        return 0.0
    same = total = 0
    for s in samples:
        a = predict_logits(model, s.image, policy, device, torch.float32).argmax(0)
        b = predict_logits(model, s.image, policy, device, torch.bfloat16).argmax(0)
        same += int((a == b).sum())
        total += a.numel()
    return same / max(1, total)
