"""The engine process: the models and the batching engine, shared by every front end of the host.

    python -m app.procs.server --socket PATH      (started by ``unetseg serve --workers N``; settings: UNETSEG_*)

It listens on the Unix socket at once (front ends ask whether it is ready) and loads and warms up the models
in a background thread. Each ``run`` message becomes a request on the in-process ``Engine``: its memory is
reserved from the one budget of the host, its inputs batched with every front end's, the mask written into
the front end's shared array. A front end that goes away takes its requests with it: they are cancelled
and their memory is freed. SIGTERM stops accepting connections, finishes what is queued, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Settings
from app.engine import Engine
from app.errors import ServiceError
from app.inference import Timing
from app.logs import configure_logging
from app.main import io_pool, local_engine
from app.procs.protocol import Arena, attach, encode, receive

log = logging.getLogger("unetseg.engine")


class EngineHost:
    """The engine as a service to front ends in other processes, whatever carries their messages (this
    module's Unix socket, or Ray Serve's handles in ``app.ray.engine``): warm-up, hello, status, and a
    request's work from its model input to its mask."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.ready = threading.Event()
        self.error: str | None = None
        self.pool = io_pool(settings, "engine-io")

    def start_models(self) -> None:
        """(a thread) Warm the models up; the front ends turn ready when this is done."""
        try:
            self.engine.start(warmup=self.settings.warmup)
        except Exception as exc:
            self.error = f"warm-up failed: {type(exc).__name__}: {exc}"
            log.exception("model warm-up failed")
            return
        self.ready.set()
        log.info("engine ready: %s on %s", ", ".join(self.engine.models), self.engine.device)

    def hello(self) -> dict[str, Any]:
        return {
            "default_model": self.engine.default_model,
            "models": [
                {
                    "card": m.card.to_dict(),
                    "device": m.device_name,
                    "precision": m.precision,
                    "graph": m.graph,
                    "max_batch": m.max_batch,
                }
                for m in self.engine.models.values()
            ],
        }

    def status(self) -> dict[str, Any]:
        failure = self.error or self.engine.failure()
        return {
            "ready": self.ready.is_set() and failure is None,
            "failure": failure,
            "models": {
                name: {
                    "queue_depth": m.queue_depth,
                    "rejected": m.rejected,
                    "load_s": m.load_s,
                    "graph": m.graph,
                    "max_batch": m.max_batch,
                    "batches": {str(k): v for k, v in m.batch_counts().items()},
                }
                for name, m in self.engine.models.items()
            },
            "gpu": {k: list(v) for k, v in self.engine.gpu_memory().items()},
        }

    async def predict(
        self,
        model: str,
        image: np.ndarray,
        size: tuple[int, int],
        instances: bool,
        extra_bytes: int,
        background: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None, Timing]:
        """The (H, W) class map, the instance ids when asked for, and the timing, for ``image`` (what
        ``app.procs.client.model_input`` made of the request's image). A ServiceError is the request's answer."""
        loop = asyncio.get_running_loop()
        prepare = self.engine.prepare
        prepared = await loop.run_in_executor(self.pool, prepare, model, image, size, instances, extra_bytes)
        try:
            timing = await self.engine.run(prepared, background=background)
            classes, found = await loop.run_in_executor(self.pool, self.engine.finish, prepared)
        finally:
            self.engine.release(prepared)
            del prepared  # its views of the input go before the caller lets go of it
        return classes, found, timing

    def stop(self) -> None:
        """Finish what is queued, then stop the engine and its threads."""
        self.engine.stop()
        self.pool.shutdown(wait=True)


def error_reply(exc: Exception, what: str) -> dict[str, Any]:
    """The answer to a request that failed: a ServiceError's status, detail and headers; anything else (a
    malformed message, a vanished array, a bug) that request's 500, logged."""
    if isinstance(exc, ServiceError):
        return {"error": {"status": exc.status_code, "detail": exc.detail, "headers": exc.headers}}
    log.error("%s failed", what, exc_info=exc)
    return {"error": {"status": 500, "detail": f"inference failed: {type(exc).__name__}: {exc}"}}


class EngineServer:
    """The engine process's Unix socket: one connection per front end."""

    def __init__(self, host: EngineHost) -> None:
        self.host = host

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One front end: its messages, and the tasks of its requests (cancelled when it goes away)."""
        tasks: dict[int, asyncio.Task[None]] = {}
        arena: Arena | None = None
        try:
            while (message := await receive(reader)) is not None:
                op = message.get("op")
                if op == "run":
                    rid = int(message["id"])
                    tasks[rid] = task = asyncio.create_task(self.run(message, writer, arena))
                    task.add_done_callback(lambda _, rid=rid: tasks.pop(rid, None))  # type: ignore[misc]
                elif op == "cancel":
                    running = tasks.get(int(message["id"]))
                    if running is not None:
                        running.cancel()
                elif op == "arena":
                    if arena is not None:
                        arena.close()
                    arena = Arena.attach(str(message["name"]), int(message["size"]))
                elif op == "hello":
                    writer.write(encode({"op": "hello", **self.host.hello()}))
                elif op == "status":
                    writer.write(encode({"op": "status", **self.host.status()}))
        finally:
            for task in list(tasks.values()):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
            if arena is not None:
                arena.close()
            writer.close()

    async def run(self, message: dict[str, Any], writer: asyncio.StreamWriter, arena: Arena | None) -> None:
        rid = int(message["id"])
        reply: dict[str, Any]
        try:
            h, w = (int(v) for v in message["size"])
            image = attach(message["input"], tuple(message["shape"]), np.uint8, arena)
            mask = attach(message["mask"], (h, w), np.uint8, arena)
            ids = attach(message["ids"], (h, w), np.int32, arena) if message.get("ids") is not None else None
            classes, found, timing = await self.host.predict(
                message["model"],
                image,
                (h, w),
                bool(message["instances"]),
                int(message["extra_bytes"]),
                bool(message.get("background")),
            )
            mask[:] = classes
            if ids is not None and found is not None:
                ids[:] = found
            reply = {"timing": [timing.queue_s, timing.model_s, timing.post_s]}
        except asyncio.CancelledError:
            # The front end waits for this answer before it uses the request's arena blocks again.
            if not writer.is_closing():
                writer.write(encode({"op": "run", "id": rid, "cancelled": True}))
            raise
        except Exception as exc:  # noqa: BLE001  (error_reply logs what is not a ServiceError)
            reply = error_reply(exc, f"request {rid} from a front end")
        if not writer.is_closing():
            writer.write(encode({"op": "run", "id": rid, **reply}))


async def serve(settings: Settings, socket_path: Path) -> int:
    host = EngineHost(local_engine(settings), settings)
    server = EngineServer(host)
    threading.Thread(target=host.start_models, name="engine-warmup", daemon=True).start()
    socket_path.unlink(missing_ok=True)
    listener = await asyncio.start_unix_server(server.connection, path=str(socket_path))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("engine process %d listening on %s", os.getpid(), socket_path)
    await stop.wait()
    listener.close()
    # What the front ends still wait for finishes; they are stopped first by the supervisor.
    await loop.run_in_executor(None, host.stop)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.procs.server", description="The engine process of serve --workers.")
    p.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    args = p.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    return asyncio.run(serve(settings, args.socket))


if __name__ == "__main__":
    sys.exit(main())
