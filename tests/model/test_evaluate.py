from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.evaluate import class_scores, confusion, main, summarize
from tests.helpers import write_tiny_bundle
from tests.model.synthetic import write_disc_dataset


def test_metrics_match_hand_computed_values() -> None:
    truth = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 0]])
    cm = confusion(pred, truth, 2)
    # truth 0 -> pred 0: 2, pred 1: 1 ; truth 1 -> pred 0: 2, pred 1: 3
    assert cm.tolist() == [[2, 1], [2, 3]]
    dice, iou = class_scores(cm)
    assert dice[1] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))  # 6/9
    assert iou[1] == pytest.approx(3 / 6)
    assert dice[0] == pytest.approx(4 / 7)
    report = summarize([cm, confusion(truth, truth, 2)], ["bg", "fg"], ["a", "b"])
    assert report["dice"] == pytest.approx((6 / 9 + 1) / 2)
    assert report["pixel_accuracy"] == pytest.approx((5 + 8) / 16)
    assert report["worst_images"][0]["stem"] == "a"


def test_absent_class_predicted_absent_scores_one_and_ignore_is_skipped() -> None:
    truth = np.array([[0, 255]])
    pred = np.array([[0, 1]])
    cm = confusion(pred, truth, 2)
    assert cm.sum() == 1
    dice, iou = class_scores(cm)
    assert dice[1] == 1.0 and iou[1] == 1.0


def test_evaluate_cli_writes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_disc_dataset(tmp_path / "data", n=4)
    write_tiny_bundle(tmp_path / "b")
    out = tmp_path / "report.json"
    assert main([str(data), "--model", str(tmp_path / "b"), "--mask", "binary", "--tta", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["plain"]["images"] == 4 and "tta" in report
    assert {c["name"] for c in report["plain"]["classes"]} == {"background", "class1"}
    text = capsys.readouterr().out
    assert "per-image dice" in text and "with flip TTA" in text
