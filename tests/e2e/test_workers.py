"""``unetseg serve --workers N``: front-end processes that load no torch, sharing one engine process.

Checked on the real command: the answers are byte for byte those of the one-process service; uploads,
metrics, readiness and the memory budget hold across the front ends; a front end that dies is replaced;
SIGTERM lets requests in flight finish before everything stops, and nothing is left in shared memory.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.procs.protocol import SHM_DIR, SHM_PREFIX
from model.bundle import InstanceSpec
from tests.e2e.server import ROOT, running_server
from tests.helpers import image_bytes, write_tiny_bundle

pytestmark = pytest.mark.e2e

PNG = "image/png"
WORKERS = ("--workers", "2")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    root = tmp_path / "weights"
    write_tiny_bundle(root / "tiny", name="tiny")
    spec = InstanceSpec("watershed", interior=1, boundary=2)
    write_tiny_bundle(root / "cells", seed=1, name="cells", classes=3, sizing="tile", size=32, instances=spec)
    return root


def children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


def served_by(r: httpx.Response) -> int:
    return int(r.headers["x-served-by"].rsplit(":", 1)[1])


def cells_batches(base: str) -> float:
    """Forward passes of the tiled model so far (the engine process's count, in /metrics)."""
    found = re.search(r'unetseg_batch_size_count\{model="cells"\} (\S+)', httpx.get(f"{base}/metrics").text)
    return float(found.group(1)) if found else 0.0


def spread(base: str, connections: int) -> dict[int, int]:
    """Open ``connections`` keep-alive connections at once, ask ``/healthz`` on each: connections per front end."""
    host, port = base.removeprefix("http://").split(":")

    async def burst() -> list[int]:
        opened = await asyncio.gather(*(asyncio.open_connection(host, int(port)) for _ in range(connections)))
        try:
            for _, writer in opened:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            heads = [(await reader.readuntil(b"\r\n\r\n")).decode() for reader, _ in opened]
        finally:
            for _, writer in opened:
                writer.close()
        return [int(re.search(r"(?i)x-served-by: \S+:(\d+)", h).group(1)) for h in heads]  # type: ignore[union-attr]

    counts: dict[int, int] = {}
    for pid in asyncio.run(burst()):
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def shm_files() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}*")}


def test_a_front_end_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "from app.config import Settings\n"
        "from app.main import create_app\n"
        "import app.procs.frontend, app.procs.client, app.pipeline\n"
        "create_app(Settings(engine_socket='/nonexistent.sock'))\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(len(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stdout + out.stderr


def test_front_ends_answer_as_one_process_does_and_share_uploads_metrics_and_the_budget(
    tmp_path: Path, weights: Path
) -> None:
    image, cells = image_bytes(57, 31), image_bytes(90, 70, seed=3)
    asks = [("tiny", "png", image), ("tiny", "json", image), ("cells", "instances", cells), ("cells", "png", cells)]
    single: dict[tuple[str, str], bytes] = {}
    with running_server(weights, tmp_path / "one", UNETSEG_MAX_BATCH="4") as (base, _):
        for model, fmt, data in asks:
            r = httpx.post(f"{base}/v1/predict?model={model}&format={fmt}", files={"file": ("a.png", data, PNG)})
            assert r.status_code == 200, r.text
            single[(model, fmt)] = r.content
    before = shm_files()
    data_dir = tmp_path / "many"
    with running_server(weights, data_dir, args=WORKERS, UNETSEG_MAX_BATCH="4", UNETSEG_MAX_INFLIGHT_MB="16") as (
        base,
        proc,
    ):
        assert len(children(proc.pid)) == 3  # the engine process and two front ends
        with httpx.Client(timeout=60) as http:
            for model, fmt, data in asks:
                r = http.post(f"{base}/v1/predict?model={model}&format={fmt}", files={"file": ("a.png", data, PNG)})
                assert r.status_code == 200, r.text
                if fmt == "json":  # the timings differ from run to run; the rest is the same
                    same = re.sub(rb'"timings_ms": ?\{[^}]*\}', b"", r.content)
                    assert same == re.sub(rb'"timings_ms": ?\{[^}]*\}', b"", single[(model, fmt)])
                else:
                    assert r.content == single[(model, fmt)], (model, fmt)
            # An upload made through one front end is found by the others.
            up = http.post(f"{base}/v1/uploads", files={"file": ("a.png", image, PNG)})
            assert up.status_code == 201
            uid = up.json()["id"]
            # A job taken by any front end runs (in the first one only), and any front end answers about it.
            r = http.post(f"{base}/v1/jobs?model=cells&format=instances", content=cells, headers={"Content-Type": PNG})
            assert r.status_code == 202, r.text
            job_url = f"{base}/v1/jobs/{r.json()['id']}"
            deadline = time.monotonic() + 60
            while (job := httpx.get(job_url).json())["state"] in ("queued", "running"):
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            assert job["state"] == "done", job
            assert httpx.get(f"{job_url}/result").content == single[("cells", "instances")]

        def by_id(_: int) -> tuple[int, int]:
            with httpx.Client(timeout=60) as c:  # a connection each: the kernel spreads them over the front ends
                r = c.post(f"{base}/v1/predict", data={"upload_id": uid})
                return r.status_code, served_by(r)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(by_id, range(24)))
        assert {status for status, _ in answers} == {200}
        # One budget for the host (16 MiB here, about 1 MiB a request), kept by the engine process: an image
        # that alone needs more (20 MiB) is refused.
        big = image_bytes(1200, 1000, seed=4)
        r = httpx.post(f"{base}/v1/predict?model=cells", files={"file": ("a.png", big, PNG)}, timeout=60)
        assert r.status_code == 413 and "MiB" in r.json()["detail"]
        # Every front end's requests are counted in /metrics, whichever answers it.
        metrics = httpx.get(f"{base}/metrics").text
        pattern = r'unetseg_requests_total\{method="POST",model="\w+",route="/v1/predict",status="200"\} (\S+)'
        assert sum(float(v) for v in re.findall(pattern, metrics)) == len(asks) + 24
        assert 'unetseg_batch_size_count{model="cells"}' in metrics
    assert shm_files() <= before  # every shared array was removed


def test_a_dead_front_end_is_replaced_and_sigterm_lets_requests_finish(tmp_path: Path, weights: Path) -> None:
    with running_server(weights, tmp_path / "data", args=WORKERS, UNETSEG_MAX_BATCH="1") as (base, proc):
        fronts = children(proc.pid)
        r = httpx.post(f"{base}/v1/predict", files={"file": ("a.png", image_bytes(40, 30), PNG)})
        victim = served_by(r)
        assert victim in fronts
        os.kill(victim, signal.SIGKILL)  # a front end this test's server started
        deadline = time.monotonic() + 60
        while True:  # the supervisor starts another; meanwhile the other front end answers
            now = children(proc.pid)
            if len(now) == 3 and victim not in now:
                break
            assert time.monotonic() < deadline, "the dead front end was not replaced"
            time.sleep(0.2)
        # Keep-alive connections opened in a burst are spread over the front ends, the new one included (each
        # has its own socket on the port; with one shared socket, the first to wake took nearly all of them).
        counts = spread(base, 32)
        assert len(counts) == 2 and set(counts) <= now and victim not in counts, counts
        assert min(counts.values()) >= 4, counts
        # A tiled request that takes a while is in flight when SIGTERM comes: it finishes, then all stop.
        slow = image_bytes(1600, 1200, seed=5)  # 3234 tiles of 32, one per forward pass
        before = cells_batches(base)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post, f"{base}/v1/predict?model=cells", files={"file": ("a.png", slow, PNG)}, timeout=120
            )
            deadline = time.monotonic() + 60
            while cells_batches(base) <= before:  # its tiles are running in the engine process
                assert time.monotonic() < deadline and not pending.done(), "the request never reached the model"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            r = pending.result()
            assert r.status_code == 200 and r.headers["content-type"] == PNG
        assert proc.wait(90) == 0
