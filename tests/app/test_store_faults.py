"""The upload store's trouble stays the store's: a database that stops, restarts or hangs costs uploads a
quick 503 with Retry-After, never predictions that do not use the store; ``/readyz`` and the metrics say the
store is unreachable; the service is back as soon as the database is.

PostgreSQL here is a server of each test's own (``private_postgres``), which it stops as a crash would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.backends import PrivatePostgres, private_postgres
from tests.conftest import make_settings, wait_ready
from tests.helpers import image_bytes


@pytest.fixture
def pg() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        yield server


def upload(client: TestClient, seed: int) -> Any:
    return client.post("/v1/uploads", content=image_bytes(24, 20, seed=seed), headers={"Content-Type": "image/png"})


def predict_raw(client: TestClient, seed: int = 0) -> Any:
    return client.post("/v1/predict", content=image_bytes(24, 20, seed=seed), headers={"Content-Type": "image/png"})


def store_up(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("unetseg_store_up "):
            return float(line.split()[1])
    raise AssertionError("no unetseg_store_up in /metrics")


def test_a_stopped_database_is_a_503_for_the_store_only_and_the_service_is_back_with_it(
    tmp_path: Path, weights_dir: Path, pg: PrivatePostgres
) -> None:
    settings = make_settings(tmp_path, weights_dir, database_url=pg.url, store_timeout_s=2.0)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        first = upload(client, 1)
        assert first.status_code == 201
        uid = first.json()["id"]
        assert client.get("/readyz").json()["store"]["status"] == "ok"
        assert store_up(client) == 1

        pg.stop()
        for call in (
            lambda: upload(client, 2),
            lambda: client.get(f"/v1/uploads/{uid}"),
            lambda: client.get("/v1/uploads"),
            lambda: client.delete(f"/v1/uploads/{uid}"),
            lambda: client.post("/v1/predict", data={"upload_id": uid}),
        ):
            r = call()
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"] == "1"
            assert "upload database is unavailable" in r.json()["detail"]
        assert predict_raw(client).status_code == 200  # an image sent needs no store
        ready = client.get("/readyz")
        assert ready.status_code == 200, "an unreachable store leaves the service ready"
        assert ready.json()["status"] == "ready"
        assert ready.json()["store"]["status"] == "unreachable"
        assert "upload database is unavailable" in ready.json()["store"]["detail"]
        assert store_up(client) == 0

        pg.start()
        back = time.monotonic()
        while (r := upload(client, 3)).status_code != 201:
            assert r.status_code == 503 and time.monotonic() - back < 5, r.text
            time.sleep(0.05)
        assert client.post("/v1/predict", data={"upload_id": uid}).status_code == 200
        time.sleep(1.0)  # past the probe's one-second memory: /readyz asks the store again
        assert client.get("/readyz").json()["store"]["status"] == "ok"
        assert store_up(client) == 1


def test_a_restarted_database_costs_no_request_an_error(tmp_path: Path, weights_dir: Path, pg: PrivatePostgres) -> None:
    """Every pooled connection is dead after a restart: each is checked before use, and replaced."""
    settings = make_settings(tmp_path, weights_dir, database_url=pg.url, store_threads=4)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        # Four uploads at once, so that the pool holds four connections.
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda i=i: results.append(upload(client, 10 + i).status_code)) for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == [201] * 4
        pg.stop()
        pg.start()
        statuses = [upload(client, 20 + i).status_code for i in range(6)]
        assert statuses == [201] * 6
        assert client.get("/v1/uploads").json()["count"] == 10


def test_a_store_that_does_not_answer_holds_no_thread_a_prediction_needs(
    tmp_path: Path, weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store calls that hang (a database that no longer answers) wait in the store's own threads: images
    sent for prediction are decoded and segmented meanwhile, and store calls past the store's threads get
    503 after UNETSEG_STORE_TIMEOUT_S instead of queueing."""
    settings = make_settings(tmp_path, weights_dir, io_threads=2, store_threads=2, store_timeout_s=0.5)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        store = client.app.state.unetseg.store  # type: ignore[attr-defined]
        inside, release = threading.Semaphore(0), threading.Event()
        real_get = store.get

        def hanging_get(uid: str) -> Any:
            inside.release()
            assert release.wait(60)
            return real_get(uid)

        monkeypatch.setattr(store, "get", hanging_get)
        statuses: list[int] = []
        hung = [
            threading.Thread(target=lambda i=i: statuses.append(upload(client, 30 + i).status_code)) for i in range(2)
        ]
        for t in hung:
            t.start()
        try:
            for _ in hung:
                assert inside.acquire(timeout=30)  # both store threads are taken
            t0 = time.monotonic()
            refused = upload(client, 40)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
            assert time.monotonic() - t0 < 10
            # More predictions at once than there are I/O threads, while the store hangs.
            answers: list[int] = []
            preds = [
                threading.Thread(target=lambda i=i: answers.append(predict_raw(client, i).status_code))
                for i in range(4)
            ]
            for t in preds:
                t.start()
            for t in preds:
                t.join(60)
            assert answers == [200] * 4
            assert not release.is_set()
        finally:
            release.set()
            for t in hung:
                t.join(60)
        assert sorted(statuses) == [201, 201]
