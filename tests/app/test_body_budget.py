"""The budget of request bodies being read (``UNETSEG_MAX_INFLIGHT_MB``): a body that does not fit beside
those in flight is refused with 503 and Retry-After before more of it is read, every body's share is given
back when its request ends however it ends, and the jobs' bodies (streamed to disk) are not counted.

The middleware is driven directly: each request's body arrives in chunks the test hands over one at a time,
so one request is held mid-body while another arrives.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from app.config import Settings
from app.main import MULTIPART_OVERHEAD, create_app
from app.middleware import BodyLimitMiddleware

MIB = 1024 * 1024
CHUNK = 600 * 1024  # two of them pass a 1 MiB budget


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind the middleware: reads the whole body as a route does, answers its length; a body
    starting with b"raise" makes it fail."""
    body = await Request(scope, receive).body()
    if body.startswith(b"raise"):
        raise RuntimeError("the app failed")
    await JSONResponse({"bytes": len(body)})(scope, receive, send)


def middleware(mb: int = 1) -> BodyLimitMiddleware:
    """The body limit as ``create_app`` sets it up, with a budget of ``mb`` MiB."""
    s = Settings(max_inflight_mb=mb)
    return BodyLimitMiddleware(
        echo,
        limit=s.max_upload_bytes + MULTIPART_OVERHEAD,
        paths={"/v1/jobs": s.max_job_bytes + MULTIPART_OVERHEAD},
        max_inflight_bytes=s.max_inflight_mb * MIB,
        unbudgeted={"/v1/jobs"},
    )


class Peer:
    """One request's client: its body goes in chunks the test hands over, its response is collected."""

    def __init__(self, path: str = "/v1/predict", length: int | None = None) -> None:
        headers = [(b"content-type", b"image/png")]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        self.scope: dict[str, Any] = {"type": "http", "method": "POST", "path": path, "headers": headers}
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.asked = 0  # how many times the app (through the middleware) asked for the next message
        self.changed = asyncio.Event()
        self.sent: list[Message] = []

    def start(self, app: BodyLimitMiddleware) -> asyncio.Task[None]:
        return asyncio.create_task(app(self.scope, self.receive, self.send))

    async def receive(self) -> Message:
        self.asked += 1
        self.changed.set()
        return await self.queue.get()

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def chunk(self, data: bytes, more: bool = True) -> None:
        """Hand over one chunk, and return once the middleware took it and the app asks for the next."""
        asked = self.asked
        self.queue.put_nowait({"type": "http.request", "body": data, "more_body": more})
        await self.until_asked(asked + 1)

    def finish(self, data: bytes = b"") -> None:
        self.queue.put_nowait({"type": "http.request", "body": data, "more_body": False})

    def leave(self) -> None:
        self.queue.put_nowait({"type": "http.disconnect"})

    async def until_asked(self, n: int) -> None:
        while self.asked < n:
            self.changed.clear()
            await self.changed.wait()

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}

    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_that_does_not_fit_beside_one_being_read_gets_503_and_the_first_completes(declared: bool) -> None:
    async def run() -> None:
        app = middleware(mb=1)
        first = Peer()
        first_done = first.start(app)
        await first.until_asked(1)
        await first.chunk(b"x" * CHUNK)  # the first request is mid-body, its bytes held
        assert app.budget.held == CHUNK

        second = Peer(length=CHUNK if declared else None)
        second_done = second.start(app)
        if not declared:
            await second.until_asked(1)
            second.queue.put_nowait({"type": "http.request", "body": b"y" * CHUNK, "more_body": True})
        await second_done
        assert second.status == 503
        assert second.headers["retry-after"] == "1" and second.headers["connection"] == "close"
        assert second.json() == {
            "detail": "the service is reading 0.6 MiB of request bodies and the limit is 1 MiB; retry shortly"
        }
        # Refused before any more was read: a declared body not at all, a chunked one at its first chunk.
        assert second.asked == (0 if declared else 1)
        assert app.budget.held == CHUNK

        first.finish(b"z" * 1000)
        await first_done
        assert first.status == 200 and first.json() == {"bytes": CHUNK + 1000}
        assert app.budget.held == 0

    asyncio.run(run())


@pytest.mark.parametrize("ending", ["answered", "app fails", "client leaves"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_is_given_back_to_the_budget_however_its_request_ends(ending: str, declared: bool) -> None:
    async def run() -> None:
        app = middleware(mb=1)
        data = (b"raise" if ending == "app fails" else b"x").ljust(500_000, b"x")
        peer = Peer(length=len(data) if declared else None)
        done = peer.start(app)
        await peer.until_asked(1)
        await peer.chunk(data[:250_000])
        assert app.budget.held == (len(data) if declared else 250_000)
        if ending == "client leaves":
            peer.leave()
        else:
            peer.finish(data[250_000:])
        if ending == "answered":
            await done
            assert peer.status == 200 and peer.json() == {"bytes": len(data)}
        elif ending == "app fails":
            with pytest.raises(RuntimeError, match="the app failed"):
                await done
        else:
            with pytest.raises(ClientDisconnect):
                await done
        assert app.budget.held == 0
        # What was given back is there for the next request.
        again = Peer(length=MIB)
        again_done = again.start(app)
        await again.until_asked(1)
        again.finish(b"x" * MIB)
        await again_done
        assert again.status == 200 and app.budget.held == 0

    asyncio.run(run())


def test_the_jobs_bodies_are_not_counted() -> None:
    async def run() -> None:
        app = middleware(mb=1)
        job = Peer("/v1/jobs")
        job_done = job.start(app)
        await job.until_asked(1)
        await job.chunk(b"j" * 2 * MIB)  # more than the whole budget, held open
        assert app.budget.held == 0

        image = Peer(length=CHUNK)
        image_done = image.start(app)
        await image.until_asked(1)
        assert app.budget.held == CHUNK
        image.finish(b"x" * CHUNK)
        await image_done
        assert image.status == 200

        job.finish()
        await job_done
        assert job.status == 200 and job.json() == {"bytes": 2 * MIB}
        assert app.budget.held == 0 and app.budget.peak == CHUNK

    asyncio.run(run())


def test_a_body_over_the_whole_budget_is_413_and_0_means_no_budget() -> None:
    async def run() -> None:
        app = middleware(mb=1)
        alone = Peer(length=2 * MIB)
        await alone.start(app)
        assert alone.status == 413 and "1 MiB" in alone.json()["detail"] and "retry-after" not in alone.headers
        assert alone.asked == 0 and app.budget.held == 0

        unlimited = middleware(mb=0)
        peers = [Peer(length=2 * MIB) for _ in range(3)]
        tasks = [peer.start(unlimited) for peer in peers]
        for peer in peers:
            await peer.until_asked(1)
        assert unlimited.budget.held == 6 * MIB  # all three at once
        for peer in peers:
            peer.finish(b"x" * 2 * MIB)
        await asyncio.gather(*tasks)
        assert [peer.status for peer in peers] == [200, 200, 200] and unlimited.budget.held == 0

    asyncio.run(run())


def test_the_app_budgets_bodies_by_the_setting_and_leaves_the_jobs_out() -> None:
    app = create_app(Settings(max_inflight_mb=3))
    layer: Any = app.build_middleware_stack()
    while not isinstance(layer, BodyLimitMiddleware):
        layer = layer.app
    assert layer.budget.limit == 3 * MIB
    assert layer.unbudgeted == {"/v1/jobs"}
