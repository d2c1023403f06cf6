"""The training loop: epochs of augmented batches on the training device, validation every K epochs, a
checkpoint after every epoch, and the export of the best validated epoch when the run ends.

``RUN_DIR`` holds ``config.json`` (the recipe), ``last.pt`` (weights, optimizer, scheduler, epoch, random
generators: ``resume=True`` continues exactly where an interrupted run stopped), ``best/`` (the best
validated epoch as a provisional bundle), ``metrics.jsonl``, ``curves.png``, ``grad_norms.json`` and
``summary.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from model.augment import augment, random_crops
from model.bundle import load_bundle, save_bundle
from model.device import resolve_device, training_dtype
from model.encoders import load_imagenet
from model.plot import plot_curves
from model.train.config import TrainConfig
from model.train.data import load_data
from model.train.export import export, instance_metrics, make_card
from model.train.losses import LOSSES, SideOutputs
from model.train.optim import ema_warmup_fn, lr_factor
from model.train.validate import ValSet, validate
from model.unet import UNet, count_parameters


class Progress:
    """One status line, redrawn in place on a terminal (at most 4 times a second) and printed every 10%
    otherwise. ``info`` may hold tensors: they are read only when a line is drawn, since reading a value off
    a GPU waits for the work queued before it."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.start = total, label, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last_decile = -1
        self.last_draw = 0.0

    def update(self, done: int, **info: torch.Tensor | float) -> None:
        now = time.monotonic()
        decile = done * 10 // max(1, self.total)
        redraw = done == self.total or now - self.last_draw >= 0.25
        due = redraw if self.tty else decile != self.last_decile
        self.last_decile = decile
        if not due:
            return
        self.last_draw = now
        elapsed = now - self.start
        eta = elapsed / max(1, done) * (self.total - done)
        extra = " ".join(f"{k} {float(v):.4f}" for k, v in info.items())
        line = f"{self.label} {done}/{self.total} [{elapsed:.0f}s<{eta:.0f}s] {extra}"
        if self.tty:
            print("\r" + line, end="\n" if done == self.total else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


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


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(
    cfg: TrainConfig,
    resume: bool = False,
    max_epochs_this_run: int = 0,
    log: bool = True,
    time_budget: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or continue) training; returns the final summary (also in RUN_DIR/summary.json).

    ``max_epochs_this_run``: pause after that many epochs (no bundle; ``resume`` later). ``time_budget``:
    wall-clock seconds for this call before the export (0 = none): when the next epoch would end after it,
    at the pace of this one, the run ends after this epoch as if it were the last (validated, exported;
    ``stop`` = "time budget"). The schedule is not shortened, so a budget is a guard, not a recipe.
    ``log``: a line per epoch on stderr, and with ``progress`` a status line within the epoch too.
    """
    started = time.monotonic()
    device = resolve_device(cfg.device)
    dtype = training_dtype(cfg.precision, device)
    loss_fn = LOSSES[cfg.loss]
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "last.pt"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape for the whole run: pick the fastest kernels
    # channels-last pays where convolutions run in it natively: CUDA, and CPUs with bf16 kernels.
    channels_last = device.type == "cuda" or dtype == torch.bfloat16

    torch.manual_seed(cfg.seed)
    data = load_data(cfg, device)
    model = UNet(cfg.architecture()).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if cfg.pretrained and not cfg.init and not (resume and ckpt_path.exists()):
        assert model.encoder is not None
        load_imagenet(model.encoder, Path(cfg.pretrained_weights) if cfg.pretrained_weights else None)
    # With --ema, validation, the best checkpoint and the exported bundle use the averaged weights.
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
        "bad_epochs": 0,  # validations in a row without a better score
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
    state.setdefault("val_elapsed", 0.0)  # checkpoints written before it was kept lack it

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
    val_set = ValSet(data.val, make_card(cfg, data, {}, {}).input, device)
    val_seconds = 0.0  # the last validation's, to foresee the next one under a time budget
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
        bar = Progress(steps, f"epoch {state['epoch'] + 1}/{cfg.epochs}") if log and progress else None
        # Summed on the device in float64 (the sum of Python floats it replaces), read only when shown.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        grad_norms: list[torch.Tensor] = []
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size].tolist()
            if cfg.sizing == "resize":
                x = torch.stack([data.train_x[i] for i in idx])  # (B, C, size, size) uint8
                y = torch.stack([data.train_y[i] for i in idx])  # (B, size, size) uint8
            else:
                x, y = random_crops(
                    [data.train_x[i] for i in idx],
                    [data.train_y[i] for i in idx],
                    cfg.size,
                    gen_aug,
                    cfg.augment.border_crops,
                )
            x, yl = augment(x.float() / 255, y.long(), cfg.augment, gen_aug)  # (B, C, h, w) in [0, 1], (B, h, w)
            x = (x - mean) / std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(x)  # (B, K, h, w)
                sides = side.logits((yl.shape[-2], yl.shape[-1])) if side is not None else []
            loss = loss_fn(logits, yl)
            if sides:
                loss = loss + cfg.deep_supervision * torch.stack([loss_fn(o, yl) for o in sides]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if state["step"] + len(grad_norms) < cfg.grad_log_steps:
                g = model.first_layer.weight.grad
                grad_norms.append(g.norm() if g is not None else torch.zeros((), device=device))
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.detach()
            if bar:
                bar.update(s + 1, loss=loss_sum / (s + 1))
        state["step"] += steps
        state["grad_norms"] += [float(g) for g in grad_norms]
        state["epoch"] += 1
        train_seconds = time.monotonic() - t0
        # The run ends after this epoch if it is the last, or if the next would overrun the time budget.
        due = state["epoch"] % cfg.val_every == 0
        next_due = (state["epoch"] + 1) % cfg.val_every == 0
        spent = time.monotonic() - started + (val_seconds if due else 0.0)
        out_of_time = bool(time_budget) and spent + train_seconds + (val_seconds if next_due else 0.0) > time_budget
        last = state["epoch"] == cfg.epochs or out_of_time
        row: dict[str, Any] = {"epoch": state["epoch"], "train_loss": float(loss_sum) / steps}
        val: dict[str, Any] | None = None
        if due or last:
            t_val = time.monotonic()
            scored = model if ema is None else ema.module
            val = validate(scored, val_set, names, dtype, instances, 2 * cfg.batch_size, channels_last)
            val_seconds = time.monotonic() - t_val
            state["val_elapsed"] += val_seconds
            row.update(
                val_dice=val["dice"],
                val_iou=val["iou"],
                val_pixel_accuracy=val["pixel_accuracy"],
                **instance_metrics(val),
            )
        state["elapsed"] += time.monotonic() - t0
        row.update(lr=sched.get_last_lr()[0], seconds=round(time.monotonic() - t0, 2))
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        improved = False
        if val is not None:
            # Instance models are kept for their instances: the best epoch is the one with the highest mAP.
            score = val["instances"]["map"] if instances is not None else val["dice"]
            improved = score > state["best"]
            if improved:
                state.update(best=score, best_epoch=state["epoch"], bad_epochs=0)
                # The best weights as a provisional bundle; the final card is written when training ends.
                best_card = make_card(cfg, data, {}, {"provisional": True})
                save_bundle(run_dir / "best", best_card, model if ema is None else ema.module, "float32")
            else:
                state["bad_epochs"] += 1
        if log:
            scores = ""
            if val is not None:
                scores = f" val dice {val['dice']:.4f} iou {val['iou']:.4f} acc {val['pixel_accuracy']:.4f}"
                scores += f" mAP {val['instances']['map']:.4f}" if instances is not None else ""
            print(
                f"epoch {state['epoch']}: loss {row['train_loss']:.4f}{scores}{' *' if improved else ''} "
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
        if out_of_time and state["epoch"] < cfg.epochs:
            stop_reason = "time budget"
            break
    (run_dir / "grad_norms.json").write_text(json.dumps(state["grad_norms"]) + "\n")
    summary = {"stop": stop_reason, **state}
    if stop_reason != "paused":
        summary["bundle"] = str(export(cfg, data, state, device))
    (run_dir / "summary.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "grad_norms"}, indent=2) + "\n"
    )
    return summary
