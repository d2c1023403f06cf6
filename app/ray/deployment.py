"""The Serve applications: front-end replicas (HTTP, decode, encode, store) scaled apart from engine replicas
(the models, one replica per GPU), as ``serve --workers`` splits one host.

- **Front ends** (application and deployment ``unetseg``, the HTTP ingress at ``/``): each replica runs
  ``create_app(settings)`` with its lifespan, the one-process service route for route, its models those of
  the engine deployment (``RayEngine``, over a deployment handle). They need CPUs only; add them for HTTP,
  codec and store work.
- **Engines** (application and deployment ``unetseg-engine``, no HTTP route; ``app.ray.engine``): each
  replica holds every model once on its device and batches the requests of every front end routed to it.
  Add them for devices.

Two applications rather than one so that they stop in order: the front ends finish their requests (a body
still arriving included) while the engines still answer them, and then the engines stop.

What Serve adds around them:

- **Readiness.** An engine replica's constructor loads and warms up its models, and Serve routes nothing to
  it before that returns; a failed load or warm-up fails the replica's start (Serve retries it and, past
  ``max_constructor_retry_count``, fails the application). A front end starts at once and answers like a
  front end of ``serve --workers``: ``/readyz`` is 200 while an engine replica says it is warm, 503 with the
  reason otherwise, and so are predictions. ``unetseg serve --ray`` starts the engines first, then the front
  ends.
- **Health checks** (``check_health``, every ``health_check_period_s``) run on each replica's event loop, so
  a wedged loop times out; an engine replica's also fails when a model has requests waiting and has not
  finished a batch for ``UNETSEG_REQUEST_TIMEOUT_S``. Serve replaces an unhealthy replica, and a replica
  whose process died; while no engine replica answers, front ends answer 503 with the reason.
- **Over capacity**: each front end takes ``max_ongoing_requests`` at once; beyond that the proxy queues up
  to ``max_queued_requests`` and then answers 503 with ``Retry-After`` (``backpressure_config``); an engine
  replica takes every request routed to it into its engine, whose own queue answers 503 with
  ``Retry-After`` as in one process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.deployment import Application, Deployment
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.logs import configure_logging
from app.main import create_app
from app.ray.engine import EngineReplica
from app.ray.frontend import RayEngine
from app.state import AppState

APP_NAME = "unetseg"
DEPLOYMENT_NAME = "unetseg"  # the front ends (Serve's ingress)
ENGINE_APP = ENGINE_NAME = "unetseg-engine"


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


class _Frontend:
    """One front end. ``settings``: ``Settings`` fields as JSON values, over the replica's ``UNETSEG_*``."""

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self._settings = Settings(**dict(settings or {}))
        configure_logging(self._settings.log_format, self._settings.log_level)
        self._engine: DeploymentHandle[Any] = serve.get_deployment_handle(ENGINE_NAME, app_name=ENGINE_APP)
        self._state: AppState | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        handle = self._engine
        app = create_app(self._settings, remote_engine=lambda s: RayEngine(handle, s.default_model))
        app.add_middleware(ProxyRequestId)
        self._state = app.state.unetseg
        return app

    async def check_health(self) -> None:
        state = self._state
        if state is None or state.engine is None:
            raise RuntimeError("the app has not started")
        if state.error is not None:
            raise RuntimeError(state.error)


# Backpressure past a replica's own limit: the proxy (or a handle) queues, then answers 503 with Retry-After.
BACKPRESSURE = BackpressureConfig(status_code=503, retry_after_s=1)

Frontend: Deployment = serve.deployment(
    name=DEPLOYMENT_NAME,
    num_replicas=1,
    ray_actor_options={"num_cpus": 1},
    # Concurrent requests per front end; past it the proxy queues, then sheds.
    max_ongoing_requests=16,
    max_queued_requests=64,
    backpressure_config=BACKPRESSURE,
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    max_constructor_retry_count=3,
)(serve.ingress()(_Frontend))

EngineDeployment: Deployment = serve.deployment(
    name=ENGINE_NAME,
    num_replicas=1,
    ray_actor_options={"num_cpus": 1, "num_gpus": 0},
    # Every request routed here goes into the engine, which batches them and sheds past UNETSEG_QUEUE_SIZE.
    max_ongoing_requests=4096,
    logging_config={"enable_access_log": False},  # every front end asks every replica's status twice a second
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    max_constructor_retry_count=3,
)(EngineReplica)


def settings_overrides(settings: Settings) -> dict[str, Any]:
    """Every field of ``settings`` as JSON values, relative paths made absolute (replicas have other working
    directories), for the replicas to rebuild the same ``Settings``."""
    fields = settings.model_dump(mode="json")
    fields["weights_dir"] = str(settings.weights_dir.resolve())
    fields["data_dir"] = str(settings.data_dir.resolve())
    return fields


def applications(
    settings: Mapping[str, Any] | None = None,
    replicas: int = 1,
    engines: int = 1,
    gpus_per_engine: float = 0,
    cpus_per_replica: float = 1,
    grace_s: float = 30.0,
) -> tuple[Application, Application]:
    """What ``unetseg serve --ray`` runs: (the engine application, ``engines`` replicas; the front-end
    application, ``replicas`` replicas)."""
    fields = dict(settings or {})
    engine = EngineDeployment.options(
        num_replicas=engines,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_engine},
        graceful_shutdown_timeout_s=grace_s,
    ).bind(fields)
    frontend = Frontend.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        graceful_shutdown_timeout_s=grace_s,
    ).bind(fields)
    return engine, frontend


def _settings_arg(args: dict[str, Any]) -> dict[str, Any]:
    settings = args.get("settings") or {}
    if not isinstance(settings, dict):
        raise ValueError("args.settings must be a mapping of setting names to values")
    unknown = sorted(set(settings) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"args.settings: unknown settings {', '.join(unknown)}")
    return settings


def build(args: dict[str, Any]) -> Application:
    """The front ends' builder that ``deploy/serve.yaml`` names: ``args.settings`` holds ``Settings`` fields
    (optional; the replicas read ``UNETSEG_*`` for the rest). Replicas and autoscaling come from the config's
    ``deployments`` section."""
    return Frontend.bind(_settings_arg(args))


def build_engine(args: dict[str, Any]) -> Application:
    """The engines' builder that ``deploy/serve.yaml`` names: ``args.settings`` as for ``build``; replicas and
    GPUs from the config's ``deployments`` section."""
    return EngineDeployment.bind(_settings_arg(args))
