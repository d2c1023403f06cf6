"""The FastAPI application: ``create_app(settings)`` and the lifespan that loads the models once.

Start-up validates and loads every bundle (a bad bundle stops the start with a message naming the file
and field), opens the upload store, then moves the models to the device and warms them up in a
background thread: ``/healthz`` answers at once, ``/readyz`` turns 200 when the models are warm.

With ``UNETSEG_ENGINE_SOCKET`` (set by ``unetseg serve --workers N`` for its front ends), or a
``remote_engine`` (the Ray front-end replicas' handle to the engine replicas), the models live in another
process instead, and this process loads no torch: it reads, decodes and encodes, and ``/readyz`` turns 200
once the engine answers that its models are warm.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from app.config import Settings
from app.deps import require_api_key
from app.errors import ServiceError
from app.inference import RemoteInference
from app.jobs.runner import JobMetrics, job_lifespan
from app.metrics import Metrics
from app.middleware import BodyLimitMiddleware, RequestContextMiddleware, RouteTemplates
from app.routes import docs, health, jobs, models, predict, uploads, web
from app.state import AppState
from app.store import open_store
from app.store.gate import StoreGate

if TYPE_CHECKING:
    from app.engine import Engine

log = logging.getLogger("unetseg")

# Multipart framing around the file: boundaries, part headers and the small form fields.
MULTIPART_OVERHEAD = 64 * 1024

DESCRIPTION = """Image segmentation with U-Nets. Send an image, get its mask back: a palette PNG whose pixel
values are class ids, the image with the mask overlaid, or per-class areas and COCO RLE as JSON.

Models are self-describing bundles (`GET /v1/models`). When the service has API keys configured, every
`/v1` endpoint needs one, as `Authorization: Bearer <key>` or `X-API-Key: <key>`.

Every response carries an `X-Request-ID` (yours, when you send a sane one: up to 128 of `A-Z a-z 0-9 . _ -`);
error bodies repeat it as `request_id` next to `detail`. `X-Served-By` names the process that answered
(`hostname:pid`; one replica of several when the service runs on Ray Serve). A page to try the models is at
`/`; Prometheus metrics are at `/metrics`."""


def local_engine(s: Settings) -> Engine:
    """Every bundle of ``s.weights_dir`` loaded (not yet warm) for this process's device, as the settings say."""
    import torch

    from app.engine import Engine, resolve_device
    from app.engine.device import resolve_streams

    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    device = resolve_device(s.device)
    return Engine.from_folder(
        s.weights_dir,
        device,
        precision=s.precision,
        max_batch=s.max_batch,
        max_wait_s=s.max_wait_ms / 1000,
        queue_size=s.queue_size,
        compile=s.compile,
        default_model=s.default_model,
        streams=resolve_streams(s.streams, device),
        graph=s.graph,
        cuda_graphs=s.cuda_graphs,
        max_inflight_bytes=s.max_inflight_mb * 1024 * 1024,
    )


def io_pool(s: Settings, name: str) -> concurrent.futures.ThreadPoolExecutor:
    """The threads that decode, prepare, finish and encode requests (``UNETSEG_IO_THREADS``). Their torch work
    (the CPU's upsampling and class maps) runs on one torch thread each: many requests at once use the cores,
    not each request all of them over again."""
    from app.engine.device import set_own_threads

    threads = s.io_threads or os.cpu_count() or 1
    return concurrent.futures.ThreadPoolExecutor(threads, name, initializer=set_own_threads, initargs=(1,))


def _start_engine(state: AppState) -> None:
    from app.engine import Engine

    engine = state.engine
    assert isinstance(engine, Engine)
    try:
        engine.start(warmup=state.settings.warmup)
    except Exception as exc:
        state.error = f"warm-up failed: {type(exc).__name__}: {exc}"
        log.exception("model warm-up failed")
        return
    state.ready.set()
    log.info("ready: %s on %s", ", ".join(engine.models), engine.device)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.unetseg
    s = state.settings
    if s.engine_socket or state.remote_engine is not None:
        async with _remote(app):
            yield
        return
    engine = local_engine(s)
    state.engine = engine
    state.store = open_store(s)
    state.store_gate = StoreGate(s.store_threads, s.store_timeout_s, state.store.meta.ping)
    state.executor = io_pool(s, "unetseg-io")
    loader = threading.Thread(target=_start_engine, args=(state,), name="unetseg-warmup", daemon=True)
    loader.start()
    try:
        async with job_lifespan(app):
            yield
    finally:
        state.ready.clear()
        loader.join()
        engine.stop()  # finishes what is queued
        state.executor.shutdown(wait=True)
        state.store_gate.close()
        state.store.close()


@asynccontextmanager
async def _remote(app: FastAPI) -> AsyncIterator[None]:
    """A front end's lifespan: the engine's client (ready once the engine says its models are warm), the store,
    the I/O threads and the jobs (with --workers, run only by the front end the supervisor lets run them)."""
    from app.procs.client import RemoteEngine

    state: AppState = app.state.unetseg
    s = state.settings
    engine: RemoteInference
    if state.remote_engine is not None:
        engine = state.remote_engine(s)
    else:
        engine = RemoteEngine(s.engine_socket, s.default_model)
    state.engine = engine
    state.confirm_ready = engine.confirm_ready
    state.store = open_store(s)
    state.store_gate = StoreGate(s.store_threads, s.store_timeout_s, state.store.meta.ping)
    state.executor = concurrent.futures.ThreadPoolExecutor(s.io_threads or os.cpu_count() or 1, "unetseg-io")
    await engine.start(on_ready=state.ready.set)
    try:
        async with job_lifespan(app):
            yield
    finally:
        state.ready.clear()
        await engine.stop()
        state.executor.shutdown(wait=True)
        state.store_gate.close()
        state.store.close()


async def service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, without echoing the offending input (it can be a whole uploaded file)."""
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def _query_names(dependant: Dependant) -> set[str]:
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def single_valued_query(request: Request) -> None:
    """Refuse (422) a query parameter of the route given more than once, which would otherwise silently be
    its last value (``?model=a&model=b`` segmenting with b). The error is FastAPI's own list of field errors.
    A coroutine: FastAPI runs a plain function dependency on a worker thread, a hand-off every request."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    declared = _query_names(route.dependant)
    repeated = sorted({key for key, _ in request.query_params.multi_items() if key in declared})
    errors = [
        {"type": "repeated", "loc": ("query", key), "msg": "Given more than once: send it once"}
        for key in repeated
        if len(request.query_params.getlist(key)) > 1
    ]
    if errors:
        raise RequestValidationError(errors)


def create_app(
    settings: Settings | None = None, remote_engine: Callable[[Settings], RemoteInference] | None = None
) -> FastAPI:
    """The service. Its models are loaded in this process, or with ``UNETSEG_ENGINE_SOCKET`` or ``remote_engine``
    (a factory of the engine's client, made in the lifespan) they live elsewhere."""
    settings = settings or Settings()
    app = FastAPI(
        title="unetseg",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # docs.install serves the docs pages with their assets from this service
        redoc_url=None,
        generate_unique_id_function=lambda route: route.name,  # operation ids (client functions) are route names
        dependencies=[Depends(single_valued_query)],
    )
    state = AppState(settings=settings, remote_engine=remote_engine)
    app.state.unetseg = state
    app.state.metrics = metrics = Metrics(state)
    app.state.job_metrics = JobMetrics(metrics.registry, app)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        paths={"/v1/jobs": settings.max_job_bytes + MULTIPART_OVERHEAD},
        max_inflight_bytes=settings.max_inflight_mb * 1024 * 1024,
        unbudgeted={"/v1/jobs"},  # streamed to the store as they arrive, never held whole
    )
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=[
                "Server-Timing",
                "X-Model",
                "X-Model-Version",
                "X-Request-ID",
                "X-Served-By",
                "Retry-After",
            ],
        )
    # Outermost: every response, the body limit's and CORS's included, gets a request id, a log line and metrics.
    app.add_middleware(
        RequestContextMiddleware,
        observe=metrics.observe_request,
        routes=RouteTemplates.of(app),
        body_timeout_s=settings.body_timeout_s,
    )
    app.include_router(health.router)
    web.install(app)
    docs.install(app)
    secured = [Depends(require_api_key)]
    for module in (models, uploads, predict, jobs):
        app.include_router(module.router, prefix="/v1", dependencies=secured)
    return app
