"""The only place where requests meet torch: device, precision, queueing, dynamic batching, threads.

One ``ModelEngine`` per loaded model owns a worker thread and a bounded queue of jobs. A job is one
request's inputs: one resized image, or all the tiles of a large image. The worker collects inputs from
the queued jobs until it has ``max_batch`` of them or ``max_wait`` has passed since the first, groups them
by input shape, runs one forward pass per group, and hands each job its own slice of the logits.
With ``streams`` > 1, that many workers take jobs from the same queue and run their forward passes at
once; on the CPU each gets its share of the torch threads (under load, two single-thread forward passes
get more done than one two-thread pass, whose threads wait for each other at every operation).

- A full queue raises ``Overloaded`` (503 with Retry-After) at once: no request waits unboundedly.
- A batch that fails is retried item by item, so a failing input fails only its own request.
- A cancelled job (its request timed out or went away) is skipped.
- ``stop()`` refuses new jobs and finishes every job already queued before the thread exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from app.errors import InferenceFailed, Overloaded, RequestTimeout, UnknownModel
from model.bundle import DTYPES, Bundle, Card, discover, load_bundle
from model.inference import Plan, finish, make_plan

log = logging.getLogger("unetseg.engine")


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


def device_supports(dtype: torch.dtype, device: torch.device) -> bool:
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
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


@dataclass
class Timing:
    queue_s: float = 0.0
    model_s: float = 0.0


@dataclass(eq=False)  # identity comparison: jobs hold tensors
class _Job:
    inputs: torch.Tensor  # (N, C, h, w) float32 on the CPU
    future: concurrent.futures.Future[tuple[torch.Tensor, Timing]]
    enqueued: float
    outputs: torch.Tensor | None = None  # (N, K, h, w) float32, filled batch by batch
    scheduled: int = 0
    done: int = 0
    started: float | None = None
    model_s: float = 0.0
    failed: bool = False

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


_STOP = object()


@dataclass
class EngineStats:
    batches: int = 0
    items: int = 0
    rejected: int = 0
    failed: int = 0


class ModelEngine:
    def __init__(
        self,
        bundle: Bundle,
        device: torch.device,
        dtype: torch.dtype,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        queue_size: int = 64,
        compile: bool = False,
        streams: int = 1,
    ) -> None:
        if streams < 1:
            raise ValueError("streams must be at least 1")
        self.card = bundle.card
        self.name = bundle.card.name
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.channels_last = device.type == "cuda" or dtype != torch.float32
        t0 = time.perf_counter()
        model = bundle.model.to(device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if compile else model
        self.to_device_s = time.perf_counter() - t0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self.streams = streams
        # On the CPU several streams share the cores: each worker runs its forward passes on its share.
        self.threads_per_stream = stream_threads(streams, device.type)
        self._threads = [
            threading.Thread(target=self._run_stream, name=f"engine-{self.name}-{i}", daemon=True)
            for i in range(streams)
        ]
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()
        self.on_batch: Callable[[str, int], None] | None = None  # (model, batch size), for metrics
        self.load_s = bundle.load_s + self.to_device_s  # read, moved to the device and (later) warmed up

    # --- public API ------------------------------------------------------------------------------

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def warmup(self) -> None:
        """Run the shapes the service will see (batch 1 and a full batch) once, before reporting ready."""
        p = self.card.input
        t0 = time.perf_counter()
        for n in sorted({1, self.max_batch}):
            x = torch.zeros(n, p.channels, p.size, p.size)
            self._forward(x)
        self.load_s += time.perf_counter() - t0

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def submit(self, inputs: torch.Tensor) -> concurrent.futures.Future[tuple[torch.Tensor, Timing]]:
        """Queue a job; its future gives (logits (N, K, h, w) float32 CPU, timing)."""
        if self._closed:
            raise Overloaded("the service is shutting down", retry_after_s=5)
        fut: concurrent.futures.Future[tuple[torch.Tensor, Timing]] = concurrent.futures.Future()
        try:
            self._queue.put_nowait(_Job(inputs, fut, time.perf_counter()))
        except queue.Full:
            self.stats.rejected += 1
            raise Overloaded(f"model {self.name!r} has {self._queue.maxsize} requests waiting; retry shortly") from None
        return fut

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is queued, and end the worker thread."""
        if self._closed:
            return
        self._closed = True
        alive = [t for t in self._threads if t.is_alive()]
        if alive:
            self._queue.put(_STOP)  # passed on from worker to worker: each drains the queue, then exits
        for t in alive:
            t.join(timeout)

    # --- worker ----------------------------------------------------------------------------------

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) CPU float32 -> (B, K, h, w) CPU float32."""
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            y = self.model(x)
        return y.float().cpu()

    def _run_stream(self) -> None:
        if self.threads_per_stream:
            torch.set_num_threads(self.threads_per_stream)
        self._run()

    def _run(self) -> None:
        pending: deque[_Job] = deque()
        stopping = False
        while True:
            if not pending:
                if stopping and self._queue.empty():
                    self._queue.put(_STOP)  # for the next worker (it stays behind when the last one exits)
                    return
                item = self._queue.get()
                if item is _STOP:
                    stopping = True
                    continue
                assert isinstance(item, _Job)
                pending.append(item)
            deadline = time.perf_counter() + self.max_wait_s
            while sum(j.size - j.scheduled for j in pending) < self.max_batch:
                try:
                    if stopping:
                        item = self._queue.get_nowait()
                    else:
                        item = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    continue
                assert isinstance(item, _Job)
                pending.append(item)
            for job in [j for j in pending if j.future.cancelled()]:
                pending.remove(job)
            if not pending:
                continue
            self._run_batch(pending)
            for job in [j for j in pending if j.scheduled == j.size]:
                pending.remove(job)

    def _run_batch(self, pending: deque[_Job]) -> None:
        shape = pending[0].inputs.shape[1:]
        batch: list[tuple[_Job, int]] = []
        for job in pending:
            if job.inputs.shape[1:] != shape:
                continue
            while job.scheduled < job.size and len(batch) < self.max_batch:
                batch.append((job, job.scheduled))
                job.scheduled += 1
            if len(batch) == self.max_batch:
                break
        now = time.perf_counter()
        for job, _ in batch:
            if job.started is None:
                job.started = now
        x = torch.stack([job.inputs[i] for job, i in batch])
        try:
            out = self._forward(x)
            elapsed = time.perf_counter() - now
            with self._stats_lock:
                self.stats.batches += 1
                self.stats.items += len(batch)
            if self.on_batch:
                self.on_batch(self.name, len(batch))
            for job in {id(j): j for j, _ in batch}.values():
                job.model_s += elapsed
            for (job, i), y in zip(batch, out, strict=True):
                self._deliver(job, i, y)
        except Exception:
            log.exception("batch of %d failed on model %s; retrying its items one by one", len(batch), self.name)
            for job, i in batch:
                t0 = time.perf_counter()
                try:
                    y = self._forward(job.inputs[i : i + 1])[0]
                except Exception as exc:  # noqa: BLE001 - reported to that request only
                    with self._stats_lock:
                        self.stats.failed += 1
                    job.failed = True
                    with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
                        job.future.set_exception(InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}"))
                    continue
                job.model_s += time.perf_counter() - t0
                self._deliver(job, i, y)

    def _deliver(self, job: _Job, index: int, logits: torch.Tensor) -> None:
        if job.failed:
            return
        if job.outputs is None:
            job.outputs = torch.empty((job.size, *logits.shape), dtype=logits.dtype)
        job.outputs[index] = logits
        job.done += 1
        if job.done == job.size:
            assert job.started is not None
            timing = Timing(queue_s=job.started - job.enqueued, model_s=job.model_s)
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
                job.future.set_result((job.outputs, timing))


@dataclass
class Segmentation:
    mask: np.ndarray  # (H, W) uint8 class ids
    model: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds: prepare, queue, model (+ finish)


class Engine:
    """All loaded models and their workers; the service's single entry point into inference."""

    def __init__(
        self,
        bundles: Iterable[Bundle],
        device: torch.device,
        precision: str = "auto",
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        queue_size: int = 64,
        compile: bool = False,
        default_model: str | None = None,
        streams: int = 1,
    ) -> None:
        self.device = device
        self.models: dict[str, ModelEngine] = {}
        for b in bundles:
            if b.card.name in self.models:
                raise ValueError(f"two bundles are named {b.card.name!r} ({b.path})")
            dtype = resolve_dtype(precision, b.card, device)
            self.models[b.card.name] = ModelEngine(
                b, device, dtype, max_batch, max_wait_s, queue_size, compile, streams
            )
        if not self.models:
            raise ValueError("no model bundles to serve")
        if default_model in self.models:
            self.default_model = default_model
        else:
            self.default_model = next(iter(self.models))
            if default_model:
                log.warning("default model %r is not loaded; using %r", default_model, self.default_model)

    @classmethod
    def from_folder(cls, weights_dir: Path, device: torch.device, **kwargs: object) -> Engine:
        bundles = [load_bundle(folder) for folder in discover(weights_dir)]
        if not bundles:
            raise ValueError(f"{weights_dir} holds no model bundle (a folder with card.json and model.safetensors)")
        return cls(bundles, device, **kwargs)  # type: ignore[arg-type]

    def start(self, warmup: bool = True) -> None:
        for m in self.models.values():
            if warmup:
                m.warmup()
            m.start()

    def stop(self, timeout: float | None = None) -> None:
        for m in self.models.values():
            m.stop(timeout)

    def get(self, name: str | None) -> ModelEngine:
        key = name or self.default_model
        try:
            return self.models[key]
        except KeyError:
            raise UnknownModel(f"unknown model {key!r}; available: {', '.join(sorted(self.models))}") from None

    async def segment(
        self,
        name: str | None,
        image: np.ndarray,
        executor: concurrent.futures.Executor | None = None,
        timeout_s: float | None = None,
        size: tuple[int, int] | None = None,
    ) -> Segmentation:
        """Segment an (H, W[, C]) uint8 image, already in the model's channels, off the event loop.

        ``size``: the (height, width) of the mask when ``image`` is a reduced copy (see ``make_plan``).
        """
        engine = self.get(name)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        plan: Plan = await loop.run_in_executor(executor, make_plan, image, engine.card.input, size)
        prepare_s = time.perf_counter() - t0
        fut = engine.submit(plan.inputs)
        try:
            logits, timing = await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"the prediction did not finish within {timeout_s:g} s") from None
        t0 = time.perf_counter()
        mask = await loop.run_in_executor(executor, finish, plan, logits)
        model_s = timing.model_s + time.perf_counter() - t0
        return Segmentation(mask, engine.name, {"prepare": prepare_s, "queue": timing.queue_s, "model": model_s})

    def segment_sync(self, name: str | None, image: np.ndarray) -> Segmentation:
        """The same pipeline without an event loop (for the CLI)."""
        engine = self.get(name)
        t0 = time.perf_counter()
        plan = make_plan(image, engine.card.input)
        prepare_s = time.perf_counter() - t0
        logits, timing = engine.submit(plan.inputs).result()
        t1 = time.perf_counter()
        mask = finish(plan, logits)
        model_s = timing.model_s + time.perf_counter() - t1
        return Segmentation(mask, engine.name, {"prepare": prepare_s, "queue": timing.queue_s, "model": model_s})
