"""Access control: with UNETSEG_API_KEY set, every /v1 endpoint needs a key and everything else stays open;
CORS only for the configured origins; the OpenAPI document shows the security schemes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.asgi import serving
from tests.conftest import make_settings, wait_ready
from tests.helpers import image_bytes, write_tiny_bundle

KEYS = ("first-Key-0123456789", "second-Key-abcdefghij")
PNG = image_bytes(24, 16)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("auth")
    write_tiny_bundle(root / "weights" / "tiny", name="tiny")
    settings = make_settings(root, root / "weights", api_key=",".join(KEYS))
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def uploaded(client: TestClient) -> str:
    r = client.post("/v1/uploads", files={"file": ("a.png", PNG, "image/png")}, headers={"X-API-Key": KEYS[0]})
    assert r.status_code in (200, 201), r.text
    uid: str = r.json()["id"]
    return uid


def started(client: TestClient) -> str:
    r = client.post("/v1/jobs", content=PNG, headers={"X-API-Key": KEYS[0], "Content-Type": "image/png"})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


Call = Callable[[TestClient, dict[str, str]], httpx.Response]

# Every /v1 operation, with a request that succeeds when the key is right, and the status it then gets.
OPERATIONS: dict[tuple[str, str], tuple[Call, tuple[int, ...]]] = {
    ("GET", "/v1/models"): (lambda c, h: c.get("/v1/models", headers=h), (200,)),
    ("GET", "/v1/models/{name}"): (lambda c, h: c.get("/v1/models/tiny", headers=h), (200,)),
    ("POST", "/v1/uploads"): (
        lambda c, h: c.post("/v1/uploads", files={"file": ("a.png", PNG, "image/png")}, headers=h),
        (200, 201),
    ),
    ("GET", "/v1/uploads"): (lambda c, h: c.get("/v1/uploads", headers=h), (200,)),
    ("GET", "/v1/uploads/{upload_id}"): (lambda c, h: c.get(f"/v1/uploads/{uploaded(c)}", headers=h), (200,)),
    ("DELETE", "/v1/uploads/{upload_id}"): (lambda c, h: c.delete(f"/v1/uploads/{uploaded(c)}", headers=h), (204,)),
    ("POST", "/v1/predict"): (
        lambda c, h: c.post("/v1/predict", files={"file": ("a.png", PNG, "image/png")}, headers=h),
        (200,),
    ),
    ("POST", "/v1/jobs"): (
        lambda c, h: c.post("/v1/jobs", files={"file": ("a.png", PNG, "image/png")}, headers=h),
        (202,),
    ),
    ("GET", "/v1/jobs"): (lambda c, h: c.get("/v1/jobs", headers=h), (200,)),
    ("GET", "/v1/jobs/{job_id}"): (lambda c, h: c.get(f"/v1/jobs/{started(c)}", headers=h), (200,)),
    ("GET", "/v1/jobs/{job_id}/result"): (
        lambda c, h: c.get(f"/v1/jobs/{started(c)}/result", headers=h),
        (200, 409),  # 409 while the job is not done yet: past the key either way
    ),
    ("DELETE", "/v1/jobs/{job_id}"): (lambda c, h: c.delete(f"/v1/jobs/{started(c)}", headers=h), (200, 204)),
}

CREDENTIALS = {
    "none": ({}, False),
    "wrong-bearer": ({"Authorization": "Bearer not-the-key"}, False),
    "wrong-x-api-key": ({"X-API-Key": "not-the-key"}, False),
    "right-bearer": ({"Authorization": f"Bearer {KEYS[0]}"}, True),
    "right-bearer-lower-case-scheme": ({"Authorization": f"bearer {KEYS[0]}"}, True),
    "right-x-api-key": ({"X-API-Key": KEYS[0]}, True),
    "second-key-bearer": ({"Authorization": f"Bearer {KEYS[1]}"}, True),
    "second-key-x-api-key": ({"X-API-Key": KEYS[1]}, True),
    "empty-bearer": ({"Authorization": "Bearer "}, False),
    "empty-x-api-key": ({"X-API-Key": ""}, False),
    "bearer-scheme-only": ({"Authorization": "Bearer"}, False),
    "key-in-other-case": ({"X-API-Key": KEYS[0].upper()}, False),
    "key-prefix": ({"X-API-Key": KEYS[0][:-1]}, False),
    "key-with-suffix": ({"X-API-Key": KEYS[0] + "x"}, False),
    "both-keys-joined": ({"X-API-Key": ",".join(KEYS)}, False),
    "right-key-basic-scheme": ({"Authorization": f"Basic {KEYS[0]}"}, False),
    "right-key-no-scheme": ({"Authorization": KEYS[0]}, False),
}


def test_the_matrix_covers_every_v1_operation(keyed: TestClient) -> None:
    spec = keyed.get("/openapi.json").json()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() if p.startswith("/v1") for m in ops}
    assert documented == set(OPERATIONS)


@pytest.mark.parametrize("credential", list(CREDENTIALS))
@pytest.mark.parametrize("operation", list(OPERATIONS), ids=lambda op: f"{op[0]} {op[1]}")
def test_auth_matrix(keyed: TestClient, operation: tuple[str, str], credential: str) -> None:
    call, success = OPERATIONS[operation]
    headers, accepted = CREDENTIALS[credential]
    r = call(keyed, headers)
    if accepted:
        assert r.status_code in success, r.text
    else:
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert "key" in r.json()["detail"]


def test_open_endpoints_need_no_key(keyed: TestClient) -> None:
    assert isinstance(keyed.app, FastAPI)
    spec = keyed.get("/openapi.json").json()
    open_paths = {p for p, ops in spec["paths"].items() if not p.startswith("/v1") and "get" in ops}
    assert {"/healthz", "/readyz"} <= open_paths
    # Routes outside the schema too: the docs, and any page the app serves.
    open_paths |= {"/docs", "/redoc", "/openapi.json"}
    open_paths |= {
        route.path
        for route in keyed.app.routes
        if isinstance(route, APIRoute) and "GET" in route.methods and "{" not in route.path
    }
    for path in sorted(open_paths):
        r = keyed.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])


def test_without_keys_configured_nothing_asks_for_one(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(tmp_path: Path, weights_dir: Path) -> None:
    app = create_app(make_settings(tmp_path, weights_dir, api_key=KEYS[0]))
    offered = 8 * 1024 * 1024  # under the body limit: only the key can stop it
    pulled = {"none": 0, "wrong": 0, "right": 0}

    async def body(name: str) -> AsyncIterator[bytes]:
        head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        pulled[name] += len(head)
        yield head
        while pulled[name] < offered:
            pulled[name] += 64 * 1024
            yield b"\0" * 64 * 1024
        yield b"\r\n--b--\r\n"

    async def run() -> dict[str, int]:
        statuses = {}
        async with serving(app) as client:
            for name, headers in [("none", {}), ("wrong", {"X-API-Key": "nope"}), ("right", {"X-API-Key": KEYS[0]})]:
                headers["content-type"] = "multipart/form-data; boundary=b"
                r = await client.post("/v1/uploads", content=body(name), headers=headers)
                statuses[name] = r.status_code
        return statuses

    statuses = asyncio.run(run())
    assert statuses == {"none": 401, "wrong": 401, "right": 415}  # the right key gets as far as decoding
    assert pulled["none"] < 64 * 1024 and pulled["wrong"] < 64 * 1024, pulled
    assert pulled["right"] >= offered


# --- CORS ------------------------------------------------------------------------------------------------------

ALLOWED = "https://segment.example"
OTHER = "https://elsewhere.example"


def preflight(client: TestClient, origin: str) -> httpx.Response:
    return client.options(
        "/v1/predict",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def test_no_cors_headers_by_default(client: TestClient) -> None:
    assert cors_headers(client.get("/v1/models", headers={"Origin": ALLOWED})) == {}
    r = preflight(client, ALLOWED)
    assert r.status_code >= 400 and cors_headers(r) == {}


def test_cors_allows_only_the_configured_origins(tmp_path: Path, weights_dir: Path) -> None:
    settings = make_settings(tmp_path, weights_dir, cors_origins=f"{ALLOWED},https://second.example", api_key=KEYS[0])
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        # Preflights carry no credentials: an allowed origin's passes without a key.
        ok = preflight(client, ALLOWED)
        assert ok.status_code == 200, ok.text
        assert ok.headers["access-control-allow-origin"] == ALLOWED
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        assert "POST" in ok.headers["access-control-allow-methods"]
        refused = preflight(client, OTHER)
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        # Actual requests: the allowed origin can read the answer (errors included), another cannot.
        r = client.get("/v1/models", headers={"Origin": ALLOWED, "X-API-Key": KEYS[0]})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
        assert "x-model" in r.headers["access-control-expose-headers"].lower()
        r = client.get("/v1/models", headers={"Origin": ALLOWED})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED
        r = client.get("/v1/models", headers={"Origin": OTHER, "X-API-Key": KEYS[0]})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_openapi_shows_the_security_schemes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    by_type = {(s["type"], s.get("scheme") or s.get("name")) for s in schemes.values()}
    assert by_type == {("http", "bearer"), ("apiKey", "X-API-Key")}
    assert all(s.get("description") for s in schemes.values())
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            named = {name for requirement in op.get("security", []) for name in requirement}
            if path.startswith("/v1"):
                assert named == set(schemes), (method, path)
                assert "401" in op["responses"], (method, path)
            else:
                assert not named, (method, path)
