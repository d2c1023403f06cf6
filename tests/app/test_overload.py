"""Overload through HTTP: a full queue answers 503 with Retry-After at once; a request over
UNETSEG_REQUEST_TIMEOUT_S answers 504, its job never reaches the model, and the queue accepts again."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import torch

from app.main import create_app
from tests.app.asgi import serving
from tests.conftest import make_settings
from tests.helpers import image_bytes

FILES = {"file": ("a.png", image_bytes(40, 30), "image/png")}


class Gate:
    """Stands in for a model: holds every forward pass until opened, and counts them."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.open = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.entered.set()
        assert self.open.wait(30), "the test never opened the gate"
        assert callable(self.inner)
        out: torch.Tensor = self.inner(x)
        return out


async def until(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path, weights_dir: Path) -> None:
    app = create_app(make_settings(tmp_path, weights_dir, queue_size=1, max_batch=1))

    async def run() -> None:
        async with serving(app) as client:
            engine = app.state.unetseg.engine.models["tiny"]
            gate = Gate(engine.model)
            engine.model = gate
            held = asyncio.create_task(client.post("/v1/predict", files=FILES))  # in the model
            await until(gate.entered.is_set)
            queued = asyncio.create_task(client.post("/v1/predict", files=FILES))  # in the queue's one slot
            await until(lambda: engine.queue_depth == 1)
            t0 = time.monotonic()
            refused = await client.post("/v1/predict", files=FILES)
            assert time.monotonic() - t0 < 10  # at once, not after waiting for a slot
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert "waiting" in refused.json()["detail"]
            # Other models have queues of their own.
            assert (await client.post("/v1/predict?model=tiles", files=FILES)).status_code == 200
            gate.open.set()
            assert (await held).status_code == 200 and (await queued).status_code == 200
            assert (await client.post("/v1/predict", files=FILES)).status_code == 200
            assert engine.stats.rejected == 1

    asyncio.run(run())


def test_a_timed_out_request_answers_504_and_frees_its_slot(tmp_path: Path, weights_dir: Path) -> None:
    app = create_app(make_settings(tmp_path, weights_dir, queue_size=1, max_batch=1, request_timeout_s=1.0))

    async def run() -> None:
        async with serving(app) as client:
            engine = app.state.unetseg.engine.models["tiny"]
            gate = Gate(engine.model)
            engine.model = gate
            held = asyncio.create_task(client.post("/v1/predict", files=FILES))
            await until(gate.entered.is_set)
            queued = asyncio.create_task(client.post("/v1/predict", files=FILES))
            await until(lambda: engine.queue_depth == 1)
            for task in (held, queued):
                r: httpx.Response = await task
                assert r.status_code == 504, r.text
                assert "did not finish within 1 s" in r.json()["detail"]
            gate.open.set()
            # The model finishes the job it was running; the timed-out job in the queue is dropped unrun,
            # and the slot it held takes new work.
            await until(lambda: engine.queue_depth == 0)
            r = await client.post("/v1/predict", files=FILES)
            assert r.status_code == 200, r.text
            assert gate.calls == 2  # the first request's pass and this one: never the timed-out queued job

    asyncio.run(run())
