"""The only place where requests meet torch: device, precision, queueing, dynamic batching, threads, memory.

One ``ModelEngine`` (``scheduler``) per loaded model owns its worker threads and its queue of jobs; the
``Engine`` here holds them all, the memory budget shared by every request in flight (``work``), and
the pipeline a request goes through: reserve its memory, make its work (lazily tiled or resized), wait
for the model (giving up when the request times out or its client hangs up), make the mask.
Device and precision choices are in ``device``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from app.engine.device import device_supports, native_bf16, resolve_device, resolve_dtype, stream_threads
from app.engine.scheduler import EngineStats, Job, ModelEngine, Timing
from app.engine.work import TRIM_BYTES, MemoryBudget, ResizedWork, TiledWork, trim_memory, work_bytes
from app.errors import RequestTimeout, ServiceError, UnknownModel
from model.bundle import Bundle, InstanceSpec, discover, load_bundle
from model.instances import instances_from_logits

__all__ = [
    "ClientGone",
    "Engine",
    "EngineStats",
    "Job",
    "MemoryBudget",
    "ModelEngine",
    "Segmentation",
    "Timing",
    "device_supports",
    "native_bf16",
    "resolve_device",
    "resolve_dtype",
    "stream_threads",
]

log = logging.getLogger("unetseg.engine")

# How often a request waiting for the model checks whether its client is still there.
DISCONNECT_POLL_S = 0.1


class ClientGone(ServiceError):
    """The client closed the connection before its prediction was ready: the job was dropped."""

    status_code = 499  # as nginx logs it: nobody reads this response


@dataclass
class Segmentation:
    mask: np.ndarray  # (H, W) uint8 class ids
    model: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds: prepare, queue, model (+ finish)
    instances: np.ndarray | None = None  # (H, W) int32 ids 0..N when asked for, for a model with instances


def finish_work(work: ResizedWork | TiledWork, spec: InstanceSpec | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The (H, W) uint8 class map and, with ``spec``, the (H, W) int32 instance ids, from the blended logits."""
    mask = work.mask()
    return mask, (instances_from_logits(work.logits(), spec) if spec is not None else None)


def make_work(engine: ModelEngine, image: np.ndarray, size: tuple[int, int] | None) -> ResizedWork | TiledWork:
    """The model inputs for an image, made lazily for a tiled policy."""
    policy = engine.card.input
    if policy.sizing == "resize":
        return ResizedWork(image, policy, size)
    if size is not None and tuple(size) != image.shape[:2]:
        raise ValueError("tiled inference needs the image at its full size")
    return TiledWork(image, policy, len(engine.card.classes))


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
        max_inflight_bytes: int = 0,
        graph: str = "auto",
    ) -> None:
        self.device = device
        self.models: dict[str, ModelEngine] = {}
        for b in bundles:
            if b.card.name in self.models:
                raise ValueError(f"two bundles are named {b.card.name!r} ({b.path})")
            dtype = resolve_dtype(precision, b.card, device)
            self.models[b.card.name] = ModelEngine(
                b, device, dtype, max_batch, max_wait_s, queue_size, compile, streams, graph
            )
        if not self.models:
            raise ValueError("no model bundles to serve")
        if default_model in self.models:
            self.default_model = default_model
        else:
            self.default_model = next(iter(self.models))
            if default_model:
                log.warning("default model %r is not loaded; using %r", default_model, self.default_model)
        self.budget = MemoryBudget(max_inflight_bytes)

    @classmethod
    def from_folder(cls, weights_dir: Path, device: torch.device, **kwargs: object) -> Engine:
        """Every bundle under ``weights_dir``, or the one bundle ``weights_dir`` is (a folder with a card.json)."""
        one = (Path(weights_dir) / "card.json").is_file()
        bundles = [load_bundle(folder) for folder in ([Path(weights_dir)] if one else discover(weights_dir))]
        if not bundles:
            raise ValueError(f"{weights_dir} holds no model bundle (a folder with card.json and model.safetensors)")
        return cls(bundles, device, **kwargs)  # type: ignore[arg-type]

    def start(self, warmup: bool = True) -> None:
        """Prepare each model (its frozen graph, where asked for), warm it up unless told not to, start it."""
        for m in self.models.values():
            if warmup:
                m.warmup()
            else:
                m.prepare()
            m.start()

    def stop(self, timeout: float | None = None) -> None:
        for m in self.models.values():
            m.stop(timeout)

    def failure(self) -> str | None:
        """Why a model stopped serving (one of its workers ended), or None while all serve."""
        return next((m.failure for m in self.models.values() if m.failure is not None), None)

    def get(self, name: str | None) -> ModelEngine:
        key = name or self.default_model
        try:
            return self.models[key]
        except KeyError:
            raise UnknownModel(f"unknown model {key!r}; available: {', '.join(sorted(self.models))}") from None

    def _retry_after_s(self) -> int:
        return max(1, min(60, math.ceil(sum(m.pending_s() for m in self.models.values()))))

    async def segment(
        self,
        name: str | None,
        image: np.ndarray,
        executor: concurrent.futures.Executor | None = None,
        timeout_s: float | None = None,
        size: tuple[int, int] | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        instances: bool = False,
    ) -> Segmentation:
        """Segment an (H, W[, C]) uint8 image, already in the model's channels, off the event loop.

        ``size``: the (height, width) of the mask when ``image`` is a reduced copy (see ``make_plan``).
        ``disconnected``: polled while the job waits (``request.is_disconnected``); when it says so, the job
        is dropped and ``ClientGone`` raised. Over the memory budget: ``Overloaded`` (503) or, for an image
        that alone would pass it, ``ImageTooLarge`` (413). ``instances``: also make the instance ids, when
        the model's card has ``instances`` (in the executor, like the mask; their time counts as the model's).
        """
        engine = self.get(name)
        spec = engine.card.instances if instances else None
        loop = asyncio.get_running_loop()
        if disconnected is not None and await disconnected():  # gone while its image was being decoded
            raise ClientGone("the client closed the connection before its prediction started")
        nbytes = work_bytes(image, engine.card.input, len(engine.card.classes), size, spec is not None)
        self.budget.reserve(nbytes, self._retry_after_s())
        try:
            t0 = time.perf_counter()
            work = await loop.run_in_executor(executor, make_work, engine, image, size)
            prepare_s = time.perf_counter() - t0
            fut = engine.submit_work(work)
            try:
                timing = await self._wait(fut, timeout_s, disconnected)
            finally:
                fut.cancel()  # a no-op once done; otherwise the job leaves the queue now
            t0 = time.perf_counter()
            mask, ids = await loop.run_in_executor(executor, finish_work, work, spec)
            model_s = timing.model_s + time.perf_counter() - t0
            del work
        finally:
            self.budget.release(nbytes)
            if nbytes >= TRIM_BYTES:
                with contextlib.suppress(RuntimeError):  # the executor is shutting down
                    loop.run_in_executor(executor, trim_memory)
        return Segmentation(mask, engine.name, {"prepare": prepare_s, "queue": timing.queue_s, "model": model_s}, ids)

    @staticmethod
    async def _wait(
        fut: concurrent.futures.Future[Timing],
        timeout_s: float | None,
        disconnected: Callable[[], Awaitable[bool]] | None,
    ) -> Timing:
        loop = asyncio.get_running_loop()
        waiting = asyncio.wrap_future(fut)
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            step = DISCONNECT_POLL_S if disconnected is not None else None
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise RequestTimeout(f"the prediction did not finish within {timeout_s:g} s")
                step = left if step is None else min(step, left)
            done, _ = await asyncio.wait({waiting}, timeout=step)
            if done:
                return waiting.result()
            if disconnected is not None and await disconnected():
                raise ClientGone("the client closed the connection; its prediction was dropped")

    def segment_sync(self, name: str | None, image: np.ndarray, instances: bool = False) -> Segmentation:
        """The same pipeline without an event loop (for the CLI)."""
        engine = self.get(name)
        spec = engine.card.instances if instances else None
        t0 = time.perf_counter()
        work = make_work(engine, image, None)
        prepare_s = time.perf_counter() - t0
        timing = engine.submit_work(work).result()
        t1 = time.perf_counter()
        mask, ids = finish_work(work, spec)
        model_s = timing.model_s + time.perf_counter() - t1
        return Segmentation(mask, engine.name, {"prepare": prepare_s, "queue": timing.queue_s, "model": model_s}, ids)
