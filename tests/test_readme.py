"""The README is the front door: its settings table and commands must stay true."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Settings tables may also live in the pages under docs/ (docs/jobs.md has the jobs' settings).
DOCS = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))


def test_every_setting_is_in_the_readme_table_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `UNETSEG_(\w+)` \| (.+?) \|", README + "\n" + DOCS, re.M))
    assert set(rows) == {name.upper() for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = rows[name.upper()]
        if isinstance(default, list):
            assert shown == "(none)", name
        else:
            assert shown.strip("`").lower() == str(default).lower(), name


def test_the_readme_names_make_targets_that_exist() -> None:
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z]+):", makefile, re.M))
    for cmd in re.findall(r"^make ([a-z ]+)$", README, re.M):
        for target in cmd.split():
            assert target in targets, target
