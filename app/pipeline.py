"""The predict path, written once: image bytes in, the encoded answer out. ``POST /v1/predict``,
``unetseg predict`` and ``unetseg segment`` are thin callers of ``predict``.

Its stages, in order, and where each runs:

1. ``decode_request`` (an I/O thread): decode the bytes (limits, formats, EXIF; a JPEG at a reduced scale
   when the model resizes its input), convert to the model's channels, reserve the request's memory and
   make its work (the resized uint8 input, or the image the tiles are cut from);
2. ``Engine.run`` (a model's worker): batched with other requests' inputs; uint8 to the device, normalised
   and run there, the logits upsampled (or blended) and turned into the class map on the device;
3. ``encode_response`` (an I/O thread): the mask (and instance ids) copied to the host, then encoded as the
   format asks: a palette PNG, an overlay, a 16-bit PNG of instance ids, or the JSON summary.

Two hand-offs to the I/O threads and one to a worker per request; the event loop only awaits them.
``Answer.timings`` (seconds) says where the time went: decode, queue, model (device time), post (after the
model: the class map's copy, instances), encode.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from app.imaging import (
    Decoded,
    decode,
    encode_instances_png,
    encode_mask_png,
    encode_overlay_png,
    instance_summary,
    mask_summary,
)
from app.inference import Inference, Timing
from app.schemas import Prediction

Format = Literal["png", "overlay", "json", "instances"]

# The text chunk of a bulk job's mask PNG that keeps its instance count, for the summary of a rerun.
INSTANCES_KEY = "unetseg:instances"


@dataclass(frozen=True)
class Ask:
    """What a caller wants for one image."""

    model: str | None = None  # the engine's default model when None
    format: Format = "png"
    alpha: float = 0.5  # the mask's opacity (overlay)
    compress_level: int = 1  # zlib level of PNG answers
    # A bulk job's mask: the instance count as a PNG text chunk, and the per-class pixel counts in the answer.
    bulk: bool = False


@dataclass
class Answer:
    body: bytes
    media_type: str
    model: str
    version: str
    width: int  # the image's displayed size, which the mask has
    height: int
    timings: dict[str, float] = field(default_factory=dict)
    instances: int | None = None  # instances found, for a model with instances (format json/instances, bulk)
    counts: tuple[int, ...] = ()  # pixels per class (bulk)


def wants_instances(ask: Ask, engine: Inference) -> bool:
    return ask.format in ("json", "instances") or (ask.bulk and engine.get(ask.model).card.instances is not None)


def decode_request(engine: Inference, ask: Ask, data: bytes, max_pixels: int) -> tuple[Decoded, Any]:
    """Stage 1 (an I/O thread): bytes -> the decoded image and the model's prepared work. Raises ServiceError:
    a bad image 415, over the limits 413, over the memory budget 503 (or 413 for what never fits)."""
    m = engine.get(ask.model)
    policy = m.card.input
    # A model that resizes its input needs no more pixels than its input size, unless the answer draws the
    # mask over the image's own pixels (overlay).
    reduce_to = policy.size if policy.sizing == "resize" and ask.format != "overlay" else None
    decoded = decode(data, max_pixels, reduce_to)
    image = decoded.for_model(policy.channels)
    # A JSON answer holds a run-length code of every class and instance: about a byte per pixel at worst.
    extra = decoded.width * decoded.height if ask.format == "json" else 0
    prepared = engine.prepare(m.name, image, (decoded.height, decoded.width), wants_instances(ask, engine), extra)
    return decoded, prepared


def encode_response(engine: Inference, ask: Ask, decoded: Decoded, prepared: Any, decode_s: float) -> Answer:
    """Stage 3 (an I/O thread): the mask and instance ids from the device, encoded as ``ask.format``; then the
    request's memory is given back. ``decode_s``: the seconds until the work was prepared (for the timings)."""
    try:
        mask, ids = engine.finish(prepared)
        t0 = time.perf_counter()
        card = prepared.card
        colors = [c.color for c in card.classes]
        answer = Answer(b"", "image/png", card.name, card.version, decoded.width, decoded.height)
        if ids is not None:
            answer.instances = int(ids.max(initial=0))
        if ask.format == "json":
            summary = mask_summary(mask, [(c.id, c.name) for c in card.classes])
            extra: dict[str, Any] = {}
            if ids is not None and prepared.spec is not None:
                found = instance_summary(ids, prepared.spec.interior)
                extra = {"count": len(found), "instances": found}
            answer.timings = {"decode": decode_s, **_engine_timings(prepared), "encode": time.perf_counter() - t0}
            body = Prediction.model_validate(
                {
                    "model": card.name,
                    "version": card.version,
                    "width": decoded.width,
                    "height": decoded.height,
                    "classes": summary,
                    **extra,
                    "timings_ms": {k: round(v * 1000, 3) for k, v in answer.timings.items()},
                }
            )
            # count and instances are left out, not null, for a semantic model
            answer.body = json.dumps(body.model_dump(mode="json", exclude_unset=True)).encode()
            answer.media_type = "application/json"
        elif ask.format == "instances":
            assert ids is not None, "format=instances needs a model with instances"
            answer.body, answer.instances = encode_instances_png(ids, ask.compress_level)
        elif ask.format == "overlay":
            answer.body = encode_overlay_png(decoded.rgb, mask, colors, ask.alpha, ask.compress_level)
        else:
            text = {INSTANCES_KEY: str(answer.instances)} if ask.bulk and answer.instances is not None else None
            answer.body = encode_mask_png(mask, colors, ask.compress_level, text)
        if ask.bulk:
            answer.counts = class_counts(mask, len(colors))
        if ask.format != "json":
            answer.timings = {"decode": decode_s, **_engine_timings(prepared), "encode": time.perf_counter() - t0}
        return answer
    finally:
        engine.release(prepared)


def _engine_timings(prepared: Any) -> dict[str, float]:
    t = prepared.timing
    return {"queue": t.queue_s, "model": t.model_s, "post": t.post_s}


def class_counts(mask: np.ndarray, num_classes: int) -> tuple[int, ...]:
    """(H, W) uint8 class ids -> pixels per class."""
    return tuple(int(n) for n in np.bincount(mask.ravel(), minlength=num_classes)[:num_classes])


async def predict(
    engine: Inference,
    ask: Ask,
    data: bytes,
    max_pixels: int,
    executor: concurrent.futures.Executor | None = None,
    timeout_s: float | None = None,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
    started: float | None = None,
    background: bool = False,
) -> Answer:
    """Image bytes -> the encoded answer, through the three stages. Raises ServiceError (the route maps it to
    its status). ``timeout_s``: RequestTimeout (504) when the model has not finished by then;
    ``disconnected``: polled while the model is awaited, ClientGone when the client left. ``started``: when
    the request began (``time.perf_counter()``; reading its body counts as decoding), default now.
    ``background``: after every interactive request (an asynchronous job)."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter() if started is None else started
    decoded, prepared = await loop.run_in_executor(executor, decode_request, engine, ask, data, max_pixels)
    decode_s = time.perf_counter() - t0
    try:
        await engine.run(prepared, timeout_s, disconnected, background)
        return await loop.run_in_executor(executor, encode_response, engine, ask, decoded, prepared, decode_s)
    finally:
        engine.release(prepared)  # when the model or stage 3 failed; a no-op after stage 3


async def segment(
    engine: Inference,
    name: str | None,
    image: np.ndarray,
    executor: concurrent.futures.Executor | None = None,
    instances: bool = False,
    background: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, Timing]:
    """The three stages for an (H, W[, C]) uint8 image already in the model's channels, with nothing to encode
    (a slide's regions): its (H, W) uint8 class map, its int32 instance ids when asked for, and the timings."""
    loop = asyncio.get_running_loop()
    prepared = await loop.run_in_executor(executor, engine.prepare, name, image, None, instances)
    try:
        timing = await engine.run(prepared, None, None, background)
        mask, ids = await loop.run_in_executor(executor, engine.finish, prepared)
    finally:
        engine.release(prepared)
    return mask, ids, timing


def predict_sync(engine: Inference, ask: Ask, data: bytes, max_pixels: int) -> Answer:
    """``predict`` without an event loop (the CLI's one-image-at-a-time use)."""
    return asyncio.run(predict(engine, ask, data, max_pixels))
