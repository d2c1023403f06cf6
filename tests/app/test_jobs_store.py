"""Job rows and folders in every store backend: claiming, heartbeats, taking back a dead replica's job, the
attempts limit, cancel, retention; files saved, fetched by another replica, streamed and removed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError

from app.config import Settings
from app.errors import Overloaded, StoreUnavailable
from app.jobs.store import Job, JobFiles, JobStore, S3JobFiles, new_job_id, open_job_files, owner_gone, owner_token
from app.store import UploadStore, open_store
from tests.backends import S3_ENV, new_bucket, postgres_database

BACKENDS = ["sqlite+local", "postgres+s3"]


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextmanager
def maybe(enter: bool) -> Iterator[str | None]:
    if not enter:
        yield None
        return
    with postgres_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    meta, blobs = request.param.split("+")
    urls: dict[str, Any] = {"data_dir": tmp_path / "data"}
    with maybe(meta == "postgres") as db_url:
        if db_url:
            urls["database_url"] = db_url
        if blobs == "s3":
            endpoint = request.getfixturevalue("s3_endpoint")
            for k, v in {**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint}.items():
                monkeypatch.setenv(k, v)
            urls["blob_url"] = f"s3://{new_bucket(endpoint)}/pre"
        yield Settings(**urls)


@contextmanager
def opened(settings: Settings, clock: Clock, max_active: int = 100) -> Iterator[tuple[UploadStore, JobStore]]:
    uploads = open_store(settings)
    try:
        jobs = JobStore(uploads.meta, max_active)
        jobs.clock = clock
        yield uploads, jobs
    finally:
        uploads.close()


def queued(clock: Clock, **kw: Any) -> Job:
    return Job(new_job_id(), "queued", clock(), "slide", "nuclei", "slide", **kw)


def test_claim_beat_finish(settings: Settings) -> None:
    clock = Clock()
    with opened(settings, clock) as (_, jobs):
        a, b = queued(clock), None
        jobs.create(a)
        clock.now += 1
        b = jobs.create(queued(clock))
        job, failed = jobs.claim("host:1:me", 30, 3)
        assert job is not None and job.id == a.id and job.state == "running" and job.attempts == 1 and not failed
        assert jobs.beat(a.id, "host:1:me", {"tiles_done": 5})
        assert not jobs.beat(a.id, "host:1:someone-else")
        assert jobs.get(a.id).progress == {"tiles_done": 5}  # type: ignore[union-attr]
        done = jobs.finish(a.id, "host:1:me", "done", results={"tiff": {"bytes": 3, "media_type": "image/tiff"}})
        assert done is not None and done.state == "done" and done.finished_at == clock.now
        assert jobs.finish(a.id, "host:1:me", "failed") is None  # not running any more
        assert jobs.counts() == {"queued": 1, "running": 0, "done": 1, "failed": 0, "cancelled": 0}
        assert [j.id for j in jobs.recent()] == [b.id, a.id]


def test_another_replica_sees_the_job_and_takes_it_back_when_its_heartbeat_stops(settings: Settings) -> None:
    clock = Clock()
    with opened(settings, clock) as (_, one), opened(settings, clock) as (_, two):
        job = one.create(queued(clock))
        claimed, _ = one.claim("hostA:1:a", 30, 3)
        assert claimed is not None
        assert two.get(job.id).state == "running"  # type: ignore[union-attr]
        assert two.claim("hostB:2:b", 30, 3) == (None, [])  # its heartbeat is fresh
        clock.now += 31
        taken, failed = two.claim("hostB:2:b", 30, 3)
        assert taken is not None and taken.id == job.id and taken.owner == "hostB:2:b" and taken.attempts == 2
        assert taken.info["interrupted"] == "hostA:1:a" and not failed
        assert not one.beat(job.id, "hostA:1:a")  # the old owner learns it lost the job


def test_a_job_whose_replica_keeps_dying_is_failed_with_the_reason(settings: Settings) -> None:
    clock = Clock()
    with opened(settings, clock) as (_, jobs):
        job = jobs.create(queued(clock))
        for attempt in (1, 2):
            claimed, failed = jobs.claim(f"h:{attempt}:x", 30, 2)
            assert claimed is not None and claimed.attempts == attempt and not failed
            clock.now += 31
        claimed, failed = jobs.claim("h:9:x", 30, 2)
        assert claimed is None and [f.id for f in failed] == [job.id]
        got = jobs.get(job.id)
        assert got is not None and got.state == "failed" and "stopped 2 times" in (got.error or "")


def test_a_dead_process_on_this_host_is_known_at_once() -> None:
    me = owner_token()
    host = me.split(":")[0]
    assert owner_gone(f"{host}:{2**22 + 12345}:x", me)  # no such pid
    assert not owner_gone(f"{host}:{os.getppid()}:x", me)  # alive
    assert owner_gone(f"{host}:{os.getpid()}:earlier", me)  # this pid, an earlier process
    assert not owner_gone(me, me)
    assert not owner_gone(f"elsewhere:{2**22 + 12345}:x", me)  # another host: the heartbeat decides
    assert owner_gone(None, me)


def test_cancel_give_back_and_retention(settings: Settings) -> None:
    clock = Clock()
    with opened(settings, clock, max_active=2) as (_, jobs):
        a = jobs.create(queued(clock))
        clock.now += 1
        jobs.create(queued(clock))
        with pytest.raises(Overloaded):
            jobs.create(queued(clock))
        claimed, _ = jobs.claim("h:1:x", 30, 3)
        assert claimed is not None
        back = jobs.finish(a.id, "h:1:x", "queued")  # an orderly stop: this start does not count
        assert back is not None and back.state == "queued" and back.attempts == 0 and back.owner is None
        cancelled = jobs.cancel(a.id)
        assert cancelled is not None and cancelled[0].state == "cancelled" and cancelled[1] == "queued"
        assert jobs.claim("h:1:x", 30, 3)[0] is not None  # the other one; the cancelled one never runs
        clock.now += 100
        assert jobs.expired(50) == [a.id]
        assert jobs.delete(a.id) and jobs.get(a.id) is None


def test_job_files_are_saved_fetched_by_another_replica_streamed_and_removed(settings: Settings) -> None:
    with opened(settings, Clock()) as (uploads, _), opened(settings, Clock()) as (other, _):
        files: JobFiles = open_job_files(uploads.blobs, settings.data_dir)
        job_id = new_job_id()
        work = files.workdir(job_id)
        (work / "out").mkdir()
        (work / "out" / "r.bin").write_bytes(b"x" * 3_000_000)
        files.save(job_id, "out/r.bin")
        assert files.size(job_id, "out/r.bin") == 3_000_000
        assert b"".join(files.chunks(job_id, "out/r.bin", 1 << 20)) == b"x" * 3_000_000
        assert [i for i, _ in files.job_ids()] == [job_id]
        if isinstance(files, S3JobFiles):  # another replica, another cache folder
            elsewhere = replace_cache(files, settings.data_dir.parent / "replica2")
            elsewhere.fetch(job_id)
            assert (elsewhere.workdir(job_id) / "out" / "r.bin").read_bytes() == b"x" * 3_000_000
            assert files.local(job_id, "out/r.bin") is None
        else:
            assert files.local(job_id, "out/r.bin") == work / "out" / "r.bin"
        (work / "input").write_bytes(b"in")
        files.save(job_id, "input")
        assert files.size(job_id, "input") == 2
        files.prune(job_id)  # a finished job keeps its results only
        assert files.size(job_id, "input") is None and files.size(job_id, "out/r.bin") == 3_000_000
        files.delete(job_id)
        assert list(files.job_ids()) == [] and files.size(job_id, "out/r.bin") is None
        # uploads and jobs share the blob store without touching each other's names
        assert list(other.blobs.names()) == []


def replace_cache(files: S3JobFiles, cache: Path) -> S3JobFiles:
    return S3JobFiles(files.client, files.bucket, files.prefix, cache)


def test_job_rows_survive_reopening_the_store(settings: Settings) -> None:
    clock = Clock()
    with opened(settings, clock) as (_, jobs):
        job = jobs.create(queued(clock, params={"level": 1}))
    with opened(settings, clock) as (_, jobs):
        again = jobs.get(job.id)
        assert again is not None and replace(again) == job


def test_a_replica_is_never_handed_a_job_it_runs_already(settings: Settings) -> None:
    clock = Clock()
    with opened(settings, clock) as (_, jobs):
        job = jobs.create(queued(clock))
        assert jobs.claim("h:1:me", 30, 3)[0] is not None
        clock.now += 31  # its heartbeat is late (the store was slow), but the replica still runs it
        assert jobs.claim("h:1:me", 30, 3, busy={job.id}) == (None, [])
        got = jobs.get(job.id)
        assert got is not None and got.state == "running" and got.owner == "h:1:me" and got.attempts == 1
        assert jobs.finish(job.id, "h:1:me", "queued") is not None  # queued again before its run noticed
        assert jobs.claim("h:1:me", 30, 3, busy={job.id}) == (None, [])
        again, _ = jobs.claim("h:1:me", 30, 3)  # once its run has ended
        assert again is not None and again.id == job.id


def test_cancel_tells_the_state_it_found(settings: Settings) -> None:
    clock = Clock()
    with opened(settings, clock) as (_, jobs):
        job = jobs.create(queued(clock))
        jobs.claim("h:1:x", 30, 3)
        done = jobs.finish(job.id, "h:1:x", "done")
        assert jobs.cancel(job.id) == (done, "done")  # it had ended: left as it was
        assert jobs.get(job.id) == done
        assert jobs.cancel(new_job_id()) is None


class Failing:
    """An S3 client every call of which raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            raise self.error

        return call


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "op")


@pytest.mark.parametrize(
    "error", [EndpointConnectionError(endpoint_url="http://s3.invalid"), client_error("SlowDown", 503)]
)
def test_a_bucket_that_does_not_answer_is_a_503_for_job_files(tmp_path: Path, error: Exception) -> None:
    job_id = new_job_id()
    files = S3JobFiles(Failing(error), "bucket", "jobs/", tmp_path / "cache")
    (files.workdir(job_id) / "input").write_bytes(b"x")
    calls = [
        lambda: files.save(job_id, "input"),
        lambda: files.fetch(job_id),
        lambda: files.size(job_id, "out/mask.tiff"),
        lambda: b"".join(files.chunks(job_id, "out/mask.tiff")),
        lambda: files.delete(job_id),
        lambda: files.prune(job_id),
        lambda: list(files.job_ids()),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable, match="unavailable"):
            call()


def upload_failed(cause: Exception) -> S3UploadFailedError:
    """What boto3's ``upload_file`` raises for a ClientError: its own exception, the ClientError as context."""
    try:
        try:
            raise cause
        except ClientError as exc:
            raise S3UploadFailedError(f"Failed to upload input: {exc}")  # noqa: B904 - boto3 raises it so
    except S3UploadFailedError as wrapped:
        return wrapped


def test_a_managed_transfer_that_the_bucket_fails_is_a_503_and_a_refused_one_is_not(tmp_path: Path) -> None:
    job_id = new_job_id()
    for error, unavailable in [
        (upload_failed(client_error("SlowDown", 503)), True),
        (upload_failed(client_error("InternalError", 500)), True),
        (RetriesExceededError(EndpointConnectionError(endpoint_url="http://s3.invalid")), True),
        (upload_failed(client_error("AccessDenied", 403)), False),
    ]:
        files = S3JobFiles(Failing(error), "bucket", "jobs/", tmp_path / "cache")
        (files.workdir(job_id) / "input").write_bytes(b"x")
        if unavailable:
            with pytest.raises(StoreUnavailable, match="unavailable"):
                files.save(job_id, "input")
        else:
            with pytest.raises(S3UploadFailedError):  # the bucket refused: not the store being away
                files.save(job_id, "input")


def test_a_job_file_is_missing_only_when_the_bucket_says_so(tmp_path: Path) -> None:
    job_id = new_job_id()
    missing = S3JobFiles(Failing(client_error("404", 404)), "bucket", "jobs/", tmp_path / "cache")
    assert missing.size(job_id, "out/mask.tiff") is None
    refused = S3JobFiles(Failing(client_error("AccessDenied", 403)), "bucket", "jobs/", tmp_path / "cache")
    with pytest.raises(ClientError):  # not "no such result": the bucket refused to say
        refused.size(job_id, "out/mask.tiff")
