"""Jobs through the API: images and generated slides in, predict's answers and pyramidal TIFFs, tables and
outlines out; limits, cancel and delete, two replicas sharing one store, metrics."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.procs.supervisor import Supervisor
from model.bundle import InstanceSpec, SlideSpec
from tests.backends import S3_ENV, new_bucket, postgres_database
from tests.conftest import make_settings, wait_ready
from tests.helpers import image_bytes, write_instance_bundle, write_tiny_bundle
from tests.slides import cells, slide_bytes, write_slide

TIFF = {"Content-Type": "image/tiff"}
PNG = {"Content-Type": "image/png"}


@pytest.fixture
def jobs_weights(tmp_path: Path) -> Path:
    root = tmp_path / "weights"
    write_tiny_bundle(root / "tiny", name="tiny")
    write_tiny_bundle(root / "tiles", seed=1, name="tiles", channels=1, classes=3, sizing="tile", size=32)
    spec = InstanceSpec("watershed", interior=1, boundary=2, min_area=4)
    write_instance_bundle(root / "cells", spec, name="cells", classes=3, sizing="tile", size=32)
    return root


def jobs_settings(tmp_path: Path, weights: Path, **kw: Any) -> Settings:
    return make_settings(tmp_path, weights, job_region_px=256, job_halo_px=32, **kw)


@pytest.fixture
def client(tmp_path: Path, jobs_weights: Path) -> Iterator[TestClient]:
    with TestClient(create_app(jobs_settings(tmp_path, jobs_weights))) as c:
        wait_ready(c)
        yield c


def wait_job(client: TestClient, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """Poll the job until it is done, failed or cancelled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not finished after {timeout}s: {client.get(f'/v1/jobs/{job_id}').json()}")


def start(client: TestClient, data: bytes, headers: dict[str, str] = TIFF, **params: Any) -> dict[str, Any]:
    r = client.post("/v1/jobs", content=data, headers=headers, params=params)
    assert r.status_code == 202, r.text
    body: dict[str, Any] = r.json()
    assert r.headers["location"] == f"/v1/jobs/{body['id']}"
    return body


def levels_of(data: bytes) -> list[np.ndarray]:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        return [level.asarray() for level in tif.series[0].levels]


@pytest.mark.parametrize("fmt", ["png", "json", "instances", "overlay"])
def test_an_image_job_answers_what_predict_answers(client: TestClient, fmt: str) -> None:
    img = image_bytes(70, 50)
    job = start(client, img, PNG, model="cells", format=fmt)
    assert job["kind"] == "image" and job["state"] in ("queued", "running", "done")
    done = wait_job(client, job["id"])
    assert done["state"] == "done", done
    assert done["progress"]["fraction"] == 1.0 and set(done["results"]) == {fmt}
    got = client.get(f"/v1/jobs/{job['id']}/result")
    want = client.post("/v1/predict", content=img, headers=PNG, params={"model": "cells", "format": fmt})
    assert got.status_code == 200 and got.headers["content-type"].startswith(want.headers["content-type"][:9])
    if fmt == "json":
        a, b = got.json(), want.json()
        a.pop("timings_ms"), b.pop("timings_ms")
        assert a == b
    else:
        assert np.array_equal(
            np.asarray(Image.open(io.BytesIO(got.content))), np.asarray(Image.open(io.BytesIO(want.content)))
        )


def test_a_slide_job_gives_pyramids_areas_a_table_and_outlines(client: TestClient, tmp_path: Path) -> None:
    image = cells(600, 520, seed=3)
    job = start(client, slide_bytes(image), model="cells")
    assert job["kind"] == "slide" and job["format"] == "slide"
    assert job["input"]["levels"][0] == {"width": 520, "height": 600, "mpp": None} and job["input"]["level"] == 0
    done = wait_job(client, job["id"])
    assert done["state"] == "done", done
    assert set(done["results"]) == {"tiff", "instances", "json", "csv", "geojson"}
    p = done["progress"]
    assert p["regions_done"] == p["regions_total"] == 9 and p["tiles_done"] == p["tiles_total"] > 0
    info = done["info"]
    assert info["regions"] == 9 and info["resumed_regions"] == 0 and info["width"] == 520
    folder = tmp_path / "data" / "jobs" / job["id"]
    deadline = time.monotonic() + 30
    while sorted(p.name for p in folder.iterdir()) != ["out"]:  # its input and regions are freed once it ends
        assert time.monotonic() < deadline, sorted(p.name for p in folder.iterdir())
        time.sleep(0.02)

    mask_levels = levels_of(client.get(f"/v1/jobs/{job['id']}/result").content)
    assert [m.shape for m in mask_levels] == [(600, 520), (300, 260), (150, 130)]
    mask = mask_levels[0]
    assert mask.dtype == np.uint8 and int(mask.max()) <= 2
    assert np.array_equal(mask_levels[1], mask[::2, ::2]) and np.array_equal(mask_levels[2], mask[::4, ::4])

    ids_levels = levels_of(client.get(f"/v1/jobs/{job['id']}/result?format=instances").content)
    ids = ids_levels[0]
    assert ids.dtype == np.uint32 and ids.shape == (600, 520)
    count = info["count"]
    assert count > 0 and int(ids.max()) == count and set(np.unique(ids)) == set(range(count + 1))
    assert not (ids > 0)[mask == 0].any()  # instances lie on the foreground (the smallest are dropped)

    areas = client.get(f"/v1/jobs/{job['id']}/result?format=json").json()
    assert [c["pixels"] for c in areas["classes"]] == np.bincount(mask.ravel(), minlength=3).tolist()
    assert areas["count"] == count and areas["model"] == "cells"

    table = list(csv.DictReader(io.StringIO(client.get(f"/v1/jobs/{job['id']}/result?format=csv").text)))
    assert len(table) == count
    area = np.bincount(ids.ravel())
    for row in table[:: max(1, count // 20)]:
        i = int(row["id"])
        ys, xs = np.nonzero(ids == i)
        assert int(row["area"]) == area[i] == len(ys)
        assert [int(row[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")] == [
            xs.min(),
            ys.min(),
            xs.max() - xs.min() + 1,
            ys.max() - ys.min() + 1,
        ]
        assert float(row["centroid_x"]) == round(xs.mean(), 2)

    r = client.get(f"/v1/jobs/{job['id']}/result?format=geojson")
    assert r.headers["content-type"].startswith("application/geo+json")
    outlines = r.json()
    assert outlines["type"] == "FeatureCollection" and len(outlines["features"]) == count
    f = outlines["features"][0]
    ring = np.array(f["geometry"]["coordinates"][0])
    row = table[f["properties"]["id"] - 1]
    assert ring[0].tolist() == ring[-1].tolist()
    assert int(row["bbox_x"]) - 1 <= ring[:, 0].min() and ring[:, 0].max() <= int(row["bbox_x"]) + int(row["bbox_w"])


def test_a_slide_job_segments_like_predict_on_the_whole_image(client: TestClient) -> None:
    gray = cells(540, 500, seed=5, channels=1)
    job = start(client, slide_bytes(gray), model="tiles", format="slide")
    done = wait_job(client, job["id"])
    assert done["state"] == "done", done
    assert "instances" not in done["results"] and set(done["results"]) == {"tiff", "json"}
    mask = levels_of(client.get(f"/v1/jobs/{job['id']}/result").content)[0]
    buf = io.BytesIO()
    Image.fromarray(gray[:, :, 0]).save(buf, format="PNG")
    whole = client.post("/v1/predict", content=buf.getvalue(), headers=PNG, params={"model": "tiles"})
    want = np.asarray(Image.open(io.BytesIO(whole.content)))
    # regions are tiled from their own corner, so the blend differs slightly near their borders
    assert (mask == want).mean() > 0.95


def test_a_slide_job_at_a_coarser_level(client: TestClient) -> None:
    job = start(client, slide_bytes(cells(600, 520)), model="cells", level=1)
    assert job["input"]["level"] == 1
    done = wait_job(client, job["id"])
    assert done["state"] == "done" and done["info"]["downsample"] == 2.0
    assert levels_of(client.get(f"/v1/jobs/{job['id']}/result").content)[0].shape == (300, 260)


def test_multipart_and_upload_id_bodies(client: TestClient) -> None:
    data = slide_bytes(cells(300, 300), levels=2)
    a = client.post("/v1/jobs?model=cells", files={"file": ("s.tiff", data, "image/tiff")})
    assert a.status_code == 202, a.text
    img = image_bytes(40, 30)
    uid = client.post("/v1/uploads", content=img, headers=PNG).json()["id"]
    b = client.post("/v1/jobs", data={"upload_id": uid})
    assert b.status_code == 202, b.text
    assert b.json()["input"]["sha256"] == uid and b.json()["kind"] == "image"
    assert wait_job(client, a.json()["id"])["state"] == "done"
    assert wait_job(client, b.json()["id"])["state"] == "done"
    assert client.post("/v1/jobs", data={"upload_id": "0" * 64}).status_code == 404


def test_limits_and_refusals(tmp_path: Path, jobs_weights: Path) -> None:
    settings = jobs_settings(tmp_path, jobs_weights, max_upload_bytes=50_000, max_job_bytes=600_000, max_pixels=100_000)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        big = slide_bytes(cells(600, 520))  # ~450 kB: over predict's limit, within the jobs'
        assert c.post("/v1/predict", content=big, headers=TIFF).status_code == 413
        assert c.post("/v1/jobs?model=cells", content=big, headers=TIFF).status_code == 202
        assert c.post("/v1/jobs", content=b"\0" * 700_000, headers=TIFF).status_code == 413  # Content-Length

        def chunked() -> Iterator[bytes]:
            for _ in range(20):
                yield b"\0" * 50_000

        assert c.post("/v1/jobs", content=chunked(), headers=TIFF).status_code == 413  # cut off as it streams in
        assert c.post("/v1/jobs", content=b"not an image", headers=PNG).status_code == 415
        assert c.post("/v1/jobs", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
        assert c.post("/v1/jobs", content=image_bytes(), headers=PNG, params={"format": "slide"}).status_code == 415
        assert c.post("/v1/jobs?model=nope", content=image_bytes(), headers=PNG).status_code == 404
        assert c.post("/v1/jobs?format=instances", content=image_bytes(), headers=PNG).status_code == 422
        too_many = c.post("/v1/jobs", content=image_bytes(400, 300), headers=PNG)  # 120000 pixels > 100000
        assert too_many.status_code == 413
        assert c.post("/v1/jobs", headers=PNG).status_code == 422
        # nothing is left of the refused bodies
        jobs_dir = tmp_path / "data" / "jobs"
        assert len(list(jobs_dir.iterdir())) == 1
    settings = jobs_settings(tmp_path, jobs_weights, max_job_pixels=100_000)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        r = c.post("/v1/jobs?model=cells", content=slide_bytes(cells(600, 520)), headers=TIFF)
        assert r.status_code == 413 and "coarser level" in r.json()["detail"]
        assert (
            c.post("/v1/jobs?model=cells&level=1", content=slide_bytes(cells(600, 520)), headers=TIFF).status_code
            == 202
        )


def test_the_body_is_on_disk_before_its_job_is_queued(
    tmp_path: Path, jobs_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(jobs_settings(tmp_path, jobs_weights, job_concurrency=0))
    events: list[str] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    with TestClient(app) as c:
        wait_ready(c)
        store = app.state.jobs.store
        create = store.create

        def creating(job: Any) -> Any:
            events.append(f"row {job.id}")
            return create(job)

        monkeypatch.setattr(os, "fsync", recording)
        monkeypatch.setattr(store, "create", creating)
        job = start(c, image_bytes(40, 30), PNG)
    folder = os.path.realpath(tmp_path / "data" / "jobs" / job["id"])
    before_row = events[: events.index(f"row {job['id']}")]
    assert f"{folder}/input" in before_row and folder in before_row


def test_cancel_a_queued_job_then_remove_it(tmp_path: Path, jobs_weights: Path) -> None:
    with TestClient(create_app(jobs_settings(tmp_path, jobs_weights, job_concurrency=0))) as c:
        wait_ready(c)
        job = start(c, slide_bytes(cells(300, 300)), model="cells")
        folder = tmp_path / "data" / "jobs" / job["id"]
        assert (folder / "input").is_file()
        assert c.get(f"/v1/jobs/{job['id']}/result").status_code == 409
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        assert not folder.exists()
        assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        assert c.get(f"/v1/jobs/{job['id']}/result").status_code == 409
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert c.get("/v1/jobs/..%2F..%2Fetc").status_code == 404


def test_a_job_that_ends_as_it_is_cancelled_keeps_its_results(
    tmp_path: Path, jobs_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELETE reads the job queued, but it has run and ended by the time it is cancelled: nothing is removed."""
    app = create_app(jobs_settings(tmp_path, jobs_weights, job_concurrency=0))
    with TestClient(app) as c:
        wait_ready(c)
        job = start(c, image_bytes(40, 30), PNG)
        store = app.state.jobs.store
        seen = store.get(job["id"])
        assert seen is not None and seen.state == "queued"
        store.claim("elsewhere:1:x", 30, 3)  # another replica runs it to the end
        result = tmp_path / "data" / "jobs" / job["id"] / "out" / "result.png"
        result.parent.mkdir()
        result.write_bytes(b"png")
        results = {"png": {"bytes": 3, "media_type": "image/png"}}
        assert store.finish(job["id"], "elsewhere:1:x", "done", results=results) is not None
        monkeypatch.setattr(store, "get", lambda job_id: seen)  # the read DELETE decides on, from before
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 200 and r.json()["state"] == "done"
        assert result.read_bytes() == b"png"
        monkeypatch.undo()
        assert c.get(f"/v1/jobs/{job['id']}/result").content == b"png"


def test_cancel_a_running_slide_job(client: TestClient, tmp_path: Path) -> None:
    job = start(client, slide_bytes(cells(2048, 1536), levels=2), model="cells")  # 48 regions
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job['id']}").json()["progress"]["regions_done"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    folder = tmp_path / "data" / "jobs" / job["id"]
    while folder.exists():  # its runner stops and removes its files
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"


@pytest.mark.parametrize("backend", ["sqlite+files", "postgres+s3"])
def test_two_replicas_share_the_jobs(
    tmp_path: Path, jobs_weights: Path, backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One replica takes the job (and runs none), the other runs it; both answer about it. With PostgreSQL and
    S3 the replicas share nothing else: each has its own data folder."""
    with contextlib.ExitStack() as stack:
        if backend == "postgres+s3":
            endpoint = request.getfixturevalue("s3_endpoint")
            for k, v in {**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint}.items():
                monkeypatch.setenv(k, v)
            urls = {
                "database_url": stack.enter_context(postgres_database()),
                "blob_url": f"s3://{new_bucket(endpoint)}/shared",
            }
            homes = [tmp_path / "a", tmp_path / "b"]
        else:
            urls, homes = {}, [tmp_path, tmp_path]
        front = create_app(jobs_settings(homes[0], jobs_weights, job_concurrency=0, **urls))
        worker = create_app(jobs_settings(homes[1], jobs_weights, **urls))
        a = stack.enter_context(TestClient(front))
        b = stack.enter_context(TestClient(worker))
        wait_ready(a)
        wait_ready(b)
        job = start(a, slide_bytes(cells(300, 280)), model="cells")
        done = wait_job(a, job["id"])
        assert done["state"] == "done" and done["attempts"] == 1
        assert b.get(f"/v1/jobs/{job['id']}").json() == done
        table = a.get(f"/v1/jobs/{job['id']}/result?format=csv").text
        assert table == b.get(f"/v1/jobs/{job['id']}/result?format=csv").text
        assert len(table.splitlines()) == done["info"]["count"] + 1
        ids = levels_of(a.get(f"/v1/jobs/{job['id']}/result?format=instances").content)[0]
        assert int(ids.max()) == done["info"]["count"]
        listing = a.get("/v1/jobs").json()
        assert listing["counts"]["done"] == 1 and listing["items"][0]["id"] == job["id"]
        assert listing["limits"]["max_job_bytes"] == 4 * 1024**3
        assert a.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert b.get(f"/v1/jobs/{job['id']}").status_code == 404


def test_a_replica_that_takes_a_job_on_s3_keeps_no_copy_of_its_input(
    tmp_path: Path, jobs_weights: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in {**S3_ENV, "AWS_ENDPOINT_URL_S3": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    urls = {"blob_url": f"s3://{new_bucket(s3_endpoint)}/shared"}
    with TestClient(create_app(jobs_settings(tmp_path, jobs_weights, job_concurrency=0, **urls))) as c:
        wait_ready(c)
        job = start(c, slide_bytes(cells(300, 280)), model="cells")
        assert not (tmp_path / "data" / "jobs-cache" / job["id"]).exists()
    with TestClient(create_app(jobs_settings(tmp_path, jobs_weights, **urls))) as c:  # a runner fetches it
        wait_ready(c)
        assert wait_job(c, job["id"])["state"] == "done"


def test_metrics_count_jobs(client: TestClient) -> None:
    job = start(client, slide_bytes(cells(300, 300)), model="cells")
    assert wait_job(client, job["id"])["state"] == "done"
    text = client.get("/metrics").text
    assert 'unetseg_jobs{state="done"} 1.0' in text
    assert 'unetseg_jobs_finished_total{kind="slide",state="done"} 1.0' in text
    assert 'unetseg_job_tiles_total{model="cells"}' in text
    assert "unetseg_job_duration_seconds_bucket" in text


def test_a_failed_job_says_why(client: TestClient) -> None:
    broken = bytearray(slide_bytes(cells(300, 300), levels=1))
    broken[-5000:] = b"\0" * 5000  # the last tiles' data gone
    job = start(client, bytes(broken), model="cells", format="slide")
    done = wait_job(client, job["id"])
    if done["state"] == "failed":
        assert done["error"]
        assert client.get(f"/v1/jobs/{job['id']}/result").status_code == 409
    else:  # zeroed compressed tiles can decode as empty: still a complete job
        assert done["state"] == "done"
    assert json.dumps(done)


def damaged_tiffs(count: int) -> list[bytes]:
    """A truncated header, and a small pyramid with a few bytes of its IFDs (and the header) overwritten at
    random (a fixed seed)."""
    good = slide_bytes(cells(192, 128), levels=2)
    with tifffile.TiffFile(io.BytesIO(good)) as tif:
        ifds = [0, tif.pages.first.offset] + [level.keyframe.offset for level in tif.series[0].levels]
    rng = np.random.default_rng(7)
    bodies = [b"II*\x00", b"MM\x00+\x00\x08\x00\x00"]
    for _ in range(count):
        broken = bytearray(good)
        for _ in range(3):
            broken[int(rng.choice(ifds)) + int(rng.integers(0, 300))] = int(rng.integers(0, 256))
        bodies.append(bytes(broken))
    return bodies


def test_a_damaged_tiff_is_refused_never_a_server_error(tmp_path: Path, jobs_weights: Path) -> None:
    with TestClient(create_app(jobs_settings(tmp_path, jobs_weights, job_concurrency=0, max_jobs=1000))) as c:
        wait_ready(c)
        answers: list[int] = []
        for body in damaged_tiffs(60):
            for fmt in ("auto", "png"):
                r = c.post("/v1/jobs", content=body, headers=TIFF, params={"model": "cells", "format": fmt})
                assert r.status_code in (202, 413, 415), r.text  # a damaged tile is found when the job runs
                answers.append(r.status_code)
        assert answers[:4] == [415] * 4 and answers.count(415) > 20


def test_the_card_names_the_level_by_microns_per_pixel(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    spec = InstanceSpec("watershed", interior=1, boundary=2, min_area=4)
    write_instance_bundle(
        weights / "cells", spec, name="cells", classes=3, sizing="tile", size=32, slide=SlideSpec(mpp=1.0, level=2)
    )
    card = json.loads((weights / "cells" / "card.json").read_text())
    assert card["slide"] == {"mpp": 1.0, "level": 2}
    with TestClient(create_app(jobs_settings(tmp_path, weights, default_model="cells"))) as c:
        wait_ready(c)
        buf = io.BytesIO()
        write_slide(buf, cells(600, 520), resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
        job = start(c, buf.getvalue())  # 0.5, 1 and 2 um per pixel: the card's 1.0 is level 1
        assert job["input"]["level"] == 1 and job["input"]["levels"][1]["mpp"] == 1.0
        assert start(c, slide_bytes(cells(600, 520)))["input"]["level"] == 2  # no resolution: the card's level
        assert start(c, slide_bytes(cells(600, 520)), level=0)["input"]["level"] == 0  # the request's
        done = wait_job(c, job["id"])
        assert done["state"] == "done" and done["info"]["mpp"] == 1.0 and done["info"]["width"] == 260


def test_a_front_end_of_serve_workers_opens_the_jobs(tmp_path: Path) -> None:
    """A front end (its models in an engine process, here one that never answers) opens the jobs at start-up:
    its job routes answer from the store, ready or not."""
    app = create_app(Settings(data_dir=tmp_path / "data", engine_socket=str(tmp_path / "engine.sock")))
    with TestClient(app) as c:
        assert app.state.jobs.runner is not None
        listing = c.get("/v1/jobs")
        assert listing.status_code == 200 and listing.json()["items"] == []
        assert c.get(f"/v1/jobs/{'0' * 32}").status_code == 404


@pytest.mark.parametrize(("concurrency", "want"), [(2, ["2", "0", "0"]), (0, ["0", "0", "0"])])
def test_only_the_first_front_end_runs_jobs(tmp_path: Path, concurrency: int, want: list[str]) -> None:
    supervisor = Supervisor(Settings(data_dir=tmp_path / "data", job_concurrency=concurrency), 3, 1.0)
    try:
        assert [supervisor.front_env_of(i)["UNETSEG_JOB_CONCURRENCY"] for i in range(3)] == want
    finally:
        shutil.rmtree(supervisor.rundir)
