"""Images sent as the request body itself (``curl --data-binary``), and forms with fields left empty.

A raw body gets the same limits, errors and results as the multipart field ``file``.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import MULTIPART_OVERHEAD, create_app
from tests.app.asgi import serving
from tests.conftest import make_settings, wait_ready
from tests.helpers import image_bytes

JPEG = image_bytes(48, 36, fmt="JPEG", seed=4)


def raw(client: TestClient, path: str, data: bytes, ctype: str = "image/jpeg") -> httpx.Response:
    return client.post(path, content=data, headers={"content-type": ctype})


@pytest.mark.parametrize("ctype", ["image/jpeg", "image/png", "image/x-anything", "application/octet-stream"])
def test_a_raw_body_is_uploaded_like_a_file(client: TestClient, ctype: str) -> None:
    first = raw(client, "/v1/uploads", JPEG, ctype)
    assert first.status_code == 201, first.text
    up = first.json()
    assert (up["width"], up["height"], up["format"], up["bytes"]) == (48, 36, "jpeg", len(JPEG))
    assert first.headers["location"] == f"/v1/uploads/{up['id']}"
    # The same bytes as a multipart file: the same upload.
    again = client.post("/v1/uploads", files={"file": ("a.jpg", JPEG, "image/jpeg")})
    assert again.status_code == 200 and again.json() == up


@pytest.mark.parametrize("query", ["", "?format=overlay&alpha=0.3", "?format=json", "?model=tiles&format=json"])
def test_a_raw_body_is_segmented_like_a_file(client: TestClient, query: str) -> None:
    by_body = raw(client, f"/v1/predict{query}", JPEG)
    by_file = client.post(f"/v1/predict{query}", files={"file": ("a.jpg", JPEG, "image/jpeg")})
    assert by_body.status_code == by_file.status_code == 200, by_body.text
    assert by_body.headers["content-type"] == by_file.headers["content-type"]
    assert by_body.headers["x-model"] == by_file.headers["x-model"]
    assert "model;dur=" in by_body.headers["server-timing"]
    if "json" in query:
        a, b = by_body.json(), by_file.json()
        assert a["classes"] == b["classes"] and (a["width"], a["height"]) == (48, 36)
    else:
        assert by_body.content == by_file.content
        with Image.open(io.BytesIO(by_body.content)) as mask:
            assert mask.size == (48, 36)


@pytest.mark.parametrize(
    ("data", "ctype", "status", "words"),
    [
        (b"", "image/png", 415, "empty"),
        (b"certainly not a picture", "image/png", 415, "not an image"),
        (JPEG[:100], "image/jpeg", 415, "truncated"),
        (b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'/>", "image/svg+xml", 415, "not an image"),
        (JPEG, "text/plain", 415, "Content-Type image/*"),
        (JPEG, "application/json", 415, "Content-Type image/*"),
        (JPEG, "", 415, "no Content-Type"),
    ],
)
def test_raw_bodies_that_are_not_images_are_415(
    client: TestClient, data: bytes, ctype: str, status: int, words: str
) -> None:
    for path in ("/v1/predict", "/v1/uploads"):
        r = client.post(path, content=data, headers={"content-type": ctype} if ctype else {})
        assert r.status_code == status, (path, r.text)
        assert words in r.json()["detail"] and r.json()["request_id"]
    assert client.get("/v1/uploads").json()["count"] == 0


def test_raw_bodies_have_the_byte_and_pixel_limits(tmp_path: Path, weights_dir: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, weights_dir, max_upload_bytes=5000, max_pixels=64 * 64))) as c:
        wait_ready(c)
        big_file = image_bytes(60, 60, fmt="BMP")  # over 5000 bytes (below the multipart allowance), few pixels
        assert 5000 < len(big_file) < 5000 + MULTIPART_OVERHEAD
        for path in ("/v1/predict", "/v1/uploads"):
            r = raw(c, path, big_file, "image/bmp")
            assert r.status_code == 413 and "limit of 5000 bytes" in r.json()["detail"], r.text
            r = raw(c, path, image_bytes(65, 64, mode="1"), "image/png")  # small file, too many pixels
            assert r.status_code == 413 and "pixels" in r.json()["detail"], r.text
        assert c.get("/v1/uploads").json()["count"] == 0


def test_an_oversized_raw_body_is_cut_off_while_it_streams(tmp_path: Path, weights_dir: Path) -> None:
    limit = 100_000
    app = create_app(make_settings(tmp_path, weights_dir, max_upload_bytes=limit))
    chunk = 16 * 1024
    offered = 64 * 1024 * 1024

    async def body(counter: list[int]) -> AsyncIterator[bytes]:
        while counter[0] < offered:
            counter[0] += chunk
            yield b"\xff" * chunk

    chunked, declared = [0], [0]

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with serving(app) as client:
            headers = {"content-type": "image/jpeg"}
            a = await client.post("/v1/predict", content=body(chunked), headers=headers)
            headers["content-length"] = str(offered)
            b = await client.post("/v1/uploads", content=body(declared), headers=headers)
            return a, b

    by_chunks, by_length = asyncio.run(run())
    assert by_chunks.status_code == 413 and "limit" in by_chunks.json()["detail"]
    assert chunked[0] <= limit + 2 * chunk, chunked  # the exact image limit, not the multipart allowance
    assert by_length.status_code == 413 and "limit" in by_length.json()["detail"]
    assert declared[0] == 0


def test_empty_form_fields_count_as_absent(client: TestClient) -> None:
    """What a docs page's "Try it out" sends: the field left blank goes along, empty."""
    png = image_bytes(30, 20)
    uid = client.post("/v1/uploads", files={"file": ("a.png", png, "image/png")}).json()["id"]
    by_file = client.post("/v1/predict", data={"upload_id": ""}, files={"file": ("a.png", png, "image/png")})
    assert by_file.status_code == 200, by_file.text
    empty_file = {"file": ("", b"", "application/octet-stream")}  # a file input with nothing chosen
    by_id = client.post("/v1/predict", data={"upload_id": uid}, files=empty_file)
    assert by_id.status_code == 200, by_id.text
    assert by_id.content == by_file.content
    r = client.post("/v1/predict", data={"upload_id": ""}, files=empty_file)
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = client.post("/v1/uploads", files=empty_file)
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = client.post("/v1/predict", data={"upload_id": [uid, uid]})
    assert r.status_code == 422 and "one 'upload_id'" in r.json()["detail"]
