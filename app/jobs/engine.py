"""The jobs' one door into the engine: every call jobs make into ``app.engine`` (and the predict pipeline) is here.

Jobs run through the same engine as interactive predictions, with the same memory budget (each region is
one ``segment`` call and reserves what it holds) and the same fair scheduler, which puts a small request
ahead of a large job's remaining tiles. When the engine gains a lower priority for background work, it is
passed in ``segment_region`` and ``segment_image_bytes`` below, and nowhere else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from pathlib import Path

import numpy as np

from app.config import Settings
from app.engine import Engine, resolve_device
from app.engine.work import trim_memory
from app.errors import Overloaded
from app.imaging import Decoded
from app.segment.pipeline import segment_image
from model.bundle import Card, load_bundle
from model.inference import tile_origins

log = logging.getLogger("unetseg.jobs")

# Longest wait before a region refused for lack of room (queue or memory budget) is tried again.
MAX_BACKOFF_S = 5.0


def model_card(engine: Engine, name: str | None) -> Card:
    """The card of the model ``name`` (the default when None); ``UnknownModel`` (404) when not loaded."""
    return engine.get(name).card


def model_name(engine: Engine, name: str | None) -> str:
    return engine.get(name).name


def tiles_for(card: Card, height: int, width: int) -> int:
    """The model inputs (tiles, or 1 for a resizing model) an (height, width) region is segmented in."""
    policy = card.input
    if policy.sizing == "resize":
        return 1
    return len(tile_origins(height, policy.size, policy.overlap)) * len(
        tile_origins(width, policy.size, policy.overlap)
    )


async def segment_region(
    engine: Engine,
    name: str,
    region: np.ndarray,
    executor: concurrent.futures.Executor | None,
    instances: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, C) uint8 region in the model's channels -> (H, W) uint8 class ids and, with ``instances`` (for
    a model with instances), (H, W) int32 instance ids 0..N. No time limit: a job waits as long as it takes.
    While the engine has no room (its queue full, or the memory budget held by others) the region waits and
    is tried again; a region that alone is over the budget raises ``ImageTooLarge``."""
    backoff = 0.1
    while True:
        try:
            # Here the engine's lower priority for job work goes, once it has one.
            seg = await engine.segment(name, region, executor, timeout_s=None, instances=instances)
        except Overloaded as exc:
            wait = min(MAX_BACKOFF_S, backoff, float(exc.headers.get("Retry-After", "1")))
            log.debug("region waits %.1f s: %s", wait, exc.detail)
            await asyncio.sleep(wait)
            backoff = min(MAX_BACKOFF_S, backoff * 2)
            continue
        return seg.mask, seg.instances


async def segment_image_bytes(
    engine: Engine,
    name: str,
    data: bytes,
    max_pixels: int,
    executor: concurrent.futures.Executor | None,
    full_image: bool,
    instances: bool,
) -> tuple[Decoded, np.ndarray, np.ndarray | None, dict[str, float]]:
    """An image job: the predict pipeline (decode, segment) without its time limit, waiting while the engine
    has no room. Returns the decoded image, the class ids, the instance ids (or None) and the timings."""
    backoff = 0.1
    while True:
        try:
            # Here too: the engine's lower priority for job work, once it has one.
            decoded, seg = await segment_image(
                engine, name, data, max_pixels, executor, full_image=full_image, instances=instances
            )
        except Overloaded:
            await asyncio.sleep(backoff)
            backoff = min(MAX_BACKOFF_S, backoff * 2)
            continue
        return decoded, seg.mask, seg.instances, seg.timings


def open_engine(bundle: Path, settings: Settings) -> Engine:
    """An engine for one bundle in this process (``unetseg segment SLIDE``), started without warm-up. On the
    CPU it runs one single-thread stream per core, as the bulk job's does: a job keeps the model busy."""
    import os

    loaded = load_bundle(bundle)
    device = resolve_device(settings.device)
    streams = max(settings.streams, os.cpu_count() or 1) if device.type == "cpu" else settings.streams
    engine = Engine(
        [loaded],
        device,
        precision=settings.precision,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        streams=streams,
        graph=settings.graph,
        max_inflight_bytes=settings.max_inflight_mb * 1024 * 1024,
    )
    engine.start(warmup=False)
    return engine


def release_memory() -> None:
    """Hand the heap a region freed back to the system (glibc ``malloc_trim``, as the engine does after a large
    request): without it the arenas of the job's threads keep growing with fragments over a long slide."""
    trim_memory()
