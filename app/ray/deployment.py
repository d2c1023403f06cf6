"""The Serve deployment: whole-app replicas, each running ``create_app(settings)`` and its lifespan.

Every replica is one Ray actor process holding the complete service (HTTP routes, decode, engine, encode,
store), so the API is the one-process service's, route for route. What Serve adds around it:

- **A replica takes traffic only when warm.** The app's lifespan is wrapped so that its start-up waits
  until the warm-up thread has finished; Serve routes nothing to a replica before its start-up returns, so
  ``/readyz`` through the proxy is 200 as soon as one replica is warm, and a failed load or warm-up fails
  the replica's start (Serve then retries it and, past ``max_constructor_retry_count``, fails the
  deployment) instead of leaving a replica up that cannot predict.
- **Health checks** (``check_health``, every ``health_check_period_s``) run on the replica's event loop, so
  a wedged loop times out; they also fail when a model has requests waiting and has not finished a batch
  for ``UNETSEG_REQUEST_TIMEOUT_S`` (a replica stuck on real work), or when start-up recorded an error.
  Serve replaces an unhealthy replica, and a replica whose process died.
- **Over capacity**: each replica takes ``max_ongoing_requests`` at once; beyond that the proxy queues up
  to ``max_queued_requests`` and then answers 503 with ``Retry-After`` (``backpressure_config``); inside a
  replica the app's own queue answers 503 with ``Retry-After`` as it does in one process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.deployment import Application, Deployment
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.logs import configure_logging
from app.main import create_app
from app.state import AppState

APP_NAME = "unetseg"
DEPLOYMENT_NAME = "unetseg"

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Any]]


def until_warm(lifespan: Lifespan) -> Lifespan:
    """``lifespan`` whose start-up also waits for the models' warm-up; a failed warm-up fails the start-up."""

    @asynccontextmanager
    async def warm(app: FastAPI) -> AsyncIterator[Any]:
        async with lifespan(app) as maybe_state:
            state: AppState = app.state.unetseg
            while not state.ready.is_set() and state.error is None:
                await asyncio.sleep(0.05)
            if state.error is not None:
                raise RuntimeError(state.error)
            yield maybe_state

    return warm


class ProxyRequestId:
    """Serve's proxy adds ``X-Request-ID`` to every response itself: the client's id, or one it made and put
    in the request, which the app then takes as the client's. The app's own header is dropped when it carries
    that same id, so that clients get it once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id")

        async def send_once(message: Message) -> None:
            if message["type"] == "http.response.start" and incoming is not None:
                headers = MutableHeaders(scope=message)
                if headers.get("x-request-id") == incoming:
                    del headers["x-request-id"]
            await send(message)

        await self.app(scope, receive, send_once)


class _Replica:
    """One whole service. ``settings``: ``Settings`` fields as JSON values, over the replica's ``UNETSEG_*``."""

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self._settings = Settings(**dict(settings or {}))
        configure_logging(self._settings.log_format, self._settings.log_level)
        self._state: AppState | None = None
        self._progress: dict[str, tuple[int, float]] = {}  # model -> (batches done, when that count was seen)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self._settings)
        app.router.lifespan_context = until_warm(app.router.lifespan_context)
        app.add_middleware(ProxyRequestId)
        self._state = app.state.unetseg
        return app

    async def check_health(self) -> None:
        state = self._state
        if state is None or state.engine is None:
            raise RuntimeError("the app has not started")
        if state.error is not None:
            raise RuntimeError(state.error)
        now = time.monotonic()
        stall_s = state.settings.request_timeout_s
        for name, model in state.engine.models.items():
            batches, waiting = sum(model.batch_counts().values()), model.queue_depth
            seen = self._progress.get(name)
            if seen is None or seen[0] != batches or waiting == 0:
                self._progress[name] = (batches, now)
            elif now - seen[1] > stall_s:
                raise RuntimeError(
                    f"model {name!r}: {waiting} requests waiting and no batch finished for {now - seen[1]:.0f} s"
                )


Replica: Deployment = serve.deployment(
    name=DEPLOYMENT_NAME,
    num_replicas=1,
    ray_actor_options={"num_cpus": 1},
    # Concurrent requests per replica; its engine batches them. Past it the proxy queues, then sheds.
    max_ongoing_requests=16,
    max_queued_requests=64,
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    max_constructor_retry_count=3,
)(serve.ingress()(_Replica))


def settings_overrides(settings: Settings) -> dict[str, Any]:
    """Every field of ``settings`` as JSON values, relative paths made absolute (replicas have other working
    directories), for the replicas to rebuild the same ``Settings``."""
    fields = settings.model_dump(mode="json")
    fields["weights_dir"] = str(settings.weights_dir.resolve())
    fields["data_dir"] = str(settings.data_dir.resolve())
    return fields


def application(
    settings: Mapping[str, Any] | None = None,
    replicas: int = 1,
    gpus_per_replica: float = 0,
    cpus_per_replica: float = 1,
    grace_s: float = 30.0,
) -> Application:
    """The application ``unetseg serve --ray`` runs: ``replicas`` whole-app replicas."""
    return Replica.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        graceful_shutdown_timeout_s=grace_s,
    ).bind(dict(settings or {}))


def build(args: dict[str, Any]) -> Application:
    """The builder ``deploy/serve.yaml`` names: ``args.settings`` holds ``Settings`` fields (optional; the
    replicas read ``UNETSEG_*`` for the rest). Replicas, GPUs and autoscaling come from the config's
    ``deployments`` section."""
    settings = args.get("settings") or {}
    if not isinstance(settings, dict):
        raise ValueError("args.settings must be a mapping of setting names to values")
    unknown = sorted(set(settings) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"args.settings: unknown settings {', '.join(unknown)}")
    return Replica.bind(settings)
