"""A lean HTTP/1.1 load generator: N keep-alive connections, each sending one request after another.

It writes pre-built request bytes and parses only the status line and Content-Length, so that on a small
machine the client takes as little CPU as possible away from the server being measured.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: dict[int, int] = field(default_factory=dict)  # status (0 = connection error) -> count
    # Per successful request that sent Server-Timing: the share of its round trip outside its ``model`` entry
    # (the service's forward passes and turning the logits into the mask): decode, queue, encode, HTTP.
    non_model: list[float] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]

    def summary(self) -> dict[str, float | int | dict[int, int]]:
        out: dict[str, float | int | dict[int, int]] = {
            "clients": self.clients,
            "requests": self.ok,
            "errors": dict(self.errors),
            "images_per_s": round(self.throughput, 2),
            "p50_ms": round(self.percentile(50) * 1000, 1),
            "p99_ms": round(self.percentile(99) * 1000, 1),
        }
        if self.non_model:
            out["non_model_share_p50"] = round(sorted(self.non_model)[len(self.non_model) // 2], 3)
        return out


def model_seconds(server_timing: str) -> float | None:
    """The ``model`` entry of a Server-Timing header (``decode;dur=7.2, model;dur=26.7``), in seconds."""
    for entry in server_timing.split(","):
        name, _, params = entry.strip().partition(";")
        if name == "model" and params.startswith("dur="):
            return float(params[4:]) / 1000
    return None


def multipart_request(
    host: str,
    port: int,
    path: str,
    field_name: str,
    filename: str,
    data: bytes,
    content_type: str = "application/octet-stream",
) -> bytes:
    boundary = "unetsegbenchboundary7d2f"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    return head + body


def json_request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    return head + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, float | None]:
    """Status, body and the Server-Timing model seconds (None without the header)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    status = int(status_line.split()[1])
    length = 0
    chunked = False
    model_s = None
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value.strip())
        elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif name.lower() == "server-timing":
            model_s = model_seconds(value)
    if not chunked:
        return status, await reader.readexactly(length), model_s
    body = b""
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            return status, body, model_s
        body += await reader.readexactly(size)
        await reader.readline()


async def _client(host: str, port: int, request: bytes, deadline: float, result: LoadResult) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                writer.write(request)
                await writer.drain()
                status, _, model_s = await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                result.errors[0] = result.errors.get(0, 0) + 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            if status == 200:
                rtt = time.perf_counter() - t0
                result.latencies.append(rtt)
                if model_s is not None:
                    result.non_model.append(max(0.0, 1 - model_s / rtt))
            else:
                result.errors[status] = result.errors.get(status, 0) + 1
    finally:
        writer.close()


async def run_load(
    host: str, port: int, request: bytes, clients: int, seconds: float, warmup_s: float = 2.0
) -> LoadResult:
    """Warm up for ``warmup_s`` (not recorded), then measure ``seconds`` with ``clients`` connections."""
    if warmup_s > 0:
        warm = LoadResult(clients, warmup_s)
        end = time.perf_counter() + warmup_s
        await asyncio.gather(*(_client(host, port, request, end, warm) for _ in range(clients)))
    result = LoadResult(clients, seconds)
    start = time.perf_counter()
    end = start + seconds
    await asyncio.gather(*(_client(host, port, request, end, result) for _ in range(clients)))
    result.seconds = time.perf_counter() - start  # includes the tail of the last requests
    return result
