"""What the real server does with connections that do not behave: a client that leaves mid-body (499, not
500), a chunked body past the limit (413, and the connection closed rather than drained), headers or a
body sent too slowly (closed; 408), a port already in use (said before the models load)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import ROOT, free_port, running_server

pytestmark = pytest.mark.e2e

LIMIT = 100_000
ENV = {
    "UNETSEG_MAX_UPLOAD_BYTES": str(LIMIT),
    "UNETSEG_HEADER_TIMEOUT_S": "1",
    "UNETSEG_BODY_TIMEOUT_S": "2",
    "UNETSEG_DEFAULT_MODEL": "tiny",
    "UNETSEG_WARMUP": "false",
}


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it has not within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open past {timeout} s; it sent {data[:300]!r}") from None
    except ConnectionResetError:
        pass
    return data


def metric(base: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0].split("{")[1] == wanted:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def server(weights_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with running_server(weights_dir, tmp_path / "data", **ENV) as (base, _proc):
        yield base, tmp_path / f"server-{base.rsplit(':', 1)[1]}.log"


def test_a_client_that_leaves_mid_body_is_499_not_500(server: tuple[str, Path]) -> None:
    base, log = server
    labels = {"route": "/v1/uploads", "method": "POST", "model": ""}
    for _ in range(2):
        with connect(base) as sock:
            sock.sendall(
                b"POST /v1/uploads HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 50000\r\n\r\n"
                + b"\x89PNG" * 1000
            )
    deadline = time.monotonic() + 30
    while metric(base, "unetseg_requests_total", **labels, status="499") < 2:
        assert time.monotonic() < deadline, httpx.get(f"{base}/metrics").text
        time.sleep(0.05)
    assert metric(base, "unetseg_requests_total", **labels, status="500") == 0
    text = log.read_text()
    assert text.count("POST /v1/uploads 499 ") == 2 and "Traceback" not in text


def test_a_chunked_body_past_the_limit_is_413_and_the_connection_closed(server: tuple[str, Path]) -> None:
    base, _ = server
    with connect(base) as sock:
        answer, sent = _send_until_answered(sock)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"connection: close" in answer.lower()
    assert sent < 50 * LIMIT, "the server read on past the limit"


def _send_until_answered(sock: socket.socket) -> tuple[bytes, int]:
    sock.sendall(
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (16384, b"\0" * 16384)
    sent = 0
    answer = b""
    sock.settimeout(0.01)
    try:
        while sent < 50 * LIMIT and not answer:  # a client that goes on sending, as curl would
            sock.sendall(chunk)
            sent += 16384
            with contextlib.suppress(TimeoutError):
                answer = sock.recv(65536)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return answer + read_until_closed(sock, 10), sent


def test_headers_sent_too_slowly_or_not_at_all_are_cut_off(server: tuple[str, Path]) -> None:
    base, _ = server
    with connect(base) as idle, connect(base) as slow:
        _slow_headers(idle, slow)
    assert httpx.get(f"{base}/healthz").status_code == 200  # and the server is fine


def _slow_headers(idle: socket.socket, slow: socket.socket) -> None:
    t0 = time.monotonic()
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")
    try:
        for byte in b"Host: x\r\nX-Slow: " + b"a" * 40:  # a byte every 0.2 s: 10 s for the headers
            slow.sendall(bytes([byte]))
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert read_until_closed(slow, 10) == b""
    assert read_until_closed(idle, 10) == b""
    assert time.monotonic() - t0 < 10


def test_a_body_sent_too_slowly_gets_408(server: tuple[str, Path]) -> None:
    base, _ = server
    with connect(base) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
        sock.sendall(b"\x89PNG")  # and nothing more
        answer = read_until_closed(sock, 15)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"the request body was not received in time" in answer


@pytest.mark.parametrize(
    ("workers", "holder_reuses_port"),
    [("1", False), ("2", False), ("2", True)],  # True: held as another ``serve --workers`` holds its port
)
def test_a_port_in_use_is_said_before_the_models_load(
    weights_dir: Path, tmp_path: Path, workers: str, holder_reuses_port: bool
) -> None:
    port = free_port()
    with socket.socket() as taken:
        if holder_reuses_port:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        command = ["serve", "--port", str(port), "--weights-dir", str(weights_dir), "--workers", workers]
        done = subprocess.run(
            [sys.executable, "-m", "app", *command],
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "UNETSEG_DATA_DIR": str(tmp_path / "data"), "UNETSEG_DEVICE": "cpu"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "ready:" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # nothing was opened either
