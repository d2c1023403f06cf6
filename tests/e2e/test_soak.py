"""Soak: a few hundred mixed requests at bounded concurrency against the real server on 127.0.0.1. None may
fail, and the server's resident memory after the soak stays within 10% of what it was after a warm-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.load import KINDS, make_images, rss_kib, run_load
from tests.e2e.server import running_server

pytestmark = pytest.mark.e2e

REQUESTS = 300
CONCURRENCY = 8
CAP_S = 180  # a bound on the run, far above what it takes


def test_soak_no_failures_and_flat_memory(weights_dir: Path, tmp_path: Path) -> None:
    with running_server(weights_dir, tmp_path / "data", UNETSEG_DEFAULT_MODEL="tiny") as (base, proc):
        assert base.startswith("http://127.0.0.1:")
        images = make_images(8, 160, 120)
        mix, models = list(KINDS), ["tiny", "tiles"]
        warm = run_load(base, 120, CONCURRENCY, CAP_S, mix, models, images)
        assert warm.requests == 120 and not warm.errors, warm.summary()
        before = rss_kib(proc.pid)
        soak = run_load(base, REQUESTS, CONCURRENCY, CAP_S, mix, models, images)
        after = rss_kib(proc.pid)
        summary = soak.summary()
        assert soak.requests == REQUESTS and not soak.errors, summary
        assert set(soak.by_kind) == set(KINDS)
        assert abs(after / before - 1) <= 0.10, f"VmRSS {before} KiB after warm-up, {after} KiB after the soak"
