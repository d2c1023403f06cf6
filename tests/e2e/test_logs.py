"""``unetseg serve`` logs one line per request, in UNETSEG_LOG_FORMAT, and uvicorn's access log stays off."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import running_server
from tests.helpers import image_bytes

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_serve_logs_each_request_once(fmt: str, weights_dir: Path, tmp_path: Path) -> None:
    with running_server(weights_dir, tmp_path / "data", UNETSEG_LOG_FORMAT=fmt, UNETSEG_DEFAULT_MODEL="tiny") as (
        base,
        _,
    ):
        port = base.rsplit(":", 1)[1]
        with httpx.Client(base_url=base, timeout=30) as http:
            ok = http.post(
                "/v1/predict?format=json",
                files={"file": ("a.png", image_bytes(40, 30), "image/png")},
                headers={"X-Request-ID": f"{fmt}-ok"},
            )
            assert ok.status_code == 200 and ok.headers["x-request-id"] == f"{fmt}-ok"
            bad = http.post("/v1/predict", files={"file": ("a.png", b"nope", "image/png")})
            assert bad.status_code == 415
            bad_id = bad.json()["request_id"]
            assert bad.headers["x-request-id"] == bad_id
    lines = (tmp_path / f"server-{port}.log").read_text().splitlines()
    # uvicorn's own access line looks like '127.0.0.1:PORT - "POST /v1/predict HTTP/1.1" 200 OK'.
    assert not [line for line in lines if "HTTP/1.1" in line]
    mine = [line for line in lines if f"{fmt}-ok" in line]
    assert len(mine) == 1, lines
    if fmt == "json":
        records = [json.loads(line) for line in lines]  # every line, start-up messages included, is JSON
        (ok_rec,) = [r for r in records if r.get("request_id") == "json-ok"]
        assert ok_rec["logger"] == "unetseg.access" and ok_rec["route"] == "/v1/predict"
        assert ok_rec["model"] == "tiny" and ok_rec["status"] == 200 and ok_rec["method"] == "POST"
        assert ok_rec["response_bytes"] == len(ok.content) and ok_rec["request_bytes"] > 0
        assert set(ok_rec["timings_ms"]) == {"decode", "queue", "model", "post", "encode"}
        (bad_rec,) = [r for r in records if r.get("request_id") == bad_id]
        assert bad_rec["status"] == 415 and bad_rec["model"] == "tiny"
        assert any(r["logger"] == "unetseg" and r["message"].startswith("ready:") for r in records)
    else:
        (line,) = mine
        assert " INFO unetseg.access: " in line and "POST /v1/predict 200 " in line
        assert "route=/v1/predict" in line and "model=tiny" in line and "split=decode:" in line
        assert len([x for x in lines if f"id={bad_id}" in x and " 415 " in x]) == 1
        assert any("unetseg: ready:" in x for x in lines)
