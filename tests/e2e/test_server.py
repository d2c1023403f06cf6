from __future__ import annotations

import io
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.server import running_server
from tests.helpers import image_bytes

pytestmark = pytest.mark.e2e


def test_real_server_uploads_and_predicts_over_http(weights_dir: Path, tmp_path: Path) -> None:
    with running_server(weights_dir, tmp_path / "data", UNETSEG_DEFAULT_MODEL="tiny") as (base, proc):
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.get("/healthz").json() == {"status": "ok", "detail": None}
            models = http.get("/v1/models").json()
            assert models["default_model"] == "tiny"
            data = image_bytes(80, 60, seed=7)
            up = http.post("/v1/uploads", files={"file": ("a.png", data, "image/png")})
            assert up.status_code == 201
            uid = up.json()["id"]
            r = http.post("/v1/predict", data={"upload_id": uid})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            mask = Image.open(io.BytesIO(r.content))
            assert mask.mode == "P" and mask.size == (80, 60)
            j = http.post("/v1/predict?format=json", files={"file": ("a.png", data, "image/png")}).json()
            assert sum(c["pixels"] for c in j["classes"]) == 80 * 60
            assert http.post("/v1/predict", files={"file": ("a.png", b"nope", "image/png")}).status_code == 415

            # Concurrent clients each get the mask of their own image.
            images = [image_bytes(40 + i, 30 + i, seed=i) for i in range(12)]

            def one(data: bytes) -> tuple[int, ...]:
                with httpx.Client(base_url=base, timeout=60) as c:
                    resp = c.post("/v1/predict?model=tiles", files={"file": ("x.png", data, "image/png")})
                    resp.raise_for_status()
                    return Image.open(io.BytesIO(resp.content)).size

            with ThreadPoolExecutor(6) as pool:
                sizes = list(pool.map(one, images))
            assert sizes == [(40 + i, 30 + i) for i in range(12)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    # The upload outlived the process.
    with running_server(weights_dir, tmp_path / "data") as (base, _):
        assert httpx.get(f"{base}/v1/uploads/{uid}").status_code == 200


def test_cli_predict_writes_masks(weights_dir: Path, tmp_path: Path) -> None:
    from app.cli import main

    src = tmp_path / "in.png"
    src.write_bytes(image_bytes(45, 35))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(src),
            str(bad),
            "--model",
            "tiny",
            "--out",
            str(out),
            "--weights-dir",
            str(weights_dir),
            "--device",
            "cpu",
        ]
    )
    assert code == 1  # one of the two files failed, the other was written
    mask = Image.open(out / "in.png")
    assert mask.mode == "P" and mask.size == (45, 35)
    assert set(np.unique(np.asarray(mask))) <= {0, 1}
