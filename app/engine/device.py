"""Device, precision, CUDA streams and the input shapes a model is warmed up on. The device and what it runs
natively are chosen as training chooses them (``model.device``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from model.bundle import DTYPES, Card, InputPolicy
from model.device import cuda_index, device_supports, native_bf16, resolve_device

__all__ = [
    "cuda_index",
    "device_supports",
    "input_shapes",
    "native_bf16",
    "new_stream",
    "on_stream",
    "resolve_device",
    "resolve_dtype",
    "resolve_streams",
    "set_own_threads",
    "stream_threads",
    "warmup_batches",
]


def set_own_threads(n: int) -> None:
    """The calling thread's torch thread count (the size of its OpenMP team), kept whatever other threads set.

    ``torch.set_num_threads`` sets the calling thread's count and a process-wide one; the first time a thread
    reads its count (``torch.get_num_threads``, or any operation that may run in parallel) torch replaces the
    thread's own count with the process-wide one, which is whatever any thread set last. A thread that set
    its count before then lost it: the engine's worker set two, an I/O thread started after it set one, and
    every forward pass ran on one thread of two. Reading the count first spends that replacement now."""
    torch.get_num_threads()
    torch.set_num_threads(n)


# The most CPU streams a model gets by default: each holds a batch's activations at its peak (polyp 3.0.0 in
# bfloat16: about 27 MiB per input, and a CPU batch may reach 16 inputs), so a many-core host gets 8 streams
# of several threads rather than one per core.
MAX_CPU_STREAMS = 8


def resolve_streams(setting: int, device: torch.device, cores: int | None = None) -> int:
    """Forward passes each model runs at once (``UNETSEG_STREAMS``): the setting, or for 0 one per torch thread
    (or per core of ``cores``) on the CPU, each on one thread, at most ``MAX_CPU_STREAMS``; one on any other
    device.

    On a CPU, single-thread passes side by side beat one pass on every thread whenever more than one request
    waits: that pass's threads wait for each other at every operation, and for any other work that takes a core
    (polyp 3.0.0 on a 2-core VM served 24 images/s to 8 clients with two streams, 17 with one; measured with
    ``bench.run``, docs/benchmarks.md). A lone request still runs on every thread (``batching``)."""
    if setting:
        return setting
    if device.type != "cpu":
        return 1
    return max(1, min(MAX_CPU_STREAMS, cores or torch.get_num_threads()))


def stream_threads(streams: int, device_type: str = "cpu") -> int:
    """Torch threads for each of ``streams`` CPU workers: an equal share of torch's threads, at least one.

    0 (leave the thread count alone) for a single worker or a device other than the CPU.
    """
    if streams <= 1 or device_type != "cpu":
        return 0
    return max(1, torch.get_num_threads() // streams)


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
