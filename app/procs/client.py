"""A front end's view of the engine process: ``RemoteEngine``, the ``app.inference.Inference`` of
``serve --workers``. Loads no torch.

``prepare`` (an I/O thread) does the pixel work the engine process would otherwise do on its one
interpreter: a "resize" model's input is resized here, so only (size x size x C) bytes cross; a tiled
model's image crosses whole and is cut into tiles there. Its arrays are blocks of this front end's arena
(``app.procs.protocol.Arena``), or files of their own when the arena has no room. ``run`` sends the request
and awaits the reply on the event loop; a timeout or a client that left cancels it in the engine process.
``finish`` copies the mask out of shared memory; ``release`` gives the arrays back, for a request given up
only once the engine process has answered it.

``EngineView`` is what this shares with the Ray front ends' ``app.ray.frontend.RayEngine``: the models and
their live numbers as the routes and metrics see them.

The connection is kept up by a background task: it names the arena, says hello (the models and their
cards), polls the engine process's status every ``STATUS_S`` (readiness, queue depths, batch counts, GPU
memory: what ``/readyz`` and ``/metrics`` report), and reconnects when the engine process restarts;
requests in flight when the connection drops fail with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.errors import (
    ImageTooLarge,
    InferenceFailed,
    InvalidImage,
    InvalidRequest,
    NotReady,
    Overloaded,
    RequestTimeout,
    ServiceError,
    UnknownModel,
)
from app.inference import ClientGone, Timing, wait_for
from app.procs.protocol import Arena, ArenaArray, SharedArray, encode, receive
from model.card import Card, InstanceSpec, card_from_dict
from model.pixels import as_hwc, resize_image

log = logging.getLogger("unetseg.procs")

STATUS_S = 0.5  # how often the engine process's status is read
RECONNECT_S = 0.2
ERRORS: dict[int, type[ServiceError]] = {
    404: UnknownModel,
    413: ImageTooLarge,
    415: InvalidImage,
    422: InvalidRequest,
    499: ClientGone,
    500: InferenceFailed,
    503: Overloaded,
    504: RequestTimeout,
}


def service_error(status: int, detail: str, headers: dict[str, str] | None) -> ServiceError:
    """The engine process's error as the same type (and so the same status and headers) here."""
    cls = ERRORS.get(status, InferenceFailed)
    exc = cls.__new__(cls)
    ServiceError.__init__(exc, detail, headers)
    return exc


@dataclass
class RemoteModel:
    """One model of the engine process (``app.inference.ModelInfo``), its live numbers from the last status."""

    card: Card
    device_name: str
    precision: str
    graph: str
    max_batch: int
    queue_depth: int = 0
    rejected: int = 0
    load_s: float = 0.0
    batches: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.card.name

    def batch_counts(self) -> dict[int, int]:
        return dict(self.batches)


Shared = SharedArray | ArenaArray


@dataclass
class RemotePrepared:
    card: Card
    spec: InstanceSpec | None
    size: tuple[int, int]
    image: Shared
    mask: Shared
    ids: Shared | None
    extra_bytes: int
    timing: Timing = field(default_factory=Timing)
    at_engine: bool = False  # sent, and not answered yet: the engine process may still write its arrays
    release_wanted: bool = False  # released while at the engine: given back when the answer comes
    released: bool = False

    def arrays(self) -> list[Shared]:
        return [a for a in (self.image, self.mask, self.ids) if a is not None]


def model_input(card: Card, image: np.ndarray) -> np.ndarray:
    """What crosses to the engine for ``image``: a "resize" model's input resized here (only size x size x C
    bytes cross), a tiled model's whole image in its channels (cut into tiles there)."""
    policy = card.input
    return resize_image(image, policy) if policy.sizing == "resize" else as_hwc(image, policy)


class EngineView:
    """An engine in other processes as the routes and metrics see it: its models (from its hello) and their live
    numbers (from its last status). Subclasses keep in touch with it and carry the requests."""

    NOT_ANSWERING = "the engine process is not answering"

    def __init__(self, default_model: str | None = None) -> None:
        self.wanted_default = default_model
        self._models: dict[str, RemoteModel] = {}
        self._default = ""
        self._status: dict[str, Any] = {}
        self._connected = False
        self._was_ready = False

    @property
    def default_model(self) -> str:
        return self._default

    @property
    def models(self) -> Mapping[str, RemoteModel]:
        return self._models

    def get(self, name: str | None) -> RemoteModel:
        key = name or self._default
        try:
            return self._models[key]
        except KeyError:
            raise UnknownModel(f"unknown model {key!r}; available: {', '.join(sorted(self._models))}") from None

    def failure(self) -> str | None:
        """Why the engine does not serve (None while it does, or is still starting the first time)."""
        if self._status.get("failure"):
            return str(self._status["failure"])
        if not self._was_ready:
            return None  # loading: /readyz says so until the first status that says ready
        if not self._connected:
            return self.NOT_ANSWERING
        if not self._status.get("ready"):
            return "the engine is loading its models again"
        return None

    def gpu_memory(self) -> dict[str, tuple[int, int]]:
        return {k: (int(v[0]), int(v[1])) for k, v in self._status.get("gpu", {}).items()}

    def _hello(self, hello: Mapping[str, Any]) -> None:
        self._models = {
            m.name: m
            for m in (
                RemoteModel(card_from_dict(d["card"]), d["device"], d["precision"], d["graph"], int(d["max_batch"]))
                for d in hello["models"]
            )
        }
        wanted = self.wanted_default
        self._default = wanted if wanted in self._models else str(hello["default_model"])

    def _update(self, status: dict[str, Any], on_ready: Callable[[], None]) -> None:
        self._status = status
        for name, live in status.get("models", {}).items():
            m = self._models.get(name)
            if m is not None:
                m.queue_depth = int(live["queue_depth"])
                m.rejected = int(live["rejected"])
                m.load_s = float(live["load_s"])
                m.graph = str(live["graph"])
                m.max_batch = int(live["max_batch"])
                m.batches = {int(k): int(v) for k, v in live["batches"].items()}
        if status.get("ready") and not self._was_ready:
            self._was_ready = True
            on_ready()


class RemoteEngine(EngineView):
    def __init__(self, socket_path: str, default_model: str | None = None) -> None:
        super().__init__(default_model)
        self.socket_path = socket_path
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._at_engine: dict[int, RemotePrepared] = {}  # every run sent and not yet answered, by id
        self._arena: Arena | None = None
        self._ids = itertools.count(1)
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        # Status questions sent and answers received on this connection (answered in order), and confirm_ready's
        # waiters: each waits for the answer to its own question (or a later one), never an earlier, stale one.
        self._status_asked = 0
        self._status_answered = 0
        self._status_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # --- the connection ---------------------------------------------------------------------------

    async def start(self, on_ready: Callable[[], None]) -> None:
        """Keep a connection to the engine process in a background task; ``on_ready`` when it is first ready."""
        self._arena = Arena.create()
        self._task = asyncio.create_task(self._maintain(on_ready))

    async def confirm_ready(self, timeout_s: float = 4 * STATUS_S) -> None:
        """Before this front end says "still loading": ask the engine process now (not at the next poll) and
        wait for the answer, at most ``timeout_s``. The front ends' polls are not in step, so another front
        end may already have said ready, and a client sent on by that /readyz lands on any of them."""
        if self._was_ready or not self._connected or self._writer is None:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._status_waiters.append((self._ask_status(self._writer), waiter))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, timeout_s)

    def _ask_status(self, writer: asyncio.StreamWriter) -> int:
        """Send a status question; the count of answers that includes its own."""
        writer.write(encode({"op": "status"}))
        self._status_asked += 1
        return self._status_asked

    def _answer_status_waiters(self, everyone: bool = False) -> None:
        keep = []
        for target, waiter in self._status_waiters:
            if everyone or self._status_answered >= target:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                keep.append((target, waiter))
        self._status_waiters = keep

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
        if self._arena is not None:
            self._arena.unlink()  # the mapping goes with the last array that views it

    async def _maintain(self, on_ready: Callable[[], None]) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            self._writer = writer
            try:
                await self._session(reader, writer, on_ready)
            finally:
                self._connected = False
                writer.close()
                self._writer = None
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(NotReady("the engine process went away; retry shortly"))
                self._pending.clear()
                for rid in list(self._at_engine):  # that engine process writes no more
                    self._answered(rid)
            log.warning("lost the engine process at %s; reconnecting", self.socket_path)
            await asyncio.sleep(RECONNECT_S)

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_ready: Callable[[], None]
    ) -> None:
        if self._arena is not None:
            writer.write(encode({"op": "arena", "name": self._arena.name, "size": self._arena.size}))
        writer.write(encode({"op": "hello"}))
        hello = await receive(reader)
        if hello is None:
            return
        self._hello(hello)
        self._status_asked = self._status_answered = 0  # a new connection: its own questions and answers
        self._connected = True
        poller = asyncio.create_task(self._poll(writer))
        try:
            while (message := await receive(reader)) is not None:
                if message.get("op") == "status":
                    self._status_answered += 1
                    self._update(message, on_ready)
                    self._answer_status_waiters()
                    continue
                rid = int(message.get("id", -1))
                self._answered(rid)
                fut = self._pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(message)
        finally:
            poller.cancel()
            self._answer_status_waiters(everyone=True)

    async def _poll(self, writer: asyncio.StreamWriter) -> None:
        while True:
            self._ask_status(writer)
            await asyncio.sleep(STATUS_S)

    # --- the three steps of a request ----------------------------------------------------------------

    def prepare(
        self,
        name: str | None,
        image: np.ndarray,
        size: tuple[int, int] | None = None,
        instances: bool = False,
        extra_bytes: int = 0,
    ) -> RemotePrepared:
        """(an I/O thread) The model's input in shared memory (resized here for a "resize" model), and the
        shared arrays the answer will be written to."""
        card = self.get(name).card
        h, w = size or image.shape[:2]
        pixels = model_input(card, image)
        spec = card.instances if instances else None
        made: list[Shared] = []
        try:
            made.append(self._shared(pixels.shape, np.uint8))
            made.append(self._shared((h, w), np.uint8))
            if spec is not None:
                made.append(self._shared((h, w), np.int32))
            assert made[0].array is not None
            made[0].array[:] = pixels
        except BaseException:
            for array in made:
                array.close()
                array.unlink()
            raise
        return RemotePrepared(
            card, spec, (int(h), int(w)), made[0], made[1], made[2] if spec is not None else None, extra_bytes
        )

    def _shared(self, shape: tuple[int, ...], dtype: type) -> Shared:
        """A block of the arena, or a file of its own when the arena has no room."""
        block = self._arena.allocate(shape, dtype) if self._arena is not None else None
        return block if block is not None else SharedArray.create(shape, dtype)

    def _answered(self, rid: int) -> None:
        prepared = self._at_engine.pop(rid, None)
        if prepared is not None:
            prepared.at_engine = False
            if prepared.release_wanted:
                self.release(prepared)

    async def run(
        self,
        prepared: RemotePrepared,
        timeout_s: float | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        background: bool = False,
    ) -> Timing:
        if disconnected is not None and await disconnected():
            raise ClientGone("the client closed the connection before its prediction started")
        writer = self._writer
        if writer is None or not self._connected:
            raise NotReady(self.failure() or self.NOT_ANSWERING)
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        prepared.at_engine = True
        self._at_engine[rid] = prepared
        writer.write(
            encode(
                {
                    "op": "run",
                    "id": rid,
                    "model": prepared.card.name,
                    "input": prepared.image.ref,
                    "shape": list(prepared.image.shape),
                    "size": list(prepared.size),
                    "mask": prepared.mask.ref,
                    "ids": prepared.ids.ref if prepared.ids is not None else None,
                    "instances": prepared.spec is not None,
                    "extra_bytes": prepared.extra_bytes,
                    "background": background,
                }
            )
        )
        try:
            reply: dict[str, Any] = await wait_for(fut, timeout_s, disconnected)
        except (RequestTimeout, ClientGone, asyncio.CancelledError):
            self._pending.pop(rid, None)
            if not writer.is_closing():
                writer.write(encode({"op": "cancel", "id": rid}))
            raise
        error = reply.get("error")
        if error is not None:
            raise service_error(int(error["status"]), str(error["detail"]), error.get("headers"))
        queue_s, model_s, post_s = (float(v) for v in reply["timing"])
        prepared.timing = Timing(queue_s, model_s, post_s)
        return prepared.timing

    def finish(self, prepared: RemotePrepared) -> tuple[np.ndarray, np.ndarray | None]:
        assert prepared.mask.array is not None
        mask = prepared.mask.array.copy()
        ids = prepared.ids.array.copy() if prepared.ids is not None and prepared.ids.array is not None else None
        return mask, ids

    def release(self, prepared: RemotePrepared) -> None:
        """Give the request's arrays back; after it was given up (a timeout, a client that left), only once the
        engine process has answered it, which it may still be writing until then."""
        if prepared.released:
            return
        if prepared.at_engine:
            prepared.release_wanted = True
            return
        prepared.released = True
        for array in prepared.arrays():
            array.close()
            array.unlink()
