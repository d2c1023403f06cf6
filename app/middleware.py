"""ASGI middleware: the request body limit, enforced while the body streams in, and the budget of the bodies
being read; request ids, the access log and request metrics; what happens to a body the client does not
finish sending."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.routing import Mount, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.budget import MemoryBudget


class _BodyRefused(Exception):
    pass


class BodyLimitMiddleware:
    """Answer 413 ``{"detail": ...}`` as soon as a request body passes ``limit`` bytes, and 503 when the
    bodies being read together would pass the process's body budget.

    A declared Content-Length over the limit is refused before anything is read; a chunked or lying body
    is cut off at the first chunk that passes the limit, so an oversized upload never sits in memory.

    **The body budget** (``max_inflight_bytes``, ``UNETSEG_MAX_INFLIGHT_MB``; 0: none, as the engine's
    budget): the bytes of every request body this process is reading or still holds, counted from the
    first byte until the request ends (its response is sent, it fails, or its client leaves), whatever
    ends it. The engine's budget counts a request only once its image is decoded; this one counts what
    comes before. A body with a Content-Length reserves all of it up front: the route reads it whole into
    memory anyway, and refusing before the first byte means a refused body is never taken in, and that
    many bodies arriving at once cannot each take part of the budget and then all be refused half read.
    A body without one (chunked) reserves its bytes as they arrive. A body that does not fit beside those
    in flight gets 503 with ``Retry-After: 1`` and ``Connection: close`` before any more of it is read; one
    that could never fit, even alone, gets 413. Routes in ``unbudgeted`` (the jobs', whose bodies go
    to disk as they stream in) are not counted.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        paths: dict[str, int] | None = None,
        max_inflight_bytes: int = 0,
        unbudgeted: Iterable[str] = (),
    ) -> None:
        """``paths``: routes (exact paths) with a limit of their own, such as the jobs' far larger one."""
        self.app = app
        self.limit = limit
        self.paths = paths or {}
        self.budget = MemoryBudget(max_inflight_bytes)  # one app, so one budget, per process
        self.unbudgeted = frozenset(unbudgeted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.limit)
        budget = None if scope["path"] in self.unbudgeted else self.budget
        detail = f"the request body is over the limit of {limit} bytes"
        declared = 0
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, "invalid Content-Length header")
                    return
                if declared > limit:
                    await _send_json(send, 413, detail)
                    return
        held = 0  # bytes this request holds of the budget
        if budget is not None and declared > 0:
            refused = _take(budget, declared, declared)
            if refused is not None:
                await _send_json(send, *refused)
                return
            held = declared
        received = 0
        refusal: tuple[int, str, dict[str, str]] | None = None
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refusal, held
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refusal = (413, detail, {})
                    raise _BodyRefused
                if budget is not None and received > held:
                    refusal = _take(budget, received - held, received)
                    if refusal is not None:
                        raise _BodyRefused
                    held = received
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:  # the app turned the aborted read into its own error: ours goes out instead
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            with contextlib.suppress(_BodyRefused):
                await self.app(scope, limited_receive, guarded_send)
        finally:
            if budget is not None and held:
                budget.release(held)
        if refusal is not None and not started:
            await _send_json(send, *refusal)


def _take(budget: MemoryBudget, nbytes: int, body: int) -> tuple[int, str, dict[str, str]] | None:
    """Reserve ``nbytes`` more of a body of (at least) ``body`` bytes; or the refusal to answer, holding none."""
    if not budget.fits_alone(body):
        return 413, f"the request body is over the {_mib(budget.limit)} MiB the service reads at once", {}
    if budget.try_reserve(nbytes):
        return None
    return (
        503,
        f"the service is reading {_mib(budget.held)} MiB of request bodies and the limit is "
        f"{_mib(budget.limit)} MiB; retry shortly",
        {"Retry-After": "1"},
    )


def _mib(nbytes: int) -> str:
    """Bytes as MiB: whole, else to one decimal place (0.6, 19.1)."""
    text = f"{nbytes / (1024 * 1024):.1f}"
    return text.removesuffix(".0")


async def _send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None, **fields: str) -> int:
    """A JSON error (``detail`` and ``fields``) on a connection that is then closed. Returns the body's length."""
    body = json.dumps({"detail": detail, **fields}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((name.lower().encode(), value.encode()) for name, value in (headers or {}).items()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return len(body)


# --- request ids, access log and request metrics ---------------------------------------------------------

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
request_id_var: ContextVar[str | None] = ContextVar("unetseg_request_id", default=None)
access_log = logging.getLogger("unetseg.access")


@dataclass
class RequestRecord:
    """One answered request, as logged and counted."""

    request_id: str
    method: str
    path: str
    route: str  # the route's template (e.g. /v1/uploads/{upload_id}), never the raw path
    status: int
    duration_s: float
    request_bytes: int
    response_bytes: int
    client: str | None = None
    model: str | None = None  # set by routes that use a model (request.state.model)
    timings_s: dict[str, float] = field(default_factory=dict)  # predict's split (request.state.timings)

    def fields(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "model": self.model,
            "status": self.status,
            "duration_ms": round(self.duration_s * 1000, 3),
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            "timings_ms": {k: round(v * 1000, 3) for k, v in self.timings_s.items()},
            "client": self.client,
        }

    def text(self) -> str:
        path = _printable(self.path)
        parts = [
            f"{self.client or '-'} {self.method} {path} {self.status} {self.duration_s * 1000:.1f}ms",
            f"id={self.request_id}",
            f"route={self.route}",
        ]
        if self.model:
            parts.append(f"model={self.model}")
        parts.append(f"in={self.request_bytes}B out={self.response_bytes}B")
        if self.timings_s:
            parts.append("split=" + ",".join(f"{k}:{v * 1000:.1f}" for k, v in self.timings_s.items()) + "ms")
        return " ".join(parts)


def _printable(text: str, limit: int = 1000) -> str:
    """Control characters escaped (a decoded path may hold a newline), and cut at ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
UNMATCHED = "<unmatched>"


class RouteTemplates:
    """Request path -> the template of the route serving it (``/v1/uploads/{upload_id}``), from a fixed set.

    Labels and log fields then never carry raw paths. Literal templates win over templates with parameters.
    """

    def __init__(self, templates: Iterable[str]) -> None:
        compiled = []
        for template in dict.fromkeys(templates):
            regex, path_format, _ = compile_path(template)
            compiled.append((regex, path_format))
        compiled.sort(key=lambda rf: ("{" in rf[1], -len(re.sub(r"\{[^}]*\}", "", rf[1]))))
        self._compiled = compiled

    def match(self, path: str) -> str:
        for regex, path_format in self._compiled:
            if regex.match(path):
                return path_format
        return UNMATCHED

    @staticmethod
    def of(app: FastAPI) -> Callable[[], RouteTemplates]:
        """A loader of ``app``'s templates (documented paths, the app's own routes and mounts), for when the
        routes are all added."""

        def load() -> RouteTemplates:
            templates = list(app.openapi().get("paths", {}))
            for route in app.routes:
                path = getattr(route, "path", None)
                if isinstance(route, Mount):
                    templates.append(route.path + "/{path:path}")
                elif isinstance(path, str):
                    templates.append(path)
            return RouteTemplates(templates)

        return load


class RequestContextMiddleware:
    """Give every HTTP request an id, put it in error bodies, log one line per request and count it.

    - Every response carries ``X-Served-By``: ``hostname:pid`` of the process that answered (one replica
      of several, under Ray Serve).
    - The id is the client's ``X-Request-ID`` when it is sane (1-128 of ``[A-Za-z0-9._-]``), else a new
      one; it is returned in ``X-Request-ID``, kept in ``request.state.request_id`` and in
      ``request_id_var`` while the request runs.
    - A JSON error response (status >= 400) whose body is an object with ``detail`` gets ``request_id``
      added next to it.
    - **A body not received whole within ``body_timeout_s``** of the request's start (a client that sends
      slowly on purpose, or stalls) ends the request: 408 and the connection closed.
    - **A response sent before the request's body was read to its end** (a 413 on a chunked body, a 401,
      a 408) carries ``Connection: close``: the server then closes the connection instead of reading, and
      discarding, whatever the client goes on sending.
    - **A client that disconnects before its response is complete** is logged and counted as 499 (as nginx
      does), not as the 500 of the exception its request's read then raises.
    - **A redirect's Location is a path** (the router's trailing-slash redirect builds an absolute URL from
      the Host header, which a client or proxy chooses).
    - When the request is done, one ``unetseg.access`` log record carries a ``RequestRecord`` (as
      ``record.unetseg``), and ``observe`` (the metrics) gets the same record.

    Pure ASGI: response bodies stream through untouched, except the small JSON error bodies it amends.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Callable[[], RouteTemplates],
        observe: Callable[[RequestRecord], None] | None = None,
        body_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.observe = observe
        self.body_timeout_s = body_timeout_s
        self._load_routes = routes
        self._routes: RouteTemplates | None = None
        self.served_by = f"{socket.gethostname()}:{os.getpid()}"

    def route_of(self, path: str) -> str:
        if self._routes is None:
            self._routes = self._load_routes()
        return self._routes.match(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        # Routing rewrites root_path and path for mounts: take the route path as it arrived.
        path = scope["path"]
        root_path = scope.get("root_path", "")
        route_path = path[len(root_path) :] if root_path and path.startswith(root_path) else path
        rid = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if REQUEST_ID_RE.fullmatch(candidate):
                    rid = candidate
                break
        request_id = rid or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = request_id_var.set(request_id)
        status = 500
        received = 0
        sent = 0
        started = False
        held: Message | None = None  # the start of a JSON error response, sent with its amended body
        chunks: list[bytes] = []
        body_done = not _has_body(scope)
        gone = False  # the client disconnected before its response was complete
        complete = False
        timed_out = False
        deadline = None if self.body_timeout_s is None else time.monotonic() + self.body_timeout_s

        async def counting_receive() -> Message:
            nonlocal received, body_done, gone, timed_out
            if body_done or deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    timed_out = True
                    raise _BodyTimeout from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = body_done or not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not complete:
                gone = True
            return message

        async def amending_send(message: Message) -> None:
            nonlocal status, sent, started, held, complete
            if timed_out:  # the app turned the aborted read into its own error: the 408 goes out instead
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                headers["X-Served-By"] = self.served_by
                if not body_done:
                    headers["Connection"] = "close"
                if 300 <= status < 400 and "location" in headers:
                    headers["Location"] = _path_only(headers["location"])
                if status >= 400 and headers.get("content-type", "").startswith("application/json"):
                    held = message
                    return
                started = True
                await send(message)
                return
            if message["type"] == "http.response.body":
                complete = not message.get("more_body", False)
                if held is not None:
                    chunks.append(message.get("body", b""))
                    if message.get("more_body", False):
                        return
                    body = _with_request_id(b"".join(chunks), request_id)
                    MutableHeaders(scope=held)["content-length"] = str(len(body))
                    start, held = held, None
                    started = True
                    await send(start)
                    sent += len(body)
                    await send({"type": "http.response.body", "body": body})
                    return
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, amending_send)
            if timed_out and not started:  # the app caught the timeout and answered: ours still goes out
                status = 408
                sent = await _send_error(send, 408, _BODY_TIMEOUT_DETAIL, request_id, self.served_by)
        except _BodyTimeout:
            status = 408
            if not started:
                sent = await _send_error(send, 408, _BODY_TIMEOUT_DETAIL, request_id, self.served_by)
        except Exception:
            if gone:
                return  # the read failed because the client left: nothing to answer, nothing to report (499)
            status = 500
            if not started:
                started = True
                sent = await _send_error(send, 500, "internal server error", request_id, self.served_by)
            raise
        finally:
            if gone and not complete:
                status = 499  # as nginx logs it: the client left before its response was complete
            request_id_var.reset(token)
            client = scope.get("client")
            timings = state.get("timings")
            model = state.get("model")
            record = RequestRecord(
                request_id=request_id,
                method=scope["method"],
                path=path,
                route=self.route_of(route_path),
                status=status,
                duration_s=time.perf_counter() - t0,
                request_bytes=received,
                response_bytes=sent,
                client=client[0] if client else None,
                model=model if isinstance(model, str) else None,
                timings_s=dict(timings) if isinstance(timings, dict) else {},
            )
            access_log.info(record.text(), extra={"unetseg": record.fields()})
            if self.observe is not None:
                self.observe(record)


class _BodyTimeout(Exception):
    pass


_BODY_TIMEOUT_DETAIL = "the request body was not received in time"


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


def _path_only(location: str) -> str:
    parts = urlsplit(location)
    return urlunsplit(("", "", parts.path or "/", parts.query, parts.fragment))


async def _send_error(send: Send, status: int, detail: str, request_id: str, served_by: str) -> int:
    """A JSON error of the middleware's own, with the request's id, on a connection it closes."""
    headers = {"X-Request-ID": request_id, "X-Served-By": served_by}
    return await _send_json(send, status, detail, headers, request_id=request_id)


def _with_request_id(body: bytes, request_id: str) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict) or "detail" not in data:
        return body
    data["request_id"] = request_id
    return json.dumps(data).encode()
