"""Upload metadata in PostgreSQL (psycopg 3), shared by every replica.

``write()`` is a transaction that first takes a transaction-scoped advisory lock, the same key for every
replica, so changes to rows and the blobs they name happen one at a time across the deployment (as
SQLite's write lock does on one machine); it is released by the commit. Reads take no lock.

A database that goes away must cost the callers that need it a quick 503, and nothing once it is back:

- **Every wait is short** (``timeout_s``): for a free connection, to connect, for a statement (the
  server's ``statement_timeout``, which also bounds the wait for another replica's write lock) and for
  unacknowledged bytes on a dead link (``tcp_user_timeout``, keepalives).
- **Connections are checked before use** (an empty query, a round trip): after a restart of the server
  the pooled connections are dead, and the first request to take one would fail on it.
- **No back-off between attempts**: a connection that cannot be had is opened anew by the next call that
  needs one, so the service is back as soon as the database is. (A refused connection costs a refused
  TCP connect; an unreachable host, at most ``timeout_s``.)

Connection failures, timeouts and a server shutting down raise ``StoreUnavailable`` (503 with
``Retry-After``); any other database error is a bug and stays what it is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from app.errors import StoreUnavailable
from app.store import Metadata, Rows
from app.store.sql import SqlRows, schema

if TYPE_CHECKING:
    import psycopg

# pg_advisory_xact_lock takes a bigint; any constant works as long as every replica uses the same.
LOCK_KEY = int.from_bytes(b"unetseg\x01", "big") & (2**63 - 1)
POOL_SIZE = 8
TIMEOUT_S = 5.0


class ConnectionPool:
    """At most ``size`` connections, each checked with a round trip before it is handed out; a broken one
    is dropped, and a new one opened by the call that needs it."""

    def __init__(self, url: str, size: int, timeout_s: float) -> None:
        import psycopg

        self.url = url
        self.timeout_s = timeout_s
        self._psycopg = psycopg
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        ms = max(1, round(timeout_s * 1000))
        self._params: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(2, round(timeout_s)),  # libpq takes whole seconds, and treats 1 as 2
            "options": f"-c statement_timeout={ms}",
            "keepalives": 1,
            "keepalives_idle": max(1, round(timeout_s)),
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "tcp_user_timeout": ms,
        }

    def connect(self) -> psycopg.Connection[Any]:
        return self._psycopg.connect(self.url, **self._params)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if not self._slots.acquire(timeout=self.timeout_s):
            raise StoreUnavailable(f"no PostgreSQL connection was free within {self.timeout_s:g} s")
        conn = None
        try:
            conn = self._checked()
            yield conn
        finally:
            if conn is not None:
                self._give_back(conn)
            self._slots.release()

    def _checked(self) -> psycopg.Connection[Any]:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self.connect()
            try:
                conn.execute("")  # a round trip: a connection the server closed fails here, not in the caller
                return conn
            except self._psycopg.Error:
                conn.close()  # dead (the server restarted, or went away): try the next, or a new one

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        idle = self._psycopg.pq.TransactionStatus.IDLE
        if conn.closed or conn.broken or conn.info.transaction_status != idle:
            conn.close()
            return
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresMetadata(Metadata):
    def __init__(self, url: str, pool_size: int = POOL_SIZE, timeout_s: float = TIMEOUT_S) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise RuntimeError(
                "UNETSEG_DATABASE_URL names PostgreSQL: install the 'postgres' extra (pip install 'unetseg[postgres]')"
            ) from exc
        self._errors = (psycopg.OperationalError, psycopg.InterfaceError)
        self._pool = ConnectionPool(url, pool_size, timeout_s)
        # One connection first, for the schema and for an error that says why.
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))  # replicas starting at once
                for statement in schema(real="DOUBLE PRECISION", bigint="BIGINT"):
                    conn.execute(statement)
        except (psycopg.OperationalError, StoreUnavailable) as exc:  # names host and database, never the password
            self._pool.close()
            raise RuntimeError(f"UNETSEG_DATABASE_URL: cannot use the PostgreSQL database: {exc}") from exc

    @contextmanager
    def _unavailable_as_503(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailable(f"the upload database is unavailable: {first}") from exc

    @contextmanager
    def read(self) -> Iterator[Rows]:
        with self._unavailable_as_503(), self._pool.connection() as conn:
            yield SqlRows(conn.execute, "%s")

    @contextmanager
    def write(self) -> Iterator[Rows]:
        with self._unavailable_as_503(), self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            yield SqlRows(conn.execute, "%s")

    def ping(self) -> None:
        with self._unavailable_as_503(), self._pool.connection() as conn:
            conn.execute("SELECT 1")

    def close(self) -> None:
        self._pool.close()
