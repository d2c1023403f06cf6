"""The page at ``/`` in a real browser: Debian's Chromium, driven by Playwright, against the real server.

The screenshot it leaves in ``artifacts/browser.png`` shows the page as a person sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from model.bundle import InstanceSpec, discover
from tests.e2e.server import ROOT, running_server
from tests.helpers import DATASETS, image_bytes, write_instance_bundle

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DATASET_IMAGES = DATASETS / "kvasir_seg" / "images"
SCREENSHOT = ROOT / "artifacts" / "browser.png"
API_KEY = "browser-test-key"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (Debian: apt-get install chromium)"),
]


def pick_image(tmp_path: Path) -> Path:
    """A real colonoscopy frame when the datasets folder is there, else a generated image."""
    if DATASET_IMAGES.is_dir():
        files = sorted(p for p in DATASET_IMAGES.iterdir() if p.is_file())
        if files:
            return files[0]
    path = tmp_path / "generated.png"
    path.write_bytes(image_bytes(320, 240, seed=3))
    return path


def served_weights(fixture_weights: Path) -> tuple[Path, dict[str, str]]:
    """The shipped bundles when the repository has them (what a person sees), else the tiny test bundles."""
    shipped = ROOT / "weights"
    if any(discover(shipped)):
        return shipped, {}
    return fixture_weights, {"UNETSEG_DEFAULT_MODEL": "tiny"}


def test_page_segments_an_image_in_a_real_browser(weights_dir: Path, tmp_path: Path) -> None:
    from playwright.sync_api import ConsoleMessage, expect, sync_playwright

    image = pick_image(tmp_path)
    weights, env = served_weights(weights_dir)
    env |= {"UNETSEG_API_KEY": API_KEY, "UNETSEG_WARMUP": "false", "UNETSEG_MAX_BATCH": "2"}
    with running_server(weights, tmp_path / "data", **env) as (base, _):
        with httpx.Client(base_url=base, timeout=60, headers={"X-API-Key": API_KEY}) as http:
            model = http.get("/v1/models").json()["default_model"]
            files = {"file": (image.name, image.read_bytes(), "application/octet-stream")}
            expected: dict[str, Any] = http.post(f"/v1/predict?format=json&model={model}", files=files).json()
            unauthorized = httpx.get(f"{base}/v1/models").json()["detail"]

        problems: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
                page = context.new_page()
                page.set_default_timeout(30_000)

                def on_console(msg: ConsoleMessage) -> None:
                    # The 401 before the key is entered is expected; anything else is a fault of the page.
                    if msg.type == "error" and "401" not in msg.text:
                        problems.append(msg.text)

                page.on("console", on_console)
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                page.goto(f"{base}/")

                # The service wants a key: the page shows the API's own words, then takes the key.
                expect(page.locator("#error")).to_be_visible()
                expect(page.locator("#error-detail")).to_have_text(unauthorized)
                expect(page.locator("#error-status")).to_have_text("401")
                page.locator("#api-key").fill(API_KEY)
                page.locator("#api-key").press("Enter")
                expect(page.locator("#model")).to_be_enabled()
                expect(page.locator("#error")).to_be_hidden()
                expect(page.locator("#model")).to_have_value(model)
                expect(page.locator("#model-classes li")).to_have_count(len(expected["classes"]))

                page.locator("#file").set_input_files(str(image))
                expect(page.locator("#viewer")).to_have_attribute("data-state", "done")

                # The areas shown are the API's for the same image.
                rows = page.locator("#areas tbody tr")
                expect(rows).to_have_count(len(expected["classes"]))
                for i, cls in enumerate(expected["classes"]):
                    row = rows.nth(i)
                    assert row.get_attribute("data-class-id") == str(cls["id"])
                    assert row.locator("td").first.inner_text().strip() == cls["name"]
                    assert row.locator(".pixels").inner_text().replace(",", "") == str(cls["pixels"])
                    share = float(row.locator(".share").inner_text().rstrip("%"))
                    assert abs(share - cls["fraction"] * 100) <= 0.005 + 1e-9, (share, cls["fraction"])

                # The overlay: the mask layer has the image's size and paints exactly the non-background pixels.
                drawn = page.evaluate(
                    """() => {
                        const c = document.getElementById("mask-layer");
                        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                        let n = 0;
                        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
                        const img = document.getElementById("image-layer");
                        return {w: c.width, h: c.height, painted: n, iw: img.width, ih: img.height};
                    }"""
                )
                assert (drawn["w"], drawn["h"]) == (expected["width"], expected["height"])
                assert (drawn["iw"], drawn["ih"]) == (expected["width"], expected["height"])
                assert drawn["painted"] == sum(c["pixels"] for c in expected["classes"] if c["id"] != 0)
                assert page.locator("#timing-total").inner_text().endswith(" ms")
                expect(page.locator("#timing-split dt")).to_have_text(list(expected["timings_ms"]))

                # The opacity slider works from the keyboard.
                page.locator("#opacity").focus()
                page.keyboard.press("ArrowRight")
                expect(page.locator("#opacity-value")).to_have_text("55%")
                assert page.locator("#mask-layer").evaluate("c => c.style.opacity") == "0.55"

                # The download is the service's palette PNG mask.
                with page.expect_download() as info:
                    page.locator("#download").click()
                saved = tmp_path / "downloaded.png"
                info.value.save_as(saved)
                with Image.open(saved) as mask:
                    assert mask.mode == "P" and mask.size == (expected["width"], expected["height"])

                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
            finally:
                browser.close()
        assert problems == []
    with Image.open(SCREENSHOT) as shot:
        assert shot.size[0] == 1360


def test_page_counts_and_outlines_instances_in_a_real_browser(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    weights = tmp_path / "weights"
    write_instance_bundle(weights / "cells", InstanceSpec("watershed", 1, 2), name="cells", classes=3)
    image = tmp_path / "cells.png"
    image.write_bytes(image_bytes(96, 72, seed=5))
    with running_server(weights, tmp_path / "data", UNETSEG_WARMUP="false", UNETSEG_DEFAULT_MODEL="cells") as (base, _):
        files = {"file": (image.name, image.read_bytes(), "application/octet-stream")}
        expected: dict[str, Any] = httpx.post(f"{base}/v1/predict?format=json", files=files, timeout=60).json()
        assert expected["count"] >= 1
        problems: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1360, "height": 900})
                page.set_default_timeout(30_000)
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                page.goto(f"{base}/")
                expect(page.locator("#model")).to_be_enabled()
                expect(page.locator("#model-meta")).to_contain_text("separates instances (watershed)")
                page.locator("#file").set_input_files(str(image))
                expect(page.locator("#viewer")).to_have_attribute("data-state", "done")
                expect(page.locator("#instance-count")).to_be_visible()
                assert page.locator("#instance-count").get_attribute("data-count") == str(expected["count"])
                drawn = page.evaluate(
                    """() => {
                        const c = document.getElementById("mask-layer");
                        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                        let painted = 0, outline = 0;
                        for (let i = 0; i < d.length; i += 4) {
                            if (d[i + 3] > 0) painted++;
                            if (d[i + 3] > 0 && d[i] === 255 && d[i + 1] === 255 && d[i + 2] === 255) outline++;
                        }
                        return {painted, outline};
                    }"""
                )
                # Outlines recolour instance pixels only: the painted pixels are still the foreground.
                assert drawn["painted"] == sum(c["pixels"] for c in expected["classes"] if c["id"] != 0)
                assert 0 < drawn["outline"] <= drawn["painted"]
            finally:
                browser.close()
        assert problems == []


def test_page_clears_the_last_result_after_an_error_and_shows_small_sizes_in_bytes(
    weights_dir: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    good = tmp_path / "good.png"
    good.write_bytes(image_bytes(64, 48, seed=4))
    bad = tmp_path / "five.png"
    bad.write_bytes(b"hello")  # 5 bytes, not an image: a 415
    with (
        running_server(weights_dir, tmp_path / "data", UNETSEG_WARMUP="false", UNETSEG_DEFAULT_MODEL="tiny") as (
            base,
            _,
        ),
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(f"{base}/")
            expect(page.locator("#model")).to_be_enabled()
            page.locator("#file").set_input_files(str(good))
            expect(page.locator("#viewer")).to_have_attribute("data-state", "done")
            expect(page.locator("#download")).to_be_enabled()
            page.locator("#file").set_input_files(str(bad))
            expect(page.locator("#viewer")).to_have_attribute("data-state", "error")
            expect(page.locator("#error-status")).to_have_text("415")
            expect(page.locator("#file-name")).to_have_text("five.png · 5 bytes")
            shown = page.evaluate(
                """() => ["image-layer", "mask-layer"].map((id) => {
                        const c = document.getElementById(id);
                        return [c.width, c.height];
                    })"""
            )
            assert shown == [[0, 0], [0, 0]]  # not good.png's image and mask under five.png's name
            expect(page.locator("#caption")).to_have_text("")
            expect(page.locator("#download")).to_be_disabled()
            expect(page.locator("#areas tbody tr")).to_have_count(0)
        finally:
            browser.close()
