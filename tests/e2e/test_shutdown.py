"""The real server under a signal and under an oversized streamed body.

- SIGTERM with requests in flight: the server stops accepting connections, finishes the requests it has
  (their bodies still arriving when the signal came), and exits 0.
- A chunked upload with no Content-Length, far over the limit: the server answers 413 and stops reading
  long before the client has sent it all.
"""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.e2e.server import running_server
from tests.helpers import image_bytes

pytestmark = pytest.mark.e2e

BOUNDARY = "shutdown-test-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart_file(data: bytes) -> tuple[bytes, bytes]:
    """(head, tail) of a multipart body with ``data`` as its ``file`` part."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
    return head, f"\r\n--{BOUNDARY}--\r\n".encode()


def accepts_connections(base: str) -> bool:
    try:
        httpx.get(f"{base}/healthz", timeout=2)
    except httpx.TransportError:
        return False
    return True


def test_sigterm_finishes_in_flight_requests_then_exits_0(weights_dir: Path, tmp_path: Path) -> None:
    images = [image_bytes(60 + 10 * i, 40 + 5 * i, seed=i) for i in range(4)]
    paths = ["/v1/predict", "/v1/predict?model=tiles", "/v1/predict?format=json", "/v1/uploads"]
    release = threading.Event()
    started = [threading.Event() for _ in images]

    def body(i: int) -> Iterator[bytes]:
        head, tail = multipart_file(images[i])
        half = len(images[i]) // 2
        yield head + images[i][:half]
        started[i].set()
        assert release.wait(60)  # the rest of the body only after the signal
        yield images[i][half:] + tail

    def send(i: int) -> httpx.Response:
        with httpx.Client(timeout=60) as http:
            return http.post(f"{base}{paths[i]}", content=body(i), headers={"content-type": CONTENT_TYPE})

    with running_server(weights_dir, tmp_path / "data", UNETSEG_DEFAULT_MODEL="tiny") as (base, proc):
        with ThreadPoolExecutor(len(images)) as pool:
            futures = [pool.submit(send, i) for i in range(len(images))]
            try:
                for event in started:
                    assert event.wait(30)
                time.sleep(1.0)  # the server has read the headers: each request is in flight
                proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 20
                while accepts_connections(base):  # it stops accepting new connections...
                    assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                    time.sleep(0.05)
                assert proc.poll() is None  # ...while it waits for the requests it has
            finally:
                release.set()
            responses = [f.result(60) for f in futures]
        assert proc.wait(30) == 0
    for i, r in enumerate(responses):
        assert r.status_code in (200, 201), (paths[i], r.status_code, r.text[:200])
    assert Image.open(io.BytesIO(responses[0].content)).size == (60, 40)
    assert Image.open(io.BytesIO(responses[1].content)).size == (70, 45)
    assert (responses[2].json()["width"], responses[2].json()["height"]) == (80, 50)
    assert responses[3].json()["bytes"] == len(images[3])


def test_an_oversized_chunked_upload_is_cut_off_by_the_real_server(weights_dir: Path, tmp_path: Path) -> None:
    limit = 200_000
    offered = 512 * 1024 * 1024  # what the client would send if it were let
    chunk = 64 * 1024
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        head, _ = multipart_file(b"")
        yield head
        while sent < offered:
            sent += chunk
            yield b"\0" * chunk

    with running_server(
        weights_dir, tmp_path / "data", UNETSEG_MAX_UPLOAD_BYTES=str(limit), UNETSEG_DEFAULT_MODEL="tiny"
    ) as (base, _):
        with httpx.Client(timeout=60) as http:
            # The client's write fails when the server closes the connection; it then reads the answer.
            r = http.post(f"{base}/v1/uploads", content=body(), headers={"content-type": CONTENT_TYPE})
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        # The client got to send at most what the loopback socket buffers hold beyond the limit.
        assert sent < 64 * 1024 * 1024, sent
        # The server is well and serves the next client.
        ok = httpx.post(f"{base}/v1/uploads", files={"file": ("a.png", image_bytes(), "image/png")}, timeout=30)
        assert ok.status_code == 201
