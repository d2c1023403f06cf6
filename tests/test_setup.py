"""`make setup` installs what running the service needs; `make test` (and CI) what the tests need too."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def planned(target: str, venv: Path) -> str:
    """The commands `make TARGET` would run in a clean clone (a virtual environment not made yet)."""
    done = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def test_setup_installs_the_service_only(tmp_path: Path) -> None:
    commands = planned("setup", tmp_path / "venv")
    assert "pip install -q -e '.'" in commands
    assert "dev" not in commands and "ray" not in commands


def test_test_installs_the_test_tooling_first_from_a_clean_clone(tmp_path: Path) -> None:
    commands = planned("test", tmp_path / "venv").splitlines()
    install = next(i for i, c in enumerate(commands) if "pip install -q -e '.[dev,ray]'" in c)
    assert install < next(i for i, c in enumerate(commands) if "ruff check" in c)
    assert install < next(i for i, c in enumerate(commands) if "-m pytest" in c)


def test_ci_installs_everything_the_tests_need() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make setup-dev\nmake test\n" in ci
