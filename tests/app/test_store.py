"""UploadStore: atomic content-addressed writes, recovery after a crash, quota and retention eviction."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import app.store as store_module
from app.main import create_app
from app.store import UploadStore
from tests.conftest import make_settings, wait_ready
from tests.helpers import image_bytes


class Clock:
    """Stands in for time.time in the store, so that ages and order are exact."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(store_module.time, "time", c)
    return c


def blob(i: int, size: int = 1000) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (size // 32) + bytes([i % 256]) * (size % 32)


def files_on_disk(store: UploadStore) -> set[str]:
    return {p.name for p in store.files.rglob("*") if p.is_file()}


def rows(store: UploadStore) -> set[str]:
    return {u.id for u in store.recent(1000)}


def consistent(store: UploadStore) -> None:
    """Rows and files agree, every file holds the bytes its name is the hash of, nothing is left in tmp/."""
    assert files_on_disk(store) == rows(store)
    for uid in rows(store):
        assert hashlib.sha256(store.path_for(uid).read_bytes()).hexdigest() == uid
    assert not list(store.tmp.iterdir())


def test_put_is_content_addressed_atomic_and_idempotent(tmp_path: Path) -> None:
    store = UploadStore(tmp_path)
    data = blob(1)
    upload, created = store.put(data, 10, 20, "png")
    assert created and upload.id == hashlib.sha256(data).hexdigest()
    assert (upload.width, upload.height, upload.format, upload.bytes) == (10, 20, "png", len(data))
    path = store.path_for(upload.id)
    assert path == tmp_path / "uploads" / upload.id[:2] / upload.id and path.read_bytes() == data
    again, created = store.put(data, 10, 20, "png")
    assert not created and again == upload
    assert store.read(upload.id) == data
    consistent(store)
    store.close()


def test_a_write_goes_through_a_synced_temporary_file_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = UploadStore(tmp_path)
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        assert Path(src).parent == store.tmp and Path(src).read_bytes() == data  # complete before it is visible
        assert not Path(dst).exists()
        db = sqlite3.connect(tmp_path / "uploads.sqlite3")  # a reader of its own: the store holds its lock
        assert db.execute("SELECT COUNT(*) FROM uploads").fetchone()[0] == 0  # no row before the file is in place
        db.close()
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "fsync", fsync)
    monkeypatch.setattr(store_module.os, "replace", replace)
    data = blob(2)
    upload, _ = store.put(data, 1, 1, "png")
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, then the folder
    assert store.get(upload.id) is not None
    store.close()


def test_recovery_removes_temp_files_orphan_files_and_rows_without_files(tmp_path: Path) -> None:
    store = UploadStore(tmp_path)
    kept, lost = (store.put(blob(i), 1, 1, "png")[0] for i in (3, 4))
    store.close()
    # What a crash can leave: a half-written temporary file, a renamed file whose row was never inserted,
    # and (after tampering) a row whose file is gone.
    (tmp_path / "tmp" / f"{'ab' * 32}.1.2").write_bytes(b"half")
    orphan = blob(5)
    orphan_id = hashlib.sha256(orphan).hexdigest()
    (tmp_path / "uploads" / orphan_id[:2]).mkdir(exist_ok=True)
    (tmp_path / "uploads" / orphan_id[:2] / orphan_id).write_bytes(orphan)
    (tmp_path / "uploads" / lost.id[:2] / lost.id).unlink()

    store = UploadStore(tmp_path)
    assert rows(store) == {kept.id}
    assert store.read(kept.id) == blob(3)
    assert store.get(orphan_id) is None and store.get(lost.id) is None
    consistent(store)
    store.close()


def test_quota_evicts_the_oldest_first_and_keeps_the_new_upload(tmp_path: Path, clock: Clock) -> None:
    store = UploadStore(tmp_path, max_bytes=3500)
    ids = []
    for i in range(3):
        clock.now += 10
        ids.append(store.put(blob(10 + i), 1, 1, "png")[0].id)
    assert rows(store) == set(ids)  # 3000 bytes: within the quota
    clock.now += 10
    newest = store.put(blob(20), 1, 1, "png")[0].id
    assert rows(store) == {ids[1], ids[2], newest}  # the oldest went first
    assert store.stats().bytes == 3000
    clock.now += 10
    big = store.put(blob(21, 3000), 1, 1, "png")[0].id  # alone nearly fills the quota
    assert rows(store) == {big}
    clock.now += 10
    huge = store.put(blob(22, 5000), 1, 1, "png")[0].id  # over the quota on its own: kept, all else goes
    assert rows(store) == {huge}
    consistent(store)
    store.close()


def test_retention_evicts_old_uploads(tmp_path: Path, clock: Clock) -> None:
    store = UploadStore(tmp_path, retention_s=100)
    old = store.put(blob(30), 1, 1, "png")[0].id
    clock.now += 60
    young = store.put(blob(31), 1, 1, "png")[0].id
    clock.now += 50  # old is 110 s old, young 50 s
    assert store.get(old) is None and store.read(old) is None
    assert store.get(young) is not None
    assert rows(store) == {young}
    clock.now += 60
    assert store.evict() == [young]
    assert rows(store) == set()
    consistent(store)
    store.close()
    # Start-up with an expired upload: the first lookup evicts it.
    store = UploadStore(tmp_path, retention_s=100)
    store.put(blob(32), 1, 1, "png")
    store.close()
    clock.now += 1000
    store = UploadStore(tmp_path, retention_s=100)
    assert store.evict() and rows(store) == set()
    consistent(store)
    store.close()


@pytest.mark.parametrize(
    "bad",
    ["", "0" * 63, "0" * 65, "0" * 64 + "\n", "0" * 64 + "\x00", "../" + "0" * 61, "/" + "0" * 63, "A" * 64, "g" * 64],
)
def test_malformed_ids_never_touch_the_disk(tmp_path: Path, bad: str) -> None:
    store = UploadStore(tmp_path)
    uid = store.put(blob(40), 1, 1, "png")[0].id
    assert store.get(bad) is None and store.read(bad) is None and store.delete(bad) is False
    assert store.get(uid) is not None
    store.close()


def test_a_put_racing_a_delete_of_the_same_bytes_leaves_no_row_without_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """delete() removes the row, then the file; a put() of the same bytes in between must not lose its file."""
    store = UploadStore(tmp_path)
    data = blob(50)
    uid = store.put(data, 1, 1, "png")[0].id
    in_unlink = threading.Event()
    real_unlink = Path.unlink

    def slow_unlink(self: Path, missing_ok: bool = False) -> None:
        if threading.current_thread().name == "deleter":
            in_unlink.set()
            threading.Event().wait(0.3)  # the window between the row and the file
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", slow_unlink)
    deleter = threading.Thread(target=store.delete, args=(uid,), name="deleter")
    deleter.start()
    assert in_unlink.wait(10)
    _, created = store.put(data, 1, 1, "png")  # the same bytes, uploaded again while the delete runs
    deleter.join(10)
    # The put comes after the delete: it stored the bytes anew, and its row has its file.
    assert created and store.read(uid) == data
    consistent(store)
    store.close()


def test_concurrent_puts_of_the_same_bytes_create_it_once(tmp_path: Path) -> None:
    store = UploadStore(tmp_path)
    data = blob(60, 200_000)
    barrier = threading.Barrier(6)
    created: list[bool] = []

    def put() -> None:
        barrier.wait()
        created.append(store.put(data, 1, 1, "png")[1])

    threads = [threading.Thread(target=put) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(created) == [False] * 5 + [True]
    consistent(store)
    store.close()


def test_the_database_is_wal_and_passes_its_integrity_check(tmp_path: Path) -> None:
    store = UploadStore(tmp_path)
    for i in range(5):
        store.put(blob(70 + i), 1, 1, "png")
    store.close()
    db = sqlite3.connect(tmp_path / "uploads.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


def test_the_listing_reports_quota_retention_and_totals(tmp_path: Path, weights_dir: Path) -> None:
    settings = make_settings(tmp_path, weights_dir, max_store_bytes=12_345, retention_s=3600)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        data = image_bytes(20, 20)
        assert client.post("/v1/uploads", files={"file": ("a.png", data, "image/png")}).status_code == 201
        listing = client.get("/v1/uploads").json()
        assert (listing["max_bytes"], listing["retention_s"]) == (12_345, 3600)
        assert (listing["count"], listing["total_bytes"]) == (1, len(data))
        # Past the quota, the oldest upload is evicted and the listing says so.
        first = listing["items"][0]["id"]
        for seed in range(1, 6):
            big = image_bytes(40, 40, seed=seed)  # ~4.8 kB each, incompressible
            assert client.post("/v1/uploads", files={"file": ("b.png", big, "image/png")}).status_code == 201
        listing = client.get("/v1/uploads").json()
        assert listing["total_bytes"] <= 12_345
        assert first not in {item["id"] for item in listing["items"]}
        assert client.get(f"/v1/uploads/{first}").status_code == 404
