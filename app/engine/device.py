"""Device, precision, CUDA streams and the input shapes a model is warmed up on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from model.bundle import DTYPES, Card, InputPolicy


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


def stream_threads(streams: int, device_type: str = "cpu") -> int:
    """Torch threads for each of ``streams`` CPU workers: an equal share of torch's threads, at least one.

    0 (leave the thread count alone) for a single worker or a device other than the CPU.
    """
    if streams <= 1 or device_type != "cpu":
        return 0
    return max(1, torch.get_num_threads() // streams)


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


def device_supports(dtype: torch.dtype, device: torch.device) -> bool:
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or native_bf16(device)
    if dtype == torch.bfloat16:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False  # float16 autocast on CPU is slow and not what cards are checked for


def resolve_dtype(setting: str, card: Card, device: torch.device) -> torch.dtype:
    """The inference dtype: the setting when explicit, else the card's first precision the device supports."""
    if setting != "auto":
        dtype = DTYPES[setting]
        if not device_supports(dtype, device):
            raise ValueError(f"precision {setting} is not supported on {device}")
        return dtype
    for name in card.precisions:
        if device_supports(DTYPES[name], device):
            return DTYPES[name]
    return torch.float32


def new_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A CUDA stream of its own for one engine worker (so that workers overlap), None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Queue the enclosed CUDA work on ``stream``; nothing to do without one."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield


def input_shapes(policy: InputPolicy) -> list[tuple[int, int, int]]:
    """Every (C, h, w) the engine feeds a model with this policy: the warm-up runs each of them.

    One shape per policy: "resize" inputs are ``size`` x ``size``, and tiles are too (an image smaller than
    a tile is padded up to one), so that a compiled model never meets a new shape once it reported ready.
    """
    return [(policy.channels, policy.size, policy.size)]


def warmup_batches(max_batch: int) -> list[int]:
    """Batch sizes to warm up: 1 and ``max_batch`` (with a compiled model, the second one is marked dynamic,
    so one graph serves every size from 2 to ``max_batch``)."""
    return sorted({1, max_batch})
