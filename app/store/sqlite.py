"""Upload metadata in one SQLite file (WAL, ``synchronous=FULL``): the embedded default.

Several processes on one machine may share the file: ``write()`` is a ``BEGIN IMMEDIATE`` transaction, the
database-wide write lock SQLite takes across processes. Reads use a connection of their own, so in WAL mode
they never wait for a write (or its fsyncs).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.errors import StoreUnavailable
from app.store import Metadata, Rows
from app.store.sql import SqlRows, schema

BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another process's write lock


@contextmanager
def _unavailable_as_503() -> Iterator[None]:
    """A database locked past the busy timeout, a full disk or an I/O error: the store's trouble, not the
    request's (503 with Retry-After). Errors in the statements themselves stay what they are."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(f"the upload database is unavailable: {exc}") from exc


class SqliteMetadata(Metadata):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._db = self._connect()
        self._enable_wal()
        with self.write() as _:
            for statement in schema(real="REAL", bigint="INTEGER"):
                self._db.execute(statement)
        self._reader = self._connect()

    def _enable_wal(self) -> None:
        """Switch the file to WAL. Two processes opening a new file at once can both get SQLITE_BUSY here at
        once, without SQLite's busy handler (it would deadlock them): retry until the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        db.execute("PRAGMA synchronous=FULL")
        return db

    @contextmanager
    def read(self) -> Iterator[Rows]:
        with _unavailable_as_503(), self._read_lock:
            yield SqlRows(self._reader.execute)

    @contextmanager
    def write(self) -> Iterator[Rows]:
        with _unavailable_as_503(), self._write_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield SqlRows(self._db.execute)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # also when the COMMIT itself failed (disk full, I/O error)
                    self._db.execute("ROLLBACK")
                raise

    def ping(self) -> None:
        with self.read() as rows:
            rows.get("")

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._db.close()
            self._reader.close()
