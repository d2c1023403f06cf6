"""A front end's view of the engine process (``app.procs.client.RemoteEngine``) against a stand-in engine
process on a Unix socket: readiness is asked for when a request needs it, not only polled."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import app.procs.client as client
from app.procs.client import RemoteEngine
from app.procs.protocol import encode, receive
from tests.helpers import tiny_card


def test_a_front_end_that_has_not_seen_the_engine_ready_asks_it_before_saying_still_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The poll would come only after a minute: only confirm_ready can learn that the engine is ready.
    monkeypatch.setattr(client, "STATUS_S", 60.0)
    asyncio.run(asks_when_needed(tmp_path))


async def asks_when_needed(tmp_path: Path) -> None:
    statuses: list[dict[str, Any]] = []
    ready_now = asyncio.Event()

    hung_up = asyncio.Event()

    async def engine_process(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        finally:
            writer.close()
            await writer.wait_closed()
            hung_up.set()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (message := await receive(reader)) is not None:
            if message["op"] == "hello":
                model = {"card": tiny_card().to_dict(), "device": "cpu", "precision": "float32"}
                hello = {
                    "op": "hello",
                    "default_model": "tiny",
                    "models": [{**model, "graph": "eager", "max_batch": 4}],
                }
                writer.write(encode(hello))
            elif message["op"] == "status":
                status = {"op": "status", "ready": ready_now.is_set(), "failure": None, "models": {}, "gpu": {}}
                statuses.append(status)
                writer.write(encode(status))

    path = tmp_path / "engine.sock"
    server = await asyncio.start_unix_server(engine_process, path=str(path))
    became_ready = asyncio.Event()
    engine = RemoteEngine(str(path))
    await engine.start(on_ready=became_ready.set)
    try:
        for _ in range(500):  # the first poll, at connection: not ready yet
            if statuses:
                break
            await asyncio.sleep(0.01)
        assert statuses and not statuses[0]["ready"]
        await engine.confirm_ready()
        assert not became_ready.is_set()  # the engine still said "loading": asked, and answered so
        ready_now.set()  # the engine process has warmed up (another front end's poll may have seen it)
        await asyncio.gather(engine.confirm_ready(), engine.confirm_ready())  # one question answers both
        assert became_ready.is_set()
        assert len(statuses) == 3  # the poll at connection, then one question each time
        await engine.confirm_ready()  # once ready, nothing more is asked
        assert len(statuses) == 3
    finally:
        await engine.stop()
        await asyncio.wait_for(hung_up.wait(), 10)  # the stand-in saw the front end go
        server.close()
        await server.wait_closed()
