from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.backends import s3_emulator
from tests.helpers import write_tiny_bundle


@pytest.fixture
def weights_dir(tmp_path: Path) -> Path:
    root = tmp_path / "weights"
    write_tiny_bundle(root / "tiny", name="tiny")
    write_tiny_bundle(root / "tiles", seed=1, name="tiles", channels=1, classes=3, sizing="tile", size=32)
    return root


def make_settings(tmp_path: Path, weights_dir: Path, **kw: object) -> Settings:
    base: dict[str, object] = dict(
        weights_dir=weights_dir,
        data_dir=tmp_path / "data",
        device="cpu",
        default_model="tiny",
        precision="float32",
        max_wait_ms=1.0,
        io_threads=2,
    )
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout}s: {client.get('/readyz').json()}")


@pytest.fixture
def settings(tmp_path: Path, weights_dir: Path) -> Settings:
    return make_settings(tmp_path, weights_dir)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3 emulator on 127.0.0.1 for a test module's S3-backed stores (``tests.backends.s3_emulator``)."""
    with s3_emulator() as endpoint:
        yield endpoint
