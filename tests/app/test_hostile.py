"""Hostile input: every path that takes bytes answers bad input with a 4xx JSON ``detail``, never a 500 or a
hang, and takes every odd-but-valid image it documents.

The corpus is generated here, nothing binary is committed: empty and truncated files, text in disguise,
header bombs (forged dimensions in a tiny file), degenerate sizes, animations, unusual modes, broken
multipart bodies, huge fields and upload ids that try to leave the store.
"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

from app.main import MULTIPART_OVERHEAD, create_app
from tests.app.asgi import serving
from tests.conftest import make_settings, wait_ready
from tests.helpers import image_bytes, write_tiny_bundle

ENDPOINTS = ("/v1/predict", "/v1/uploads")
HANG_S = 60  # an answer slower than this counts as a hang


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app for the whole corpus, default limits, a resize model (tiny) and a tile model (tiles)."""
    root = tmp_path_factory.mktemp("hostile")
    weights = root / "weights"
    write_tiny_bundle(weights / "tiny", name="tiny")
    write_tiny_bundle(weights / "tiles", seed=1, name="tiles", channels=1, classes=3, sizing="tile", size=32)
    with TestClient(create_app(make_settings(root, weights)), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def bounded(call: Callable[[], httpx.Response]) -> httpx.Response:
    """Run one request; fail (instead of hanging the suite) if it has no answer within HANG_S."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["response"] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(HANG_S)
    assert not worker.is_alive(), f"no answer within {HANG_S}s"
    if "error" in box:
        raise box["error"]
    response: httpx.Response = box["response"]
    return response


def send_file(api: TestClient, path: str, data: bytes, name: str = "x.png", ctype: str = "image/png") -> httpx.Response:
    return bounded(lambda: api.post(path, files={"file": (name, data, ctype)}))


def refused(r: httpx.Response, *statuses: int) -> str:
    """A 4xx (one of ``statuses``) with a JSON body that has a non-empty ``detail``; returns it as text."""
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert 400 <= r.status_code < 500
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict) and body.get("detail"), body
    return str(body["detail"])


def mask_size(r: httpx.Response) -> tuple[int, int]:
    assert r.status_code == 200, r.text[:300]
    mask = Image.open(io.BytesIO(r.content))
    assert mask.mode == "P"
    return mask.size


# --- generated files --------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def forged_png(width: int, height: int, bit_depth: int = 8, color_type: int = 2, raw: bytes = b"\0" * 16) -> bytes:
    """A PNG whose IHDR (with a valid CRC) declares any size, followed by a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def forged_gif(width: int, height: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def forged_bmp(width: int, height: int) -> bytes:
    data = bytearray(image_bytes(4, 4, fmt="BMP"))
    struct.pack_into("<ii", data, 18, width, height)  # BITMAPINFOHEADER biWidth, biHeight
    return bytes(data)


def forged_tiff(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF declaring ``width`` x ``height`` 8-bit gray with 16 bytes of data."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0)]
    tags += [(277, 3, 1), (278, 4, height), (279, 4, 16)]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    entries = b"".join(
        struct.pack("<HHII", tag, kind, 1, data_offset if tag == 273 else value) for tag, kind, value in tags
    )
    return b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + b"\0\0\0\0" + b"\0" * 16


def forged_jpeg(width: int, height: int) -> bytes:
    data = bytearray(image_bytes(16, 16, fmt="JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)  # SOF0: length (2), precision (1), height, width
    return bytes(data)


def forged_webp(width: int, height: int) -> bytes:
    vp8x = b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def encoded(im: Image.Image, fmt: str, **args: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **args)
    return buf.getvalue()


def blocks(seed: int, width: int = 48, height: int = 40) -> Image.Image:
    """A palette image of 8x8 blocks in a few colors: lossless in every format, GIF included."""
    rng = np.random.default_rng(seed)
    ids = np.kron(rng.integers(0, 4, (height // 8 + 1, width // 8 + 1)), np.ones((8, 8), dtype=np.int64))
    im = Image.fromarray(ids[:height, :width].astype(np.uint8), "P")
    colors = rng.integers(0, 256, (4, 3)).astype(np.uint8).ravel().tolist()
    im.putpalette(colors + [0] * (768 - len(colors)))
    return im


# --- bytes that are not a usable image ---------------------------------------------------------------------

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")


def truncated_corpus() -> list[Any]:
    cases = []
    for fmt in FORMATS:
        data = image_bytes(64, 48, fmt=fmt, seed=5)
        for cut in sorted({1, 8, 16, 30, len(data) // 4, len(data) // 2, len(data) * 3 // 4}):
            cases.append(pytest.param(data[:cut], id=f"{fmt}-cut-{cut}-of-{len(data)}"))
    return cases


NOT_IMAGES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"just some text, renamed to .png\n" * 20, id="text"),
    pytest.param(b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'><rect/></svg>", id="svg"),
    pytest.param(b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>", id="svg-xml-prolog"),
    pytest.param(b"<!doctype html><html><body>hi</body></html>", id="html"),
    pytest.param(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", id="pdf"),
    pytest.param(b"PK\x03\x04" + b"\0" * 40, id="zip"),
    pytest.param(b"\x89PNG\r\n\x1a\n", id="png-signature-only"),
    pytest.param(b"\xff\xd8\xff", id="jpeg-soi-only"),
    pytest.param(b"GIF89a", id="gif-signature-only"),
    pytest.param(b"RIFF\0\0\0\0WEBP", id="webp-header-only"),
    pytest.param(b"II*\0\x08\0\0\0", id="tiff-header-only"),
    pytest.param(b"BM", id="bmp-magic-only"),
    pytest.param(forged_png(0, 0), id="png-zero-size"),
    pytest.param(forged_png(16, 16, raw=b"\x07" * 3), id="png-corrupt-pixel-data"),
    pytest.param(image_bytes(16, 16, fmt="ICO"), id="ico-unsupported-format"),
    *truncated_corpus(),
]


@pytest.mark.parametrize("data", NOT_IMAGES)
def test_what_is_not_a_usable_image_is_415(api: TestClient, data: bytes) -> None:
    for path in ENDPOINTS:
        refused(send_file(api, path, data), 415)
    # The declared type changes nothing: the bytes decide.
    refused(send_file(api, "/v1/uploads", data, "x.svg", "image/svg+xml"), 415)
    assert api.get("/v1/uploads").json()["count"] == 0


BOMBS = [
    pytest.param(forged_png(100_000, 100_000), id="png-100k-square"),
    pytest.param(forged_png(2**31 - 1, 2**31 - 1), id="png-max-int"),
    pytest.param(forged_png(7_000, 7_000), id="png-49M-just-over-the-limit"),
    pytest.param(forged_png(1, 50_000_000, bit_depth=1, color_type=0), id="png-1x50M"),
    pytest.param(forged_gif(65_535, 65_535), id="gif-max"),
    pytest.param(forged_bmp(60_000, 60_000), id="bmp-60k"),
    pytest.param(forged_bmp(60_000, -60_000), id="bmp-60k-top-down"),
    pytest.param(forged_tiff(100_000, 100_000), id="tiff-100k"),
    pytest.param(forged_jpeg(65_500, 65_500), id="jpeg-65k"),
]


@pytest.mark.parametrize("data", BOMBS)
def test_header_bombs_are_413_before_any_pixel_is_decoded(
    api: TestClient, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(data) < 2_000
    loads = 0
    real_load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> Any:
        nonlocal loads
        loads += 1
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    for path in ENDPOINTS:
        assert "pixels" in refused(send_file(api, path, data), 413)
    assert loads == 0


def test_a_forged_webp_canvas_is_refused(api: TestClient) -> None:
    # libwebp itself may reject the frameless file before its size is read: 413 or 415, never more.
    for path in ENDPOINTS:
        refused(send_file(api, path, forged_webp(16_000, 16_000)), 413, 415)


# --- odd but valid images -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(1, 1), (1, 5000), (5000, 1), (2, 3)])
@pytest.mark.parametrize("model", ["tiny", "tiles"])
def test_tiny_and_extremely_thin_images_are_segmented(api: TestClient, width: int, height: int, model: str) -> None:
    data = image_bytes(width, height, seed=width + height)
    r = bounded(lambda: api.post(f"/v1/predict?model={model}", files={"file": ("x.png", data, "image/png")}))
    assert mask_size(r) == (width, height)
    r = send_file(api, "/v1/uploads", data)
    assert r.status_code in (200, 201) and (r.json()["width"], r.json()["height"]) == (width, height)


def animation(fmt: str, first: Image.Image, rest: list[Image.Image]) -> bytes:
    if fmt == "GIF":
        return encoded(first, "GIF", save_all=True, append_images=rest, duration=100, loop=0)
    rgb = [im.convert("RGB") for im in (first, *rest)]
    if fmt == "WEBP":
        return encoded(rgb[0], "WEBP", save_all=True, append_images=rgb[1:], lossless=True, duration=100)
    return encoded(rgb[0], fmt, save_all=True, append_images=rgb[1:])  # APNG, multi-page TIFF


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_animations_are_segmented_on_their_first_frame(api: TestClient, fmt: str) -> None:
    first, second, other = blocks(1), blocks(2), blocks(3)
    a = animation(fmt, first, [second])
    b = animation(fmt, first, [other, second])
    assert Image.open(io.BytesIO(a)).n_frames == 2 and Image.open(io.BytesIO(b)).n_frames == 3
    still = encoded(first.convert("RGB"), "PNG")
    masks = []
    for data in (a, b, still):
        r = send_file(api, "/v1/predict", data)
        assert mask_size(r) == first.size
        masks.append(np.asarray(Image.open(io.BytesIO(r.content))))
    # The later frames change nothing: the mask is the first frame's, as if it were a still image.
    assert np.array_equal(masks[0], masks[2]) and np.array_equal(masks[1], masks[2])
    up = send_file(api, "/v1/uploads", a)
    assert up.status_code in (200, 201) and (up.json()["width"], up.json()["height"]) == first.size


def gray16_png(width: int, height: int) -> bytes:
    arr = np.random.default_rng(0).integers(0, 65535, (height, width)).astype(np.uint16)
    return encoded(Image.fromarray(arr), "PNG")


def rgb48_png(width: int, height: int) -> bytes:
    """16 bits per channel RGB, which Pillow cannot write: rows of big-endian samples behind filter byte 0."""
    arr = np.random.default_rng(1).integers(0, 65535, (height, width, 3)).astype(">u2")
    raw = b"".join(b"\0" + arr[y].tobytes() for y in range(height))
    return forged_png(width, height, bit_depth=16, color_type=2, raw=raw)


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(blocks(4, 48, 24).convert("RGB"), "JPEG", exif=exif)


def palette_with_transparency(fmt: str) -> bytes:
    return encoded(blocks(5), fmt, transparency=0)


VALID = [
    pytest.param(gray16_png(30, 20), (30, 20), id="png-16bit-gray"),
    pytest.param(rgb48_png(30, 20), (30, 20), id="png-16bit-rgb"),
    pytest.param(encoded(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "TIFF"), (30, 20), id="tiff-16bit"),
    pytest.param(encoded(Image.new("F", (30, 20), 0.5), "TIFF"), (30, 20), id="tiff-float"),
    pytest.param(encoded(Image.new("I", (30, 20), 70000), "TIFF"), (30, 20), id="tiff-32bit-int"),
    pytest.param(image_bytes(30, 20, mode="CMYK", fmt="JPEG"), (30, 20), id="jpeg-cmyk"),
    pytest.param(image_bytes(30, 20, mode="CMYK", fmt="TIFF"), (30, 20), id="tiff-cmyk"),
    pytest.param(image_bytes(30, 20, mode="L", fmt="JPEG"), (30, 20), id="jpeg-gray"),
    pytest.param(image_bytes(30, 20, fmt="JPEG", progressive=True), (30, 20), id="jpeg-progressive"),
    pytest.param(palette_with_transparency("PNG"), (48, 40), id="png-palette-transparency"),
    pytest.param(palette_with_transparency("GIF"), (48, 40), id="gif-palette-transparency"),
    pytest.param(image_bytes(30, 20, mode="RGBA", fmt="PNG"), (30, 20), id="png-rgba"),
    pytest.param(image_bytes(30, 20, mode="LA", fmt="PNG"), (30, 20), id="png-gray-alpha"),
    pytest.param(image_bytes(30, 20, mode="1", fmt="PNG"), (30, 20), id="png-1bit"),
    pytest.param(exif_jpeg(3), (48, 24), id="jpeg-exif-rotated-180"),
    pytest.param(exif_jpeg(6), (24, 48), id="jpeg-exif-rotated-90"),
    pytest.param(exif_jpeg(8), (24, 48), id="jpeg-exif-rotated-270"),
    pytest.param(image_bytes(30, 20, fmt="TIFF", compression="tiff_lzw"), (30, 20), id="tiff-lzw"),
    pytest.param(image_bytes(30, 20, fmt="WEBP", quality=50), (30, 20), id="webp-lossy"),
    pytest.param(image_bytes(30, 20, mode="RGBA", fmt="WEBP", lossless=True), (30, 20), id="webp-lossless-alpha"),
    pytest.param(image_bytes(30, 20, mode="P", fmt="BMP"), (30, 20), id="bmp-palette"),
    pytest.param(image_bytes(30, 20, fmt="BMP"), (30, 20), id="bmp-rgb"),
]


@pytest.mark.parametrize(("data", "size"), VALID)
def test_unusual_but_valid_images_are_segmented_at_their_displayed_size(
    api: TestClient, data: bytes, size: tuple[int, int]
) -> None:
    for model in ("tiny", "tiles"):
        r = bounded(lambda m=model: api.post(f"/v1/predict?model={m}", files={"file": ("a", data, "image/png")}))
        assert mask_size(r) == size, model
    up = send_file(api, "/v1/uploads", data, "a.bin", "application/octet-stream")
    assert up.status_code in (200, 201), up.text
    assert (up.json()["width"], up.json()["height"]) == size


# --- request bodies that are not what the routes take --------------------------------------------------------

BOUNDARY = "hostile-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()
PNG = image_bytes(20, 10)


def multipart(*parts: bytes) -> dict[str, Any]:
    return {"content": b"".join(parts) + END, "headers": {"content-type": MULTIPART}}


BAD_BODIES = [
    pytest.param({"json": {"upload_id": "0" * 64}}, (415,), id="json-body"),
    pytest.param({"content": b"hello", "headers": {"content-type": "text/plain"}}, (415,), id="text-body"),
    pytest.param({"content": b"hello", "headers": {"content-type": "image/png"}}, (415,), id="raw-text-as-image"),
    pytest.param({"content": PNG[:40], "headers": {"content-type": "image/png"}}, (415,), id="raw-truncated-image"),
    pytest.param({"content": PNG, "headers": {"content-type": "image/"}}, (415,), id="raw-empty-subtype"),
    pytest.param({"content": PNG}, (415,), id="no-content-type"),
    pytest.param({"content": b""}, (422,), id="no-body"),
    pytest.param({"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, (400,), id="no-boundary"),
    pytest.param({"content": b"garbage", "headers": {"content-type": MULTIPART}}, (400,), id="garbage-multipart"),
    pytest.param(
        {"content": part("file", PNG, "a.png")[:-30], "headers": {"content-type": MULTIPART}},
        (400, 422),
        id="unterminated-multipart",
        # Starlette leaves the spooled file of a part that never ended to the garbage collector.
        marks=pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    ),
    pytest.param(multipart(part("other", b"x")), (422,), id="no-file"),
    pytest.param(multipart(part("file", PNG, "a.png"), part("file", PNG, "b.png")), (422,), id="two-files"),
    pytest.param(multipart(part("file", PNG)), (422,), id="file-as-text"),
    pytest.param({"data": {"upload_id": "a" * 5_000_000}}, (400,), id="5MB-form-field"),
    pytest.param({"data": {"x": "a" * 5_000_000}, "files": {"file": ("a.png", PNG)}}, (400,), id="5MB-extra-field"),
    pytest.param({"data": {f"f{i}": "1" for i in range(1500)}}, (400,), id="1500-fields"),
    pytest.param({"files": [(f"g{i}", ("a.png", b"x")) for i in range(1100)]}, (400,), id="1100-files"),
    pytest.param({"content": b"x", "headers": {"content-length": "abc"}}, (400,), id="bad-content-length"),
    pytest.param(multipart(part("file\x00", PNG, "a.png")), (422,), id="nul-in-field-name"),
]


@pytest.mark.parametrize(("request_args", "statuses"), BAD_BODIES)
@pytest.mark.parametrize("path", ENDPOINTS)
def test_malformed_request_bodies_are_4xx(
    api: TestClient, path: str, request_args: dict[str, Any], statuses: tuple[int, ...]
) -> None:
    refused(bounded(lambda: api.post(path, **request_args)), *statuses)


def test_the_declared_type_of_a_file_part_is_not_trusted(api: TestClient) -> None:
    r = send_file(api, "/v1/predict", PNG, "a.exe", "application/x-msdownload")
    assert mask_size(r) == (20, 10)
    refused(send_file(api, "/v1/predict", b"plain text", "a.png", "image/png"), 415)


def test_bad_query_parameters_are_4xx(api: TestClient) -> None:
    files = {"file": ("a.png", PNG, "image/png")}
    for query, status in [
        ("format=gif", 422),
        ("alpha=nan", 422),
        ("alpha=-1", 422),
        ("alpha=1e400", 422),
        ("model=..%2Ftiny", 404),
        ("model=%00", 404),
        ("model=" + "m" * 10_000, 404),
    ]:
        refused(bounded(lambda q=query: api.post(f"/v1/predict?{q}", files=files)), status)
    for query in ["limit=0", "limit=100000", "offset=-1", "offset=9223372036854775808", "offset=1e99", "limit=x"]:
        refused(api.get(f"/v1/uploads?{query}"), 422)


# --- upload ids that try to leave the store -----------------------------------------------------------------


def test_upload_ids_cannot_reach_outside_the_store(api: TestClient) -> None:
    uid = send_file(api, "/v1/uploads", PNG).json()["id"]
    for bad in [
        "..%2F..%2Fuploads.sqlite3",
        "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "%00",
        uid[:63] + "%00",
        uid + "%00",
        uid + "%0A",
        uid + "0",  # 65 hex characters
        uid[:63],
        uid.upper(),
        "%20" + uid,
    ]:
        for r in (api.get(f"/v1/uploads/{bad}"), api.delete(f"/v1/uploads/{bad}")):
            refused(r, 404)
    for bad in [
        "../../uploads.sqlite3",
        "/etc/passwd",
        "\x00",
        uid + "\x00",
        uid + "\n",
        uid + "0",
        uid.upper(),
        " " + uid,
        f"{uid[:2]}/{uid}",
    ]:
        refused(bounded(lambda b=bad: api.post("/v1/predict", data={"upload_id": b})), 404)
    # Nothing was deleted or damaged on the way.
    assert api.get(f"/v1/uploads/{uid}").status_code == 200
    assert api.post("/v1/predict", data={"upload_id": uid}).status_code == 200
    assert api.get("/v1/uploads").json()["count"] >= 1


# --- the body limit, while the body streams in ----------------------------------------------------------------


def test_an_oversized_streamed_body_is_cut_off_while_it_streams(tmp_path: Path, weights_dir: Path) -> None:
    """A chunked body with no Content-Length: the app stops reading right after the limit and answers 413."""
    limit = 100_000
    app = create_app(make_settings(tmp_path, weights_dir, max_upload_bytes=limit))
    chunk = 16 * 1024
    offered = 64 * 1024 * 1024  # what the client would send if it were let

    async def body(counter: list[int]) -> AsyncIterator[bytes]:
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
        counter[0] += len(head)
        yield head
        while counter[0] < offered:
            counter[0] += chunk
            yield b"\0" * chunk

    chunked, declared = [0], [0]

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with serving(app) as client:
            headers = {"content-type": MULTIPART}
            a = await client.post("/v1/uploads", content=body(chunked), headers=headers)
            # A declared Content-Length over the limit is refused before a byte of the body is read.
            headers["content-length"] = str(offered)
            b = await client.post("/v1/uploads", content=body(declared), headers=headers)
            return a, b

    by_chunks, by_length = asyncio.run(run())
    assert "limit" in refused(by_chunks, 413)
    assert chunked[0] <= limit + MULTIPART_OVERHEAD + 2 * chunk, chunked
    assert "limit" in refused(by_length, 413)
    assert declared[0] == 0
