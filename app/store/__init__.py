"""Uploads on disk, content-addressed by SHA-256, with their metadata in SQLite (WAL).

Layout under ``data_dir``:

    uploads/ab/abcdef...    the uploaded bytes, named by their SHA-256
    tmp/                    files being written; emptied at start-up
    uploads.sqlite3         metadata: id, width, height, format, bytes, created_at

A file is written to ``tmp/``, flushed and fsynced, renamed into place (atomic on POSIX), and only then
is its row inserted. So a row always has its complete file; a crash can leave at most a file without a
row, which start-up removes (its upload never got a reply). Eviction by quota and retention removes the
row first, then the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ID_RE = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a trailing newline through


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UploadStore:
    def __init__(self, root: Path, max_bytes: int = 0, retention_s: float = 0) -> None:
        self.root = Path(root)
        self.files = self.root / "uploads"
        self.tmp = self.root / "tmp"
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self.files.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "uploads.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS uploads (id TEXT PRIMARY KEY, width INTEGER NOT NULL, height INTEGER NOT NULL,"
            " format TEXT NOT NULL, bytes INTEGER NOT NULL, created_at REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS uploads_created ON uploads (created_at)")
        self.recover()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def path_for(self, upload_id: str) -> Path:
        return self.files / upload_id[:2] / upload_id

    def recover(self) -> None:
        """Make disk and database agree after a crash: drop temp files, orphan files and rows without files."""
        with self._lock:
            for p in self.tmp.iterdir():
                p.unlink(missing_ok=True)
            ids = {row[0] for row in self._db.execute("SELECT id FROM uploads")}
            on_disk: set[str] = set()
            for sub in self.files.iterdir():
                if not sub.is_dir():
                    continue
                for p in sub.iterdir():
                    if p.name in ids:
                        on_disk.add(p.name)
                    else:
                        p.unlink(missing_ok=True)
            for missing in ids - on_disk:
                self._db.execute("DELETE FROM uploads WHERE id = ?", (missing,))

    @staticmethod
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def put(self, data: bytes, width: int, height: int, fmt: str) -> tuple[Upload, bool]:
        """Store ``data``; returns (upload, created). The same bytes twice give the same id, created=False."""
        upload_id = self.digest(data)
        existing = self.get(upload_id)
        if existing is not None:
            return existing, False
        final = self.path_for(upload_id)
        final.parent.mkdir(exist_ok=True)
        tmp = self.tmp / f"{upload_id}.{threading.get_ident()}.{time.monotonic_ns()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # The rename and the row go together under the lock, as a delete's row and file do: otherwise a
        # delete of the same bytes could remove this file after its row was inserted.
        with self._lock:
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            created = (
                self._db.execute(
                    "INSERT OR IGNORE INTO uploads (id, width, height, format, bytes, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (upload_id, width, height, fmt, len(data), time.time()),
                ).rowcount
                > 0
            )
        self.evict(keep=upload_id)
        upload = self.get(upload_id)
        assert upload is not None
        return upload, created

    def get(self, upload_id: str) -> Upload | None:
        if not ID_RE.fullmatch(upload_id):
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT id, width, height, format, bytes, created_at FROM uploads WHERE id = ?", (upload_id,)
            ).fetchone()
        if row is None:
            return None
        if self.retention_s and time.time() - row[5] > self.retention_s:
            self.evict()
            return None
        return Upload(row[0], row[1], row[2], row[3], row[4], datetime.fromtimestamp(row[5], UTC))

    def read(self, upload_id: str) -> bytes | None:
        if self.get(upload_id) is None:
            return None
        try:
            return self.path_for(upload_id).read_bytes()
        except FileNotFoundError:  # deleted between the lookup and the read
            return None

    def delete(self, upload_id: str) -> bool:
        if not ID_RE.fullmatch(upload_id):
            return False
        with self._lock:
            gone = self._db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,)).rowcount > 0
            if gone:
                self.path_for(upload_id).unlink(missing_ok=True)
        return gone

    def recent(self, limit: int = 100, offset: int = 0) -> list[Upload]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, width, height, format, bytes, created_at FROM uploads ORDER BY created_at DESC, id"
                " LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        return [Upload(r[0], r[1], r[2], r[3], r[4], datetime.fromtimestamp(r[5], UTC)) for r in rows]

    def stats(self) -> StoreStats:
        with self._lock:
            count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM uploads").fetchone()
        return StoreStats(int(count), int(total), self.max_bytes, self.retention_s)

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove uploads past the retention time, then the oldest until the quota holds. Returns their ids."""
        removed: list[str] = []
        with self._lock:
            if self.retention_s:
                cutoff = time.time() - self.retention_s
                rows = self._db.execute("SELECT id FROM uploads WHERE created_at < ?", (cutoff,)).fetchall()
                removed += [r[0] for r in rows if r[0] != keep]
                for uid in removed:
                    self._db.execute("DELETE FROM uploads WHERE id = ?", (uid,))
            if self.max_bytes:
                total = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM uploads").fetchone()[0]
                over = []
                for uid, size in self._db.execute("SELECT id, bytes FROM uploads ORDER BY created_at, id"):
                    if total <= self.max_bytes:
                        break
                    if uid != keep:
                        over.append(uid)
                        total -= size
                for uid in over:
                    self._db.execute("DELETE FROM uploads WHERE id = ?", (uid,))
                removed += over
            for uid in removed:
                self.path_for(uid).unlink(missing_ok=True)
        return removed
