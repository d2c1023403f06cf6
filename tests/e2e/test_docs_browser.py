"""The docs page at ``/docs`` in a real browser with no internet: Swagger UI loads from the service, its
"Authorize" offers both API key schemes, and "Try it out" uploads an image and segments one.

The screenshot it leaves in ``artifacts/docs.png`` shows the page after the prediction.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.server import ROOT, running_server
from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.helpers import image_bytes

SCREENSHOT = ROOT / "artifacts" / "docs.png"
API_KEY = "docs-test-key"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (Debian: apt-get install chromium)"),
]


def test_swagger_ui_tries_out_upload_and_predict_offline(weights_dir: Path, tmp_path: Path) -> None:
    from playwright.sync_api import Page, Route, expect, sync_playwright

    image = tmp_path / "frame.png"
    image.write_bytes(image_bytes(64, 48, seed=5))
    env = {"UNETSEG_API_KEY": API_KEY, "UNETSEG_DEFAULT_MODEL": "tiny", "UNETSEG_WARMUP": "false"}
    with running_server(weights_dir, tmp_path / "data", **env) as (base, _):
        elsewhere: list[str] = []
        problems: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                context = browser.new_context(viewport={"width": 1360, "height": 1000})

                def offline(route: Route) -> None:
                    """No internet: whatever is not the service is refused (and counted)."""
                    if route.request.url.startswith(base + "/"):
                        route.continue_()
                    else:
                        elsewhere.append(route.request.url)
                        route.abort()

                context.route("**/*", offline)
                page = context.new_page()
                page.set_default_timeout(30_000)
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                page.goto(f"{base}/docs")
                expect(page.locator(".swagger-ui .info .title")).to_contain_text("unetseg")

                # Both key schemes under "Authorize"; the key goes in as X-API-Key.
                page.locator(".auth-wrapper button.authorize").click()
                dialog = page.locator(".dialog-ux .modal-ux")
                expect(dialog).to_contain_text("HTTPBearer")
                expect(dialog).to_contain_text("APIKeyHeader")
                scheme = dialog.locator(".auth-container").filter(has_text="APIKeyHeader")
                scheme.locator("input").fill(API_KEY)
                scheme.locator("button.authorize").click()
                scheme.locator("button.btn-done").click()

                def try_out(operation: str, status: str) -> Page:
                    block = page.locator(f"#operations-{operation}")
                    block.locator(".opblock-summary").first.click()
                    block.locator("button.try-out__btn").click()
                    block.locator("input[type=file]").set_input_files(str(image))
                    block.locator("button.execute").click()
                    code = block.locator(".live-responses-table .response .response-col_status").first
                    expect(code).to_have_text(status)
                    return page

                try_out("uploads-create_upload", "201")
                uploaded = page.locator("#operations-uploads-create_upload .live-responses-table .microlight").first
                expect(uploaded).to_contain_text('"width": 64')

                # The form also has an empty upload_id field: it counts as absent.
                try_out("predict-predict", "200")
                shown = page.locator("#operations-predict-predict .live-responses-table img").first
                expect(shown).to_be_visible()
                size = shown.evaluate("img => [img.naturalWidth, img.naturalHeight]")
                assert size == [64, 48]

                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
            finally:
                browser.close()
        assert elsewhere == [] and problems == []


def test_redoc_renders_offline_and_asks_nothing_of_anywhere_else(weights_dir: Path, tmp_path: Path) -> None:
    """ReDoc's sidebar shows a logo from cdn.redoc.ly; the page's policy keeps the browser from asking (the
    request is refused inside the browser, "csp", and never sent)."""
    from playwright.sync_api import ConsoleMessage, Request, expect, sync_playwright

    with running_server(weights_dir, tmp_path / "data", UNETSEG_WARMUP="false", UNETSEG_DEFAULT_MODEL="tiny") as (
        base,
        _,
    ):
        asked: list[str] = []
        kept_in: list[str] = []  # refused by the page's policy before it left the browser
        problems: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                page.set_default_timeout(30_000)

                def request(req: Request) -> None:
                    if not req.url.startswith((base + "/", "data:", "blob:")):
                        asked.append(req.url)

                def console(msg: ConsoleMessage) -> None:
                    # The logo's refusal is the policy at work; anything else refused would break the page.
                    if msg.type == "error" and "cdn.redoc.ly" not in msg.text:
                        problems.append(msg.text)

                page.on("request", request)
                page.on("requestfailed", lambda req: kept_in.append(req.url) if req.failure == "csp" else None)
                page.on("console", console)
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                page.goto(f"{base}/redoc")
                expect(page.locator("h1").first).to_contain_text("unetseg")
                expect(page.locator("text=Segment an image").first).to_be_attached()
                page.wait_for_load_state("networkidle")
            finally:
                browser.close()
        assert [url for url in asked if url not in kept_in] == [] and problems == []
