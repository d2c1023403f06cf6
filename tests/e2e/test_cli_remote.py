"""``unetseg predict --url`` against the real server writes the files the local mode writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.server import ROOT, running_server
from tests.helpers import image_bytes

pytestmark = pytest.mark.e2e
API_KEY = "remote-cli-key"


def unetseg(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_predict_on_a_service_writes_what_the_local_mode_writes(weights_dir: Path, tmp_path: Path) -> None:
    images = []
    for i, (w, h, kind) in enumerate([(40, 30, "PNG"), (61, 47, "JPEG"), (96, 80, "WEBP")]):
        path = tmp_path / "in" / f"frame{i}.{kind.lower()}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(image_bytes(w, h, fmt=kind, seed=i))
        images.append(path)
    formats = ("png", "overlay")
    local = {}
    for fmt in formats:
        args = ["--model", "tiles", "--format", fmt, "--weights-dir", weights_dir, "--device", "cpu"]
        local[fmt] = unetseg("predict", *images, *args, "--out", tmp_path / "local" / fmt)
        assert local[fmt].returncode == 0, local[fmt].stderr
    with running_server(weights_dir, tmp_path / "data", UNETSEG_API_KEY=API_KEY) as (base, _):
        for fmt in formats:
            remote = unetseg(
                "predict",
                *images,
                *["--model", "tiles", "--format", fmt, "--url", base, "--api-key", API_KEY, "--concurrency", "2"],
                *["--out", tmp_path / "remote" / fmt],
            )
            assert remote.returncode == 0, remote.stderr
            a, b = tmp_path / "local" / fmt, tmp_path / "remote" / fmt
            written = sorted(p.name for p in b.iterdir())
            assert written == sorted(p.name for p in a.iterdir()) == ["frame0.png", "frame1.png", "frame2.png"]
            for name in written:
                assert (b / name).read_bytes() == (a / name).read_bytes(), (fmt, name)
            if fmt == "png":  # the same line per image, areas included
                said = remote.stdout.replace("/remote/", "/local/").splitlines()
                assert sorted(said) == sorted(local[fmt].stdout.splitlines())
