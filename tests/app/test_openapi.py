"""The OpenAPI document is complete and valid: every operation is described, with examples and its errors; its
request bodies are what generators and docs pages need; the docs pages work without internet."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import OpenAPIV31SpecValidator


def test_every_operation_has_a_summary_a_description_examples_and_its_errors(client: TestClient) -> None:
    spec: dict[str, Any] = client.get("/openapi.json").json()
    operations = [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]
    assert {(p, m) for p, m, _ in operations} >= {
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/v1/models", "get"),
        ("/v1/models/{name}", "get"),
        ("/v1/uploads", "post"),
        ("/v1/uploads", "get"),
        ("/v1/uploads/{upload_id}", "get"),
        ("/v1/uploads/{upload_id}", "delete"),
        ("/v1/predict", "post"),
    }
    assert "/" not in spec["paths"] and not any(p.startswith("/static") for p in spec["paths"])
    for path, method, op in operations:
        where = f"{method.upper()} {path}"
        assert op.get("summary") and op.get("description"), where
        for param in op.get("parameters", []):
            assert param.get("description") and param["schema"].get("examples"), (where, param["name"])
        for code, response in op["responses"].items():
            assert response.get("description"), (where, code)
            if int(code) >= 400 and code != "422" and path != "/readyz":
                example = response["content"]["application/json"]["example"]
                assert isinstance(example["detail"], str) and example["request_id"], (where, code)
        if path.startswith("/v1/"):
            assert "401" in op["responses"], where
    predict = spec["paths"]["/v1/predict"]["post"]
    assert "Retry-After" in predict["responses"]["503"]["headers"]
    content = predict["responses"]["200"]["content"]
    assert {k: content["image/png"]["schema"][k] for k in ("type", "format")} == {"type": "string", "format": "binary"}
    assert "X-Instance-Count" in predict["responses"]["200"]["headers"]
    schemas = spec["components"]["schemas"]
    assert set(schemas["Instance"]["required"]) == {"id", "class_id", "area", "bbox", "centroid", "rle"}
    assert {"count", "instances"} <= set(schemas["Prediction"]["properties"])
    assert "instances" in schemas["ModelOut"]["properties"]
    assert content["application/json"]["example"]["classes"][1]["name"] == "polyp"
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    error_body = spec["components"]["schemas"]["ErrorBody"]
    assert set(error_body["required"]) == {"detail", "request_id"}


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_the_document_is_valid_openapi_3_1_and_every_ref_resolves(client: TestClient) -> None:
    spec: dict[str, Any] = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    OpenAPIV31SpecValidator(spec).validate()
    found = set(refs(spec))
    assert "#/components/schemas/ClassArea" in found and "#/components/schemas/RLE" in found
    for ref in found:
        assert ref.startswith("#/"), ref
        node: Any = spec
        for part in ref[2:].split("/"):
            assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
            node = node[part]
    # Operation ids are the route names: what generated clients call their functions.
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)) and {"create_upload", "predict", "get_upload"} <= set(ids)


def is_binary(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "string" and schema.get("format") == "binary"


def test_request_bodies_take_a_file_or_the_image_itself(client: TestClient) -> None:
    spec: dict[str, Any] = client.get("/openapi.json").json()
    upload = spec["paths"]["/v1/uploads"]["post"]["requestBody"]
    assert "422 without it" in upload["description"]  # "required": false only for a client generator's sake
    form = upload["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and is_binary(form["properties"]["file"])
    predict = spec["paths"]["/v1/predict"]["post"]["requestBody"]
    assert predict["required"] is True
    form = predict["content"]["multipart/form-data"]["schema"]
    assert is_binary(form["properties"]["file"]) and form["properties"]["upload_id"]["type"] == "string"
    assert "not both" in form["description"]
    by_id = predict["content"]["application/x-www-form-urlencoded"]["schema"]
    assert by_id["required"] == ["upload_id"] and set(by_id["properties"]) == {"upload_id"}
    for body in (upload, predict):
        for media in ("image/*", "application/octet-stream"):
            assert is_binary(body["content"][media]["schema"]), media


class AssetLinks(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


@pytest.mark.parametrize(("page", "assets"), [("/docs", 3), ("/redoc", 2)])
def test_docs_pages_load_only_assets_the_service_serves(client: TestClient, page: str, assets: int) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    links = AssetLinks()
    links.feed(r.text)
    assert len(links.urls) == assets, links.urls  # scripts, the stylesheet and the favicon
    # Nothing from elsewhere, in tags or in the inline script (Swagger UI's bundle is told the document's URL).
    assert not re.search(r"(https?:)?//", r.text.replace("http://www.w3.org", "")), r.text
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for url in links.urls:
        assert url.startswith("/docs/assets/"), url
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
        assert asset.headers["content-type"].startswith(types[url[url.rindex(".") :]]), (url, asset.headers)
    assert "/openapi.json" in r.text
    # The API key schemes the docs page offers under "Authorize".
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
