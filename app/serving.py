"""Running the ASGI app under uvicorn, as ``unetseg serve`` does in one process and each front end of
``serve --workers`` does on the socket the supervisor shares with it. What is added to uvicorn:

- **The port first.** ``bind`` is called before anything loads: a port in use (or an address the host does
  not have) is reported before the models load, not after minutes of loading and a "ready" in the log.
- **Headers in time.** uvicorn waits without limit for a connection's request headers: a client that sends
  them a byte at a time (slowloris), or connects and sends nothing, holds a connection for as long as it
  likes. Each connection here must send a request's headers within ``UNETSEG_HEADER_TIMEOUT_S`` of
  connecting (or of starting its next request on a kept-alive connection), else it is closed. The body's
  own limit is the app's (``RequestContextMiddleware``, ``UNETSEG_BODY_TIMEOUT_S``), so it holds under any
  server.
- **SIGTERM is an orderly stop** (``Server``).
"""

from __future__ import annotations

import asyncio
import math
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import Settings


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; OSError (in use, no such address) as it comes.

    ``reuse_port``: the first of a group of sockets on the same port (SO_REUSEPORT), among which the kernel
    spreads new connections; ``serve --workers N`` gives each front end its own (``reuse_port_group``)."""
    if reuse_port and port:
        # Another service holding the port with SO_REUSEPORT too (another ``serve --workers`` of this user)
        # would let this bind succeed and take a share of its connections: a plain bind first says "in use".
        _bound(host, port, reuse_port=False).close()
    return _bound(host, port, reuse_port)


def _bound(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is not "in use"
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def reuse_port_group(first: socket.socket, count: int) -> list[socket.socket]:
    """``first`` (bound with ``reuse_port``) and ``count - 1`` more sockets bound to its address.

    Front ends that shared one listening socket would not share its connections: the event loop that wakes
    first accepts every connection waiting (asyncio and libuv accept until the queue is empty), so a burst of
    keep-alive clients lands mostly on one or two processes (measured: 64 connections over 4 front ends as
    31/19/13/1). With a socket each in one SO_REUSEPORT group the kernel hashes each connection to one."""
    host, port = first.getsockname()[:2]
    group = [first]
    try:
        group += [_bound(host, port, reuse_port=True) for _ in range(count - 1)]
    except BaseException:
        for sock in group[1:]:
            sock.close()
        raise
    return group


def protocol_with_header_timeout(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing a connection whose request headers take longer than
    ``header_timeout_s``."""

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.logger.info("closed a connection whose request headers took over %g s", header_timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol


class Server(uvicorn.Server):
    """SIGTERM is an orderly stop: stop accepting, finish in-flight requests, drain the queue, exit 0.

    (uvicorn re-raises the signal after shutting down, which would end the process with -15.)
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured:
            captured.remove(sig)


def run(app: FastAPI, settings: Settings, grace_s: float, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` (from ``bind``, or a listening socket shared with other processes)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_with_header_timeout(settings.header_timeout_s),
        log_level=settings.log_level,
        log_config=None,  # one line per request, written by the app's middleware in UNETSEG_LOG_FORMAT
        access_log=False,
        timeout_graceful_shutdown=math.ceil(grace_s),
    )
    Server(config).run(sockets=[sock])
