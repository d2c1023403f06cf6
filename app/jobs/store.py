"""Jobs in the store: their rows beside the uploads' (same database), their files beside the uploads' bytes.

**Rows** (``JobStore``): the table ``jobs`` in the upload metadata database (SQLite or PostgreSQL, through
the same connections and the same store-wide write lock), so every replica sharing the database sees every
job. A row has the columns its queries need (state, times, owner, attempts) and one JSON document with the
rest (parameters, progress, results, the error). A running job's row names its *owner* (``host:pid:token``)
and a *heartbeat* the owner renews; ``claim`` hands a replica the oldest queued job, after taking back
running jobs whose owner is gone (a heartbeat older than the lease, or a dead process on this host): they
are queued again to resume, or failed with the reason once they have had their attempts.

**Files** (``JobFiles``): a folder per job, ``jobs/<id>/`` beside ``uploads/`` in the blob store: ``input``
(the body as sent), ``regions/`` (each slide region's result, so a resumed job skips what is done), ``out/``
(the results). Every file is written under a temporary name and renamed when complete, so nothing
half-written is ever read. With S3 the folder is a key prefix, mirrored in a local cache folder while a
replica works on the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.errors import Overloaded
from app.store import Blobs, Metadata
from app.store.s3 import is_missing, unavailable_as_503
from app.store.sql import SqlRows
from model.fsync import fsync_path

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")
COLUMNS = "id, state, created_at, finished_at, heartbeat_at, owner, attempts, doc"
# A job folder without a row younger than this is left alone at start-up: its body may still be arriving.
ORPHAN_GRACE_S = 3600.0


def schema() -> list[str]:
    return [
        "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, created_at DOUBLE PRECISION"
        " NOT NULL, finished_at DOUBLE PRECISION, heartbeat_at DOUBLE PRECISION, owner TEXT, attempts INTEGER"
        " NOT NULL, doc TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created_at)",
    ]


def new_job_id() -> str:
    return uuid.uuid4().hex


def owner_token() -> str:
    """``host:pid:random``: who runs a job; the random part tells a restarted process (same pid) apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_gone(owner: str | None, me: str) -> bool:
    """Whether ``owner`` is known to be dead from here: a process on this host that does not exist (or an
    earlier process with this one's pid). Owners on other hosts are judged by their heartbeat only."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    my_host = me.partition(":")[0]
    if host != my_host or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner != me
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Job:
    id: str
    state: str
    created_at: float
    kind: str  # "image" (the predict pipeline) or "slide" (regions of a TIFF)
    model: str
    format: str  # image: png, overlay, json, instances; slide: "slide"
    params: dict[str, Any] = field(default_factory=dict)  # alpha, level, region_px, halo_px
    input: dict[str, Any] = field(default_factory=dict)  # bytes, sha256, media type, width, height, levels
    progress: dict[str, Any] = field(default_factory=dict)  # stage, tiles done/total, regions done/total
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # format -> file, bytes, media_type
    info: dict[str, Any] = field(default_factory=dict)  # timings, count, level, resumed regions
    error: str | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    owner: str | None = None
    attempts: int = 0

    def doc(self) -> str:
        keys = ("kind", "model", "format", "params", "input", "progress", "results", "info", "error")
        return json.dumps({k: getattr(self, k) for k in keys})

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Job:
        jid, state, created, finished, beat, owner, attempts, doc = row
        d = json.loads(doc)
        return cls(
            jid,
            state,
            float(created),
            d["kind"],
            d["model"],
            d["format"],
            d.get("params", {}),
            d.get("input", {}),
            d.get("progress", {}),
            d.get("results", {}),
            d.get("info", {}),
            d.get("error"),
            None if finished is None else float(finished),
            None if beat is None else float(beat),
            owner,
            int(attempts),
        )


class JobStore:
    """Job rows, through the upload store's metadata backend (its connections and write lock)."""

    def __init__(self, meta: Metadata, max_active: int = 100) -> None:
        self.meta = meta
        self.max_active = max_active
        self.clock: Callable[[], float] = time.time
        with self._write() as rows:
            for statement in schema():
                rows.execute(statement)

    @contextlib.contextmanager
    def _write(self) -> Iterator[SqlRows]:
        with self.meta.write() as rows:
            assert isinstance(rows, SqlRows)
            yield rows

    @contextlib.contextmanager
    def _read(self) -> Iterator[SqlRows]:
        with self.meta.read() as rows:
            assert isinstance(rows, SqlRows)
            yield rows

    @staticmethod
    def _put(rows: SqlRows, job: Job) -> None:
        rows.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, heartbeat_at = ?, owner = ?, attempts = ?, doc = ?"
            " WHERE id = ?",
            (job.state, job.finished_at, job.heartbeat_at, job.owner, job.attempts, job.doc(), job.id),
        )

    @staticmethod
    def _get(rows: SqlRows, job_id: str) -> Job | None:
        row = rows.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else Job.from_row(tuple(row))

    def create(self, job: Job) -> Job:
        """Insert a queued job; ``Overloaded`` (503) when ``max_active`` jobs are queued or running already."""
        with self._write() as rows:
            (active,) = rows.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()
            if int(active) >= self.max_active:
                raise Overloaded(f"{active} jobs are queued or running, the most the service takes; retry later", 30)
            rows.execute(
                f"INSERT INTO jobs ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.state, job.created_at, None, None, None, 0, job.doc()),
            )
        return job

    def get(self, job_id: str) -> Job | None:
        with self._read() as rows:
            return self._get(rows, job_id)

    def recent(self, limit: int = 100, offset: int = 0) -> list[Job]:
        with self._read() as rows:
            found = rows.execute(
                f"SELECT {COLUMNS} FROM jobs ORDER BY created_at DESC, id LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [Job.from_row(tuple(r)) for r in found]

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state, 0 included)."""
        with self._read() as rows:
            found = rows.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({str(s): int(n) for s, n in found})
        return out

    def ids(self) -> set[str]:
        with self._read() as rows:
            return {str(r[0]) for r in rows.execute("SELECT id FROM jobs").fetchall()}

    def claim(
        self, owner: str, lease_s: float, attempts: int, busy: Collection[str] = ()
    ) -> tuple[Job | None, list[Job]]:
        """Take back abandoned running jobs, then hand ``owner`` the oldest queued one (running, attempt + 1).
        ``busy``: the jobs ``owner`` is running now, never handed to it again (nor taken back from it when their
        heartbeat is late).

        Returns (the claimed job or None, the jobs failed now for having had ``attempts`` starts)."""
        now = self.clock()
        failed: list[Job] = []
        with self._write() as rows:
            running = [
                Job.from_row(tuple(r))
                for r in rows.execute(f"SELECT {COLUMNS} FROM jobs WHERE state = 'running'").fetchall()
            ]
            for job in running:
                if job.id in busy and job.owner == owner:
                    continue
                stale = job.heartbeat_at is None or now - job.heartbeat_at > lease_s
                if not (stale or owner_gone(job.owner, owner)):
                    continue
                if job.attempts >= attempts:
                    job = replace(
                        job,
                        state="failed",
                        finished_at=now,
                        error=f"the replica running it stopped {job.attempts} times (last {job.owner}); "
                        "it is not tried again",
                    )
                    failed.append(job)
                else:
                    job = replace(job, state="queued", info={**job.info, "interrupted": job.owner})
                self._put(rows, job)
            found = rows.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY created_at, id LIMIT ?", (len(busy) + 1,)
            ).fetchall()
            row = next((r for r in found if str(r[0]) not in busy), None)
            if row is None:
                return None, failed
            job = Job.from_row(tuple(row))
            job = replace(job, state="running", owner=owner, heartbeat_at=now, attempts=job.attempts + 1)
            job.info.setdefault("started_at", now)
            self._put(rows, job)
        return job, failed

    def beat(self, job_id: str, owner: str, progress: dict[str, Any] | None = None) -> bool:
        """Renew ``owner``'s heartbeat (and progress); False when the job is no longer its to run (cancelled,
        deleted, taken over)."""
        with self._write() as rows:
            job = self._get(rows, job_id)
            if job is None or job.state != "running" or job.owner != owner:
                return False
            job.heartbeat_at = self.clock()
            if progress is not None:
                job.progress = progress
            self._put(rows, job)
        return True

    def finish(self, job_id: str, owner: str, state: str, **changes: Any) -> Job | None:
        """End ``owner``'s run of a job in ``state`` (done, failed, or queued to give it back unstarted);
        None when it was not the owner's any more."""
        with self._write() as rows:
            job = self._get(rows, job_id)
            if job is None or job.state != "running" or job.owner != owner:
                return None
            job = replace(job, state=state, **changes)
            if state in FINISHED:
                job.finished_at = self.clock()
            else:  # given back: this start does not count
                job.owner, job.heartbeat_at, job.attempts = None, None, max(0, job.attempts - 1)
            self._put(rows, job)
        return job

    def cancel(self, job_id: str) -> tuple[Job, str] | None:
        """Mark a queued or running job cancelled (its runner stops at its next heartbeat). Returns (the job as it
        is now, the state it was in): a job that had finished is left as it was. None when there is no such job."""
        with self._write() as rows:
            job = self._get(rows, job_id)
            if job is None:
                return None
            was = job.state
            if was in ACTIVE:
                job = replace(job, state="cancelled", finished_at=self.clock(), error="cancelled by a DELETE")
                self._put(rows, job)
        return job, was

    def delete(self, job_id: str) -> bool:
        with self._write() as rows:
            return int(rows.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount) > 0

    def expired(self, retention_s: float) -> list[str]:
        """Finished jobs older than ``retention_s`` (finished that long ago)."""
        cutoff = self.clock() - retention_s
        with self._read() as rows:
            found = rows.execute(
                "SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND finished_at < ?", (cutoff,)
            ).fetchall()
        return [str(r[0]) for r in found]


# --- files -----------------------------------------------------------------------------------------------------


def write_done(tmp: Path, final: Path) -> None:
    """Make a complete temporary file durable and give it its name (atomic; the folder synced)."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


class JobFiles(ABC):
    """A folder of files per job, in the blob store."""

    @abstractmethod
    def workdir(self, job_id: str) -> Path:
        """The local folder where the job's files are read and written (created)."""

    @abstractmethod
    def save(self, job_id: str, rel: str) -> None:
        """Make ``workdir/rel`` (complete, renamed into place) durable in the store."""

    @abstractmethod
    def fetch(self, job_id: str) -> None:
        """Bring the job's stored files that the local folder lacks into it (another replica wrote them)."""

    @abstractmethod
    def size(self, job_id: str, rel: str) -> int | None: ...

    @abstractmethod
    def chunks(self, job_id: str, rel: str, chunk: int = 1024 * 1024) -> Iterator[bytes]:
        """The file's bytes, a chunk at a time."""

    @abstractmethod
    def local(self, job_id: str, rel: str) -> Path | None:
        """The file's path when it is on this machine's disk, for serving it directly."""

    @abstractmethod
    def release(self, job_id: str) -> None:
        """Free this machine's copy of the job's saved files, when the store keeps them elsewhere (the replica
        that runs the job fetches them again)."""

    @abstractmethod
    def delete(self, job_id: str) -> None: ...

    @abstractmethod
    def prune(self, job_id: str) -> None:
        """Remove what a finished job no longer needs: everything but its results (``out/``)."""

    @abstractmethod
    def job_ids(self) -> Iterator[tuple[str, float]]:
        """(job id, modification time) of every job folder in the store."""


class FileJobFiles(JobFiles):
    """``<root>/jobs/<id>/`` on the data folder or a shared mount: the store is the working folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)

    def workdir(self, job_id: str) -> Path:
        d = self.root / job_id
        d.mkdir(exist_ok=True)
        return d

    def save(self, job_id: str, rel: str) -> None:
        return None  # written in place, synced and renamed by the writer (write_done)

    def fetch(self, job_id: str) -> None:
        return None

    def size(self, job_id: str, rel: str) -> int | None:
        try:
            return (self.root / job_id / rel).stat().st_size
        except FileNotFoundError:
            return None

    def chunks(self, job_id: str, rel: str, chunk: int = 1024 * 1024) -> Iterator[bytes]:
        with open(self.root / job_id / rel, "rb") as f:
            while data := f.read(chunk):
                yield data

    def local(self, job_id: str, rel: str) -> Path | None:
        p = self.root / job_id / rel
        return p if p.is_file() else None

    def release(self, job_id: str) -> None:
        return None  # the working folder is the store

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def prune(self, job_id: str) -> None:
        folder = self.root / job_id
        for p in folder.iterdir() if folder.is_dir() else ():
            if p.name != "out":
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def job_ids(self) -> Iterator[tuple[str, float]]:
        """The newer of the folder's and its ``input``'s times: a body still arriving changes only its file."""
        for p in self.root.iterdir():
            if p.is_dir():
                with contextlib.suppress(FileNotFoundError):
                    mtime = p.stat().st_mtime
                    with contextlib.suppress(FileNotFoundError):
                        mtime = max(mtime, (p / "input").stat().st_mtime)
                    yield p.name, mtime


class S3JobFiles(JobFiles):
    """``<prefix>/jobs/<id>/...`` objects, worked on in a local cache folder (``<data>/jobs-cache/<id>``). A bucket
    that does not answer (or answers 5xx) is ``StoreUnavailable`` (503), as for the uploads."""

    def __init__(self, client: Any, bucket: str, prefix: str, cache: Path) -> None:
        self.client, self.bucket, self.prefix = client, bucket, prefix
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)

    def key(self, job_id: str, rel: str = "") -> str:
        return f"{self.prefix}{job_id}/{rel}"

    def workdir(self, job_id: str) -> Path:
        d = self.cache / job_id
        d.mkdir(exist_ok=True)
        return d

    def save(self, job_id: str, rel: str) -> None:
        with unavailable_as_503():
            self.client.upload_file(str(self.cache / job_id / rel), self.bucket, self.key(job_id, rel))

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        with unavailable_as_503():
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                yield from page.get("Contents", [])

    def fetch(self, job_id: str) -> None:
        base = self.key(job_id)
        for obj in self._objects(base):
            rel = obj["Key"][len(base) :]
            target = self.cache / job_id / rel
            if rel and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
                with unavailable_as_503():
                    self.client.download_file(self.bucket, obj["Key"], str(tmp))
                os.replace(tmp, target)

    def size(self, job_id: str, rel: str) -> int | None:
        """The object's size; None only when there is no such object."""
        from botocore.exceptions import ClientError

        with unavailable_as_503():
            try:
                return int(self.client.head_object(Bucket=self.bucket, Key=self.key(job_id, rel))["ContentLength"])
            except ClientError as exc:
                if is_missing(exc):
                    return None
                raise

    def chunks(self, job_id: str, rel: str, chunk: int = 1024 * 1024) -> Iterator[bytes]:
        with unavailable_as_503():
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(job_id, rel))["Body"]
            with contextlib.closing(body):
                yield from body.iter_chunks(chunk)

    def local(self, job_id: str, rel: str) -> Path | None:
        return None  # the cache may be stale or partial: results are read from the bucket

    def release(self, job_id: str) -> None:
        shutil.rmtree(self.cache / job_id, ignore_errors=True)

    def _delete(self, keys: list[dict[str, str]]) -> None:
        for i in range(0, len(keys), 1000):
            with unavailable_as_503():
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i : i + 1000]})

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.cache / job_id, ignore_errors=True)
        self._delete([{"Key": o["Key"]} for o in self._objects(self.key(job_id))])

    def prune(self, job_id: str) -> None:
        shutil.rmtree(self.cache / job_id, ignore_errors=True)
        base = self.key(job_id)
        self._delete([{"Key": o["Key"]} for o in self._objects(base) if not o["Key"].startswith(base + "out/")])

    def job_ids(self) -> Iterator[tuple[str, float]]:
        newest: dict[str, float] = {}
        for obj in self._objects(self.prefix):
            job_id = obj["Key"][len(self.prefix) :].split("/", 1)[0]
            newest[job_id] = max(newest.get(job_id, 0.0), obj["LastModified"].timestamp())
        yield from newest.items()


def open_job_files(blobs: Blobs, data_dir: Path) -> JobFiles:
    """The job folders beside the uploads of the store's blob backend."""
    from app.store.files import FileBlobs
    from app.store.s3 import S3Blobs

    if isinstance(blobs, FileBlobs):
        return FileJobFiles(blobs.root)
    if isinstance(blobs, S3Blobs):
        prefix = blobs.prefix.removesuffix("uploads/") + "jobs/"
        return S3JobFiles(blobs.client, blobs.bucket, prefix, Path(data_dir) / "jobs-cache")
    raise ValueError(f"jobs cannot keep files in a {type(blobs).__name__}")
