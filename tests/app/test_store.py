"""The upload store's promises, checked once for every backend combination: content-addressed, atomic,
durable, one upload for the same bytes from two replicas, quota and retention, safe recovery.

"Replicas" are two store instances on the same database and blobs, as two server processes would be.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import app.store.files as files_module
from app.config import Settings
from app.main import create_app
from app.store import Rows, UploadStore, make_upload, open_store
from app.store.files import FileBlobs
from app.store.s3 import S3Blobs
from tests.backends import S3_ENV, new_bucket, postgres_database
from tests.conftest import make_settings, wait_ready
from tests.helpers import image_bytes

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ["sqlite+local", "sqlite+s3", "postgres+file", "postgres+s3"]


class Clock:
    """Stands in for the store's clock, so that ages and order are exact."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    name: str
    urls: dict[str, Any]  # data_dir, database_url, blob_url

    def open(self, clock: Clock | None = None, **kw: Any) -> UploadStore:
        store = open_store(Settings(**self.urls, **kw))
        if clock is not None:
            store.clock = clock
        return store


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    meta, blobs = request.param.split("+")
    urls: dict[str, Any] = {"data_dir": tmp_path / "data", "database_url": "", "blob_url": ""}
    with contextmanager_or_none(meta == "postgres", postgres_database) as db_url:
        if db_url is not None:
            urls["database_url"] = db_url
        if blobs == "file":
            urls["blob_url"] = (tmp_path / "shared-mount").as_uri()
        elif blobs == "s3":
            endpoint = request.getfixturevalue("s3_endpoint")
            for k, v in {**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint}.items():
                monkeypatch.setenv(k, v)
            urls["blob_url"] = f"s3://{new_bucket(endpoint)}/some/prefix"
        yield Backend(request.param, urls)


@contextmanager
def contextmanager_or_none(enter: bool, cm: Callable[[], Any]) -> Iterator[Any]:
    if not enter:
        yield None
        return
    with cm() as value:
        yield value


def blob(i: int, size: int = 1000) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (size // 32) + bytes([i % 256]) * (size % 32)


def uid_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows(store: UploadStore) -> set[str]:
    return {u.id for u in store.recent(1000)}


def blob_names(store: UploadStore) -> set[str]:
    return {name for name, _ in store.blobs.names()}


def consistent(store: UploadStore) -> None:
    """Rows and blobs agree, every blob holds the bytes its name is the hash of, nothing is left staged."""
    assert blob_names(store) == rows(store)
    for uid in rows(store):
        data = store.blobs.read(uid)
        assert data is not None and uid_of(data) == uid
    if isinstance(store.blobs, FileBlobs):
        assert not store.blobs.staged()


def test_put_is_content_addressed_and_idempotent(backend: Backend) -> None:
    store = backend.open()
    data = blob(1)
    upload, created = store.put(data, 10, 20, "png")
    assert created and upload.id == uid_of(data)
    assert (upload.width, upload.height, upload.format, upload.bytes) == (10, 20, "png", len(data))
    again, created = store.put(data, 10, 20, "png")
    assert not created and again == upload
    assert store.get(upload.id) == upload and store.read(upload.id) == data
    assert store.stats().count == 1 and store.stats().bytes == len(data)
    consistent(store)
    store.close()


def test_an_upload_is_invisible_to_other_replicas_until_its_blob_and_row_are_committed(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, replica = backend.open(), backend.open()
    data = blob(2, 300_000)
    uid = uid_of(data)
    seen: list[str] = []
    real_publish = store.blobs.publish

    def publish(staged: Any) -> None:
        assert staged.data == data  # staged whole before anything is published
        assert replica.get(uid) is None and replica.read(uid) is None
        real_publish(staged)
        seen.append("published")
        assert replica.get(uid) is None and replica.read(uid) is None  # no row until the commit

    monkeypatch.setattr(store.blobs, "publish", publish)
    upload, created = store.put(data, 1, 1, "png")
    assert created and seen == ["published"]
    assert replica.get(uid) == upload and replica.read(uid) == data
    consistent(replica)
    store.close()
    replica.close()


def test_a_file_is_synced_in_tmp_then_renamed_into_place_and_its_folder_synced(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backend.open()
    if not isinstance(store.blobs, FileBlobs):
        store.close()
        pytest.skip("file blobs only: S3 PUTs are atomic by themselves")
    blobs = store.blobs
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    data = blob(3)

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        assert Path(src).parent == blobs.tmp and Path(src).read_bytes() == data  # complete before it is visible
        assert not Path(dst).exists()
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "fsync", fsync)
    monkeypatch.setattr(files_module.os, "replace", replace)
    upload, _ = store.put(data, 1, 1, "png")
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, then the folder
    assert blobs.path_for(upload.id).read_bytes() == data
    store.close()


def insert_row(store: UploadStore, uid: str, size: int) -> None:
    rows_: Rows
    with store.meta.write() as rows_:
        rows_.insert(make_upload(uid, 1, 1, "png", size, 1.0))


def test_a_put_whose_row_fails_leaves_nothing_behind_and_the_store_goes_on(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backend.open()
    data = blob(8)
    real_write = store.meta.write

    @contextmanager
    def failing_write() -> Iterator[Rows]:
        with real_write() as r:

            def insert(upload: Any) -> bool:
                raise OSError("the database is gone")

            monkeypatch.setattr(r, "insert", insert)
            yield r

    monkeypatch.setattr(store.meta, "write", failing_write)
    with pytest.raises(OSError, match="the database is gone"):
        store.put(data, 1, 1, "png")
    monkeypatch.setattr(store.meta, "write", real_write)
    assert store.get(uid_of(data)) is None and blob_names(store) == set()
    consistent(store)
    upload, created = store.put(data, 1, 1, "png")
    assert created and store.read(upload.id) == data
    consistent(store)
    store.close()


def test_recovery_removes_orphan_blobs_and_rows_without_blobs(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backend.open()
    kept = store.put(blob(4), 1, 1, "png")[0]
    lost = store.put(blob(5), 1, 1, "png")[0]
    # What a crash can leave: a blob published whose row never committed, and a row whose blob is gone.
    orphan = blob(6)
    staged = store.blobs.stage(uid_of(orphan), orphan)
    store.blobs.publish(staged)
    store.blobs.discard(staged)
    store.blobs.delete(lost.id)
    store.close()

    monkeypatch.setattr(type(store.blobs), "orphan_grace_s", 0.0)  # the orphan is old enough
    store = backend.open()
    assert rows(store) == {kept.id}
    assert store.read(kept.id) == blob(4)
    assert store.get(uid_of(orphan)) is None and store.get(lost.id) is None
    consistent(store)
    store.close()


def test_recovery_leaves_another_replicas_upload_in_flight_alone(backend: Backend) -> None:
    store = backend.open()
    data = blob(7, 50_000)
    staged = store.blobs.stage(uid_of(data), data)  # a replica's put, between its staging and its row
    replica = backend.open()  # another replica starting meanwhile
    store.blobs.publish(staged)
    insert_row(store, staged.id, len(data))
    store.blobs.discard(staged)
    assert replica.read(staged.id) == data
    consistent(replica)
    store.close()
    replica.close()


def test_recovery_removes_the_temporary_files_of_dead_writers_only(backend: Backend) -> None:
    store = backend.open()
    if not isinstance(store.blobs, FileBlobs):
        store.close()
        pytest.skip("file blobs only: S3 has no temporary objects")
    tmp = store.blobs.tmp
    dead = tmp / f"{'ab' * 32}.dead"
    dead.write_bytes(b"half")  # nobody holds its lock: its writer was killed
    alive = tmp / f"{'cd' * 32}.alive"
    fd = os.open(alive, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer still at work
    try:
        backend.open().close()
        assert not dead.exists() and alive.exists()
    finally:
        os.close(fd)
    backend.open().close()
    assert not alive.exists()
    store.close()


def test_quota_evicts_the_oldest_first_and_keeps_the_new_upload(backend: Backend) -> None:
    clock = Clock()
    store = backend.open(clock, max_store_bytes=3500)
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


def test_retention_evicts_old_uploads(backend: Backend) -> None:
    clock = Clock()
    store = backend.open(clock, retention_s=100)
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
    store = backend.open(clock, retention_s=100)
    uid = store.put(blob(32), 1, 1, "png")[0].id
    store.close()
    clock.now += 1000
    store = backend.open(clock, retention_s=100)
    assert store.get(uid) is None and rows(store) == set()
    consistent(store)
    store.close()


@pytest.mark.parametrize(
    "bad",
    ["", "0" * 63, "0" * 65, "0" * 64 + "\n", "0" * 64 + "\x00", "../" + "0" * 61, "/" + "0" * 63, "A" * 64, "g" * 64],
)
def test_malformed_ids_never_reach_the_backends(tmp_path: Path, bad: str) -> None:
    store = open_store(Settings(data_dir=tmp_path))
    uid = store.put(blob(40), 1, 1, "png")[0].id
    assert store.get(bad) is None and store.read(bad) is None and store.delete(bad) is False
    assert store.get(uid) is not None
    store.close()


def test_a_put_racing_a_delete_of_the_same_bytes_on_another_replica_keeps_its_blob(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete removes the row, then the blob; a put of the same bytes in between must not lose its blob."""
    store, replica = backend.open(), backend.open()
    data = blob(50)
    uid = store.put(data, 1, 1, "png")[0].id
    in_delete, checked = threading.Event(), threading.Event()
    real_delete, real_intact = store.blobs.delete, replica._intact

    def slow_delete(name: str) -> None:
        in_delete.set()
        checked.wait(10)  # the window between the row and the blob: held until the put has looked
        real_delete(name)

    def intact(uid: str) -> bool:
        try:
            return real_intact(uid)
        finally:
            checked.set()

    monkeypatch.setattr(store.blobs, "delete", slow_delete)
    monkeypatch.setattr(replica, "_intact", intact)
    deleter = threading.Thread(target=store.delete, args=(uid,), name="deleter")
    deleter.start()
    assert in_delete.wait(10)
    _, created = replica.put(data, 1, 1, "png")  # the same bytes, uploaded again while the delete runs
    deleter.join(10)
    # Until the delete commits, the row is there: the put answers with it (created=False) and the delete
    # then removes it. Either way, no row is left without its blob.
    assert not created and store.get(uid) is None and replica.read(uid) is None
    consistent(store)
    store.close()
    replica.close()


def test_a_put_whose_blob_another_replica_deletes_before_its_row_publishes_it_again(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Put P finds no row and stages its blob; meanwhile a replica stores the same bytes and deletes them
    (row and blob). P's row must still come with its blob."""
    store, replica = backend.open(), backend.open()
    data = blob(51, 40_000)
    uid = uid_of(data)
    real_stage = store.blobs.stage

    def stage(name: str, content: bytes) -> Any:
        staged = real_stage(name, content)
        assert replica.put(content, 1, 1, "png")[1] and replica.delete(name)  # between P's stage and its row
        return staged

    monkeypatch.setattr(store.blobs, "stage", stage)
    upload, created = store.put(data, 1, 1, "png")
    assert created and upload.id == uid
    assert store.read(uid) == data and replica.read(uid) == data
    consistent(replica)
    store.close()
    replica.close()


def test_the_same_bytes_put_at_once_on_two_replicas_are_created_once(backend: Backend) -> None:
    stores = [backend.open(), backend.open()]
    data = blob(60, 200_000)
    barrier = threading.Barrier(6)
    created: list[bool] = []
    errors: list[BaseException] = []

    def put(store: UploadStore) -> None:
        barrier.wait()
        try:
            created.append(store.put(data, 1, 1, "png")[1])
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=put, args=(stores[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(created) == [False] * 5 + [True]
    assert rows(stores[1]) == {uid_of(data)}
    consistent(stores[0])
    for s in stores:
        s.close()


# A replica in a process of its own: waits for the start file, puts blobs 0..N-1 and prints what it created.
REPLICA = """
import json, pathlib, sys, time
from app.config import Settings
from app.store import open_store
urls, start, n = json.loads(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
store = open_store(Settings(**urls))
while not start.exists():
    time.sleep(0.005)
created = [store.put(bytes([i]) * 100_000 + bytes(i), 1, 1, "png")[1] for i in range(n)]
store.close()
print(json.dumps(created))
"""


def test_two_replica_processes_putting_the_same_bytes_create_each_upload_once(backend: Backend, tmp_path: Path) -> None:
    n = 12
    start = tmp_path / "start"
    urls = json.dumps({k: str(v) for k, v in backend.urls.items()})
    procs = [
        subprocess.Popen([sys.executable, "-c", REPLICA, urls, str(start), str(n)], stdout=subprocess.PIPE, cwd=ROOT)
        for _ in range(2)
    ]
    start.touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    created = [json.loads(out) for out in outputs]
    assert [a + b for a, b in zip(*created, strict=True)] == [1] * n  # each upload created by one of them
    store = backend.open()
    assert rows(store) == {uid_of(bytes([i]) * 100_000 + bytes(i)) for i in range(n)}
    consistent(store)
    store.close()


def test_a_put_whose_upload_a_concurrent_put_evicts_still_answers(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interleaving that once ended in a 500: put A commits its row, put B's eviction removes it before
    A answers. A's put is held right after its transaction while B runs whole; A must still answer."""
    store = backend.open(max_store_bytes=10)  # every upload is over the quota: each put evicts all others
    a, b = blob(70), blob(71)
    a_committed, b_done = threading.Event(), threading.Event()
    real_write = store.meta.write

    @contextmanager
    def write() -> Iterator[Rows]:
        with real_write() as r:
            yield r
        if threading.current_thread().name == "A":
            a_committed.set()
            assert b_done.wait(30)

    monkeypatch.setattr(store.meta, "write", write)
    results: dict[str, tuple[Any, bool]] = {}
    thread_a = threading.Thread(target=lambda: results.update(A=store.put(a, 1, 1, "png")), name="A")
    thread_a.start()
    assert a_committed.wait(30)
    results["B"] = store.put(b, 2, 2, "png")  # evicts A's upload
    b_done.set()
    thread_a.join(30)
    upload_a, created_a = results["A"]
    assert created_a and upload_a.id == uid_of(a) and upload_a.bytes == len(a)
    assert results["B"][1] and rows(store) == {uid_of(b)}
    assert store.get(uid_of(a)) is None
    consistent(store)
    store.close()


def test_concurrent_puts_over_a_tiny_quota_never_fail(backend: Backend) -> None:
    stores = [backend.open(max_store_bytes=10), backend.open(max_store_bytes=10)]
    errors: list[BaseException] = []

    def put(n: int) -> None:
        for i in range(8):
            data = blob(1000 * n + i)
            try:
                upload, created = stores[n % 2].put(data, 1, 1, "png")
                assert created and upload.id == uid_of(data)
            except BaseException as exc:
                errors.append(exc)
                raise

    threads = [threading.Thread(target=put, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(rows(stores[0])) == 1  # the last put evicted the others
    consistent(stores[0])
    for s in stores:
        s.close()


def test_the_store_survives_a_restart(backend: Backend) -> None:
    store = backend.open()
    uploads = [store.put(blob(80 + i), i + 1, i + 2, "png")[0] for i in range(4)]
    assert store.delete(uploads[0].id)
    store.close()
    store = backend.open()
    assert store.recent(10) == sorted(uploads[1:], key=lambda u: (-u.created_at.timestamp(), u.id))
    for u in uploads[1:]:
        assert store.read(u.id) == blob(80 + uploads.index(u))
    consistent(store)
    store.close()


def test_the_sqlite_database_is_wal_and_passes_its_integrity_check(tmp_path: Path) -> None:
    store = open_store(Settings(data_dir=tmp_path))
    for i in range(5):
        store.put(blob(90 + i), 1, 1, "png")
    store.close()
    db = sqlite3.connect(tmp_path / "uploads.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


def test_sqlite_urls_name_a_relative_or_an_absolute_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url, path in [("sqlite:///rel/meta.db", tmp_path / "rel" / "meta.db"), (f"sqlite:///{tmp_path}/abs.db", None)]:
        store = open_store(Settings(data_dir=tmp_path / "data", database_url=url))
        uid = store.put(blob(96), 1, 1, "png")[0].id
        store.close()
        db = sqlite3.connect(path or tmp_path / "abs.db")
        assert db.execute("SELECT id FROM uploads").fetchall() == [(uid,)]
        db.close()
    assert not (tmp_path / "data" / "uploads.sqlite3").exists()


@pytest.mark.parametrize(
    ("field", "url", "message"),
    [
        ("database_url", "mysql://h/db", "unsupported scheme 'mysql'"),
        ("database_url", "sqlite://host/x.db", "sqlite:///relative or sqlite:////absolute"),
        ("database_url", "sqlite:///", "sqlite:///relative or sqlite:////absolute"),
        ("blob_url", "gs://bucket", "unsupported scheme 'gs'"),
        ("blob_url", "file://host/path", "names a local path"),
        ("blob_url", "s3:///prefix", "no bucket"),
    ],
)
def test_a_bad_url_is_refused_with_its_setting_named(tmp_path: Path, field: str, url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        open_store(Settings(data_dir=tmp_path, **{field: url}))
    assert f"UNETSEG_{field.upper()}" in str(info.value)


def test_an_unreachable_database_or_a_missing_bucket_stops_the_start_with_its_setting_named(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match="UNETSEG_DATABASE_URL: cannot use the PostgreSQL database"):
        open_store(Settings(data_dir=tmp_path, database_url="postgresql://nobody:pw@127.0.0.1:1/nothing"))
    for k, v in {**S3_ENV, "AWS_ENDPOINT_URL_S3": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match="UNETSEG_BLOB_URL: cannot use the S3 bucket 'no-such-bucket'"):
        open_store(Settings(data_dir=tmp_path, blob_url="s3://no-such-bucket/x"))


def test_s3_publish_writes_the_object_again_when_it_went_missing(backend: Backend) -> None:
    store = backend.open()
    if not isinstance(store.blobs, S3Blobs):
        store.close()
        pytest.skip("S3 only")
    data = blob(95)
    staged = store.blobs.stage(uid_of(data), data)
    store.blobs.delete(staged.id)  # e.g. another replica's start-up took it for an orphan
    store.blobs.publish(staged)
    assert store.blobs.read(staged.id) == data
    store.close()


def test_two_apps_on_one_store_share_uploads(backend: Backend, tmp_path: Path, weights_dir: Path) -> None:
    """Two services (replicas) on the same store: upload on one, predict by id and delete on the other."""
    urls = {k: v for k, v in backend.urls.items() if k != "data_dir"}
    one = make_settings(tmp_path / "one", weights_dir, **urls, data_dir=backend.urls["data_dir"])
    two = make_settings(tmp_path / "two", weights_dir, **urls, data_dir=backend.urls["data_dir"])
    with TestClient(create_app(one)) as c1, TestClient(create_app(two)) as c2:
        wait_ready(c1)
        wait_ready(c2)
        data = image_bytes(24, 20)
        r = c1.post("/v1/uploads", files={"file": ("a.png", data, "image/png")})
        assert r.status_code == 201
        uid = r.json()["id"]
        assert c2.post("/v1/uploads", files={"file": ("a.png", data, "image/png")}).status_code == 200
        assert c2.get(f"/v1/uploads/{uid}").json()["bytes"] == len(data)
        assert c2.post("/v1/predict", data={"upload_id": uid}).status_code == 200
        assert c2.delete(f"/v1/uploads/{uid}").status_code == 204
        assert c1.get(f"/v1/uploads/{uid}").status_code == 404


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


def test_store_calls_never_block_the_event_loop(
    tmp_path: Path, weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a predict by id and an upload wait on the store, the service still answers other requests."""
    with TestClient(create_app(make_settings(tmp_path, weights_dir))) as client:
        wait_ready(client)
        data = image_bytes(20, 20)
        uid = client.post("/v1/uploads", files={"file": ("a.png", data, "image/png")}).json()["id"]
        store = client.app.state.unetseg.store  # type: ignore[attr-defined]
        waiting, release = threading.Semaphore(0), threading.Event()
        real_read, real_stage = store.blobs.read, store.blobs.stage

        def stuck(real: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                waiting.release()
                assert release.wait(30)
                return real(*args)

            return call

        monkeypatch.setattr(store.blobs, "read", stuck(real_read))
        monkeypatch.setattr(store.blobs, "stage", stuck(real_stage))
        statuses: list[int] = []
        calls = [
            lambda: client.post("/v1/predict", data={"upload_id": uid}),
            lambda: client.post("/v1/uploads", files={"file": ("b.png", image_bytes(21, 20), "image/png")}),
        ]
        threads = [threading.Thread(target=lambda c=c: statuses.append(c().status_code)) for c in calls]
        for t in threads:
            t.start()
        try:
            for _ in calls:
                assert waiting.acquire(timeout=30)  # both requests are inside the store now
            health = threading.Thread(target=lambda: statuses.append(client.get("/healthz").status_code))
            health.start()
            health.join(30)
            assert not health.is_alive() and statuses == [200]  # answered while the store calls wait
        finally:
            release.set()
            for t in threads:
                t.join(30)
        assert sorted(statuses) == [200, 200, 201]


def damage(store: UploadStore, uid: str, how: str, other: bytes = b"") -> None:
    """Change a blob behind the store's back, as a disk, an operator or another program might."""
    data = store.blobs.read(uid)
    assert data is not None
    new = {
        "deleted": None,
        "truncated": data[: len(data) // 2],
        "bit-flipped": data[:100] + bytes([data[100] ^ 1]) + data[101:],
        "replaced": other,
        "a folder": None,
    }[how]
    if isinstance(store.blobs, FileBlobs):
        path = store.blobs.path_for(uid)
        path.unlink()
        if how == "a folder":
            path.mkdir()
            (path / "x").write_bytes(b"x")
        elif new is not None:
            path.write_bytes(new)
    else:
        assert isinstance(store.blobs, S3Blobs)
        store.blobs.client.delete_object(Bucket=store.blobs.bucket, Key=store.blobs.key(uid))
        if new is not None:
            store.blobs.client.put_object(Bucket=store.blobs.bucket, Key=store.blobs.key(uid), Body=new)


DAMAGE = ["deleted", "truncated", "bit-flipped", "replaced"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_blob_is_taken_for_missing_and_the_same_bytes_restore_it(
    backend: Backend, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = backend.open()
    data, other = blob(70, 5000), blob(71, 5000)
    uid = store.put(data, 1, 1, "png")[0].id
    damage(store, uid, how, other)
    with caplog.at_level("WARNING", logger="unetseg.store"):
        assert store.read(uid) is None  # never other bytes, never part of them
    assert f"upload {uid}: its blob" in caplog.text
    assert store.get(uid) is None and uid not in rows(store)  # the upload is gone, not listed
    assert store.put(data, 1, 1, "png")[1]  # created anew
    assert store.read(uid) == data
    consistent(store)
    store.close()


@pytest.mark.parametrize("how", DAMAGE)
def test_uploading_the_same_bytes_restores_a_damaged_blob_not_yet_read(backend: Backend, how: str) -> None:
    store = backend.open()
    data = blob(72, 5000)
    first = store.put(data, 1, 1, "png")[0]
    damage(store, first.id, how, blob(73, 5000))
    again, created = store.put(data, 1, 1, "png")
    assert (again, created) == (first, False)
    assert store.read(first.id) == data
    consistent(store)
    store.close()


def test_a_folder_where_a_blob_was_is_missing_and_healed(tmp_path: Path) -> None:
    store = open_store(Settings(data_dir=tmp_path))
    data = blob(74, 5000)
    uid = store.put(data, 1, 1, "png")[0].id
    damage(store, uid, "a folder")
    assert store.describe(uid) is None and store.read(uid) is None and not store.delete(uid)
    assert store.put(data, 1, 1, "png")[1] and store.read(uid) == data
    uid2 = store.put(blob(75), 1, 1, "png")[0].id
    damage(store, uid2, "a folder")
    assert store.delete(uid2) and not store.blobs.path_for(uid2).exists()
    store.close()


def test_the_api_never_serves_a_damaged_upload_and_a_new_upload_heals_it(tmp_path: Path, weights_dir: Path) -> None:
    """Before: a deleted blob was 200 on GET and listed but 404 on predict, and uploading the same bytes did
    not restore it; a truncated one was a 415 that blamed the client; a replaced one, the other image's mask."""
    with TestClient(create_app(make_settings(tmp_path, weights_dir))) as client:
        wait_ready(client)
        store = client.app.state.unetseg.store  # type: ignore[attr-defined]
        data, other = image_bytes(30, 20, seed=1), image_bytes(30, 20, seed=2)
        good_mask = client.post("/v1/predict", content=data, headers={"Content-Type": "image/png"}).content
        for how in ["deleted", "truncated", "replaced"]:
            uid = client.post("/v1/uploads", files={"file": ("a.png", data, "image/png")}).json()["id"]
            damage(store, uid, how, other)
            if how == "deleted":
                assert client.get(f"/v1/uploads/{uid}").status_code == 404
            else:
                r = client.post("/v1/predict", data={"upload_id": uid})
                assert r.status_code == 404, (how, r.status_code)
            assert uid not in {u["id"] for u in client.get("/v1/uploads").json()["items"]}
            assert client.post("/v1/uploads", files={"file": ("a.png", data, "image/png")}).status_code == 201
            r = client.post("/v1/predict", data={"upload_id": uid})
            assert r.status_code == 200 and r.content == good_mask
        uid = client.post("/v1/uploads", files={"file": ("a.png", data, "image/png")}).json()["id"]
        damage(store, uid, "a folder")
        assert client.post("/v1/predict", data={"upload_id": uid}).status_code == 404
        assert client.delete(f"/v1/uploads/{uid}").status_code == 404
        assert client.post("/v1/uploads", files={"file": ("a.png", data, "image/png")}).status_code == 201
        assert client.delete(f"/v1/uploads/{uid}").status_code == 204
