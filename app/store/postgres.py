"""Upload metadata in PostgreSQL (psycopg 3), shared by every replica.

``write()`` is a transaction that first takes a transaction-scoped advisory lock, the same key for every
replica, so changes to rows and the blobs they name happen one at a time across the deployment (as
SQLite's write lock does on one machine); it is released by the commit. Reads take no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from app.store import Metadata, Rows
from app.store.sql import SqlRows, schema

# pg_advisory_xact_lock takes a bigint; any constant works as long as every replica uses the same.
LOCK_KEY = int.from_bytes(b"unetseg\x01", "big") & (2**63 - 1)
POOL_SIZE = 8
CONNECT_TIMEOUT_S = 10


class PostgresMetadata(Metadata):
    def __init__(self, url: str) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise RuntimeError(
                "UNETSEG_DATABASE_URL names PostgreSQL: install the 'postgres' extra (pip install 'unetseg[postgres]')"
            ) from exc
        # One connection first, for the schema and for an error that says why (the pool's would not).
        try:
            with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))  # replicas starting at once
                for statement in schema(real="DOUBLE PRECISION", bigint="BIGINT"):
                    conn.execute(statement)
        except psycopg.OperationalError as exc:  # its message names host and database, never the password
            raise RuntimeError(f"UNETSEG_DATABASE_URL: cannot use the PostgreSQL database: {exc}") from exc
        self._pool = ConnectionPool(
            url, min_size=1, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=False, name="unetseg-store"
        )
        self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)

    @contextmanager
    def read(self) -> Iterator[Rows]:
        with self._pool.connection() as conn:
            yield SqlRows(conn.execute, "%s")

    @contextmanager
    def write(self) -> Iterator[Rows]:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            yield SqlRows(conn.execute, "%s")

    def close(self) -> None:
        self._pool.close()
