"""The browser page at ``/`` (static files under ``app/static``, served as they are) and ``/metrics``.

Neither needs an API key: the page asks for one when the API answers 401, and metrics are for the
operator's scraper (restrict ``/metrics`` at the proxy if it must not be public).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from app.metrics import CONTENT_TYPE, Metrics

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# The page loads nothing from elsewhere; images and masks are shown from blob: URLs.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)


def page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
    )


METRICS_EXAMPLE = """# HELP unetseg_requests_total HTTP requests answered.
# TYPE unetseg_requests_total counter
unetseg_requests_total{method="POST",model="polyp",route="/v1/predict",status="200"} 42.0
# HELP unetseg_queue_depth Requests waiting in the model's queue.
# TYPE unetseg_queue_depth gauge
unetseg_queue_depth{model="polyp"} 0.0
"""


def metrics(request: Request) -> Response:
    m: Metrics = request.app.state.metrics
    return Response(m.render(), media_type=CONTENT_TYPE)


def install(app: FastAPI) -> None:
    """Add ``/``, ``/static/...`` and ``/metrics`` to the app itself (outside the key-checked ``/v1``)."""
    app.add_api_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        tags=["health"],
        summary="Prometheus metrics",
        description=(
            "The Prometheus text exposition format: requests and their latency by route template, method, "
            "model and status; batch sizes; queue depth; requests rejected by a full queue; model load time; "
            "stored uploads and their bytes; GPU memory on CUDA. Needs no API key."
        ),
        response_class=Response,
        responses={200: {"description": "The metrics.", "content": {"text/plain": {"example": METRICS_EXAMPLE}}}},
    )
