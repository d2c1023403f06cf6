"""Drive the ASGI app in-process with an async httpx client, its lifespan running, for tests that need
concurrent requests or streamed request bodies (the sync TestClient reads a request body whole)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI


@asynccontextmanager
async def serving(app: FastAPI, ready_timeout: float = 60) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan started and its models warm; yields a client that calls the app directly.

    The transport pulls a streamed request body only as the app asks for it, so a test can count how much
    of a body the app read.
    """
    async with app.router.lifespan_context(app):
        ready = await asyncio.to_thread(app.state.unetseg.ready.wait, ready_timeout)
        assert ready, f"not ready after {ready_timeout}s: {app.state.unetseg.error}"
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            yield client
