"""The engine's promises through HTTP: a client that hangs up stops its job (forward passes counted), a
killed worker turns into 500s and a 503 /readyz with the reason, and the memory budget answers 503 or 413."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from app.main import create_app
from tests.app.asgi import serving
from tests.app.test_overload import Gate, until
from tests.conftest import make_settings


def gray_png(side: int) -> bytes:
    rng = np.random.default_rng(side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def test_a_client_that_hangs_up_stops_its_job(tmp_path: Path, weights_dir: Path) -> None:
    # max_batch 1: the 128x128 image is 25 tiles of 32, so 25 forward passes if nobody stops it.
    app = create_app(make_settings(tmp_path, weights_dir, max_batch=1))
    request = httpx.Request(
        "POST", "http://testserver/v1/predict?model=tiles", files={"file": ("a.png", gray_png(128))}
    )
    body = request.read()
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []
    unread = [body]

    async def receive() -> dict[str, Any]:
        if unread:
            return {"type": "http.request", "body": unread.pop(), "more_body": False}
        await gone.wait()  # then the client hangs up
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/predict",
        "raw_path": b"/v1/predict",
        "query_string": b"model=tiles",
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.headers.raw],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }

    async def run() -> None:
        async with serving(app):
            engine = app.state.unetseg.engine.models["tiles"]
            gate = Gate(engine.model)
            engine.model = gate
            call = asyncio.create_task(app(scope, receive, send))
            await until(gate.entered.is_set)  # the first tile is in the model
            gone.set()  # the client hangs up
            await until(lambda: engine.in_flight == 0)  # the job left the queue while its first pass ran
            gate.open.set()
            await call
            assert gate.calls == 1, gate.calls  # of 25
            start = next(m for m in sent if m["type"] == "http.response.start")
            assert start["status"] == 499

    asyncio.run(run())


class Kill(BaseException):
    pass


def test_a_killed_worker_answers_500_and_readyz_503_with_the_reason(tmp_path: Path, weights_dir: Path) -> None:
    app = create_app(make_settings(tmp_path, weights_dir))

    def killer(x: torch.Tensor) -> torch.Tensor:
        raise Kill("killed on purpose")

    async def run() -> None:
        async with serving(app) as client:
            engine = app.state.unetseg.engine.models["tiny"]
            inner = engine.model
            engine.model = killer
            r = await client.post("/v1/predict", files={"file": ("a.png", gray_png(40))})
            assert r.status_code == 500, r.text
            assert "stopped: Kill: killed on purpose" in r.json()["detail"]
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["status"] == "failed" and "killed on purpose" in ready.json()["detail"]
            r = await client.post("/v1/predict", files={"file": ("a.png", gray_png(40))})
            assert r.status_code == 503 and "not serving" in r.json()["detail"]
            # The other model has workers of its own and still answers.
            r = await client.post("/v1/predict?model=tiles", files={"file": ("a.png", gray_png(40))})
            assert r.status_code == 200
            engine.model = inner

    asyncio.run(run())


def test_the_memory_budget_answers_503_while_busy_and_413_for_what_never_fits(
    tmp_path: Path, weights_dir: Path
) -> None:
    # tiles: 1 channel, 3 classes: 1 + 3 * 4 + 2 = 15 bytes per pixel, plus 1 MiB: 200x200 needs 1.6 MiB.
    app = create_app(make_settings(tmp_path, weights_dir, max_inflight_mb=2))
    files = {"file": ("a.png", gray_png(200))}

    async def run() -> None:
        async with serving(app) as client:
            engine = app.state.unetseg.engine.models["tiles"]
            gate = Gate(engine.model)
            engine.model = gate
            held = asyncio.create_task(client.post("/v1/predict?model=tiles", files=files))
            await until(gate.entered.is_set)
            r = await client.post("/v1/predict?model=tiles", files=files)
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1 and "MiB" in r.json()["detail"]
            big = await client.post("/v1/predict?model=tiles", files={"file": ("b.png", gray_png(600))})
            assert big.status_code == 413 and "allows 2 MiB" in big.json()["detail"]
            gate.open.set()
            assert (await held).status_code == 200
            assert (await client.post("/v1/predict?model=tiles", files=files)).status_code == 200
            assert app.state.unetseg.engine.budget.held == 0

    asyncio.run(run())


def test_large_tiled_jobs_hold_their_image_accumulator_and_mask_only(tmp_path: Path, weights_dir: Path) -> None:
    """The budget counts what the lazily tiled job holds; no request leaves memory reserved."""
    app = create_app(make_settings(tmp_path, weights_dir, max_inflight_mb=64))
    seen: list[int] = []

    async def run() -> None:
        async with serving(app) as client:
            budget = app.state.unetseg.engine.budget
            engine = app.state.unetseg.engine.models["tiles"]
            inner = engine.model
            lock = threading.Lock()

            def spy(x: torch.Tensor) -> torch.Tensor:
                with lock:
                    seen.append(budget.held)
                out: torch.Tensor = inner(x)
                return out

            engine.model = spy
            r = await client.post("/v1/predict?model=tiles", files={"file": ("a.png", gray_png(300))})
            assert r.status_code == 200
            assert budget.held == 0
            assert seen and max(seen) == 300 * 300 * 15 + 1024 * 1024

    asyncio.run(run())
