"""``unetseg segment SLIDE DST``: a slide job in-process, with the service's outputs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from app.segment import main
from model.bundle import InstanceSpec
from tests.helpers import write_instance_bundle
from tests.slides import cells, write_slide


def test_segment_a_slide_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, _ = write_instance_bundle(
        tmp_path / "cells", InstanceSpec("watershed", 1, 2, 4), name="cells", classes=3, sizing="tile", size=32
    )
    monkeypatch.setenv("UNETSEG_JOB_REGION_PX", "256")
    monkeypatch.setenv("UNETSEG_JOB_HALO_PX", "32")
    monkeypatch.setenv("UNETSEG_DEVICE", "cpu")
    slide = tmp_path / "case 1.ome.tiff"
    write_slide(slide, cells(400, 520, seed=2))
    dst = tmp_path / "out"
    assert main([str(slide), str(dst), "--model", str(bundle)]) == 0
    names = sorted(p.name for p in dst.iterdir())
    assert names == [f"case 1{s}" for s in (".csv", ".geojson", ".instances.tiff", ".json", ".mask.tiff")]
    info = json.loads((dst / "case 1.json").read_text())
    assert info["width"] == 520 and info["count"] > 0
    with tifffile.TiffFile(dst / "case 1.instances.tiff") as tif:
        ids = tif.series[0].levels[0].asarray()
        assert [lv.shape for lv in tif.series[0].levels] == [(400, 520), (200, 260), (100, 130)]
    rows = list(csv.DictReader(io.StringIO((dst / "case 1.csv").read_text())))
    assert len(rows) == info["count"] == int(ids.max())
    assert [int(r["area"]) for r in rows] == np.bincount(ids.ravel())[1:].tolist()
    assert "instances" in capsys.readouterr().out


def test_a_broken_slide_is_an_error(tmp_path: Path) -> None:
    bundle, _ = write_instance_bundle(
        tmp_path / "cells", InstanceSpec("watershed", 1, 2, 4), name="cells", classes=3, sizing="tile", size=32
    )
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    assert main([str(bad), str(tmp_path / "out"), "--model", str(bundle)]) == 1
