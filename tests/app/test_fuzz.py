"""Property-based fuzz of the API from its own OpenAPI document (schemathesis, in-process over ASGI).

For every documented operation, requests generated from the document, valid ones and invalid ones, must
never get a 5xx; every response must be documented (status, content type, headers, body schema); and
invalid requests must be refused.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from app.main import create_app
from tests.conftest import make_settings
from tests.helpers import write_tiny_bundle

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = 40  # per operation and mode


@pytest.fixture(scope="module")
def app_and_schema(tmp_path_factory: pytest.TempPathFactory) -> tuple[FastAPI, schemathesis.BaseSchema]:
    root = tmp_path_factory.mktemp("fuzz")
    write_tiny_bundle(root / "weights" / "tiny", name="tiny")
    write_tiny_bundle(root / "weights" / "tiles", seed=1, name="tiles", channels=1, sizing="tile", size=32)
    app = create_app(make_settings(root, root / "weights"))
    return app, schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture
def api_schema(app_and_schema: tuple[FastAPI, schemathesis.BaseSchema]) -> schemathesis.BaseSchema:
    """The schema, with the app's lifespan running and its models warm (schemathesis ends the lifespan
    after each test)."""
    app, schema = app_and_schema
    with asgi.get_client(app) as client:
        client.get("http://testserver/healthz")  # starts the lifespan if it is not running
    assert app.state.unetseg.ready.wait(60), app.state.unetseg.error
    return schema


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_the_api_keeps_to_its_openapi_document(api_schema: schemathesis.BaseSchema, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/predict", "POST /v1/uploads"}
    failures = []
    fuzzed = set()
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,  # the same examples on every run: a failure is a bug, not bad luck
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def keeps_to_the_document(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS)

        name = f"{operation.method.upper()} {operation.path}"
        try:
            keeps_to_the_document()
        except Unsatisfiable:  # an operation without parameters or body has nothing to make invalid
            assert mode == GenerationMode.NEGATIVE, name
            continue
        except Exception as exc:  # noqa: BLE001 - every operation is fuzzed, then all failures reported
            failures.append(f"{name}: {exc}")
        fuzzed.add(name)
    assert not failures, "\n\n".join(failures)
    assert fuzzed >= {"POST /v1/predict", "POST /v1/uploads", "GET /v1/uploads", "GET /v1/uploads/{upload_id}"}
