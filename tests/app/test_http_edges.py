"""HTTP edges the app itself answers: HEAD on the probes and the page, redirects that do not trust the Host
header, repeated query parameters, settings that cannot be read, the shipped bundles found from anywhere."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import DEFAULT_WEIGHTS_DIR, Settings, SettingsError, load_settings, shipped_weights_dirs
from tests.helpers import image_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["/", "/healthz", "/readyz"])
def test_head_answers_as_get_without_a_body(client: TestClient, path: str) -> None:
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_a_trailing_slash_redirect_is_a_path_not_the_host_a_client_named(client: TestClient) -> None:
    r = client.get("/v1/models/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 307
    assert r.headers["location"] == "/v1/models"


@pytest.mark.parametrize(
    ("method", "url", "name"),
    [
        ("POST", "/v1/predict?model=tiny&model=tiles", "model"),
        ("POST", "/v1/predict?format=png&alpha=0.2&format=json", "format"),
        ("GET", "/v1/uploads?limit=1&limit=1000", "limit"),
    ],
)
def test_a_repeated_query_parameter_is_refused(client: TestClient, method: str, url: str, name: str) -> None:
    r = client.request(method, url, content=image_bytes(20, 20), headers={"Content-Type": "image/png"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [
        {"type": "repeated", "loc": ["query", name], "msg": "Given more than once: send it once"}
    ]


def test_a_repeated_parameter_the_route_does_not_take_is_ignored_as_any_other(client: TestClient) -> None:
    assert client.get("/v1/models?x=1&x=2").status_code == 200


def test_a_setting_that_cannot_be_read_is_named_without_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"UNETSEG_MAX_BATCH: Input should be a valid integer.*'abc'"):
        load_settings(max_batch="abc")
    for command in (["serve"], ["predict", "x.png"], ["segment", "a", "b"]):
        done = subprocess.run(
            [sys.executable, "-m", "app", *command],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "UNETSEG_MAX_BATCH": "abc"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert "UNETSEG_MAX_BATCH: Input should be a valid integer" in done.stderr
        assert "Traceback" not in done.stderr


def test_the_shipped_bundles_are_found_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no weights/ here
    shipped = Settings().weights_dir
    assert shipped == ROOT / "weights"
    assert Settings(weights_dir=Path("elsewhere")).weights_dir == Path("elsewhere")  # a folder given is kept
    (tmp_path / "weights" / "mine").mkdir(parents=True)
    (tmp_path / "weights" / "mine" / "card.json").write_text("{}")
    assert Settings().weights_dir == DEFAULT_WEIGHTS_DIR  # ./weights first, when it has bundles
    assert shipped_weights_dirs()[0] == ROOT / "weights"


def test_an_installed_package_ships_every_bundle() -> None:
    """The wheel installs weights/<name>/ under share/unetseg/weights, where ``shipped_weights_dirs`` looks."""
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    bundles = sorted(p.parent for p in (ROOT / "weights").glob("*/card.json"))
    assert data_files == {
        f"share/unetseg/weights/{b.name}": [f"weights/{b.name}/card.json", f"weights/{b.name}/model.safetensors"]
        for b in bundles
    }


def test_predict_from_another_folder_uses_the_shipped_bundles_and_a_wrong_folder_names_the_option(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes(32, 24))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "UNETSEG_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "app", "predict", "a.png", "--model", "polyp", "--out", "masks"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "masks" / "a.png").is_file()
    (tmp_path / "empty").mkdir()
    for command in (
        [*cmd, "--weights-dir", "empty"],
        [sys.executable, "-m", "app", "segment", ".", "out", "--model", "polyp", "--weights-dir", "empty"],
    ):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2
        assert "--weights-dir" in done.stderr, done.stderr
