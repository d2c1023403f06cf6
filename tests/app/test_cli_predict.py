"""``unetseg predict``: a bundle folder names a model as well as a name does; two inputs with one stem are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from tests.helpers import image_bytes, write_tiny_bundle


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i, folder in enumerate(("a", "b")):
        path = tmp_path / "in" / folder / f"frame{i}.png"
        path.parent.mkdir(parents=True)
        path.write_bytes(image_bytes(40, 30, seed=i))
        paths.append(path)
    return paths


def test_model_as_a_bundle_folder_or_a_name(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "weights" / "tiny", name="tiny")
    by_folder, by_name = tmp_path / "by-folder", tmp_path / "by-name"
    argv = [*map(str, images), "--device", "cpu"]
    assert main(["predict", *argv, "--model", str(folder), "--out", str(by_folder)]) == 0
    weights = ["--weights-dir", str(tmp_path / "weights")]
    assert main(["predict", *argv, "--model", "tiny", *weights, "--out", str(by_name)]) == 0
    for path in images:
        a = np.asarray(Image.open(by_folder / f"{path.stem}.png"))
        b = np.asarray(Image.open(by_name / f"{path.stem}.png"))
        assert a.shape == (30, 40) and np.array_equal(a, b)
    assert main(["predict", *argv, "--model", "nope", *weights, "--out", str(by_name)]) == 2
    assert "unknown model 'nope'; available: tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["predict", *argv, "--model", str(tmp_path / "in"), "--out", str(by_name)])
    assert info.value.code == 2
    assert "not a model bundle" in capsys.readouterr().err


def test_two_inputs_with_one_stem_are_refused_before_anything_is_written(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny", name="tiny")
    twin = images[1].with_name(images[0].name)  # b/frame0.png beside a/frame0.png
    images[1].rename(twin)
    out = tmp_path / "masks"
    with pytest.raises(SystemExit) as info:
        main(["predict", str(images[0]), str(twin), "--model", str(folder), "--out", str(out), "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "would both be written to" in err and "frame0.png" in err
    assert not out.exists()
