"""A front end's view of the engine process (``app.procs.client.RemoteEngine``) against a stand-in engine
process on a Unix socket: readiness is asked for when a request needs it, not only polled, and an answer to
an earlier question is not taken for the answer to a later one; the arena's blocks, and a request given up
while the engine process may still write its arrays."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import app.procs.client as client
from app.errors import RequestTimeout
from app.procs.client import RemoteEngine
from app.procs.protocol import Arena, ArenaArray, SharedArray, attach, encode, receive
from tests.helpers import tiny_card

HELLO = {
    "op": "hello",
    "default_model": "tiny",
    "models": [
        {"card": tiny_card().to_dict(), "device": "cpu", "precision": "float32", "graph": "eager", "max_batch": 4}
    ],
}
Handle = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def front_end(tmp_path: Path, handle: Handle, on_ready: Callable[[], None]) -> AsyncIterator[RemoteEngine]:
    """A ``RemoteEngine`` started against a stand-in engine process on a Unix socket, which says hello and
    ``handle``s every other message in turn; on the way out the front end stops and the stand-in sees it go."""
    hung_up = asyncio.Event()

    async def engine_process(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (message := await receive(reader)) is not None:
                if message["op"] == "hello":
                    writer.write(encode(HELLO))
                else:
                    await handle(message, writer)
        finally:
            writer.close()
            await writer.wait_closed()
            hung_up.set()

    path = tmp_path / "engine.sock"
    server = await asyncio.start_unix_server(engine_process, path=str(path))
    engine = RemoteEngine(str(path))
    await engine.start(on_ready=on_ready)
    try:
        yield engine
    finally:
        await engine.stop()
        await asyncio.wait_for(hung_up.wait(), 10)
        server.close()
        await server.wait_closed()


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

    async def handle(message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if message["op"] == "status":
            status: dict[str, Any] = {"op": "status", "ready": ready_now.is_set(), "failure": None, "models": {}}
            if not answered and not first_question.is_set():
                first_question.set()  # the poll's question, answered "loading" but only later: a slow answer
                await answer_the_first.wait()
            elif len(answered) == 1:
                await answer_the_second.wait()
            answered.append(status["ready"])
            writer.write(encode({**status, "gpu": {}}))

    became_ready = asyncio.Event()
    async with front_end(tmp_path, handle, became_ready.set) as engine:
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


def test_the_arena_reuses_freed_blocks_joins_neighbours_and_says_when_it_is_full() -> None:
    arena = Arena.create(size=4096)
    try:
        a = arena.allocate((10,), np.uint8)  # 64 bytes once aligned
        b = arena.allocate((100,), np.uint8)  # 128
        c = arena.allocate((3000,), np.uint8)
        assert a is not None and b is not None and c is not None
        assert (a.ref, b.ref, c.ref) == (0, 64, 192)
        assert arena.allocate((1000,), np.uint8) is None  # 4096 - 3264 = 832 left
        a.unlink()
        b.unlink()
        b.unlink()  # once only
        assert arena.free_bytes() == 4096 - 3008
        d = arena.allocate((190,), np.uint8)  # fits only in a and b joined
        assert d is not None and d.ref == 0
        c.unlink()
        d.unlink()
        assert arena._free == [(0, 4096)]
    finally:
        arena.unlink()


def test_the_engine_process_refuses_an_offset_outside_the_arena() -> None:
    arena = Arena.create(size=4096)
    try:
        engine_side = Arena.attach(arena.name, arena.size)
        for offset in (-64, 4096, 10**9, 3):  # before it, past its end, far past it, misaligned
            with pytest.raises(ValueError, match="arena"):
                attach(offset, (8, 8), np.uint8, engine_side)
        with pytest.raises(ValueError, match="no arena"):
            attach(0, (8, 8), np.uint8, None)
        block = arena.allocate((8, 8), np.uint8)
        assert block is not None and block.array is not None
        attach(block.ref, (8, 8), np.uint8, engine_side)[:] = 7  # what the engine writes, the front end reads
        assert (block.array == 7).all()
        engine_side.close()
    finally:
        arena.unlink()


def test_a_request_given_up_keeps_its_arena_blocks_until_the_engine_process_answers(tmp_path: Path) -> None:
    asyncio.run(given_up(tmp_path))


async def given_up(tmp_path: Path) -> None:
    runs: list[dict[str, Any]] = []
    cancelled = asyncio.Event()
    answer_it = asyncio.Event()

    async def handle(message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if message["op"] == "status":
            writer.write(encode({"op": "status", "ready": True, "failure": None, "models": {}, "gpu": {}}))
        elif message["op"] == "run":
            runs.append(message)
        elif message["op"] == "cancel":
            cancelled.set()
            await answer_it.wait()  # still writing the mask, say
            writer.write(encode({"op": "run", "id": message["id"], "cancelled": True}))

    ready = asyncio.Event()
    async with front_end(tmp_path, handle, ready.set) as engine:
        await asyncio.wait_for(ready.wait(), 10)
        assert engine._arena is not None
        image = np.zeros((40, 30, 3), np.uint8)
        first = engine.prepare("tiny", image)
        assert isinstance(first.image, ArenaArray) and isinstance(first.mask, ArenaArray)
        held = {first.image.ref, first.mask.ref}
        with pytest.raises(RequestTimeout):
            await engine.run(first, timeout_s=0.2)
        engine.release(first)  # what the pipeline does after the 504
        await asyncio.wait_for(cancelled.wait(), 10)
        second = engine.prepare("tiny", image)
        assert {second.image.ref, second.mask.ref}.isdisjoint(held)  # the engine may still write those
        assert runs[0]["input"] in held and runs[0]["mask"] in held
        answer_it.set()
        for _ in range(100):
            if first.released:
                break
            await asyncio.sleep(0.01)
        engine.release(second)
        assert engine._arena.free_bytes() == engine._arena.size  # all given back once answered
        big = engine._shared((6000, 6000), np.uint8)  # more than the arena holds: a file of its own
        assert isinstance(big, SharedArray) and big.path.exists()
        big.close()
        big.unlink()
