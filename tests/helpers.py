"""Shared test helpers: tiny bundles and generated images (no dataset files needed)."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import Card, ClassInfo, Dataset, InputPolicy, InstanceSpec, save_bundle
from model.inference import to_tensor
from model.unet import UNet, UNetConfig

# Real datasets, read in place (UNETSEG_DATASETS, default ../shared/datasets beside the checkout);
# tests that need them skip without it.
DATASETS = Path(
    os.environ.get("UNETSEG_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets"
).resolve()


def tiny_card(
    name: str = "tiny", channels: int = 3, classes: int = 2, sizing: str = "resize", size: int = 32, **overrides: Any
) -> Card:
    arch = UNetConfig(in_channels=channels, num_classes=classes, base_width=4, depth=2)
    colors = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]
    fields: dict[str, Any] = dict(
        name=name,
        version="0.0.1",
        architecture=arch,
        classes=tuple(ClassInfo(i, "background" if i == 0 else f"class{i}", colors[i]) for i in range(classes)),
        input=InputPolicy(channels, (0.5,) * channels, (0.25,) * channels, sizing, size, 0.25),  # type: ignore[arg-type]
        dataset=Dataset("synthetic", license="CC0"),
        metrics={"val_dice": 0.5},
    )
    fields.update(overrides)
    return Card(**fields)


def write_tiny_bundle(folder: Path, seed: int = 0, **card_args: Any) -> tuple[Path, Card, UNet]:
    card = tiny_card(**card_args)
    torch.manual_seed(seed)
    model = UNet(card.architecture).eval()
    # Random BatchNorm statistics, so that eval-mode outputs are not degenerate.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    save_bundle(folder, card, model, "float32")
    return folder, card, model


def image_bytes(
    width: int = 40, height: int = 30, mode: str = "RGB", fmt: str = "PNG", seed: int = 0, **save_args: Any
) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def write_instance_bundle(folder: Path, spec: InstanceSpec, seed: int = 1, **card_args: Any) -> tuple[Path, Card]:
    """A tiny bundle whose card has ``instances``, its output bias shifted so that every class wins somewhere
    (each class's median logit on a generated image becomes 0): an untrained tiny model otherwise often
    predicts one class everywhere, and has no instances to show."""
    folder, card, model = write_tiny_bundle(folder, seed=seed, instances=spec, **card_args)
    mode = "RGB" if card.input.channels == 3 else "L"
    size = card.input.size
    image = np.asarray(Image.open(io.BytesIO(image_bytes(size, size, seed=99))).convert(mode))
    with torch.no_grad():
        out = model(to_tensor(image, card.input)[None])[0]  # (K, size, size)
        model.outc.conv.bias -= out.flatten(1).median(1).values
    save_bundle(folder, card, model, "float32")
    return folder, card


class FakeCuda:
    """Stands in for the CUDA driver queries: per-device compute capabilities, and which device is current."""

    def __init__(self, capabilities: dict[int, tuple[int, int]]) -> None:
        self.capabilities = capabilities
        self.current = 0
        self.asked: list[tuple[str, int, bool | None]] = []

    def get_device_capability(self, index: int) -> tuple[int, int]:
        self.asked.append(("capability", index, None))
        return self.capabilities[index]

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        self.asked.append(("bf16", self.current, including_emulation))
        major = self.capabilities[self.current][0]
        return major >= 8 or including_emulation  # what torch answers: emulation counts by default

    @contextlib.contextmanager
    def device(self, index: int) -> Iterator[None]:
        before, self.current = self.current, index
        try:
            yield
        finally:
            self.current = before


def install_fake_cuda(monkeypatch: pytest.MonkeyPatch, capabilities: dict[int, tuple[int, int]]) -> FakeCuda:
    """Answer torch's CUDA queries from ``capabilities`` (device index -> compute capability) for one test."""
    fake = FakeCuda(capabilities)
    monkeypatch.setattr(torch.cuda, "get_device_capability", fake.get_device_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake.is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    return fake
