"""Crash with a shared store: kill -9 the real server while clients upload to PostgreSQL + a shared folder
or S3 (the emulator), restart it on the same store, and check that every acknowledged upload is there with
its bytes and that no row names missing bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.store import open_store
from app.store.files import FileBlobs
from tests.backends import S3_ENV, new_bucket, postgres_database
from tests.e2e.server import running_server, uploads_until_killed

pytestmark = pytest.mark.e2e

CLIENTS = 4
KILL_AFTER = 16  # acknowledged uploads before the kill


@pytest.mark.parametrize("blobs", ["file", "s3"])
def test_kill_9_with_a_shared_store_loses_no_acknowledged_upload(
    blobs: str, weights_dir: Path, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    with postgres_database() as database_url:
        env = {"UNETSEG_DATABASE_URL": database_url}
        if blobs == "file":
            env["UNETSEG_BLOB_URL"] = (tmp_path / "mount").as_uri()
        else:
            endpoint = request.getfixturevalue("s3_endpoint")
            env |= {**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint}
            env["UNETSEG_BLOB_URL"] = f"s3://{new_bucket(endpoint)}/crash"
        for k, v in env.items():
            monkeypatch.setenv(k, v)  # for the store this test opens to look, as well as the servers
        run(weights_dir, tmp_path, env)


def run(weights_dir: Path, tmp_path: Path, env: dict[str, str]) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    acked = uploads_until_killed(weights_dir, data_dir, CLIENTS, KILL_AFTER, **env)

    with running_server(weights_dir, data_dir, **env) as (base, _), httpx.Client(base_url=base, timeout=30) as http:
        listing = {item["id"] for item in http.get("/v1/uploads", params={"limit": 1000}).json()["items"]}
        assert set(acked) <= listing, f"acknowledged but lost: {set(acked) - listing}"
        some = next(iter(acked))
        assert http.post("/v1/predict", data={"upload_id": some}).status_code == 200

    store = open_store(Settings(data_dir=data_dir))  # the same store, from UNETSEG_DATABASE_URL/BLOB_URL
    try:
        rows = {u.id for u in store.recent(1000)}
        for uid in rows:  # every row has its bytes, whole
            data = store.read(uid)
            assert data is not None and hashlib.sha256(data).hexdigest() == uid
        for uid, data in acked.items():
            assert store.read(uid) == data
        blobs = {name for name, _ in store.blobs.names()}
        if isinstance(store.blobs, FileBlobs):
            assert blobs == rows and not store.blobs.staged()  # start-up removed the dead server's leftovers
        else:
            assert rows <= blobs  # an object without a row stays for the grace period (another replica's?)
    finally:
        store.close()
