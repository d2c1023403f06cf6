"""Model bundles: a folder with the weights as safetensors and a JSON card (``model.card``) that describes
everything a server needs to run them (architecture, classes and colors, input policy, precision,
provenance, metrics).

    weights/<name>/
        card.json           the card (see ``model.card.Card``)
        model.safetensors   the state dict; float16 or float32 tensors, no pickle

Loading validates every field and fails with ``BundleError`` naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model.card import (
    CARD_FILE,
    FORMAT,
    NAME_RE,
    WEIGHTS_FILE,
    BundleError,
    Card,
    ClassInfo,
    Dataset,
    DType,
    InputPolicy,
    InstanceMethod,
    InstanceSpec,
    Sizing,
    SlideSpec,
    discover,
    read_card,
)
from model.fsync import fsync_path
from model.unet import UNet

__all__ = [
    "CARD_FILE",
    "DTYPES",
    "FORMAT",
    "NAME_RE",
    "WEIGHTS_FILE",
    "Bundle",
    "BundleError",
    "Card",
    "ClassInfo",
    "DType",
    "Dataset",
    "InputPolicy",
    "InstanceMethod",
    "InstanceSpec",
    "Sizing",
    "SlideSpec",
    "discover",
    "load_bundle",
    "read_card",
    "save_bundle",
]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Bundle:
    card: Card
    model: UNet  # in eval mode, float32, on the CPU until the caller moves it
    path: Path | None = None
    load_s: float = 0.0  # seconds it took to read and validate


def load_bundle(folder: Path | str) -> Bundle:
    """Read and validate ``folder``'s card and weights; returns the model in eval mode on the CPU."""
    folder = Path(folder)
    t0 = time.perf_counter()
    card = read_card(folder)
    wpath = folder / WEIGHTS_FILE
    if _interrupted_save(folder):
        raise BundleError(
            wpath,
            None,
            f"older than {CARD_FILE}: a save was interrupted after writing the card; "
            f"{WEIGHTS_FILE}.tmp holds the weights saved with it (rename it to {WEIGHTS_FILE} to finish the save)",
        )
    if not wpath.is_file():
        raise BundleError(wpath, None, "missing: every bundle folder needs a model.safetensors")
    try:
        state = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(wpath, None, f"is not a valid safetensors file: {exc}") from None
    model = UNet(card.architecture)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            detail.append(f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        raise BundleError(wpath, None, "does not match card.json's architecture: " + "; ".join(detail))
    for key, tensor in state.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise BundleError(
                wpath, key, f"has shape {tuple(tensor.shape)}, the architecture needs {tuple(want.shape)}"
            )
        if want.is_floating_point() and not torch.isfinite(tensor).all():
            raise BundleError(wpath, key, "contains NaN or infinite values")
        state[key] = tensor.to(want.dtype)
    model.load_state_dict(state)
    model.eval()
    return Bundle(card=card, model=model, path=folder, load_s=time.perf_counter() - t0)


def save_bundle(folder: Path | str, card: Card, model: torch.nn.Module, storage: DType = "float16") -> Path:
    """Write ``card.json`` and ``model.safetensors`` into ``folder`` (created if needed).

    Floating-point tensors are stored as ``storage``; integer buffers (BatchNorm's counter) stay as they are.
    Both files are written and synced next to their final names, then renamed: the card first, so that a
    crash never leaves new weights beside an old card (an old card would describe them wrongly without a
    word: classes, normalisation, input policy). A crash between the two renames leaves the new card with
    the old weights and the new ones in ``model.safetensors.tmp``, whose metadata names the card they were
    saved with (``card_sha256``); ``load_bundle`` refuses that folder and says how to finish the save.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: _stored(k, v.detach().cpu(), DTYPES[storage]) for k, v in model.state_dict().items()}
    card_bytes = (json.dumps(card.to_dict(), indent=2) + "\n").encode("utf-8")
    tmp_weights = folder / (WEIGHTS_FILE + ".tmp")
    metadata = {"format": FORMAT, "name": card.name, "version": card.version, "card_sha256": _sha256(card_bytes)}
    save_file(state, str(tmp_weights), metadata=metadata)
    tmp_weights.chmod(0o644)  # readable by the service's own user, like the card
    tmp_card = folder / (CARD_FILE + ".tmp")
    tmp_card.write_bytes(card_bytes)
    for tmp in (tmp_weights, tmp_card):  # durable before either is renamed: no rename of an empty file
        fsync_path(tmp)
    tmp_card.replace(folder / CARD_FILE)
    tmp_weights.replace(folder / WEIGHTS_FILE)
    fsync_path(folder)
    return folder


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _interrupted_save(folder: Path) -> bool:
    """True when ``folder`` holds a card whose weights are still in ``model.safetensors.tmp``: a save that
    crashed between its two renames."""
    pending = folder / (WEIGHTS_FILE + ".tmp")
    if not pending.is_file():
        return False
    try:
        with safe_open(str(pending), "pt") as f:
            saved_with = (f.metadata() or {}).get("card_sha256")
        card_bytes = (folder / CARD_FILE).read_bytes()
    except (SafetensorError, OSError, ValueError):
        return False  # a save cut short before its card was renamed: the folder is the old bundle, whole
    return saved_with == _sha256(card_bytes)


def _stored(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tensor as stored: floats in ``dtype``, except normalisation statistics and anything the narrower
    type cannot hold (float16 overflows at 65504, where a BatchNorm running variance can get to), which stay
    float32. Integer buffers stay as they are."""
    if not tensor.is_floating_point():
        return tensor.contiguous()
    if dtype != torch.float32 and (
        key.endswith(("running_mean", "running_var"))
        or (tensor.numel() > 0 and float(tensor.abs().max()) > torch.finfo(dtype).max)
    ):
        return tensor.to(torch.float32).contiguous()
    return tensor.to(dtype).contiguous()
