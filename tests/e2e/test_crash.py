"""Crash: kill -9 the real server while several clients upload, restart it on the same data folder, and
check that nothing acknowledged was lost and that nothing half-written ever became visible."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import running_server, uploads_until_killed

pytestmark = pytest.mark.e2e

CLIENTS = 4
KILL_AFTER = 24  # acknowledged uploads before the kill


def visible_files(data_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in (data_dir / "uploads").rglob("*") if p.is_file()}


def db_rows(data_dir: Path) -> set[str]:
    db = sqlite3.connect(data_dir / "uploads.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {row[0] for row in db.execute("SELECT id FROM uploads")}
    finally:
        db.close()


def test_kill_9_during_uploads_loses_no_acknowledged_upload(weights_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    acked = uploads_until_killed(weights_dir, data_dir, CLIENTS, KILL_AFTER)

    # As the killed process left it: every visible file is complete (its bytes hash to its name), the
    # database is intact, every row has its file, and every acknowledged upload is there.
    files = visible_files(data_dir)
    for name, path in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == name, f"half-written file visible: {path}"
    rows = db_rows(data_dir)
    assert rows <= set(files), "a row without its file"
    assert set(acked) <= rows, f"acknowledged but lost: {set(acked) - rows}"

    # Restarted on the same folder: every acknowledged upload is served with its bytes, and the store's
    # files and rows agree exactly (start-up removed what no reply ever acknowledged).
    with running_server(weights_dir, data_dir) as (base, _), httpx.Client(base_url=base, timeout=30) as http:
        listing = http.get("/v1/uploads", params={"limit": 1000}).json()
        assert set(acked) <= {item["id"] for item in listing["items"]}
        for uid, data in acked.items():
            meta = http.get(f"/v1/uploads/{uid}")
            assert meta.status_code == 200 and meta.json()["bytes"] == len(data)
            assert hashlib.sha256(data).hexdigest() == uid
        some = next(iter(acked))
        assert http.post("/v1/predict", data={"upload_id": some}).status_code == 200
        # Uploading again works and is recognised as already stored.
        again = http.post("/v1/uploads", files={"file": ("a.png", acked[some], "image/png")})
        assert again.status_code == 200 and again.json()["id"] == some
        files = visible_files(data_dir)
        rows = db_rows(data_dir)
        assert set(files) == rows == {item["id"] for item in listing["items"]}
        assert listing["count"] == len(rows)
        for name, path in files.items():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == name
        assert not list((data_dir / "tmp").iterdir())
