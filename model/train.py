"""Train a U-Net on a folder dataset and write a model bundle.

    unetseg train --data DATA_DIR --name polyp --mask binary --sizing resize --size 256 --epochs 100
    python -m model.train ...   (the same)

Loss: cross-entropy + soft Dice. AdamW with linear warm-up and cosine decay. bf16 autocast and
channels-last on CUDA (and on CPUs that support bf16, unless --precision float32). Augmentation runs on
the training device. Every epoch writes ``RUN_DIR/last.pt`` (weights, optimizer, scheduler, epoch, random
generators), so ``--resume`` continues an interrupted run exactly; the best epoch by validation Dice is
written as a bundle to ``--out``. ``RUN_DIR`` also gets ``metrics.jsonl`` and ``curves.png``.

Instance masks (``--mask instances:boundary=W``, read from the dataset's ``instances/``) train three
classes, background / interior / boundary; the card then says how to make instances from them (watershed,
``model.instances``), and the best epoch is the one with the highest validation mAP (the 2018 Data Science
Bowl metric) instead of Dice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from model.augment import IGNORE, AugmentConfig, augment, random_crops
from model.bundle import Card, ClassInfo, Dataset, DType, InputPolicy, InstanceSpec, load_bundle, save_bundle
from model.data import MaskSpec, Sample, find_pairs, load_sample, resize_pair, split
from model.encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, load_imagenet
from model.evaluate import evaluate_model
from model.plot import plot_curves
from model.unet import UNet, UNetConfig, count_parameters

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
    encoder_lr: float = 1.0  # the encoder's learning rate as a fraction of lr
    epochs: int = 100
    batch_size: int = 8
    steps_per_epoch: int = 0  # 0: one pass over the training images
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 2.0
    loss: str = "dice_ce"  # dice_ce (cross-entropy + soft Dice) | ce (cross-entropy only)
    ema: float = 0.0  # decay of an exponential moving average of the weights (and BN statistics); 0 = off
    deep_supervision: float = 0.0  # weight of the decoder side outputs' mean loss; 0 = off
    patience: int = 25  # epochs without a better validation Dice before stopping; 0 = never
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads > 1 else ''}"


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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.01."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


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


LOSSES = {"dice_ce": dice_ce_loss, "ce": ce_loss, "structure": structure_loss}


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


class Progress:
    """One status line, redrawn in place on a terminal and printed every 10% otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.start = total, label, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last_decile = -1

    def update(self, done: int, **info: float) -> None:
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(1, done) * (self.total - done)
        extra = " ".join(f"{k} {v:.4f}" for k, v in info.items())
        line = f"{self.label} {done}/{self.total} [{elapsed:.0f}s<{eta:.0f}s] {extra}"
        decile = done * 10 // max(1, self.total)
        if self.tty:
            print("\r" + line, end="\n" if done == self.total else "", file=sys.stderr, flush=True)
        elif decile != self.last_decile:
            print(line, file=sys.stderr, flush=True)
        self.last_decile = decile


@dataclass
class Data:
    train_x: list[torch.Tensor]  # each (C, H, W) uint8 on the device; all size x size under "resize"
    train_y: list[torch.Tensor]  # each (H, W) uint8
    val: list[Sample]  # native size, for the serving pipeline
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra_images: int = 0  # of train_x, those from extra_data (the last ones)


def load_data(cfg: TrainConfig, device: torch.device) -> Data:
    spec = MaskSpec.parse(cfg.mask)
    pairs = find_pairs(cfg.data_dir, spec.folder)
    train_idx, val_idx = split(len(pairs), cfg.val_fraction, cfg.split_seed_or_seed)
    extra_spec = cfg.extra_mask_spec
    training = [(*pairs[i], spec) for i in train_idx]
    for folder in cfg.extra_data:
        training += [(image, mask, extra_spec) for image, mask in find_pairs(folder, extra_spec.folder)]

    train_x, train_y = [], []
    sums = np.zeros(cfg.channels)
    sq = np.zeros(cfg.channels)
    count = 0
    for image_path, mask_path, mask_spec in training:
        s = load_sample(image_path, mask_path, mask_spec, cfg.channels)
        img, msk = resize_pair(s, cfg.size) if cfg.sizing == "resize" else (s.image, s.mask)
        img3 = img.reshape(img.shape[0], img.shape[1], -1).astype(np.float64) / 255
        sums += img3.sum((0, 1))
        sq += (img3**2).sum((0, 1))
        count += img3.shape[0] * img3.shape[1]
        train_x.append(torch.from_numpy(np.ascontiguousarray(img3.transpose(2, 0, 1) * 255).astype(np.uint8)))
        train_y.append(torch.from_numpy(np.array(msk, dtype=np.uint8)))
    if spec.num_classes is not None and spec.num_classes != len(cfg.class_names):
        raise ValueError(
            f"mask spec {cfg.mask} gives {spec.num_classes} classes, --classes names {len(cfg.class_names)}"
        )
    # IGNORE (255) in an index mask marks pixels the loss skips, e.g. where a pseudo-label is unsure.
    top = max(int(y.masked_fill(y == IGNORE, 0).max()) for y in train_y)
    if top >= len(cfg.class_names):
        raise ValueError(f"masks hold class id {top}, but only {len(cfg.class_names)} classes are named")
    mean = sums / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 1e-6))
    if cfg.pretrained:  # the statistics the pretrained encoder was trained with, not the dataset's
        mean, std = np.full(cfg.channels, IMAGENET_MEAN), np.full(cfg.channels, IMAGENET_STD)
    return Data(
        train_x=[x.to(device) for x in train_x],
        train_y=[y.to(device) for y in train_y],
        val=[load_sample(*pairs[i], spec, cfg.channels) for i in val_idx],
        mean=tuple(float(round(m, 5)) for m in mean),
        std=tuple(float(round(s, 5)) for s in std),
        extra_images=len(training) - len(train_idx),
    )


def init_weights(cfg: TrainConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of the bundle ``cfg.init`` (checked to have the architecture ``cfg`` trains) and what the new
    card records about it: the start of a fine-tuning run, with the training that bundle had itself."""
    start = load_bundle(cfg.init)
    card = start.card
    if card.architecture != cfg.architecture():
        raise ValueError(
            f"--init {cfg.init}: its architecture {asdict(card.architecture)} differs from this run's "
            f"{asdict(cfg.architecture())}"
        )
    record = {
        "name": card.name,
        "version": card.version,
        "metrics": card.metrics,
        **{k: card.training[k] for k in ("epochs", "train_seconds", "hardware", "init_from") if k in card.training},
    }
    return start.model, record


def make_card(
    cfg: TrainConfig,
    data: Data,
    metrics: dict[str, float],
    training: dict[str, Any],
    precisions: tuple[DType, ...] = ("float32",),
) -> Card:
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


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def train(cfg: TrainConfig, resume: bool = False, max_epochs_this_run: int = 0, log: bool = True) -> dict[str, Any]:
    """Run (or continue) training; returns the final summary (also in RUN_DIR/summary.json)."""
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.precision, device)
    loss_fn = LOSSES[cfg.loss]
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "last.pt"

    torch.manual_seed(cfg.seed)
    data = load_data(cfg, device)
    model = UNet(cfg.architecture()).to(device)
    if device.type == "cuda" or dtype == torch.bfloat16:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # With --ema, validation, the best checkpoint and the exported bundle use the averaged weights.
    if cfg.pretrained and not cfg.init and not (resume and ckpt_path.exists()):
        assert model.encoder is not None
        load_imagenet(model.encoder)
    ema = None
    if cfg.ema:
        ema = AveragedModel(model, multi_avg_fn=ema_warmup_fn(cfg.ema), use_buffers=True)
    # Made after the average's copy of the model, so that copy carries no hooks.
    side = SideOutputs(model).to(device) if cfg.deep_supervision else None
    encoder = list(model.encoder.parameters()) if model.encoder is not None else []
    rest = [p for p in model.parameters() if all(p is not q for q in encoder)]
    rest += list(side.parameters()) if side is not None else []
    groups = [{"params": rest}] + ([{"params": encoder, "lr": cfg.lr * cfg.encoder_lr}] if encoder else [])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_train = len(data.train_x)
    steps = cfg.steps_per_epoch or max(1, n_train // cfg.batch_size)
    total_steps = steps * cfg.epochs
    warmup = max(1, int(cfg.warmup_epochs * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_steps))
    gen_order = torch.Generator().manual_seed(cfg.seed)
    gen_aug = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    state: dict[str, Any] = {
        "epoch": 0,
        "best": -1.0,
        "best_epoch": 0,
        "bad_epochs": 0,
        "elapsed": 0.0,
        "grad_norms": [],
        "step": 0,
    }
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        saved = TrainConfig.from_dict(json.loads(ckpt["config"]))
        if saved.architecture() != cfg.architecture() or saved.data_dir != cfg.data_dir:
            raise ValueError(f"{ckpt_path} was written for another architecture or dataset; use a new --run-dir")
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            if "ema" not in ckpt:
                raise ValueError(f"{ckpt_path} was written without --ema; use a new --run-dir")
            ema.load_state_dict(ckpt["ema"])
        if side is not None:
            if "side" not in ckpt:
                raise ValueError(f"{ckpt_path} was written without --deep-supervision; use a new --run-dir")
            side.load_state_dict(ckpt["side"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen_order.set_state(ckpt["gen_order"].cpu())
        gen_aug.set_state(ckpt["gen_aug"].cpu())
        state = json.loads(ckpt["state"])
        if log:
            what = "mAP" if cfg.instance_spec() else "dice"
            print(f"resumed {ckpt_path} at epoch {state['epoch']} (best {what} {state['best']:.4f})", file=sys.stderr)
    elif ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it or choose another --run-dir")
    else:
        if cfg.init:
            start, state["init_from"] = init_weights(cfg)
            model.load_state_dict(start.state_dict())
            if ema is not None:
                ema.module.load_state_dict(start.state_dict())
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    if log:
        print(
            f"{cfg.name}: {n_train} train / {len(data.val)} val images, {count_parameters(model):,} parameters, "
            f"{device} {str(dtype).removeprefix('torch.')}, {steps} steps/epoch",
            file=sys.stderr,
        )
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    names = list(cfg.class_names)
    instances = cfg.instance_spec()
    epochs_run = 0
    stop_reason = "epochs"
    while state["epoch"] < cfg.epochs:
        if max_epochs_this_run and epochs_run >= max_epochs_this_run:
            stop_reason = "paused"
            break
        if cfg.patience and state["bad_epochs"] >= cfg.patience:
            stop_reason = "early stopping"
            break
        t0 = time.monotonic()
        model.train()
        order = torch.randperm(n_train, generator=gen_order)
        if steps * cfg.batch_size > n_train:  # tile datasets: sample more crops than images
            order = torch.randint(0, n_train, (steps * cfg.batch_size,), generator=gen_order)
        bar = Progress(steps, f"epoch {state['epoch'] + 1}/{cfg.epochs}") if log else None
        loss_sum = 0.0
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size].tolist()
            if cfg.sizing == "resize":
                x = torch.stack([data.train_x[i] for i in idx])
                y = torch.stack([data.train_y[i] for i in idx])
            else:
                x, y = random_crops(
                    [data.train_x[i] for i in idx],
                    [data.train_y[i] for i in idx],
                    cfg.size,
                    gen_aug,
                    cfg.augment.border_crops,
                )
            x, yl = augment(x.float() / 255, y.long(), cfg.augment, gen_aug)
            x = (x - mean) / std
            if device.type == "cuda" or dtype == torch.bfloat16:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(x)
                sides = side.logits((yl.shape[-2], yl.shape[-1])) if side is not None else []
            loss = loss_fn(logits, yl)
            if sides:
                loss = loss + cfg.deep_supervision * torch.stack([loss_fn(o, yl) for o in sides]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if state["step"] < cfg.grad_log_steps:
                g = model.first_layer.weight.grad
                state["grad_norms"].append(float(g.norm()) if g is not None else 0.0)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            state["step"] += 1
            loss_sum += float(loss.detach())
            if bar:
                bar.update(s + 1, loss=loss_sum / (s + 1))
        scored = model if ema is None else ema.module
        val = evaluate_model(
            scored, data.val, make_card(cfg, data, {}, {}).input, names, device, dtype, instances=instances
        )
        state["epoch"] += 1
        state["elapsed"] += time.monotonic() - t0
        row = {
            "epoch": state["epoch"],
            "train_loss": loss_sum / steps,
            "val_dice": val["dice"],
            "val_iou": val["iou"],
            "val_pixel_accuracy": val["pixel_accuracy"],
            **_instance_metrics(val),
            "lr": sched.get_last_lr()[0],
            "seconds": round(time.monotonic() - t0, 2),
        }
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        # Instance models are kept for their instances: the best epoch is the one with the highest mAP.
        score = val["instances"]["map"] if instances is not None else val["dice"]
        improved = score > state["best"]
        if improved:
            state.update(best=score, best_epoch=state["epoch"], bad_epochs=0)
            # The best weights as a provisional bundle; the final card is written when training ends.
            save_bundle(run_dir / "best", make_card(cfg, data, {}, {"provisional": True}), scored, "float32")
        else:
            state["bad_epochs"] += 1
        if log:
            print(
                f"epoch {state['epoch']}: loss {row['train_loss']:.4f} val dice {val['dice']:.4f} "
                f"iou {val['iou']:.4f} acc {val['pixel_accuracy']:.4f}"
                + (f" mAP {val['instances']['map']:.4f}" if instances is not None else "")
                + f"{' *' if improved else ''} "
                f"({row['seconds']:.0f}s)",
                file=sys.stderr,
            )
        _atomic_save(
            {
                "model": model.state_dict(),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                **({"side": side.state_dict()} if side is not None else {}),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "gen_order": gen_order.get_state(),
                "gen_aug": gen_aug.get_state(),
                "config": json.dumps(cfg.to_dict()),
                "state": json.dumps(state),
            },
            ckpt_path,
        )
        plot_curves(_read_rows(run_dir / "metrics.jsonl"), run_dir / "curves.png", f"{cfg.name} training")
        epochs_run += 1
    (run_dir / "grad_norms.json").write_text(json.dumps(state["grad_norms"]) + "\n")
    summary = {"stop": stop_reason, **state}
    if stop_reason != "paused":
        summary["bundle"] = str(export(cfg, data, state, device))
    (run_dir / "summary.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "grad_norms"}, indent=2) + "\n"
    )
    return summary


def _instance_metrics(report: dict[str, Any]) -> dict[str, float]:
    """An instance model's extra validation numbers (empty for a semantic model's report)."""
    out: dict[str, float] = {}
    if "foreground" in report:
        out.update(val_foreground_dice=report["foreground"]["dice"], val_foreground_iou=report["foreground"]["iou"])
    if "instances" in report:
        out.update(val_map=report["instances"]["map"], val_ap50=report["instances"]["ap50"])
    return out


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    agree = _bf16_agreement(served, data.val[:16], provisional.input, device)
    if agree >= 0.995:
        precisions = ("bfloat16", "float32")
    metrics = {
        "val_dice": round(rep32["dice"], 4),
        "val_iou": round(rep32["iou"], 4),
        "val_pixel_accuracy": round(rep32["pixel_accuracy"], 4),
        **{k: round(v, 4) for k, v in _instance_metrics(rep32).items()},
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
        "augment": asdict(cfg.augment),
        "precision": str(pick_dtype(cfg.precision, device)).removeprefix("torch."),
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
    device = pick_device(cfg.device)
    state = json.loads(torch.load(ckpt_path, map_location="cpu", weights_only=True)["state"])
    return export(cfg, load_data(cfg, device), state, device)


def _bf16_agreement(model: torch.nn.Module, samples: list[Sample], policy: InputPolicy, device: torch.device) -> float:
    from model.evaluate import predict_logits

    if device.type == "cpu" and not cpu_supports_bf16():
        return 0.0
    same = total = 0
    for s in samples:
        a = predict_logits(model, s.image, policy, device, torch.float32).argmax(0)
        b = predict_logits(model, s.image, policy, device, torch.bfloat16).argmax(0)
        same += int((a == b).sum())
        total += a.numel()
    return same / max(1, total)


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--patience", type=int, default=25)
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
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--scale takes LO,HI (e.g. 0.75,1.25), not {text!r}") from None
    if not 0 < lo <= hi:
        raise SystemExit(f"--scale needs 0 < LO <= HI, got {text!r}")
    return lo, hi


def config_from_args(args: argparse.Namespace) -> TrainConfig:
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
    summary = train(cfg, resume=args.resume, max_epochs_this_run=args.max_epochs_this_run)
    print(json.dumps({k: v for k, v in summary.items() if k != "grad_norms"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
