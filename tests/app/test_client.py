"""``unetseg predict --url`` (app/client.py) against the app in-process: concurrent requests, 503s retried
after their Retry-After, one line per failure with the service's words, a progress bar, the files written."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image
from starlette.types import Message, Receive, Scope, Send

from app.client import predict_remote
from app.main import create_app
from tests.app.asgi import serving
from tests.conftest import make_settings
from tests.helpers import image_bytes

API_KEY = "cli-key"


class Busy:
    """In front of the app, a service that is busy at first: each image's first prediction is a 503 with
    ``Retry-After: 1``, and so is a retry that comes back sooner than that."""

    RETRY_AFTER_S = 1.0

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.refused: dict[str, float] = {}
        self.early = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/predict":
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        while True:
            message = await receive()
            messages.append(message)
            if not message.get("more_body", False):
                break
        key = hashlib.sha256(b"".join(m.get("body", b"") for m in messages)).hexdigest()
        now = time.monotonic()
        first = key not in self.refused
        if first or now - self.refused[key] < self.RETRY_AFTER_S:
            self.early += not first
            self.refused.setdefault(key, now)
            body = json.dumps({"detail": "busy", "request_id": "x"}).encode()
            headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()  # then what the client does next

        await self.app(scope, replay, send)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_images_are_sent_concurrently_retried_after_503_and_written(
    tmp_path: Path, weights_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = []
    for i, (w, h) in enumerate([(40, 30), (33, 21), (64, 48)]):
        path = tmp_path / "in" / f"frame{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(image_bytes(w, h, seed=i))
        images.append(path)
    (tmp_path / "in" / "notes.png").write_text("not a picture")
    sent = [*images, tmp_path / "in" / "notes.png", tmp_path / "in" / "missing.png"]
    app = create_app(make_settings(tmp_path, weights_dir, api_key=[API_KEY]))
    busy = Busy(app)
    bar = Terminal()
    out = tmp_path / "out"

    async def run() -> tuple[int, dict[str, bytes]]:
        async with serving(app) as http:
            status = await predict_remote(
                sent,
                "http://testserver",
                out,
                api_key=API_KEY,
                concurrency=3,
                transport=httpx.ASGITransport(app=busy),
                progress_stream=bar,
            )
            direct = {}
            for path in images:
                headers = {"X-API-Key": API_KEY, "Content-Type": "image/png"}
                r = await http.post("/v1/predict", content=path.read_bytes(), headers=headers)
                direct[path.stem] = r.content
            return status, direct

    status, direct = asyncio.run(run())
    assert status == 1  # two of the five failed
    # Every image was refused once with Retry-After: 1, and no retry came back early.
    assert len(busy.refused) == len(images) + 1 and busy.early == 0
    assert sorted(p.name for p in out.iterdir()) == ["frame0.png", "frame1.png", "frame2.png"]
    for path in images:
        written = (out / f"{path.stem}.png").read_bytes()
        assert written == direct[path.stem]
        with Image.open(path) as im, Image.open(out / f"{path.stem}.png") as mask:
            assert mask.mode == "P" and mask.size == im.size
            share = float((np.asarray(mask) == 1).mean())
    said = capsys.readouterr()
    lines = said.out.splitlines()
    assert len(lines) == 3 and all(" -> " in line and "class1 " in line for line in lines), said.out
    assert f"class1 {share:.1%}" in next(line for line in lines if "frame2" in line)
    failures = said.err.splitlines()
    assert len(failures) == 2, said.err
    notes = next(line for line in failures if "notes.png" in line)
    assert "415" in notes and "not an image" in notes and "request id" in notes
    assert any("missing.png" in line and "No such file" in line for line in failures)
    assert bar.getvalue().rstrip().endswith("] 5/5, 2 failed")


def test_a_service_that_cannot_be_used_stops_the_command(
    tmp_path: Path, weights_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(image_bytes())
    app = create_app(make_settings(tmp_path, weights_dir, api_key=[API_KEY]))

    async def run(**kwargs: str) -> int:
        async with serving(app):
            transport = httpx.ASGITransport(app=app)
            return await predict_remote([image], "http://testserver", tmp_path / "out", transport=transport, **kwargs)

    assert asyncio.run(run(api_key="wrong")) == 2
    assert "401" in capsys.readouterr().err
    assert asyncio.run(run(api_key=API_KEY, model="lungs")) == 2
    assert "unknown model 'lungs'; available: tiles, tiny" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
