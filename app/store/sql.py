"""The ``Rows`` of both SQL backends: the same statements, with the driver's parameter marker."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from app.store import Rows, Upload, make_upload

COLUMNS = "id, width, height, format, bytes, created_at"

Execute = Callable[[str, Sequence[Any]], Any]  # (sql, params) -> a DB-API cursor


class SqlRows(Rows):
    def __init__(self, execute: Execute, marker: str = "?") -> None:
        self._execute = execute
        self._marker = marker

    def _run(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._execute(sql.replace("?", self._marker), params)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Any statement (``?`` markers) in this transaction: for the tables other modules keep here (jobs)."""
        return self._run(sql, params)

    def get(self, uid: str) -> Upload | None:
        row = self._run(f"SELECT {COLUMNS} FROM uploads WHERE id = ?", (uid,)).fetchone()
        return None if row is None else make_upload(*row)

    def recent(self, limit: int, offset: int) -> list[Upload]:
        rows = self._run(
            f"SELECT {COLUMNS} FROM uploads ORDER BY created_at DESC, id LIMIT ? OFFSET ?", (limit, offset)
        ).fetchall()
        return [make_upload(*r) for r in rows]

    def totals(self) -> tuple[int, int]:
        count, total = self._run("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM uploads").fetchone()
        return int(count), int(total)

    def ids(self) -> set[str]:
        return {r[0] for r in self._run("SELECT id FROM uploads").fetchall()}

    def insert(self, upload: Upload) -> bool:
        cursor = self._run(
            f"INSERT INTO uploads ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (upload.id, upload.width, upload.height, upload.format, upload.bytes, upload.created_at.timestamp()),
        )
        return int(cursor.rowcount) > 0

    def delete(self, uid: str) -> bool:
        return int(self._run("DELETE FROM uploads WHERE id = ?", (uid,)).rowcount) > 0

    def older_than(self, cutoff: float) -> list[str]:
        return [r[0] for r in self._run("SELECT id FROM uploads WHERE created_at < ?", (cutoff,)).fetchall()]

    def by_age(self) -> Iterator[tuple[str, int]]:
        for uid, size in self._run("SELECT id, bytes FROM uploads ORDER BY created_at, id").fetchall():
            yield uid, int(size)


def schema(real: str, bigint: str) -> list[str]:
    return [
        f"CREATE TABLE IF NOT EXISTS uploads (id TEXT PRIMARY KEY, width INTEGER NOT NULL, height INTEGER NOT NULL,"
        f" format TEXT NOT NULL, bytes {bigint} NOT NULL, created_at {real} NOT NULL)",
        "CREATE INDEX IF NOT EXISTS uploads_created ON uploads (created_at)",
    ]
