"""The README is the front door and docs/ holds the rest: the settings table, the commands and the links
between the pages must stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SETTINGS_PAGE = (ROOT / "docs" / "api.md").read_text()


def _prose(text: str) -> str:
    """The text without its fenced code blocks (whose `#` lines are comments, not headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", _prose(page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_setting_is_in_the_settings_table_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `UNETSEG_(\w+)` \| (.+?) \|", SETTINGS_PAGE, re.M))
    assert set(rows) == {name.upper() for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = rows[name.upper()]
        if isinstance(default, list):
            assert shown == "(none)", name
        else:
            assert shown.strip("`").lower() == str(default).lower(), name


def test_the_readme_links_the_settings_table() -> None:
    assert "(docs/api.md#settings)" in README


def test_the_docs_name_make_targets_that_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    named = 0
    for page in PAGES:
        text = page.read_text()
        for cmd in re.findall(r"^make ([a-z -]+)$", text, re.M) + re.findall(r"`make ([a-z -]+)`", text):
            for target in cmd.split():
                named += 1
                assert target in targets, f"{page.name}: make {target}"
    assert named >= 3  # setup, serve, test at least


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_names_a_file_and_heading_that_exist(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor:
            assert anchor in _anchors(linked), f"{page.name}: {target}"
