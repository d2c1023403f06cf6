"""The page runs jobs in a real browser (Debian's Chromium): a slide shows its progress, areas, instance count
and result downloads; an image job draws its mask as a prediction does. Leaves ``artifacts/jobs-browser.png``."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from model.bundle import InstanceSpec
from tests.e2e.server import ROOT, running_server
from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.helpers import image_bytes, write_instance_bundle
from tests.slides import cells, write_slide

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (Debian: apt-get install chromium)"),
]
SCREENSHOT = ROOT / "artifacts" / "jobs-browser.png"


def test_page_runs_a_slide_job_and_an_image_job(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    weights = tmp_path / "weights"
    write_instance_bundle(
        weights / "cells", InstanceSpec("watershed", 1, 2, 4), name="cells", classes=3, sizing="tile", size=32
    )
    slide = tmp_path / "slide.tiff"
    write_slide(slide, cells(600, 520, seed=4))
    image = tmp_path / "cells.png"
    image.write_bytes(image_bytes(96, 72, seed=5))
    env = {"UNETSEG_WARMUP": "false", "UNETSEG_DEFAULT_MODEL": "cells", "UNETSEG_JOB_REGION_PX": "256"}
    with running_server(weights, tmp_path / "data", **env) as (base, _):
        problems: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1360, "height": 900}, accept_downloads=True)
                page.set_default_timeout(60_000)
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                page.goto(f"{base}/")
                expect(page.locator("#model")).to_be_enabled()
                page.locator("#as-job").check()
                page.locator("#file").set_input_files(str(slide))
                expect(page.locator("#job")).to_be_visible()
                expect(page.locator("#job")).to_have_attribute("data-state", "done", timeout=180_000)
                expect(page.locator("#job-results button")).to_have_count(5)
                job = httpx.get(f"{base}/v1/jobs").json()["items"][0]
                assert job["kind"] == "slide" and job["state"] == "done"
                expect(page.locator("#instance-count")).to_have_attribute("data-count", str(job["info"]["count"]))
                expect(page.locator("#job-state")).to_contain_text("9/9 regions")
                with page.expect_download() as download:
                    page.locator('#job-results button[data-format="csv"]').click()
                assert Path(download.value.path()).read_text().startswith("id,class_id,area")
                SCREENSHOT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)

                page.locator("#file").set_input_files(str(image))  # an image, as a job: drawn as predict draws it
                expect(page.locator("#viewer")).to_have_attribute("data-state", "done", timeout=60_000)
                expect(page.locator("#job-results button")).to_have_count(1)
                files = {"file": (image.name, image.read_bytes(), "image/png")}
                expected = httpx.post(f"{base}/v1/predict?format=json", files=files, timeout=60).json()
                expect(page.locator("#instance-count")).to_have_attribute("data-count", str(expected["count"]))
            finally:
                browser.close()
        assert problems == []
