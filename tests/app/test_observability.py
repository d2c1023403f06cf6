"""Metrics at /metrics, request ids, the access log in both formats, and the page's static files."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.logs import JsonFormatter, TextFormatter, make_formatter
from app.main import create_app
from app.middleware import UNMATCHED as UNMATCHED_ROUTE
from app.middleware import RequestRecord
from tests.conftest import make_settings, wait_ready
from tests.helpers import image_bytes

PNG = "image/png"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: TestClient) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture
def small_queue(tmp_path: Path, weights_dir: Path) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, weights_dir, queue_size=1, max_batch=1)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def test_metrics_expose_every_series(small_queue: TestClient) -> None:
    c = small_queue
    data = image_bytes(40, 30)
    assert c.post("/v1/predict?model=tiny", files={"file": ("a.png", data, PNG)}).status_code == 200
    assert c.post("/v1/predict?format=json", files={"file": ("a.png", data, PNG)}).status_code == 200
    up = c.post("/v1/uploads", files={"file": ("a.png", data, PNG)})
    assert up.status_code == 201
    assert c.get(f"/v1/uploads/{up.json()['id']}").status_code == 200
    assert c.get("/v1/uploads/" + "0" * 64).status_code == 404

    # Fill the queue: one job held inside the worker (its batch hook waits), one waiting behind it.
    engine = c.app.state.unetseg.engine  # type: ignore[attr-defined]
    tiny = engine.models["tiny"]
    entered, release = threading.Event(), threading.Event()

    def held(name: str, size: int) -> None:
        entered.set()
        release.wait(30)

    tiny.on_batch = held
    x = torch.zeros(1, 3, 32, 32)
    running = tiny.submit(x)
    assert entered.wait(30)
    waiting = tiny.submit(x)
    try:
        r = c.post("/v1/predict", files={"file": ("a.png", data, PNG)})
        assert r.status_code == 503 and "retry-after" in r.headers
        during = scrape(c)
    finally:
        release.set()
        running.result(30)
        waiting.result(30)
    after = scrape(c)

    assert value(during, "unetseg_queue_depth", model="tiny") == 1
    assert value(during, "unetseg_queue_depth", model="tiles") == 0
    assert value(after, "unetseg_queue_depth", model="tiny") == 0
    assert value(after, "unetseg_rejected_requests_total", model="tiny") == 1
    assert value(after, "unetseg_rejected_requests_total", model="tiles") == 0

    predict = {"route": "/v1/predict", "method": "POST", "model": "tiny"}
    assert value(after, "unetseg_requests_total", **predict, status="200") == 2
    assert value(after, "unetseg_requests_total", **predict, status="503") == 1
    assert value(after, "unetseg_request_duration_seconds_count", **predict, status="200") == 2
    assert value(after, "unetseg_request_duration_seconds_bucket", **predict, status="200", le="+Inf") == 2
    upload = {"route": "/v1/uploads/{upload_id}", "method": "GET", "model": ""}
    assert value(after, "unetseg_requests_total", **upload, status="200") == 1
    assert value(after, "unetseg_requests_total", **upload, status="404") == 1
    assert value(after, "unetseg_requests_total", route="/metrics", method="GET", model="", status="200") == 1
    # Routes are templates: no raw path (an id) ever becomes a label.
    routes = {dict(labels).get("route") for name, labels in after if name == "unetseg_requests_total"}
    assert not any("0000" in (r or "") for r in routes), routes

    # Four forward passes of one input each: two predictions and the two queued jobs.
    assert value(after, "unetseg_batch_size_count", model="tiny") == 4
    assert value(after, "unetseg_batch_size_sum", model="tiny") == 4
    assert value(after, "unetseg_batch_size_bucket", model="tiny", le="1.0") == 4

    assert value(after, "unetseg_model_load_seconds", model="tiny") > 0
    assert value(after, "unetseg_model_load_seconds", model="tiles") > 0
    assert value(after, "unetseg_uploads_stored") == 1
    assert value(after, "unetseg_uploads_bytes") == len(data)
    assert not any(n.startswith("unetseg_gpu_") for n in names(after))  # CPU only


def test_each_app_has_its_own_registry(tmp_path: Path, weights_dir: Path) -> None:
    a = TestClient(create_app(make_settings(tmp_path, weights_dir)))
    b = TestClient(create_app(make_settings(tmp_path, weights_dir)))
    assert a.get("/healthz").status_code == 200
    assert a.get("/healthz").status_code == 200
    sa, sb = scrape(a), scrape(b)
    assert value(sa, "unetseg_requests_total", route="/healthz", method="GET", model="", status="200") == 2
    assert not any(name == "unetseg_requests_total" and ("route", "/healthz") in labels for name, labels in sb)


def test_request_ids_are_returned_and_put_in_error_details(client: TestClient) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "trace.42_A-b"})
    assert r.headers["x-request-id"] == "trace.42_A-b"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    for bad in ("has space", "a" * 129, "semi;colon", "a/b", ""):
        rid = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert rid != bad and len(rid) == 32

    r = client.post("/v1/predict?model=nope", files={"file": ("a.png", image_bytes(), PNG)})
    body = r.json()
    assert r.status_code == 404 and body["request_id"] == r.headers["x-request-id"]
    assert body["detail"] == "unknown model 'nope'; available: tiles, tiny"
    assert r.headers["content-length"] == str(len(r.content))

    r = client.post(
        "/v1/predict?format=bmp", files={"file": ("a.png", image_bytes(), PNG)}, headers={"X-Request-ID": "q1"}
    )
    assert r.status_code == 422 and r.json()["request_id"] == "q1"

    # The body limit answers before the app: its 413 carries the id too.
    big = b"x" * (client.app.state.unetseg.settings.max_upload_bytes + 128 * 1024)  # type: ignore[attr-defined]
    r = client.post("/v1/uploads", content=big, headers={"X-Request-ID": "big-1", "Content-Type": "image/png"})
    assert r.status_code == 413 and r.json()["request_id"] == "big-1" and isinstance(r.json()["detail"], str)

    # Successful bodies are left as they are.
    assert "request_id" not in client.get("/v1/models").json()


def access_records(caplog: pytest.LogCaptureFixture, request_id: str) -> list[logging.LogRecord]:
    return [
        rec
        for rec in caplog.records
        if rec.name == "unetseg.access" and getattr(rec, "unetseg", {}).get("request_id") == request_id
    ]


def test_one_access_record_per_request_with_the_timing_split(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="unetseg.access")
    data = image_bytes(40, 30)
    r = client.post("/v1/predict?format=json", files={"file": ("a.png", data, PNG)}, headers={"X-Request-ID": "log-1"})
    assert r.status_code == 200
    (rec,) = access_records(caplog, "log-1")
    fields = rec.unetseg  # type: ignore[attr-defined]
    assert fields["method"] == "POST" and fields["route"] == "/v1/predict" and fields["path"] == "/v1/predict"
    assert fields["model"] == "tiny" and fields["status"] == 200
    assert fields["request_bytes"] > len(data)  # the multipart body around the file
    assert fields["response_bytes"] == len(r.content)
    assert set(fields["timings_ms"]) == {"decode", "queue", "model", "post", "encode"}
    assert fields["timings_ms"] == r.json()["timings_ms"]
    assert fields["duration_ms"] >= sum(fields["timings_ms"].values()) * 0.99

    r = client.get("/v1/uploads/nope", headers={"X-Request-ID": "log-2"})
    (rec,) = access_records(caplog, "log-2")
    assert rec.unetseg["route"] == "/v1/uploads/{upload_id}" and rec.unetseg["status"] == 404  # type: ignore[attr-defined]
    assert rec.unetseg["model"] is None and rec.unetseg["timings_ms"] == {}  # type: ignore[attr-defined]

    # JSON: one object per line with the same fields.
    line = JsonFormatter().format(access_records(caplog, "log-1")[0])
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["level"] == "info" and parsed["logger"] == "unetseg.access"
    assert {k: parsed[k] for k in ("request_id", "route", "model", "status")} == {
        "request_id": "log-1",
        "route": "/v1/predict",
        "model": "tiny",
        "status": 200,
    }
    # Text: readable, with the same facts.
    text = TextFormatter().format(access_records(caplog, "log-1")[0])
    assert "POST /v1/predict 200 " in text and "id=log-1" in text and "route=/v1/predict" in text
    assert "model=tiny" in text and "split=decode:" in text


def test_formatters_render_plain_records_and_reject_unknown_formats() -> None:
    rec = logging.LogRecord("unetseg", logging.WARNING, __file__, 1, "default model %r is not loaded", ("x",), None)
    parsed = json.loads(make_formatter("json").format(rec))
    assert parsed["message"] == "default model 'x' is not loaded" and parsed["level"] == "warning"
    assert make_formatter("text").format(rec).endswith("WARNING unetseg: default model 'x' is not loaded")
    with pytest.raises(ValueError, match="unknown log format"):
        make_formatter("xml")


def test_record_text_names_every_field() -> None:
    rec = RequestRecord(
        "r1", "POST", "/v1/predict", "/v1/predict", 200, 0.0123, 10, 20, "1.2.3.4", "polyp", {"model": 0.01}
    )
    assert (
        rec.text()
        == "1.2.3.4 POST /v1/predict 200 12.3ms id=r1 route=/v1/predict model=polyp in=10B out=20B split=model:10.0ms"
    )
    # A decoded path may hold control characters: the text line stays one line.
    rec = RequestRecord("r2", "GET", "/a\nINFO forged\x1b", UNMATCHED_ROUTE, 404, 0.001, 0, 10)
    assert rec.text().startswith("- GET /a\\x0aINFO forged\\x1b 404 ") and "\n" not in rec.text()


def test_page_and_static_files_are_served_without_a_key(tmp_path: Path, weights_dir: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, weights_dir, api_key="k1"))) as c:
        wait_ready(c)
        assert c.get("/v1/models").status_code == 401
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        html = page.text
        for asset, kind in (("/static/app.js", "javascript"), ("/static/app.css", "text/css")):
            assert f'"{asset}"' in html
            r = c.get(asset)
            assert r.status_code == 200 and kind in r.headers["content-type"], asset
        assert c.get("/static/favicon.svg").status_code == 200
        assert c.get("/static/nope.js").status_code == 404
        assert c.get("/metrics").status_code == 200
        # Everything the page loads is its own: nothing from another host.
        assert "http://" not in html and "https://" not in html


def test_an_unhandled_error_is_a_500_with_the_request_id_logged_and_counted(
    tmp_path: Path, weights_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(tmp_path, weights_dir))

    def broken() -> None:
        raise RuntimeError("boom")

    app.add_api_route("/broken", broken, methods=["GET"])
    caplog.set_level(logging.INFO, logger="unetseg.access")
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/broken", headers={"X-Request-ID": "err-1"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "err-1"
        assert r.json() == {"detail": "internal server error", "request_id": "err-1"}
        (rec,) = access_records(caplog, "err-1")
        assert rec.unetseg["status"] == 500 and rec.unetseg["route"] == "/broken"  # type: ignore[attr-defined]
        samples = scrape(c)
        assert value(samples, "unetseg_requests_total", route="/broken", method="GET", model="", status="500") == 1
