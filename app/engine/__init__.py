"""The only place where requests meet torch: device, precision, queueing, dynamic batching, threads, memory.

The package, by job:

- ``batching``: which inputs run together and when (admission, fairness, waiting), plain Python;
- ``workers``: one model's worker threads (``ModelEngine``): batches in, logits delivered, failures local;
- ``runner``: the model on its device (normalisation, forward pass, frozen or CUDA graphs, pinned staging,
  the measured batch limit); ``device``: device and precision choices; ``graph``: the frozen graph;
- ``work``: a request's inputs and their post-processing on the device, and the memory they need (counted
  by ``app.budget.MemoryBudget``).

``Engine`` holds every loaded model and the budget shared by all requests in flight. A request goes through
it in three steps, which the service's pipeline (``app.pipeline``) runs on two hand-offs to its I/O threads
and one to a model's worker: ``prepare`` (reserve its memory, make its work: the resized uint8 input, or
the lazily cut tiles), ``run`` (wait for the model, giving up when the request times out or its client
hangs up), ``finish`` (the mask and instance ids, copied from the device).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from app.budget import MemoryBudget
from app.engine.batching import Job, Timing
from app.engine.device import device_supports, native_bf16, resolve_device, resolve_dtype, stream_threads
from app.engine.work import TRIM_BYTES, ResizedWork, TensorWork, TiledWork, work_bytes
from app.engine.workers import EngineStats, ModelEngine
from app.errors import UnknownModel
from app.heap import trim_memory
from app.inference import ClientGone, wait_for
from model.bundle import Bundle, Card, InstanceSpec, discover, load_bundle
from model.instances import instances_from_logits

__all__ = [
    "ClientGone",
    "Engine",
    "EngineStats",
    "Job",
    "MemoryBudget",
    "ModelEngine",
    "Prepared",
    "Segmentation",
    "TensorWork",
    "Timing",
    "device_supports",
    "make_work",
    "native_bf16",
    "resolve_device",
    "resolve_dtype",
    "stream_threads",
]

log = logging.getLogger("unetseg.engine")


@dataclass
class Segmentation:
    mask: np.ndarray  # (H, W) uint8 class ids
    model: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds: prepare, queue, model, post
    instances: np.ndarray | None = None  # (H, W) int32 ids 0..N when asked for, for a model with instances


def make_work(
    engine: ModelEngine, image: np.ndarray, size: tuple[int, int] | None, keep_logits: bool = False
) -> ResizedWork | TiledWork:
    """The model inputs for an image: one resized uint8 input, or its tiles (cut when they are batched)."""
    policy = engine.card.input
    if policy.sizing == "resize":
        return ResizedWork(image, policy, size, keep_logits)
    if size is not None and tuple(size) != image.shape[:2]:
        raise ValueError("tiled inference needs the image at its full size")
    return TiledWork(image, policy, len(engine.card.classes), engine.device)


@dataclass
class Prepared:
    """A request's work for one model, with the memory it reserved (``Engine.release`` gives it back)."""

    engine: ModelEngine
    work: ResizedWork | TiledWork
    spec: InstanceSpec | None  # make instances, for a model that has them
    nbytes: int
    prepare_s: float
    timing: Timing = field(default_factory=Timing)
    released: bool = False

    @property
    def card(self) -> Card:
        return self.engine.card


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
        cuda_graphs: bool = True,
    ) -> None:
        self.device = device
        self.models: dict[str, ModelEngine] = {}
        for b in bundles:
            if b.card.name in self.models:
                raise ValueError(f"two bundles are named {b.card.name!r} ({b.path})")
            dtype = resolve_dtype(precision, b.card, device)
            self.models[b.card.name] = ModelEngine(
                b, device, dtype, max_batch, max_wait_s, queue_size, compile, streams, graph, cuda_graphs
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

    def gpu_memory(self) -> dict[str, tuple[int, int]]:
        """(bytes allocated, bytes reserved) by torch on the CUDA device; empty off CUDA."""
        if self.device.type != "cuda":
            return {}
        return {str(self.device): (torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device))}

    def get(self, name: str | None) -> ModelEngine:
        key = name or self.default_model
        try:
            return self.models[key]
        except KeyError:
            raise UnknownModel(f"unknown model {key!r}; available: {', '.join(sorted(self.models))}") from None

    def _retry_after_s(self) -> int:
        return max(1, min(60, math.ceil(sum(m.pending_s() for m in self.models.values()))))

    # --- the three steps of a request -------------------------------------------------------------

    def prepare(
        self,
        name: str | None,
        image: np.ndarray,
        size: tuple[int, int] | None = None,
        instances: bool = False,
        extra_bytes: int = 0,
    ) -> Prepared:
        """Reserve what an (H, W[, C]) uint8 image, already in the model's channels, will hold, and make its work
        (in an I/O thread: resizing is CPU work). ``size``: the (height, width) of the mask when ``image`` is a
        reduced copy. ``instances``: also make instance ids, for a model whose card has them. ``extra_bytes``:
        what the caller will add (its encoded answer). Over the memory budget: ``Overloaded`` (503) or, for an
        image that alone would pass it, ``ImageTooLarge`` (413)."""
        engine = self.get(name)
        spec = engine.card.instances if instances else None
        nbytes = work_bytes(image, engine.card.input, len(engine.card.classes), size, spec is not None) + extra_bytes
        self.budget.reserve(nbytes, self._retry_after_s())
        try:
            t0 = time.perf_counter()
            work = make_work(engine, image, size, keep_logits=spec is not None)
        except BaseException:
            self.budget.release(nbytes)
            raise
        return Prepared(engine, work, spec, nbytes, time.perf_counter() - t0)

    async def run(
        self,
        prepared: Prepared,
        timeout_s: float | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        background: bool = False,
    ) -> Timing:
        """Queue the work and wait for the model (on the event loop, without blocking it).

        ``disconnected``: polled while the job waits (``request.is_disconnected``); when it says so, the job
        is dropped and ``ClientGone`` raised. Past ``timeout_s``: ``RequestTimeout`` (504), the job dropped.
        ``background``: after every interactive request (an asynchronous job's work).
        """
        if disconnected is not None and await disconnected():  # gone while its image was being decoded
            raise ClientGone("the client closed the connection before its prediction started")
        fut = prepared.engine.submit_work(prepared.work, background=background)
        try:
            prepared.timing = await wait_for(asyncio.wrap_future(fut), timeout_s, disconnected)
        finally:
            fut.cancel()  # a no-op once done; otherwise the job leaves the queue now
        return prepared.timing

    def finish(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray | None]:
        """The (H, W) uint8 class map and, when asked for, the (H, W) int32 instance ids, on the host (in an I/O
        thread: the copy from the device and the watershed are CPU work). Adds their time to ``post``."""
        t0 = time.perf_counter()
        mask = prepared.work.mask()
        ids = instances_from_logits(prepared.work.logits(), prepared.spec) if prepared.spec is not None else None
        prepared.timing.post_s += time.perf_counter() - t0
        return mask, ids

    def release(self, prepared: Prepared) -> None:
        """Give back what ``prepare`` reserved (once); after a large job, hand freed memory to the system."""
        if prepared.released:
            return
        prepared.released = True
        self.budget.release(prepared.nbytes)
        if prepared.nbytes >= TRIM_BYTES:
            trim_memory()

    # --- the three steps at once, without an event loop (tests and scripts) ------------------------

    def segment_sync(self, name: str | None, image: np.ndarray, instances: bool = False) -> Segmentation:
        """The same without an event loop (for tests and scripts)."""
        prepared = self.prepare(name, image, None, instances)
        try:
            timing = prepared.engine.submit_work(prepared.work).result()
            prepared.timing = timing
            mask, ids = self.finish(prepared)
        finally:
            self.release(prepared)
        return Segmentation(mask, prepared.engine.name, timings(prepared, timing), ids)


def timings(prepared: Prepared, timing: Timing) -> dict[str, float]:
    """A request's engine timings in seconds: prepare, queue, model (device time), post (after the model)."""
    return {"prepare": prepared.prepare_s, "queue": timing.queue_s, "model": timing.model_s, "post": timing.post_s}
