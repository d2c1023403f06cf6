from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.imaging import rle_decode
from app.main import create_app
from tests.conftest import make_settings, wait_ready
from tests.helpers import image_bytes

PNG = "image/png"


def upload(client: TestClient, data: bytes, name: str = "a.png") -> dict[str, object]:
    r = client.post("/v1/uploads", files={"file": (name, data, PNG)})
    assert r.status_code in (200, 201), r.text
    body: dict[str, object] = r.json()
    return body


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_not_ready_before_warmup(tmp_path: Path, weights_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import app.main as main

    gate = threading.Event()
    real = main._start_engine

    def slow(state: object) -> None:
        gate.wait(10)
        real(state)  # type: ignore[arg-type]

    monkeypatch.setattr(main, "_start_engine", slow)
    with TestClient(create_app(make_settings(tmp_path, weights_dir))) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post("/v1/predict", files={"file": ("a.png", image_bytes(), PNG)})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        gate.set()
        wait_ready(c)
        assert c.get("/v1/models").status_code == 200


def test_models_lists_every_bundle_with_its_card(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["default_model"] == "tiny"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"tiny", "tiles"}
    tiny = by_name["tiny"]
    assert tiny["default"] is True and by_name["tiles"]["default"] is False
    assert tiny["device"] == "cpu" and tiny["precision"] == "float32"
    assert tiny["classes"] == [
        {"id": 0, "name": "background", "color": [0, 0, 0]},
        {"id": 1, "name": "class1", "color": [255, 0, 0]},
    ]
    assert tiny["input"]["sizing"] == "resize" and tiny["input"]["size"] == 32
    assert by_name["tiles"]["input"]["sizing"] == "tile"
    assert tiny["metrics"] == {"val_dice": 0.5}
    assert client.get("/v1/models/tiles").json()["name"] == "tiles"
    assert client.get("/v1/models/nope").status_code == 404


def test_upload_is_content_addressed_and_idempotent(client: TestClient) -> None:
    data = image_bytes(40, 30)
    r = client.post("/v1/uploads", files={"file": ("a.png", data, PNG)})
    assert r.status_code == 201
    body = r.json()
    assert body["id"] == hashlib.sha256(data).hexdigest()
    assert (body["width"], body["height"], body["format"], body["bytes"]) == (40, 30, "png", len(data))
    assert r.headers["location"] == f"/v1/uploads/{body['id']}"
    again = client.post("/v1/uploads", files={"file": ("other-name.png", data, PNG)})
    assert again.status_code == 200 and again.json() == body
    assert client.get(f"/v1/uploads/{body['id']}").json() == body
    listing = client.get("/v1/uploads").json()
    assert listing["count"] == 1 and listing["total_bytes"] == len(data) and listing["items"] == [body]
    assert client.delete(f"/v1/uploads/{body['id']}").status_code == 204
    assert client.get(f"/v1/uploads/{body['id']}").status_code == 404
    assert client.delete(f"/v1/uploads/{body['id']}").status_code == 404


@pytest.mark.parametrize("bad_id", ["0" * 64, "abc", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "A" * 64])
def test_unknown_or_malformed_upload_ids_are_404(client: TestClient, bad_id: str) -> None:
    for r in (client.get(f"/v1/uploads/{bad_id}"), client.delete(f"/v1/uploads/{bad_id}")):
        assert r.status_code == 404 and "detail" in r.json()
    r = client.post("/v1/predict", data={"upload_id": bad_id})
    assert r.status_code == 404 and "no upload" in r.json()["detail"]


def test_uploads_survive_a_restart(tmp_path: Path, weights_dir: Path) -> None:
    s = make_settings(tmp_path, weights_dir)
    data = image_bytes()
    with TestClient(create_app(s)) as c:
        uid = upload(c, data)["id"]
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        assert c.get(f"/v1/uploads/{uid}").status_code == 200
        r = c.post("/v1/predict", data={"upload_id": uid})
        assert r.status_code == 200


def decode_png(content: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(content))
    im.load()
    return im


def test_predict_png_is_a_palette_mask_of_the_image_size(client: TestClient) -> None:
    r = client.post("/v1/predict", files={"file": ("a.png", image_bytes(57, 31), PNG)})
    assert r.status_code == 200 and r.headers["content-type"] == PNG
    assert r.headers["x-model"] == "tiny" and r.headers["x-model-version"] == "0.0.1"
    timing = r.headers["server-timing"]
    assert [part.split(";")[0] for part in timing.split(", ")] == ["decode", "queue", "model", "post", "encode"]
    im = decode_png(r.content)
    assert im.mode == "P" and im.size == (57, 31)
    ids = np.asarray(im)
    assert set(np.unique(ids)) <= {0, 1}
    assert im.getpalette()[:6] == [0, 0, 0, 255, 0, 0]  # type: ignore[index]


def test_predict_from_upload_equals_predict_from_file(client: TestClient) -> None:
    data = image_bytes(64, 48, seed=3)
    uid = upload(client, data)["id"]
    a = client.post("/v1/predict", files={"file": ("a.png", data, PNG)})
    b = client.post("/v1/predict", data={"upload_id": uid})
    assert np.array_equal(np.asarray(decode_png(a.content)), np.asarray(decode_png(b.content)))


def test_predict_json_reports_areas_boxes_and_rle(client: TestClient) -> None:
    data = image_bytes(50, 40, seed=1)
    mask = np.asarray(decode_png(client.post("/v1/predict", files={"file": ("a.png", data, PNG)}).content))
    r = client.post("/v1/predict?format=json", files={"file": ("a.png", data, PNG)})
    assert r.status_code == 200
    body = r.json()
    assert (body["model"], body["width"], body["height"]) == ("tiny", 50, 40)
    assert set(body["timings_ms"]) == {"decode", "queue", "model", "post", "encode"}
    total = 0
    for c in body["classes"]:
        binary = mask == c["id"]
        assert c["pixels"] == int(binary.sum())
        assert c["fraction"] == pytest.approx(binary.mean())
        assert np.array_equal(rle_decode(c["rle"]), binary)
        if c["pixels"]:
            ys, xs = np.nonzero(binary)
            assert c["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        else:
            assert c["bbox"] is None
        total += c["pixels"]
    assert total == 50 * 40


def test_predict_overlay_blends_the_image(client: TestClient) -> None:
    data = image_bytes(30, 20, seed=2)
    r0 = client.post("/v1/predict?format=overlay&alpha=0", files={"file": ("a.png", data, PNG)})
    assert r0.status_code == 200
    im = decode_png(r0.content)
    assert im.mode == "RGB" and im.size == (30, 20)
    assert np.array_equal(np.asarray(im), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    r1 = client.post("/v1/predict?format=overlay&alpha=1", files={"file": ("a.png", data, PNG)})
    mask = np.asarray(decode_png(client.post("/v1/predict", files={"file": ("a.png", data, PNG)}).content))
    full = np.asarray(decode_png(r1.content))
    assert (full[mask == 1] == [255, 0, 0]).all()


def test_predict_other_model_and_tiles(client: TestClient) -> None:
    r = client.post("/v1/predict?model=tiles", files={"file": ("a.png", image_bytes(90, 70), PNG)})
    assert r.status_code == 200 and r.headers["x-model"] == "tiles"
    im = decode_png(r.content)
    assert im.size == (90, 70) and set(np.unique(np.asarray(im))) <= {0, 1, 2}


def test_exif_orientation_is_applied(client: TestClient) -> None:
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    up = upload(client, buf.getvalue())
    assert (up["width"], up["height"]) == (30, 50)
    r = client.post("/v1/predict", files={"file": ("a.jpg", buf.getvalue(), "image/jpeg")})
    assert decode_png(r.content).size == (30, 50)


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"", 415, "empty"),
        (b"just some text, renamed to .png", 415, "not an image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", 415, "not an image"),
        (image_bytes(40, 40)[:200], 415, "truncated"),
    ],
)
def test_bad_images_get_415(client: TestClient, data: bytes, status: int, words: str) -> None:
    for path in ("/v1/predict", "/v1/uploads"):
        r = client.post(path, files={"file": ("x.png", data, PNG)})
        assert r.status_code == status, (path, r.text)
        assert words in r.json()["detail"]
    assert client.get("/v1/uploads").json()["count"] == 0


def test_limits_give_413(tmp_path: Path, weights_dir: Path) -> None:
    s = make_settings(tmp_path, weights_dir, max_upload_bytes=5000, max_pixels=64 * 64)
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        big_file = image_bytes(60, 60, fmt="BMP")  # > 5000 bytes, few pixels
        r = c.post("/v1/uploads", files={"file": ("a.bmp", big_file, "image/bmp")})
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        huge_body = b"x" * 200_000  # past the body limit itself: cut off while streaming
        r = c.post("/v1/predict", files={"file": ("a.png", huge_body, PNG)})
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        many_pixels = image_bytes(65, 64, mode="1")  # small file, too many pixels
        r = c.post("/v1/predict", files={"file": ("a.png", many_pixels, PNG)})
        assert r.status_code == 413 and "pixels" in r.json()["detail"]


def test_decompression_bomb_is_refused_before_decoding(client: TestClient) -> None:
    im = Image.new("1", (20000, 20000))  # 400 Mpx, a few kB as PNG
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000
    r = client.post("/v1/predict", files={"file": ("bomb.png", buf.getvalue(), PNG)})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]


def test_missing_and_contradictory_fields_are_422(client: TestClient) -> None:
    assert client.post("/v1/predict").status_code == 422
    assert client.post("/v1/predict", data={"other": "x"}).status_code == 422
    uid = upload(client, image_bytes())["id"]
    r = client.post("/v1/predict", data={"upload_id": uid}, files={"file": ("a.png", image_bytes(), PNG)})
    assert r.status_code == 422 and "not both" in r.json()["detail"]
    r = client.post(
        "/v1/predict", files=[("file", ("a.png", image_bytes(), PNG)), ("file", ("b.png", image_bytes(seed=1), PNG))]
    )
    assert r.status_code == 422 and "one image" in r.json()["detail"]
    assert client.post("/v1/uploads").status_code == 422
    assert client.post("/v1/predict?format=gif", files={"file": ("a.png", image_bytes(), PNG)}).status_code == 422
    assert client.post("/v1/predict?alpha=2", files={"file": ("a.png", image_bytes(), PNG)}).status_code == 422


def test_unknown_model_is_404(client: TestClient) -> None:
    r = client.post("/v1/predict?model=nope", files={"file": ("a.png", image_bytes(), PNG)})
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["detail"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
def test_image_modes_are_converted(client: TestClient, mode: str) -> None:
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    if mode == "I;16":
        arr = (np.random.default_rng(0).integers(0, 65535, (20, 30))).astype(np.uint16)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        data = image_bytes(30, 20, mode=mode, fmt=fmt)
    for model in ("tiny", "tiles"):
        r = client.post(f"/v1/predict?model={model}", files={"file": ("a", data, "application/octet-stream")})
        assert r.status_code == 200, (mode, r.text)
        assert decode_png(r.content).size == (30, 20)


@pytest.mark.parametrize(("fmt", "args"), [("JPEG", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {}), ("GIF", {})])
def test_formats_are_accepted(client: TestClient, fmt: str, args: dict[str, object]) -> None:
    data = image_bytes(33, 21, fmt=fmt, **args)
    up = upload(client, data)
    assert up["format"] == fmt.lower()
    r = client.post("/v1/predict", files={"file": ("a", data, "application/octet-stream")})
    assert r.status_code == 200 and decode_png(r.content).size == (33, 21)


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/v1/models", "get"),
        ("/v1/uploads", "post"),
        ("/v1/uploads/{upload_id}", "get"),
        ("/v1/uploads/{upload_id}", "delete"),
        ("/v1/predict", "post"),
    ]:
        op = paths[path][method]
        assert op["summary"] and op.get("description"), (path, method)
    predict = paths["/v1/predict"]["post"]
    content = predict["responses"]["200"]["content"]
    png = content["image/png"]["schema"]
    assert (png["type"], png["format"]) == ("string", "binary") and "16-bit" in png["description"]
    assert "X-Instance-Count" in predict["responses"]["200"]["headers"]
    assert "instances" in next(p for p in predict["parameters"] if p["name"] == "format")["schema"]["enum"]
    assert "application/json" in content
    for code in ("404", "413", "415", "422", "503"):
        assert code in predict["responses"]
    assert client.get("/docs").status_code == 200 and client.get("/redoc").status_code == 200
    json.dumps(spec)


def test_validation_errors_do_not_echo_the_input(client: TestClient) -> None:
    secret = b"x" * 5000 + b"SECRET-BYTES"
    # A file part without a filename is a plain form field: 'file' is then not a file, a 422.
    r = client.post("/v1/predict", files={"file": (None, secret)})
    assert r.status_code == 422
    assert b"SECRET-BYTES" not in r.content
    assert "'file' must be a file" in r.json()["detail"]
