"""Start the real ``unetseg serve`` as a subprocess on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.helpers import image_bytes

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(
    weights_dir: Path, data_dir: Path, timeout: float = 90, args: tuple[str, ...] = (), **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yields (base URL, process) once /readyz answers 200; stops the server afterwards. ``args``: more
    ``unetseg serve`` arguments (e.g. ``--workers 2``)."""
    port = free_port()
    environ = {
        **os.environ,
        "UNETSEG_WEIGHTS_DIR": str(weights_dir),
        "UNETSEG_DATA_DIR": str(data_dir),
        "UNETSEG_DEVICE": "cpu",
        **env,
    }
    log = open(data_dir.parent / f"server-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=ROOT,
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout}s: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def uploads_until_killed(
    weights_dir: Path, data_dir: Path, clients: int, kill_after: int, **env: str
) -> dict[str, bytes]:
    """Start the server, let ``clients`` threads upload distinct ~230 kB images (so that a kill can land
    mid-write) until ``kill_after`` are acknowledged, then SIGKILL it. Returns the acknowledged uploads by id;
    fails on any answer other than 200/201 before the kill."""
    acknowledged: dict[str, bytes] = {}
    lock = threading.Lock()
    enough, stop = threading.Event(), threading.Event()
    failures: list[str] = []

    def client(n: int, base: str) -> None:
        with httpx.Client(timeout=30) as http:
            for i in range(10_000):
                if stop.is_set():
                    return
                data = image_bytes(320, 240, seed=1000 * n + i)
                try:
                    r = http.post(f"{base}/v1/uploads", files={"file": ("a.png", data, "image/png")})
                except httpx.TransportError:
                    return  # the server is gone
                if r.status_code not in (200, 201):
                    failures.append(f"{r.status_code} {r.text[:200]}")
                    return
                with lock:
                    acknowledged[r.json()["id"]] = data
                    if len(acknowledged) >= kill_after:
                        enough.set()

    with running_server(weights_dir, data_dir, **env) as (base, proc):
        threads = [threading.Thread(target=client, args=(n, base)) for n in range(clients)]
        for t in threads:
            t.start()
        assert enough.wait(120), f"only {len(acknowledged)} uploads acknowledged; failures: {failures}"
        os.kill(proc.pid, signal.SIGKILL)  # the server process this test started, and nothing else
        assert proc.wait(30) == -signal.SIGKILL
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures
    with lock:
        return dict(acknowledged)
