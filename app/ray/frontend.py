"""A front-end replica's view of the engine deployment: ``RayEngine``, the ``app.inference.Inference`` of the
Ray Serve application, over a handle to the engine replicas (``app.ray.engine``). Loads no torch.

A request's model input is made here (``model_input``: a "resize" model's input resized, a tiled model's
image whole) and goes to an engine replica as a Ray object with the call; the mask comes back the same way.
Serve's router picks the replica (the least busy of two it samples); a timeout or a client that left cancels
the call there. A call that Ray could not complete (the replica died, or none is up) is a 503.

A background task asks for the models once (hello) and then, every ``STATUS_S``, every engine replica for
its status (Serve's broadcast): ready when one of them is, queue depths, rejections and batch counts summed
over those that answered, GPU memory per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from app.errors import NotReady
from app.inference import ClientGone, Timing, wait_for
from app.procs.client import STATUS_S, EngineView, model_input, service_error
from model.card import Card, InstanceSpec

log = logging.getLogger("unetseg.procs")

ASK_S = 4 * STATUS_S  # longest a hello or status question waits for its answers
# What a call raises when no engine replica could answer it: a replica died with it, none is running (the
# deployment is unhealthy while Serve replaces one), or the handle's queue is full.
ENGINE_GONE = (RayError, RayServeException)


@dataclass
class RayPrepared:
    card: Card
    spec: InstanceSpec | None
    size: tuple[int, int]
    pixels: np.ndarray
    extra_bytes: int
    mask: np.ndarray | None = None
    ids: np.ndarray | None = None
    timing: Timing = field(default_factory=Timing)


def _call(handle: DeploymentHandle[Any], method: str, *args: Any) -> DeploymentResponse[Any]:
    response = getattr(handle, method).remote(*args)
    assert isinstance(response, DeploymentResponse)  # unary, never a stream
    return response


async def _answer(response: DeploymentResponse[Any]) -> Any:
    return await response


class RayEngine(EngineView):
    NOT_ANSWERING = "no engine replica is answering; retry shortly"

    def __init__(self, handle: DeploymentHandle[Any], default_model: str | None = None) -> None:
        super().__init__(default_model)
        self._handle = handle
        self._task: asyncio.Task[None] | None = None
        self._on_ready: Callable[[], None] = lambda: None

    # --- keeping in touch ---------------------------------------------------------------------------

    async def start(self, on_ready: Callable[[], None]) -> None:
        self._on_ready = on_ready
        self._task = asyncio.create_task(self._maintain())

    async def confirm_ready(self) -> None:
        if self._was_ready or not self._models:
            return
        with contextlib.suppress(TimeoutError, *ENGINE_GONE):
            self._merge(await self._statuses())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _hello_once(self) -> None:
        response = _call(self._handle, "hello")
        try:
            self._hello(await asyncio.wait_for(_answer(response), ASK_S))
        except BaseException:
            response.cancel()  # type: ignore[no-untyped-call]
            raise

    async def _statuses(self) -> list[dict[str, Any]]:
        """The status of every engine replica that answered within ``ASK_S``."""
        answers = await self._handle.broadcast("status").results_async(timeout_s=ASK_S, return_exceptions=True)
        return [a for a in answers if isinstance(a, dict)]

    async def _maintain(self) -> None:
        while True:
            try:
                if not self._models:
                    await self._hello_once()
                self._merge(await self._statuses())
            except (TimeoutError, *ENGINE_GONE) as exc:
                if self._connected:
                    log.warning("the engine deployment did not answer: %r", exc)
                self._connected = False
            except Exception:  # a bug here must not end the polling, which would leave it "not answering"
                log.exception("asking the engine deployment failed")
                self._connected = False
            await asyncio.sleep(STATUS_S)

    def _merge(self, statuses: list[dict[str, Any]]) -> None:
        if not statuses:
            self._connected = False
            return
        models: dict[str, dict[str, Any]] = {}
        for status in statuses:
            for name, live in status["models"].items():
                merged = models.setdefault(name, {**live, "queue_depth": 0, "rejected": 0, "batches": {}})
                merged["queue_depth"] += int(live["queue_depth"])
                merged["rejected"] += int(live["rejected"])
                merged["load_s"] = max(float(merged["load_s"]), float(live["load_s"]))
                for size, count in live["batches"].items():
                    merged["batches"][size] = merged["batches"].get(size, 0) + int(count)
        ready = any(s.get("ready") for s in statuses)
        failures = [str(s["failure"]) for s in statuses if s.get("failure")]
        several = len(statuses) > 1  # then a device is named after its replica too
        gpu = {f"{s['replica']}/{d}" if several else d: v for s in statuses for d, v in s.get("gpu", {}).items()}
        self._connected = True
        merged_status = {
            "ready": ready,
            "failure": None if ready or not failures else failures[0],
            "models": models,
            "gpu": gpu,
        }
        self._update(merged_status, self._on_ready)

    # --- the three steps of a request ----------------------------------------------------------------

    def prepare(
        self,
        name: str | None,
        image: np.ndarray,
        size: tuple[int, int] | None = None,
        instances: bool = False,
        extra_bytes: int = 0,
    ) -> RayPrepared:
        card = self.get(name).card
        h, w = size or image.shape[:2]
        spec = card.instances if instances else None
        return RayPrepared(card, spec, (int(h), int(w)), model_input(card, image), extra_bytes)

    async def run(
        self,
        prepared: RayPrepared,
        timeout_s: float | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        background: bool = False,
    ) -> Timing:
        if disconnected is not None and await disconnected():
            raise ClientGone("the client closed the connection before its prediction started")
        if not self._connected:  # no engine replica answered the last status question
            raise NotReady(self.failure() or self.NOT_ANSWERING)
        response = _call(
            self._handle,
            "run",
            prepared.card.name,
            prepared.pixels,
            prepared.size,
            prepared.spec is not None,
            prepared.extra_bytes,
            background,
        )
        answer = asyncio.ensure_future(_answer(response))
        try:
            reply: dict[str, Any] = await wait_for(answer, timeout_s, disconnected)
        except ENGINE_GONE as exc:
            raise NotReady(f"the engine deployment did not answer ({type(exc).__name__}); retry shortly") from exc
        except BaseException:
            response.cancel()  # type: ignore[no-untyped-call]
            answer.cancel()
            raise
        error = reply.get("error")
        if error is not None:
            raise service_error(int(error["status"]), str(error["detail"]), error.get("headers"))
        prepared.mask, prepared.ids = reply["mask"], reply["ids"]
        queue_s, model_s, post_s = (float(v) for v in reply["timing"])
        prepared.timing = Timing(queue_s, model_s, post_s)
        return prepared.timing

    def finish(self, prepared: RayPrepared) -> tuple[np.ndarray, np.ndarray | None]:
        assert prepared.mask is not None
        # Arrays read from the object store are read-only views of it; the answer's owner gets its own.
        ids = None if prepared.ids is None else np.require(prepared.ids, requirements="W")
        return np.require(prepared.mask, requirements="W"), ids

    def release(self, prepared: RayPrepared) -> None:
        prepared.mask = prepared.ids = None
