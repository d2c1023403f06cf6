"""Uploads, content-addressed by SHA-256: the bytes in a blob store, their metadata in a database.

One store, two halves chosen by URL (``open_store(settings)``):

- metadata (``UNETSEG_DATABASE_URL``): SQLite under the data folder (``sqlite.py``, the default) or
  PostgreSQL (``postgres.py``) shared by every replica;
- bytes (``UNETSEG_BLOB_URL``): a folder, local or on a shared mount (``files.py``, the default is the data
  folder), or an S3 bucket and prefix (``s3.py``).

The guarantees are kept here, once, for every combination:

- **Nothing half-written is visible.** A blob is *staged* (made durable where no reader looks: a synced
  temporary file, or a complete S3 object that no row names yet), then *published* and its row inserted.
  Readers find uploads through rows only, and a row is inserted only after its blob is published.
- **Acknowledged means durable.** ``put`` returns once the blob is synced (or S3 answered) and the row's
  transaction committed.
- **One writer at a time, across replicas.** Every change to rows and the blobs they name (publish and
  insert, delete, eviction, start-up reconciliation) runs inside ``Metadata.write()``: one transaction
  holding a store-wide lock (SQLite's write lock, a PostgreSQL advisory lock). So the same bytes uploaded at
  once by two replicas give one row, and a delete cannot remove a blob that a put has just published.
- **Eviction is part of the put.** The insert and the eviction it causes are one transaction, and ``put``
  returns the row it inserted; a concurrent put's eviction can remove that upload afterwards (the quota
  says so), never make the put fail.
- **Start-up reconciliation is safe with other replicas running**: staged blobs are removed only when their
  writer is gone (files) or they are older than the backend's grace period (S3); rows whose blob is missing
  are removed, under the lock.
- **What is read is what was stored.** A blob is hashed while it is read and must have its id as SHA-256.
  One that does not (truncated, bit-flipped, replaced by other bytes, a folder where the file was) or
  that is gone is taken for missing: logged, its row removed under the lock (unless a put restored it
  meanwhile), so the upload is a 404 rather than another image's mask or a 415 that blames the client;
  uploading the same bytes again restores it, as does a put that finds its blob in that state.
- **Trouble reaching the database or the blobs is a 503** (``StoreUnavailable``, with Retry-After), raised
  by the backends; ``gate.StoreGate`` runs store calls in threads of their own and reports reachability.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from app.config import Settings

ID_RE = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a trailing newline through
CHUNK = 1 << 20  # bytes read (and hashed) at a time

log = logging.getLogger("unetseg.store")


class BlobDamaged(Exception):
    """The blob under an id is not the bytes whose SHA-256 the id is, or not a readable file at all."""


@dataclass(frozen=True)
class Upload:
    id: str
    width: int
    height: int
    format: str
    bytes: int
    created_at: datetime


@dataclass(frozen=True)
class StoreStats:
    count: int
    bytes: int
    max_bytes: int  # 0 = no quota
    retention_s: float  # 0 = kept forever


def make_upload(uid: str, width: int, height: int, fmt: str, size: int, created_at: float) -> Upload:
    return Upload(uid, int(width), int(height), fmt, int(size), datetime.fromtimestamp(created_at, UTC))


class Rows(ABC):
    """The metadata operations, inside one transaction (``Metadata.read()`` or ``Metadata.write()``)."""

    @abstractmethod
    def get(self, uid: str) -> Upload | None: ...

    @abstractmethod
    def recent(self, limit: int, offset: int) -> list[Upload]: ...

    @abstractmethod
    def totals(self) -> tuple[int, int]:
        """(count, bytes) of every row."""

    @abstractmethod
    def ids(self) -> set[str]: ...

    @abstractmethod
    def insert(self, upload: Upload) -> bool:
        """Insert unless the id is there; True if inserted."""

    @abstractmethod
    def delete(self, uid: str) -> bool: ...

    @abstractmethod
    def older_than(self, cutoff: float) -> list[str]:
        """Ids created before ``cutoff`` (epoch seconds)."""

    @abstractmethod
    def by_age(self) -> Iterator[tuple[str, int]]:
        """(id, bytes), oldest first."""


class Metadata(ABC):
    """Where the rows live. ``write()`` is exclusive across every process sharing the database."""

    @abstractmethod
    def read(self) -> AbstractContextManager[Rows]: ...

    @abstractmethod
    def write(self) -> AbstractContextManager[Rows]:
        """One transaction holding the store-wide write lock; committed when the block ends without error."""

    @abstractmethod
    def ping(self) -> None:
        """A round trip to the database; StoreUnavailable when there is none."""

    @abstractmethod
    def close(self) -> None: ...


@dataclass
class Staged:
    """A blob made durable by ``Blobs.stage`` but not yet published under its id."""

    id: str
    data: bytes
    handle: Any = None  # the backend's own (a temporary file, ...)


class Blobs(ABC):
    """Where the bytes live, named by their id."""

    #: Blobs without a row younger than this are left alone at start-up: they can be another replica's
    #: staged upload. 0 where a blob only ever appears under its id inside ``Metadata.write()``.
    orphan_grace_s: float = 0.0

    @abstractmethod
    def stage(self, uid: str, data: bytes) -> Staged:
        """Make ``data`` durable where no reader looks; outside the write lock (it is the slow part)."""

    @abstractmethod
    def publish(self, staged: Staged) -> None:
        """Inside the write lock: after it returns, ``read(staged.id)`` gives the bytes."""

    @abstractmethod
    def discard(self, staged: Staged) -> None:
        """Release what ``stage`` kept (a published blob stays)."""

    @abstractmethod
    def chunks(self, uid: str) -> Iterator[bytes] | None:
        """The blob's bytes in pieces of at most ``CHUNK``; None when there is no blob. BlobDamaged when
        what is there is not a blob (a folder)."""

    @abstractmethod
    def exists(self, uid: str) -> bool: ...

    def read(self, uid: str) -> bytes | None:
        """The blob's bytes, hashed while they are read: None when there is none, BlobDamaged when they are
        not the bytes whose SHA-256 is ``uid``."""
        pieces = self.chunks(uid)
        if pieces is None:
            return None
        digest = hashlib.sha256()
        parts = []
        for piece in pieces:
            digest.update(piece)
            parts.append(piece)
        if digest.hexdigest() != uid:
            size = sum(map(len, parts))
            raise BlobDamaged(f"holds {size} bytes whose SHA-256 is {digest.hexdigest()}, not its id")
        return b"".join(parts)

    @abstractmethod
    def delete(self, uid: str) -> None:
        """Remove the blob if it is there."""

    @abstractmethod
    def names(self) -> Iterator[tuple[str, float]]:
        """(id, modification time in epoch seconds) of every published blob."""

    @abstractmethod
    def remove_abandoned(self) -> None:
        """Remove staged data whose writer is gone (a crashed process's temporary files)."""

    def close(self) -> None:
        return None


class UploadStore:
    """Content-addressed uploads with quota and retention, over one ``Metadata`` and one ``Blobs``."""

    def __init__(self, meta: Metadata, blobs: Blobs, max_bytes: int = 0, retention_s: float = 0) -> None:
        self.meta = meta
        self.blobs = blobs
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self.clock: Callable[[], float] = time.time  # creation times and retention ages
        self.recover()

    def close(self) -> None:
        self.meta.close()
        self.blobs.close()

    @staticmethod
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def recover(self) -> None:
        """Make blobs and rows agree after a crash, without touching other replicas' uploads in flight."""
        self.blobs.remove_abandoned()
        with self.meta.write() as rows:
            ids = rows.ids()
            now = time.time()  # blob times are the wall clock's, not self.clock's
            published = set()
            for uid, mtime in self.blobs.names():
                if uid in ids:
                    published.add(uid)
                elif now - mtime >= self.blobs.orphan_grace_s:
                    self.blobs.delete(uid)  # its put never committed a row, so it was never acknowledged
            for missing in ids - published:
                rows.delete(missing)

    def put(self, data: bytes, width: int, height: int, fmt: str) -> tuple[Upload, bool]:
        """Store ``data``; returns (upload, created). The same bytes twice give the same id, created=False.

        Bytes already stored whose blob went missing or was damaged are written again (created=False)."""
        uid = self.digest(data)
        existing = self.get(uid)
        if existing is not None and self._intact(uid):
            return existing, False
        staged = self.blobs.stage(uid, data)
        try:
            with self.meta.write() as rows:
                upload = rows.get(uid)  # a replica may have stored the same bytes meanwhile
                created = upload is None
                if upload is None:
                    self.blobs.publish(staged)
                    upload = make_upload(uid, width, height, fmt, len(data), self.clock())
                    try:
                        rows.insert(upload)
                    except BaseException:
                        self.blobs.delete(uid)  # still under the lock: no other put can have published it
                        raise
                elif not self._intact(uid):  # still so under the lock: restore it
                    self.blobs.delete(uid)  # whatever is in the way (damaged bytes, a folder)
                    self.blobs.publish(staged)
                    log.warning("upload %s: its blob was missing or damaged; restored from the same bytes", uid)
                self._evict(rows, keep=uid)
        finally:
            self.blobs.discard(staged)
        return upload, created

    def get(self, upload_id: str) -> Upload | None:
        if not ID_RE.fullmatch(upload_id):
            return None
        with self.meta.read() as rows:
            upload = rows.get(upload_id)
        if upload is None:
            return None
        if self.retention_s and self.clock() - upload.created_at.timestamp() > self.retention_s:
            self.evict()
            return None
        return upload

    def describe(self, upload_id: str) -> Upload | None:
        """``get``, for an upload whose blob is there (a stat, not a read: its bytes are checked when read)."""
        upload = self.get(upload_id)
        if upload is None or self.blobs.exists(upload_id):
            return upload
        self._drop_damaged(upload_id)
        return None

    def read(self, upload_id: str) -> bytes | None:
        """The upload's bytes, checked against its id; None for an unknown upload or one whose blob is gone
        or damaged (which is then dropped: see the module's docstring)."""
        if self.get(upload_id) is None:
            return None
        try:
            data = self.blobs.read(upload_id)
        except BlobDamaged:
            data = None
        if data is None:  # gone or damaged; or deleted between the lookup and the read, and then no row is left
            self._drop_damaged(upload_id)
        return data

    def _intact(self, uid: str) -> bool:
        try:
            return self.blobs.read(uid) is not None
        except BlobDamaged:
            return False

    def _drop_damaged(self, uid: str) -> None:
        """Remove an upload whose blob is missing or damaged, unless a put restored it meanwhile."""
        with self.meta.write() as rows:
            if rows.get(uid) is None:
                return  # deleted or evicted meanwhile
            try:
                if self.blobs.read(uid) is not None:
                    return  # restored meanwhile
                why = "is missing"
            except BlobDamaged as exc:
                why = str(exc)
            log.warning("upload %s: its blob %s; the upload is dropped (the same bytes uploaded restore it)", uid, why)
            rows.delete(uid)
            self.blobs.delete(uid)

    def delete(self, upload_id: str) -> bool:
        if not ID_RE.fullmatch(upload_id):
            return False
        with self.meta.write() as rows:
            gone = rows.delete(upload_id)
            if gone:
                self.blobs.delete(upload_id)
        return gone

    def recent(self, limit: int = 100, offset: int = 0) -> list[Upload]:
        with self.meta.read() as rows:
            return rows.recent(limit, offset)

    def stats(self) -> StoreStats:
        with self.meta.read() as rows:
            count, total = rows.totals()
        return StoreStats(count, total, self.max_bytes, self.retention_s)

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove uploads past the retention time, then the oldest until the quota holds. Returns their ids."""
        with self.meta.write() as rows:
            return self._evict(rows, keep)

    def _evict(self, rows: Rows, keep: str | None) -> list[str]:
        removed: list[str] = []
        if self.retention_s:
            removed += [uid for uid in rows.older_than(self.clock() - self.retention_s) if uid != keep]
            for uid in removed:
                rows.delete(uid)
        if self.max_bytes:
            _, total = rows.totals()
            over = []
            for uid, size in rows.by_age():
                if total <= self.max_bytes:
                    break
                if uid != keep:
                    over.append(uid)
                    total -= size
            for uid in over:
                rows.delete(uid)
            removed += over
        # Inside the transaction: a blob deleted here cannot be one that another put publishes, as that
        # needs the lock. A crash before the commit leaves rows without blobs, which start-up removes.
        for uid in removed:
            self.blobs.delete(uid)
        return removed


def open_metadata(url: str, data_dir: Path, connections: int = 8, timeout_s: float = 5.0) -> Metadata:
    """``""`` (SQLite in ``data_dir``), ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (SQLAlchemy's
    form: the path is what follows the third slash), or ``postgresql://user:pw@host/db``."""
    scheme = urlsplit(url).scheme
    if not url or scheme == "sqlite":
        from app.store.sqlite import SqliteMetadata

        if not url:
            return SqliteMetadata(Path(data_dir) / "uploads.sqlite3")
        path = unquote(urlsplit(url).path)[1:]
        if urlsplit(url).netloc or not path:
            raise ValueError(
                f"UNETSEG_DATABASE_URL: a SQLite URL is sqlite:///relative or sqlite:////absolute, not {url!r}"
            )
        return SqliteMetadata(Path(path))
    if scheme in ("postgresql", "postgres"):
        from app.store.postgres import PostgresMetadata

        return PostgresMetadata(url, connections, timeout_s)
    raise ValueError(f"UNETSEG_DATABASE_URL: unsupported scheme {scheme!r} (use sqlite:/// or postgresql://)")


def open_blobs(url: str, data_dir: Path, timeout_s: float = 5.0) -> Blobs:
    """``""`` (the data folder), ``file:///path`` or ``s3://bucket/prefix``."""
    parts = urlsplit(url)
    if not url or parts.scheme == "file":
        from app.store.files import FileBlobs

        if url and parts.netloc not in ("", "localhost"):
            raise ValueError(f"UNETSEG_BLOB_URL: a file URL names a local path (file:///path), not {url!r}")
        return FileBlobs(Path(unquote(parts.path)) if url else Path(data_dir))
    if parts.scheme == "s3":
        from app.store.s3 import S3Blobs

        if not parts.netloc:
            raise ValueError(f"UNETSEG_BLOB_URL: no bucket in {url!r} (use s3://bucket/prefix)")
        return S3Blobs(parts.netloc, unquote(parts.path).strip("/"), timeout_s=timeout_s)
    raise ValueError(f"UNETSEG_BLOB_URL: unsupported scheme {parts.scheme!r} (use file:/// or s3://)")


def open_store(settings: Settings) -> UploadStore:
    """The store the settings name: metadata from UNETSEG_DATABASE_URL, bytes from UNETSEG_BLOB_URL."""
    meta = open_metadata(settings.database_url, settings.data_dir, settings.store_threads, settings.store_timeout_s)
    try:
        blobs = open_blobs(settings.blob_url, settings.data_dir, settings.store_timeout_s)
        return UploadStore(meta, blobs, settings.max_store_bytes, settings.retention_s)
    except BaseException:
        meta.close()
        raise
