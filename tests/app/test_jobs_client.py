"""``unetseg predict --url`` sends images over predict's limits as jobs: the same mask file for an image, the
slide's pyramid, table and outlines for a TIFF over the pixel limit."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import numpy as np
import tifffile
from PIL import Image

from app.client import predict_remote
from app.main import create_app
from model.bundle import InstanceSpec
from tests.app.asgi import serving
from tests.conftest import make_settings
from tests.helpers import image_bytes, write_instance_bundle
from tests.slides import cells, write_slide


def test_images_over_the_predict_limits_go_as_jobs(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    write_instance_bundle(
        weights / "cells", InstanceSpec("watershed", 1, 2, 4), name="cells", classes=3, sizing="tile", size=32
    )
    settings = make_settings(
        tmp_path,
        weights,
        default_model="cells",
        max_upload_bytes=20_000,
        max_pixels=60_000,
        job_region_px=256,
        job_halo_px=32,
    )
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    small.write_bytes(image_bytes(40, 30))
    big.write_bytes(image_bytes(200, 150))  # ~90 kB: over the byte limit, within the pixel limit
    slide = tmp_path / "slide.tif"
    write_slide(slide, cells(300, 280))  # 84000 pixels: over the pixel limit
    out = tmp_path / "out"

    async def run() -> tuple[int, dict[str, int]]:
        app = create_app(settings)
        async with serving(app) as http:
            transport = httpx.ASGITransport(app=app)
            status = await predict_remote([small, big, slide], "http://testserver", out, transport=transport)
            counts = (await http.get("/v1/jobs")).json()["counts"]
            return status, counts

    status, counts = asyncio.run(run())
    assert status == 0 and counts["done"] == 2  # the small image went to /v1/predict
    with Image.open(out / "small.png") as a, Image.open(out / "big.png") as b:
        assert a.size == (40, 30) and b.size == (200, 150)
        assert np.asarray(b).max() <= 2
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["small.png", "big.png", "slide.mask.tiff", "slide.instances.tiff", "slide.csv", "slide.geojson", "slide.json"]
    )
    with tifffile.TiffFile(io.BytesIO((out / "slide.mask.tiff").read_bytes())) as tif:
        assert tif.series[0].levels[0].shape == (300, 280)
