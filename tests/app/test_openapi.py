"""The OpenAPI document is complete: every operation is described, with examples and its errors."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


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
    assert content["image/png"]["schema"] == {"type": "string", "format": "binary"}
    assert content["application/json"]["example"]["classes"][1]["name"] == "polyp"
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    error_body = spec["components"]["schemas"]["ErrorBody"]
    assert set(error_body["required"]) == {"detail", "request_id"}
