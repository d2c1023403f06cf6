"""The jobs' one door into inference: every call jobs make into the models (and the predict pipeline) is here.

Jobs use the same inference as interactive predictions, in this process or in the engine process that
``unetseg serve --workers`` front ends share, with the same memory budget (each region is one call and
reserves what it holds), as background work: a model's batches take job inputs only when no interactive
request waits. Nothing here imports torch, except ``open_engine`` (``unetseg segment SLIDE``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from app.config import Settings
from app.errors import NotReady, Overloaded
from app.inference import Inference
from app.pipeline import Answer, Ask, predict, segment
from model.card import Card
from model.pixels import tile_origins

if TYPE_CHECKING:
    from app.engine import Engine

log = logging.getLogger("unetseg.jobs")
T = TypeVar("T")

# Longest wait before work refused for lack of room (queue or memory budget) is tried again.
MAX_BACKOFF_S = 5.0
# Longest an engine may not answer before the job's work fails (an engine process restarts within it).
NOT_READY_S = 300.0


def model_card(engine: Inference, name: str | None) -> Card:
    """The card of the model ``name`` (the default when None); ``UnknownModel`` (404) when not loaded."""
    return engine.get(name).card


def model_name(engine: Inference, name: str | None) -> str:
    return engine.get(name).name


def tiles_for(card: Card, height: int, width: int) -> int:
    """The model inputs (tiles, or 1 for a resizing model) an (height, width) region is segmented in."""
    policy = card.input
    if policy.sizing == "resize":
        return 1
    return len(tile_origins(height, policy.size, policy.overlap)) * len(
        tile_origins(width, policy.size, policy.overlap)
    )


async def _with_room(attempt: Callable[[], Awaitable[T]], not_ready_s: float = NOT_READY_S) -> T:
    """``attempt()``, tried again with a growing pause while the engine has no room (its queue full, or the
    memory budget held by others), as long as that takes, or does not answer (the engine process of ``serve
    --workers`` restarting) for up to ``not_ready_s`` in a row: an engine that stays away (a model whose
    worker ended) fails the job with its reason."""
    backoff = 0.1
    away_since: float | None = None
    while True:
        try:
            return await attempt()
        except (Overloaded, NotReady) as exc:
            if isinstance(exc, NotReady):
                if away_since is None:
                    away_since = time.monotonic()
                elif time.monotonic() - away_since > not_ready_s:
                    raise
            else:
                away_since = None
            wait = min(MAX_BACKOFF_S, backoff, float(exc.headers.get("Retry-After", "1")))
            log.debug("job work waits %.1f s: %s", wait, exc.detail)
            await asyncio.sleep(wait)
            backoff = min(MAX_BACKOFF_S, backoff * 2)


async def segment_region(
    engine: Inference,
    name: str,
    region: np.ndarray,
    executor: concurrent.futures.Executor | None,
    instances: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, C) uint8 region in the model's channels -> (H, W) uint8 class ids and, with ``instances`` (for
    a model with instances), (H, W) int32 instance ids 0..N. A region that alone is over the memory budget
    raises ``ImageTooLarge``."""
    mask, ids, _ = await _with_room(lambda: segment(engine, name, region, executor, instances, background=True))
    return mask, ids


async def predict_bytes(
    engine: Inference, ask: Ask, data: bytes, max_pixels: int, executor: concurrent.futures.Executor | None
) -> Answer:
    """An image job: what ``POST /v1/predict`` answers for ``data``, without its time limit, as background work."""
    return await _with_room(lambda: predict(engine, ask, data, max_pixels, executor, background=True))


def open_engine(bundle: Path, settings: Settings) -> Engine:
    """An engine for one bundle in this process (``unetseg segment SLIDE``). On the CPU it runs one
    single-thread stream per core unless ``UNETSEG_STREAMS`` says otherwise, as the service does. It warms up
    only to measure its batch limit (``UNETSEG_MAX_BATCH=0``)."""
    from app.engine import Engine, resolve_device
    from app.engine.device import resolve_streams
    from model.bundle import load_bundle

    loaded = load_bundle(bundle)
    device = resolve_device(settings.device)
    streams = resolve_streams(settings.streams, device)
    engine = Engine(
        [loaded],
        device,
        precision=settings.precision,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        streams=streams,
        graph=settings.graph,
        cuda_graphs=settings.cuda_graphs,
        max_inflight_bytes=settings.max_inflight_mb * 1024 * 1024,
    )
    engine.start(warmup=settings.max_batch == 0)
    return engine
