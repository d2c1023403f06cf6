"""A Python client generated from the running service's ``/openapi.json`` (openapi-python-client, as
docs/api.md says), used against that service without a hand edit: upload, get, list, predict, delete."""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

from tests.e2e.server import ROOT, running_server
from tests.helpers import image_bytes

pytestmark = pytest.mark.e2e
CONFIG = ROOT / "docs" / "openapi-python-client.yaml"
PACKAGE = "unetseg_client"
API_KEY = "client-test-key"


@pytest.fixture
def generated(tmp_path: Path, weights_dir: Path) -> Iterator[tuple[str, Any]]:
    """(base URL, a function importing a module of the generated client) with the server running."""
    env = {"UNETSEG_API_KEY": API_KEY, "UNETSEG_DEFAULT_MODEL": "tiny", "UNETSEG_WARMUP": "false"}
    with running_server(weights_dir, tmp_path / "data", **env) as (base, _):
        out = tmp_path / "client"
        # The generator formats its output with ruff, found on PATH (the virtual environment's).
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        args = ["--config", str(CONFIG), "--meta", "none", "--output-path", str(out / PACKAGE)]
        run = subprocess.run(
            [sys.executable, "-m", "openapi_python_client", "generate", "--url", f"{base}/openapi.json", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "PATH": path},
            timeout=300,
        )
        said = run.stdout + run.stderr
        assert run.returncode == 0, said
        assert "warning" not in said.lower() and "error" not in said.lower() and "skipping" not in said.lower(), said
        sys.path.insert(0, str(out))

        def module(name: str) -> ModuleType:
            return importlib.import_module(f"{PACKAGE}.{name}" if name else PACKAGE)

        try:
            yield base, module
        finally:
            sys.path.remove(str(out))
            for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
                del sys.modules[name]


def test_a_generated_client_uploads_predicts_and_deletes(generated: tuple[str, Any]) -> None:
    base, module = generated
    authenticated = module("").AuthenticatedClient  # sends the key as "Authorization: Bearer <key>"
    create_upload, get_upload = module("api.uploads.create_upload"), module("api.uploads.get_upload")
    list_uploads, delete_upload = module("api.uploads.list_uploads"), module("api.uploads.delete_upload")
    predict = module("api.predict.predict")
    models = module("models")
    png = image_bytes(40, 30, seed=7)

    def image() -> Any:
        return module("types").File(payload=io.BytesIO(png), file_name="frame.png", mime_type="image/png")

    with authenticated(base_url=base, token=API_KEY, timeout=60) as client:
        first = create_upload.sync_detailed(client=client, body=models.UploadForm(file=image()))
        assert first.status_code == 201, first.content
        up = first.parsed
        assert isinstance(up, models.UploadOut)
        assert (up.width, up.height, up.format_, up.bytes_) == (40, 30, "png", len(png))
        again = create_upload.sync_detailed(client=client, body=image())  # the image as the body itself
        assert again.status_code == 200 and isinstance(again.parsed, models.UploadOut) and again.parsed.id == up.id

        got = get_upload.sync(up.id, client=client)
        assert isinstance(got, models.UploadOut) and got.id == up.id and got.created_at == up.created_at
        listed = list_uploads.sync(client=client)
        assert isinstance(listed, models.UploadList) and [u.id for u in listed.items] == [up.id] and listed.count == 1

        by_file = predict.sync(client=client, body=models.PredictForm(file=image()))
        by_id = predict.sync(client=client, body=models.PredictByUpload(upload_id=up.id))
        by_form_id = predict.sync(client=client, body=models.PredictForm(upload_id=up.id))
        by_body = predict.sync(client=client, body=image())
        masks = [r.payload.read() for r in (by_file, by_id, by_form_id, by_body)]
        assert masks[0][:8] == b"\x89PNG\r\n\x1a\n" and all(m == masks[0] for m in masks)
        with Image.open(io.BytesIO(masks[0])) as mask:
            assert mask.mode == "P" and mask.size == (40, 30)

        # format=json: the body parsed into the generated Prediction model.
        as_json = predict.sync_detailed(
            client=client, body=models.PredictByUpload(upload_id=up.id), format_=models.PredictFormat.JSON
        )
        assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
        prediction = models.Prediction.from_dict(json.loads(as_json.content))
        assert (prediction.model, prediction.width, prediction.height) == ("tiny", 40, 30)
        assert sum(c.pixels for c in prediction.classes) == 40 * 30
        assert all(isinstance(c, models.ClassArea) and isinstance(c.rle, models.RLE) for c in prediction.classes)

        # Errors come back as the generated ErrorBody.
        missing = predict.sync(client=client, body=models.PredictByUpload(upload_id="0" * 64))
        assert isinstance(missing, models.ErrorBody) and "no upload" in missing.detail and missing.request_id
        with authenticated(base_url=base, token="not-the-key") as stranger:
            refused = get_upload.sync(up.id, client=stranger)
        assert isinstance(refused, models.ErrorBody) and "not valid" in refused.detail

        assert delete_upload.sync_detailed(up.id, client=client).status_code == 204
        gone = get_upload.sync_detailed(up.id, client=client)
        assert gone.status_code == 404 and isinstance(gone.parsed, models.ErrorBody)
