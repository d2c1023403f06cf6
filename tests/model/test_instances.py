"""Instances from logits (watershed, connected components) and the 2018 Data Science Bowl metric, against
hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.bundle import InstanceSpec
from model.data import instance_targets
from model.instances import (
    THRESHOLDS,
    image_precisions,
    instance_properties,
    instances_from_logits,
    iou_matrix,
    matches,
    summarize_instances,
)

WATERSHED = InstanceSpec("watershed", interior=1, boundary=2)


def one_hot_logits(classes: np.ndarray, k: int = 3) -> torch.Tensor:
    """(H, W) class ids -> (K, H, W) logits whose argmax is ``classes``."""
    return torch.nn.functional.one_hot(torch.from_numpy(classes).long(), k).permute(2, 0, 1).float() * 8


def boxes(shape: tuple[int, int], *rects: tuple[int, int, int, int]) -> np.ndarray:
    """Instance ids 1..n for rectangles (top, left, height, width), drawn in order."""
    ids = np.zeros(shape, dtype=np.int32)
    for i, (t, left, hh, ww) in enumerate(rects, start=1):
        ids[t : t + hh, left : left + ww] = i
    return ids


def test_thresholds_are_the_competitions() -> None:
    assert THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_a_perfect_prediction_scores_one_whatever_its_ids() -> None:
    truth = boxes((10, 20), (1, 1, 4, 4), (5, 10, 3, 6))
    pred = np.where(truth == 1, 7, np.where(truth == 2, 3, 0))  # same objects, other ids
    assert image_precisions(truth, pred).tolist() == [1.0] * 10


def test_hits_need_iou_strictly_above_the_threshold() -> None:
    # One object of 4 x 6 = 24 pixels, one predicted 4 x 4 inside it: IoU 16/24 = 0.667.
    # 0.5 .. 0.65: one hit (TP 1) -> 1; 0.7 .. 0.95: TP 0, FP 1, FN 1 -> 0.
    truth = boxes((8, 10), (2, 2, 4, 6))
    pred = boxes((8, 10), (2, 2, 4, 4))
    assert iou_matrix(truth, pred) == pytest.approx(np.array([[16 / 24]]))
    assert image_precisions(truth, pred).tolist() == [1.0] * 4 + [0.0] * 6


def test_image_ap_averages_the_thresholds() -> None:
    # Object A predicted exactly; object B (24 px) by a 16 px box inside it (IoU 0.667).
    # 0.5 .. 0.65: TP 2 -> 2/2 = 1; 0.7 .. 0.95: TP 1, FP 1, FN 1 -> 1/3. AP = (4 + 6/3) / 10 = 0.6.
    truth = boxes((10, 20), (1, 1, 3, 3), (4, 8, 4, 6))
    pred = boxes((10, 20), (1, 1, 3, 3), (4, 8, 4, 4))
    p = image_precisions(truth, pred)
    assert p[:4].tolist() == [1.0] * 4
    assert p[4:] == pytest.approx([1 / 3] * 6)
    assert p.mean() == pytest.approx(0.6)


def test_a_split_nucleus_is_one_hit_and_one_false_positive() -> None:
    # A 4 x 10 nucleus predicted as two pieces of 4 x 6 (IoU 0.6) and 4 x 4 (IoU 0.4).
    # 0.5, 0.55: TP 1, FP 1, FN 0 -> 1/2; from 0.6 on (0.6 is not > 0.6): TP 0, FP 2, FN 1 -> 0.
    truth = boxes((6, 12), (1, 1, 4, 10))
    pred = boxes((6, 12), (1, 1, 4, 6), (1, 7, 4, 4))
    assert iou_matrix(truth, pred) == pytest.approx(np.array([[0.6, 0.4]]))
    p = image_precisions(truth, pred)
    assert p.tolist() == [0.5, 0.5] + [0.0] * 8
    assert p.mean() == pytest.approx(0.1)


def test_a_merged_pair_is_one_hit_and_one_miss() -> None:
    # Two touching nuclei (4 x 6 and 4 x 4) predicted as one 4 x 10 blob: IoU 0.6 and 0.4.
    # 0.5, 0.55: TP 1, FP 0, FN 1 -> 1/2; from 0.6 on: TP 0, FP 1, FN 2 -> 0.
    truth = boxes((6, 12), (1, 1, 4, 6), (1, 7, 4, 4))
    pred = boxes((6, 12), (1, 1, 4, 10))
    assert image_precisions(truth, pred).tolist() == [0.5, 0.5] + [0.0] * 8
    # Two halves of IoU exactly 0.5 are no hit at all: TP 0, FP 1, FN 2.
    halves = boxes((6, 12), (1, 1, 4, 5), (1, 6, 4, 5))
    assert image_precisions(halves, pred).tolist() == [0.0] * 10


def test_matching_is_one_to_one() -> None:
    # One prediction overlapping two true objects with IoU 0.4 and 0.45: at a threshold of 0.3 both pairs
    # qualify, but the prediction matches one object only (the better one): TP 1, FP 0, FN 1.
    iou = np.array([[0.4], [0.45]])
    assert matches(iou, 0.3) == 1
    assert matches(iou.T, 0.3) == 1
    # Greedy from the highest IoU: pred 0 takes truth 1 (0.9), so pred 1 can only take truth 0 (0.35).
    iou2 = np.array([[0.6, 0.35], [0.9, 0.0]])
    assert matches(iou2, 0.3) == 2
    assert matches(iou2, 0.5) == 1
    truth = boxes((6, 12), (1, 1, 4, 6), (1, 7, 4, 4))
    pred = boxes((6, 12), (1, 1, 4, 10))
    assert image_precisions(truth, pred, thresholds=(0.3,)).tolist() == [0.5]


def test_empty_images() -> None:
    empty = np.zeros((5, 5), dtype=np.int32)
    one = boxes((5, 5), (1, 1, 2, 2))
    assert image_precisions(empty, empty).tolist() == [1.0] * 10  # nothing there, nothing predicted
    assert image_precisions(empty, one).tolist() == [0.0] * 10  # only false positives
    assert image_precisions(one, empty).tolist() == [0.0] * 10  # only misses


def test_summary_means_over_images() -> None:
    spec = InstanceSpec("components", 1)
    per = [np.array([1.0] * 4 + [0.0] * 6), np.ones(10), np.array([0.5, 0.5] + [0.0] * 8)]
    r = summarize_instances(per, ["a", "b", "c"], [(1, 1), (0, 0), (2, 1)], spec)
    assert r["map"] == pytest.approx((0.4 + 1.0 + 0.1) / 3)
    assert r["ap50"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert r["ap_per_threshold"][0] == pytest.approx(2.5 / 3) and r["ap_per_threshold"][9] == pytest.approx(1 / 3)
    assert r["per_image_ap"]["min"] == pytest.approx(0.1) and r["per_image_ap"]["max"] == 1.0
    assert r["empty_images"] == 1 and r["true_objects"] == 3 and r["predicted_objects"] == 2
    assert [w["stem"] for w in r["worst_images"]] == ["c", "a", "b"]
    assert r["method"] == {"method": "components", "interior": 1, "min_area": 0}


def test_watershed_separates_touching_objects_along_their_boundaries() -> None:
    truth = boxes((20, 32), (3, 3, 11, 10), (3, 13, 11, 10), (15, 26, 4, 4))  # two touching, one apart
    classes = instance_targets(truth, 2)
    assert (classes[3:14, 11:15] == 2).all()  # 2 px of boundary each side of the touching line
    ids = instances_from_logits(one_hot_logits(classes), WATERSHED)
    assert ids.dtype == np.int32 and ids.max() == 3
    assert image_precisions(truth, ids).tolist() == [1.0] * 10
    # The same mask as connected components: the touching pair is one object.
    binary = one_hot_logits((truth > 0).astype(np.int64), 2)
    cc = instances_from_logits(binary, InstanceSpec("components", 1))
    assert cc.max() == 2


def test_instances_partition_the_semantic_foreground() -> None:
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(3, 24, 30)).astype(np.float32))
    ids = instances_from_logits(logits, WATERSHED)
    fg = logits.argmax(0).numpy() != 0
    assert ((ids > 0) == fg).all()
    assert sorted(np.unique(ids[ids > 0]).tolist()) == list(range(1, int(ids.max()) + 1))


def test_foreground_without_a_marker_and_min_area() -> None:
    classes = np.zeros((12, 20), dtype=np.int64)
    classes[2:10, 2:10] = 2
    classes[4:8, 4:8] = 1  # an object with an interior
    classes[1:4, 14:17] = 2  # a small object predicted as boundary only (9 px)
    ids = instances_from_logits(one_hot_logits(classes), WATERSHED)
    assert ids.max() == 2 and (ids[1:4, 14:17] > 0).all()
    kept = instances_from_logits(one_hot_logits(classes), InstanceSpec("watershed", 1, 2, min_area=10))
    assert kept.max() == 1 and (kept[1:4, 14:17] == 0).all() and (kept[2:10, 2:10] == 1).all()
    assert instances_from_logits(one_hot_logits(np.zeros((4, 4), dtype=np.int64)), WATERSHED).max() == 0


def test_components_are_eight_connected() -> None:
    classes = np.zeros((6, 6), dtype=np.int64)
    classes[1, 1] = classes[2, 2] = 1  # touching at a corner: one object
    classes[4, 4] = 1
    ids = instances_from_logits(one_hot_logits(classes, 2), InstanceSpec("components", 1))
    assert ids.max() == 2 and ids[1, 1] == ids[2, 2] != ids[4, 4]


def test_bad_logits_are_refused() -> None:
    with pytest.raises(ValueError, match="K, H, W"):
        instances_from_logits(torch.zeros(2, 4), WATERSHED)


def test_instance_properties() -> None:
    ids = boxes((10, 20), (1, 2, 3, 4), (5, 10, 2, 6))  # (top, left, height, width)
    ids[9, 19] = 4  # id 3 has no pixels
    assert instance_properties(ids) == [
        {"id": 1, "area": 12, "bbox": [2, 1, 4, 3], "centroid": [3.5, 2.0]},
        {"id": 2, "area": 12, "bbox": [10, 5, 6, 2], "centroid": [12.5, 5.5]},
        {"id": 4, "area": 1, "bbox": [19, 9, 1, 1], "centroid": [19.0, 9.0]},
    ]
    assert instance_properties(np.zeros((3, 3), dtype=np.int32)) == []
