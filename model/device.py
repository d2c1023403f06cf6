"""Which device to run on and which precisions it runs natively: one answer for training and serving.

bfloat16 counts as supported only where the hardware runs it natively: CUDA devices of compute capability
8.0 or later (Ampere, Hopper...) and CPUs whose oneDNN has bf16 kernels (AVX512-BF16 or AMX). Older CUDA
cards (T4, V100) emulate it, slower than float32, and ``torch.cuda.is_bf16_supported()`` alone counts that
emulation by default; a model trained or served in emulated bf16 pays the precision loss for no speed.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; otherwise the named device (checked to exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def cuda_index(device: torch.device) -> int:
    """The CUDA device's index: ``cuda`` alone means the current device, as torch reads it."""
    return device.index if device.index is not None else torch.cuda.current_device()


def native_bf16(device: torch.device) -> bool:
    """Whether this CUDA device runs bfloat16 natively (compute capability 8.0 or later).

    Not ``torch.cuda.is_bf16_supported()`` alone: by default it also counts the emulation that T4- and
    V100-class cards offer (slower than float16), and it asks about the *current* device, not ``cuda:N``.
    """
    index = cuda_index(device)
    major, _ = torch.cuda.get_device_capability(index)
    if major < 8:
        return False
    with torch.cuda.device(index):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def cpu_supports_bf16() -> bool:
    """Whether oneDNN (mkldnn) has native bf16 kernels for this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def device_supports(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` runs ``dtype`` natively (float32 always; float16 on CUDA; bf16 as above)."""
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or native_bf16(device)
    if dtype == torch.bfloat16:
        return cpu_supports_bf16()
    return False  # float16 autocast on CPU is slow and not what cards are checked for


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of a training run: ``precision`` when explicit (float32 or bfloat16; an explicit
    bfloat16 is honoured even where it is emulated), else bfloat16 where ``device`` runs it natively."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device_supports(torch.bfloat16, device) else torch.float32


def hardware(device: torch.device) -> str:
    """What the card and the benchmarks record as the machine: the GPU's name, or the CPU's and its threads."""
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
