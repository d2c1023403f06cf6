"""A front end's view of the engine process (``app.procs.client.RemoteEngine``) against a stand-in engine
process on a Unix socket: readiness is asked for when a request needs it, not only polled, and an answer to
an earlier question is not taken for the answer to a later one."""

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
    # The poll would come again only after a minute: only confirm_ready can learn that the engine is ready.
    monkeypatch.setattr(client, "STATUS_S", 60.0)
    asyncio.run(asks_when_needed(tmp_path))


async def asks_when_needed(tmp_path: Path) -> None:
    answered: list[bool] = []  # the readiness each answer said, in order
    ready_now = asyncio.Event()
    first_question = asyncio.Event()
    answer_the_first = asyncio.Event()
    answer_the_second = asyncio.Event()
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
                status: dict[str, Any] = {"op": "status", "ready": ready_now.is_set(), "failure": None, "models": {}}
                if not answered and not first_question.is_set():
                    first_question.set()  # the poll's question, answered "loading" but only later: a slow answer
                    await answer_the_first.wait()
                elif len(answered) == 1:
                    await answer_the_second.wait()
                answered.append(status["ready"])
                writer.write(encode({**status, "gpu": {}}))

    path = tmp_path / "engine.sock"
    server = await asyncio.start_unix_server(engine_process, path=str(path))
    became_ready = asyncio.Event()
    engine = RemoteEngine(str(path))
    await engine.start(on_ready=became_ready.set)
    try:
        await asyncio.wait_for(first_question.wait(), 10)
        ready_now.set()  # the engine process warmed up after it read the poll's question
        asking = asyncio.create_task(engine.confirm_ready())
        await asyncio.sleep(0.05)  # its question is on its way, behind the poll's
        assert not asking.done()
        answer_the_first.set()
        await asyncio.sleep(0.1)
        assert answered == [False] and not asking.done()  # the stale answer is not this question's
        answer_the_second.set()
        await asyncio.wait_for(asking, 10)
        assert answered == [False, True] and became_ready.is_set()
        await engine.confirm_ready()  # once ready, nothing more is asked
        assert answered == [False, True]
    finally:
        await engine.stop()
        await asyncio.wait_for(hung_up.wait(), 10)  # the stand-in saw the front end go
        server.close()
        await server.wait_closed()
