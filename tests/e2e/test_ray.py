"""``unetseg serve --ray --replicas 2`` for real: a local Ray instance on this machine, two front-end
replicas and one engine replica (half a core reserved each, so that a replacement fits on two cores).

First, a bad bundle: the engine replica's start fails, and the command exits 1 with the bundle's error in
one line. Then one server for the module (Ray takes half a minute to start on two cores); the tests run in
file order and the last one stops it:
- both front ends answer (``X-Served-By``), and the masks are the one-process service's, byte for byte;
- an upload stored through one front end is predicted by id on the other (they share a store: metadata in a
  throwaway PostgreSQL database, bytes under a file:// URL, as replicas on several machines would);
- a front end's process killed with SIGKILL: the service keeps answering and Serve starts a new one;
- the engine replica's process killed with SIGKILL: once the front ends have noticed (``/readyz`` 503), a
  prediction is a 503 with ``Retry-After`` at once; none is anything but a 200 or that 503, and a new engine
  replica serves within two minutes;
- SIGTERM with a request in flight (its body still arriving): it gets its 200 (the engine stops after the
  front ends), the command exits 0, and no process it started (Ray's included) is left.

Skipped without the ray extra, except under CI (``CI=true``), where a missing extra is a failure.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from tests.backends import postgres_database
from tests.conftest import make_settings, wait_ready
from tests.e2e.server import ROOT, free_port
from tests.helpers import image_bytes

if os.environ.get("CI") == "true":
    import ray  # noqa: F401  (CI installs the ray extra: without it these tests must fail, not skip)
else:
    pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

# The one-process service and the replicas run with the same settings (conftest's, as UNETSEG_* variables).
SETTINGS_ENV = {
    "UNETSEG_DEVICE": "cpu",
    "UNETSEG_DEFAULT_MODEL": "tiny",
    "UNETSEG_PRECISION": "float32",
    "UNETSEG_MAX_WAIT_MS": "1.0",
    "UNETSEG_IO_THREADS": "2",
}


@dataclass
class RayServer:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path
    pids: set[int] = field(default_factory=set)  # every process the command started, seen while it ran

    def served_by(self, response: httpx.Response) -> str:
        assert response.status_code in (200, 201), (response.status_code, response.text)
        return response.headers["X-Served-By"]


def descendants(pid: int) -> set[int]:
    """Pids of every living process below ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import write_tiny_bundle

    root = tmp_path_factory.mktemp("ray") / "weights"
    write_tiny_bundle(root / "tiny", name="tiny")
    write_tiny_bundle(root / "tiles", seed=1, name="tiles", channels=1, classes=3, sizing="tile", size=32)
    return root


@pytest.fixture(scope="module")
def shared_store(weights: Path) -> Iterator[dict[str, str]]:
    """The store settings of the replicas: PostgreSQL metadata and file:// blobs."""
    with postgres_database() as url:
        yield {"UNETSEG_DATABASE_URL": url, "UNETSEG_BLOB_URL": (weights.parent / "blobs").as_uri()}


@pytest.fixture(scope="module")
def server(weights: Path, shared_store: dict[str, str]) -> Iterator[RayServer]:
    port = free_port()
    data_dir = weights.parent / "data"
    log = weights.parent / "serve.log"
    env = {
        **os.environ,
        **SETTINGS_ENV,
        **shared_store,
        "UNETSEG_WEIGHTS_DIR": str(weights),
        "UNETSEG_DATA_DIR": str(data_dir),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app",
                "serve",
                "--ray",
                "--replicas",
                "2",
                "--cpus-per-replica",
                "0.5",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    srv = RayServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{srv.base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after 180 s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        srv.pids |= descendants(proc.pid)
        yield srv
    finally:
        if proc.poll() is None:  # a test failed before the shutdown test: stop it the same way
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def one_process(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = make_settings(tmp_path_factory.mktemp("one"), weights)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def test_a_bad_bundle_fails_the_start_with_its_error_in_one_line(weights: Path) -> None:
    bad = weights.parent / "bad-weights"
    shutil.copytree(weights, bad)
    card = json.loads((bad / "tiny" / "card.json").read_text())
    card["input"]["std"] = [0.0] * len(card["input"]["std"])
    (bad / "tiny" / "card.json").write_text(json.dumps(card))
    env = {**os.environ, **SETTINGS_ENV, "UNETSEG_WEIGHTS_DIR": str(bad), "RAY_USAGE_STATS_ENABLED": "0"}
    env["UNETSEG_DATA_DIR"] = str(weights.parent / "bad-data")
    cmd = [sys.executable, "-m", "app", "serve", "--ray", "--cpus-per-replica", "0.5", "--port", str(free_port())]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "ERROR unetseg:" in line]
    assert len(said) == 1 and "card.json: input.std: must be positive" in said[0], said


def both_replicas(server: RayServer, client: httpx.Client, path: str = "/readyz") -> set[str]:
    seen: set[str] = set()
    for _ in range(200):
        seen.add(server.served_by(client.get(f"{server.base}{path}")))
        if len(seen) == 2:
            break
    return seen


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_both_replicas_answer_with_the_one_process_masks(server: RayServer, one_process: TestClient) -> None:
    with httpx.Client(timeout=30) as client:
        assert len(both_replicas(server, client)) == 2
        cases = [
            ("/v1/predict", image_bytes(61, 47, seed=1)),
            ("/v1/predict?model=tiles", image_bytes(90, 70, mode="L", seed=2)),
            ("/v1/predict?format=json", image_bytes(50, 40, seed=3)),
            ("/v1/predict?format=overlay&alpha=0.6", image_bytes(40, 30, seed=4)),
        ]
        for path, img in cases:
            files = {"file": ("a.png", img, "image/png")}
            expected = one_process.post(path, files=files)
            assert expected.status_code == 200
            answered: set[str] = set()
            for _ in range(100):  # until each replica has answered this request once
                got = client.post(f"{server.base}{path}", files=files)
                if server.served_by(got) in answered:
                    continue
                answered.add(got.headers["X-Served-By"])
                if "json" in path:
                    assert {**got.json(), "timings_ms": None} == {**expected.json(), "timings_ms": None}
                else:
                    assert np.array_equal(pixels(got.content), pixels(expected.content))
                if len(answered) == 2:
                    break
            assert len(answered) == 2, path
        # Errors are the app's own, with its request id.
        bad = client.post(f"{server.base}/v1/predict", files={"file": ("a.txt", b"text", "text/plain")})
        assert bad.status_code == 415
        assert bad.json()["request_id"] == bad.headers["X-Request-ID"]
        assert client.get(f"{server.base}/openapi.json").json() == one_process.get("/openapi.json").json()


def test_an_upload_through_one_replica_is_predicted_by_id_on_the_other(
    server: RayServer, one_process: TestClient, shared_store: dict[str, str]
) -> None:
    img = image_bytes(77, 55, seed=5)
    with httpx.Client(timeout=30) as client:
        up = client.post(f"{server.base}/v1/uploads", files={"file": ("a.png", img, "image/png")})
        assert up.status_code in (200, 201)
        stored_by = server.served_by(up)
        upload_id = up.json()["id"]
        blobs = Path(urlsplit(shared_store["UNETSEG_BLOB_URL"]).path)
        assert [p.name for p in blobs.rglob(upload_id)] == [upload_id]  # the bytes went to the blob URL
        for _ in range(100):
            got = client.post(f"{server.base}/v1/predict", data={"upload_id": upload_id})
            if server.served_by(got) != stored_by:
                break
        assert got.headers["X-Served-By"] != stored_by
        expected = one_process.post("/v1/predict", files={"file": ("a.png", img, "image/png")})
        assert np.array_equal(pixels(got.content), pixels(expected.content))


def test_a_killed_replica_is_replaced_and_the_service_keeps_answering(server: RayServer) -> None:
    img = image_bytes(64, 48, seed=6)
    with httpx.Client(timeout=30) as client:
        replicas = both_replicas(server, client)
        victim = sorted(replicas)[0]
        os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
        statuses: list[int] = []
        answered_by: set[str] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = client.post(f"{server.base}/v1/predict", files={"file": ("a.png", img, "image/png")})
            statuses.append(got.status_code)
            if got.status_code == 200:
                answered_by.add(got.headers["X-Served-By"])
            if len(answered_by - replicas) == 1 and len(answered_by - {victim}) == 2:
                break
            time.sleep(0.1)
    assert statuses.count(200) == len(statuses), statuses  # the survivor took every request meanwhile
    assert victim not in answered_by
    assert len(answered_by - replicas) == 1, "no new replica answered within 120 s"
    server.pids |= descendants(server.proc.pid)


def engine_replicas(server: RayServer) -> set[int]:
    """Pids of the engine deployment's replicas (Ray names an actor's process after it)."""
    found = set()
    for pid in descendants(server.proc.pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ServeReplica:unetseg-engine"):
                found.add(pid)
    return found


def test_a_killed_engine_replica_is_a_503_until_serve_replaces_it(server: RayServer) -> None:
    from app.ray.frontend import RayEngine  # the ray extra: checked above

    img = image_bytes(64, 48, seed=8)
    files = {"file": ("a.png", img, "image/png")}
    (victim,) = engine_replicas(server)
    os.kill(victim, signal.SIGKILL)
    with httpx.Client(timeout=30) as client:
        # Each front end asks the engines every half second; the new engine takes several seconds to start.
        # Until every front end has noticed, a request may also wait in Serve's router for the new replica.
        noticed: set[str] = set()
        deadline = time.monotonic() + 30
        while len(noticed) < 2 and time.monotonic() < deadline:
            got = client.get(f"{server.base}/readyz")
            if got.status_code == 503:
                assert got.json()["detail"] == RayEngine.NOT_ANSWERING
                noticed.add(got.headers["X-Served-By"])
            time.sleep(0.05)
        assert len(noticed) == 2, "the front ends did not notice the engine gone within 30 s"
        t0 = time.monotonic()
        gone = client.post(f"{server.base}/v1/predict", files=files)
        at_once = time.monotonic() - t0
        answers: list[tuple[int, str | None]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = client.post(f"{server.base}/v1/predict", files=files)
            answers.append((got.status_code, got.headers.get("Retry-After")))
            if got.status_code == 200:
                break
            time.sleep(0.1)
        ready: list[int] = []  # and soon every front end says ready again (20 in a row)
        while ready[-20:] != [200] * 20 and time.monotonic() < deadline + 30:
            ready.append(client.get(f"{server.base}/readyz").status_code)
            time.sleep(0.1)
    assert (gone.status_code, gone.headers.get("Retry-After")) == (503, "1"), gone.text
    assert at_once < 5, at_once
    assert set(answers) <= {(200, None), (503, "1")}, answers
    assert answers[-1] == (200, None), "no new engine replica answered within 120 s"
    assert ready[-20:] == [200] * 20, ready
    assert engine_replicas(server) - {victim}
    server.pids |= descendants(server.proc.pid)


def test_sigterm_finishes_the_request_in_flight_then_stops_every_process(server: RayServer) -> None:
    boundary = "ray-shutdown-boundary"
    img = image_bytes(120, 90, seed=7)
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    started, release = threading.Event(), threading.Event()
    result: dict[str, httpx.Response | Exception] = {}

    def body() -> Iterator[bytes]:
        yield head + img[: len(img) // 2]
        started.set()
        assert release.wait(60)  # the rest of the body only after the signal
        yield img[len(img) // 2 :] + tail

    def send() -> None:
        try:
            result["r"] = httpx.post(
                f"{server.base}/v1/predict",
                content=body(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                timeout=90,
            )
        except httpx.HTTPError as exc:
            result["r"] = exc

    server.pids |= descendants(server.proc.pid)
    assert len(server.pids) > 3  # Ray's own processes and the replicas, not just a child or two
    sender = threading.Thread(target=send)
    sender.start()
    assert started.wait(30)
    time.sleep(0.5)  # the request has reached a replica
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    release.set()
    sender.join(90)
    response = result["r"]
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 200, response.text
    assert pixels(response.content).shape == (90, 120)
    assert server.proc.wait(90) == 0, server.log.read_text()[-3000:]
    deadline = time.monotonic() + 30  # ray.shutdown() has returned; the last workers may still be exiting
    while time.monotonic() < deadline and any(alive(p) for p in server.pids):
        time.sleep(0.2)
    assert [p for p in server.pids if alive(p)] == []
