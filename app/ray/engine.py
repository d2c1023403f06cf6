"""The engine deployment: one replica per GPU (or per CPU engine), holding every model once and batching the
requests of every front-end replica that routes to it. It is the engine process of ``serve --workers``
(``app.procs.server.EngineHost``), with Ray Serve's handles instead of a Unix socket and shared memory:

- ``hello()``: the models (cards, device, precision, graph, batch limit) and the default model;
- ``status()``: ready, each model's queue depth, rejections and batch counts, GPU memory, and which replica;
- ``run(model, image, size, instances, extra_bytes, background)``: the (H, W) uint8 mask (and int32 instance
  ids) for a model input made by ``app.procs.client.model_input``, or ``{"error": ...}`` as the engine
  process answers (the request's status, detail and headers). The arrays travel as Ray objects (through the
  object store of the node, or between nodes); a front end that cancels the call cancels the request here.

The constructor loads and warms the models up: Serve routes nothing to a replica before it returns, and a
failed load or warm-up fails the replica's start. ``check_health`` fails when a model has requests waiting
and has finished no batch for ``UNETSEG_REQUEST_TIMEOUT_S``; Serve then replaces the replica. On shutdown the
replica finishes what is queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import serve

from app.config import Settings
from app.logs import configure_logging
from app.main import local_engine
from app.procs.server import EngineHost, error_reply

log = logging.getLogger("unetseg.engine")


class EngineReplica:
    """One engine. ``settings``: ``Settings`` fields as JSON values, over the replica's ``UNETSEG_*``."""

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self._settings = Settings(**dict(settings or {}))
        configure_logging(self._settings.log_format, self._settings.log_level)
        self._host = EngineHost(local_engine(self._settings), self._settings)
        self._host.start_models()
        if self._host.error is not None:
            self._host.stop()
            raise RuntimeError(self._host.error)
        try:
            self._replica = serve.get_replica_context().replica_id.unique_id
        except RuntimeError:  # constructed outside Serve (a test)
            self._replica = "local"
        self._progress: dict[str, tuple[int, float]] = {}  # model -> (batches done, when that count was seen)

    def hello(self) -> dict[str, Any]:
        return {"replica": self._replica, **self._host.hello()}

    def status(self) -> dict[str, Any]:
        return {"replica": self._replica, **self._host.status()}

    async def run(
        self,
        model: str,
        image: np.ndarray,
        size: tuple[int, int],
        instances: bool,
        extra_bytes: int,
        background: bool = False,
    ) -> dict[str, Any]:
        try:
            # An argument read from the object store is a read-only view of it; the engine wants its own.
            pixels = image if image.flags.writeable else image.copy()
            classes, found, timing = await self._host.predict(
                model, pixels, (int(size[0]), int(size[1])), instances, extra_bytes, background
            )
        except Exception as exc:  # noqa: BLE001  (error_reply logs what is not a ServiceError)
            return error_reply(exc, f"a request for {model!r}")
        return {"mask": classes, "ids": found, "timing": [timing.queue_s, timing.model_s, timing.post_s]}

    def check_health(self) -> None:
        failure = self._host.error or self._host.engine.failure()
        if failure is not None:
            raise RuntimeError(failure)
        now = time.monotonic()
        stall_s = self._settings.request_timeout_s
        for name, m in self._host.engine.models.items():
            batches, waiting = sum(m.batch_counts().values()), m.queue_depth
            seen = self._progress.get(name)
            if seen is None or seen[0] != batches or waiting == 0:
                self._progress[name] = (batches, now)
            elif now - seen[1] > stall_s:
                raise RuntimeError(
                    f"model {name!r}: {waiting} requests waiting and no batch finished for {now - seen[1]:.0f} s"
                )

    def __del__(self) -> None:
        """Serve's shutdown: what is queued finishes (the front ends stop first). Once, though Python may call
        it again when the object goes."""
        if getattr(self, "_host", None) is not None and not getattr(self, "_stopped", False):
            self._stopped = True
            self._host.stop()
