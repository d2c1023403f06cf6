"""The FastAPI application: ``create_app(settings)`` and the lifespan that loads the models once.

Start-up validates and loads every bundle (a bad bundle stops the start with a message naming the file
and field), opens the upload store, then moves the models to the device and warms them up in a
background thread: ``/healthz`` answers at once, ``/readyz`` turns 200 when the models are warm.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from app.config import Settings
from app.deps import require_api_key
from app.engine import Engine, resolve_device
from app.errors import ServiceError
from app.jobs.runner import JobMetrics, job_lifespan
from app.metrics import Metrics
from app.middleware import BodyLimitMiddleware, RequestContextMiddleware, RouteTemplates
from app.routes import docs, health, jobs, models, predict, uploads, web
from app.state import AppState
from app.store import open_store

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


def _start_engine(state: AppState) -> None:
    assert state.engine is not None
    try:
        state.engine.start(warmup=state.settings.warmup)
    except Exception as exc:
        state.error = f"warm-up failed: {type(exc).__name__}: {exc}"
        log.exception("model warm-up failed")
        return
    state.ready.set()
    log.info("ready: %s on %s", ", ".join(state.engine.models), state.engine.device)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.unetseg
    s = state.settings
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    device = resolve_device(s.device)
    state.engine = Engine.from_folder(
        s.weights_dir,
        device,
        precision=s.precision,
        max_batch=s.max_batch,
        max_wait_s=s.max_wait_ms / 1000,
        queue_size=s.queue_size,
        compile=s.compile,
        default_model=s.default_model,
        streams=s.streams,
        graph=s.graph,
        max_inflight_bytes=s.max_inflight_mb * 1024 * 1024,
    )
    metrics: Metrics = app.state.metrics
    for m in state.engine.models.values():
        m.on_batch = metrics.observe_batch
    state.store = open_store(s)
    state.executor = concurrent.futures.ThreadPoolExecutor(s.io_threads or os.cpu_count() or 1, "unetseg-io")
    loader = threading.Thread(target=_start_engine, args=(state,), name="unetseg-warmup", daemon=True)
    loader.start()
    try:
        async with job_lifespan(app):
            yield
    finally:
        state.ready.clear()
        loader.join()
        state.engine.stop()  # finishes what is queued
        state.executor.shutdown(wait=True)
        state.store.close()


async def service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, without echoing the offending input (it can be a whole uploaded file)."""
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="unetseg",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # docs.install serves the docs pages with their assets from this service
        redoc_url=None,
        generate_unique_id_function=lambda route: route.name,  # operation ids (client functions) are route names
    )
    state = AppState(settings=settings)
    app.state.unetseg = state
    app.state.metrics = metrics = Metrics(state)
    app.state.job_metrics = JobMetrics(metrics.registry, app)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        paths={"/v1/jobs": settings.max_job_bytes + MULTIPART_OVERHEAD},
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
    app.add_middleware(RequestContextMiddleware, observe=metrics.observe_request, routes=RouteTemplates.of(app))
    app.include_router(health.router)
    web.install(app)
    docs.install(app)
    secured = [Depends(require_api_key)]
    for module in (models, uploads, predict, jobs):
        app.include_router(module.router, prefix="/v1", dependencies=secured)
    return app
