from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.bundle import InstanceSpec
from model.evaluate import class_scores, confusion, main, merged, summarize
from tests.helpers import write_tiny_bundle
from tests.model.synthetic import write_disc_dataset, write_touching_discs


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


def test_the_foreground_union_of_interior_and_boundary() -> None:
    truth = np.array([[0, 1, 1, 2, 2, 0]])
    pred = np.array([[0, 2, 1, 1, 0, 1]])
    cm = confusion(pred, truth, 3)
    # Union: truth fg at 1..4, pred fg at 1, 2, 3, 5 -> TP 3, FP 1, FN 1 (interior/boundary swaps count).
    assert merged(cm, [1, 2]).tolist() == [[1, 1], [1, 3]]
    report = summarize([cm], ["background", "nucleus", "boundary"], ["a"], foreground=[1, 2])
    assert report["foreground"]["dice"] == pytest.approx(6 / 8)
    assert report["foreground"]["iou"] == pytest.approx(3 / 5)
    assert report["foreground"]["classes"] == ["nucleus", "boundary"]
    assert "foreground" not in summarize([cm], ["background", "nucleus", "boundary"], ["a"])


def test_a_binary_model_is_scored_on_its_connected_components(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_touching_discs(tmp_path / "data", n=3)
    write_tiny_bundle(tmp_path / "b")
    out = tmp_path / "r.json"
    assert main([str(data), "--model", str(tmp_path / "b"), "--mask", "binary", "--json", str(out)]) == 0
    inst = json.loads(out.read_text())["plain"]["instances"]
    assert inst["method"] == {"method": "components", "interior": 1, "min_area": 0}
    assert inst["images"] == 3 and inst["true_objects"] == 6
    assert len(inst["ap_per_threshold"]) == 10 and 0 <= inst["map"] <= inst["ap50"] <= 1
    assert inst["map"] == pytest.approx(np.mean(inst["ap_per_threshold"]))
    text = capsys.readouterr().out
    assert "mAP (DSB 2018)" in text and "per-image AP" in text
    assert (
        main([str(data), "--model", str(tmp_path / "b"), "--mask", "binary", "--no-instances", "--json", str(out)]) == 0
    )
    assert "instances" not in json.loads(out.read_text())["plain"]
    args = [str(data), "--model", str(tmp_path / "b"), "--mask", "binary", "--min-area", "5", "--json", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["plain"]["instances"]["method"]["min_area"] == 5


def test_an_instance_model_is_scored_on_its_watershed_instances(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_touching_discs(tmp_path / "data", n=3)
    spec = InstanceSpec("watershed", 1, 2, min_area=4)
    write_tiny_bundle(tmp_path / "b", classes=3, instances=spec, training={"mask": "instances:boundary=2"})
    out = tmp_path / "r.json"
    assert main([str(data), "--model", str(tmp_path / "b"), "--tta", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mask"] == "instances:boundary=2"
    for run in ("plain", "tta"):
        report = result[run]
        assert report["instances"]["method"] == spec.to_dict() and report["instances"]["true_objects"] == 6
        assert report["foreground"]["classes"] == ["class1", "class2"]
        assert 0 <= report["foreground"]["dice"] <= 1
    assert "foreground (class1 + class2) dice" in capsys.readouterr().out
    # Against the binary masks, the true instances are read from instances/ beside them.
    assert main([str(data), "--model", str(tmp_path / "b"), "--mask", "binary", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["plain"]["instances"]["true_objects"] == 6
    assert main([str(data), "--model", str(tmp_path / "b"), "--no-instances", "--json", str(out)]) == 0
    assert "instances" not in json.loads(out.read_text())["plain"]
