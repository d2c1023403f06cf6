"""Running the ASGI app under uvicorn, as ``unetseg serve`` does in one process and each front end of
``serve --workers`` does on a socket it was given."""

from __future__ import annotations

import math
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.config import Settings


class Server(uvicorn.Server):
    """SIGTERM is an orderly stop: stop accepting, finish in-flight requests, drain the queue, exit 0.

    (uvicorn re-raises the signal after shutting down, which would end the process with -15.)
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured:
            captured.remove(sig)


def run(app: FastAPI, settings: Settings, grace_s: float, sock: socket.socket | None = None) -> None:
    """Serve ``app`` on ``settings.host:port``, or on ``sock`` (a listening socket shared with other processes)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # one line per request, written by the app's middleware in UNETSEG_LOG_FORMAT
        access_log=False,
        timeout_graceful_shutdown=math.ceil(grace_s),
    )
    Server(config).run(sockets=[sock] if sock is not None else None)
