from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import load_bundle
from model.data import MaskSpec, find_pairs, load_sample
from model.pseudo_label import main, pseudo_mask
from model.train import train
from tests.model.synthetic import config, write_disc_dataset


def test_pseudo_mask_ignores_unsure_pixels() -> None:
    probs = torch.tensor([[[0.95, 0.6]], [[0.05, 0.4]]])  # (K=2, 1, 2)
    mask = pseudo_mask(probs.log(), confidence=0.9)
    assert mask.tolist() == [[0, 255]]
    assert pseudo_mask(probs.log(), confidence=0.5).tolist() == [[0, 0]]
    sure = torch.tensor([[[0.02]], [[0.98]]])
    assert pseudo_mask(sure.log(), confidence=0.9).tolist() == [[1]]


def test_pseudo_labels_are_a_training_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_disc_dataset(tmp_path / "data", n=16)
    cfg = config(tmp_path, data, epochs=12, base_width=8)
    train(cfg, log=False)
    unlabelled = write_disc_dataset(tmp_path / "new", n=3, seed=7)
    out = tmp_path / "pseudo"
    assert main(["--model", cfg.out, str(unlabelled / "images"), str(out), "--confidence", "0.8"]) == 0
    pairs = find_pairs(out)
    assert [p[0].name for p in pairs] == ["d00.png", "d01.png", "d02.png"]
    assert (out / "images" / "d01.png").read_bytes() == (unlabelled / "images" / "d01.png").read_bytes()
    agree = []
    for image_path, mask_path in pairs:
        pseudo = load_sample(image_path, mask_path, MaskSpec.parse("index"), 3).mask
        truth = load_sample(
            unlabelled / "images" / image_path.name, unlabelled / "masks" / image_path.name, MaskSpec.parse("binary"), 3
        ).mask
        assert set(np.unique(pseudo)) <= {0, 1, 255}
        sure = pseudo != 255
        agree.append(float((pseudo[sure] == truth[sure]).mean()))
    assert min(agree) > 0.9  # the trained model's confident pixels are mostly right
    assert "ignored" in capsys.readouterr().out
    assert load_bundle(cfg.out).card.name == "discs"


def test_pseudo_label_refuses_a_used_folder_and_bad_confidence(tmp_path: Path) -> None:
    images = write_disc_dataset(tmp_path / "new", n=1) / "images"
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep")
    for args in (["--confidence", "1.5"], []):
        out = tmp_path / ("used" if not args else "fresh")
        with pytest.raises(SystemExit):
            main(["--model", "unused", str(images), str(out), *args])
    with pytest.raises(SystemExit):
        main(["--model", "unused", str(tmp_path / "missing"), str(tmp_path / "fresh")])
    assert (tmp_path / "used" / "x").read_text() == "keep"
    assert not (tmp_path / "fresh").exists()
