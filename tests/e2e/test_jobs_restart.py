"""A slide job through the real server: kill -9 it mid-job, start it again on the same data folder, and the job
resumes from the regions it had saved and ends with the same results an uninterrupted run gives."""

from __future__ import annotations

import csv
import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile

from model.bundle import InstanceSpec
from tests.e2e.server import running_server
from tests.helpers import write_instance_bundle
from tests.slides import cells, slide_bytes

pytestmark = pytest.mark.e2e

ENV = {"UNETSEG_JOB_REGION_PX": "256", "UNETSEG_JOB_HALO_PX": "32", "UNETSEG_DEFAULT_MODEL": "cells"}


def wait(base: str, job_id: str, until: str = "finished", timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        if until == "regions" and job["progress"]["regions_done"] >= 3:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not {until} after {timeout}s")


def results(base: str, job_id: str) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    def tiff(fmt: str) -> np.ndarray:
        data = httpx.get(f"{base}/v1/jobs/{job_id}/result", params={"format": fmt}, timeout=30).content
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return tif.series[0].levels[0].asarray()

    table = httpx.get(f"{base}/v1/jobs/{job_id}/result", params={"format": "csv"}, timeout=30).text
    return tiff("tiff"), tiff("instances"), list(csv.DictReader(io.StringIO(table)))


def test_a_slide_job_killed_mid_way_resumes_after_a_restart(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    write_instance_bundle(
        weights / "cells", InstanceSpec("watershed", 1, 2, 4), name="cells", classes=3, sizing="tile", size=32
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    slide = slide_bytes(cells(1024, 1024, seed=7), levels=2)  # 16 regions
    headers = {"Content-Type": "image/tiff"}
    with running_server(weights, data_dir, **ENV) as (base, proc):
        r = httpx.post(f"{base}/v1/jobs", content=slide, headers=headers, timeout=60)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        seen = wait(base, job_id, until="regions")
        os.kill(proc.pid, signal.SIGKILL)  # the server this test started, and nothing else
        assert proc.wait(30) == -signal.SIGKILL
    assert seen["state"] == "running", "the job ended before the kill: make the slide larger"
    saved = len(list((data_dir / "jobs" / job_id / "regions").glob("*.npz")))
    assert 3 <= saved < 16

    with running_server(weights, data_dir, **ENV) as (base, _):
        job = wait(base, job_id)
        assert job["state"] == "done", job
        assert job["attempts"] == 2 and job["info"]["resumed_regions"] >= saved
        assert not list((data_dir / "jobs" / job_id).rglob(".*.part"))
        mask, ids, table = results(base, job_id)
        # the same slide again, uninterrupted, on the same server
        again = httpx.post(f"{base}/v1/jobs", content=slide, headers=headers, timeout=60).json()["id"]
        assert wait(base, again)["state"] == "done"
        mask2, _, table2 = results(base, again)
    assert (mask == mask2).mean() > 0.999
    assert abs(len(table) - len(table2)) <= max(2, len(table2) // 100)
    assert int(ids.max()) == len(table) == job["info"]["count"]
