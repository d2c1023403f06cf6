"""Instances from a model's logits, and the 2018 Data Science Bowl metric that scores them.

    ids = instances_from_logits(logits, card.instances)   # (K, H, W) logits -> (H, W) int32, 0 = background
    table = instance_properties(ids)                      # [{id, area, bbox, centroid}, ...]
    precision = image_precisions(truth_ids, ids)          # (10,) TP / (TP + FP + FN) at IoU 0.5 ... 0.95

Post-processing (``InstanceSpec.method``, recorded in the card):

- ``watershed``: the class map is the argmax of the logits, so the instances partition exactly the
  foreground (interior or boundary) of the semantic mask. The 8-connected components of the interior class
  are the markers; a marker-controlled watershed (scikit-image) floods the foreground from them over
  1 - p(interior), so touching objects meet where the model is least sure a pixel is interior. Foreground
  that no marker reaches (a small object predicted as boundary only) becomes an instance of its own.
- ``components``: the 8-connected components of the interior class (a binary model's foreground), as
  ``skimage.measure.label`` counts them.

Either way, instances smaller than ``min_area`` pixels are dropped and the ids are renumbered 1..N.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential, watershed

from model.card import InstanceSpec

# The competition's IoU thresholds: 0.5, 0.55, ..., 0.95.
THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

_EIGHT = np.ones((3, 3), dtype=bool)


def instances_from_logits(logits: Any, spec: InstanceSpec) -> np.ndarray:
    """(K, H, W) logits at the image's size (a NumPy array, or a CPU tensor) -> (H, W) int32 instance ids,
    0 = background, 1..N. NumPy only: the service's front ends run it without torch."""
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"logits must be (K, H, W), got shape {tuple(x.shape)}")
    classes = x.argmax(0)
    if spec.method == "components":
        ids, _ = ndi.label(classes == spec.interior, structure=_EIGHT)
        return _finish(ids, spec.min_area)
    if spec.boundary is None:
        raise ValueError("the watershed method needs a boundary class")
    interior = classes == spec.interior
    foreground = interior | (classes == spec.boundary)
    markers, n = ndi.label(interior, structure=_EIGHT)
    ids = np.zeros(classes.shape, dtype=np.int32)
    if n:
        e = np.exp(x - x.max(0, keepdims=True))
        p_interior = e[spec.interior] / e.sum(0)
        ids = watershed(1.0 - p_interior, markers, mask=foreground)
    orphans, m = ndi.label(foreground & (ids == 0), structure=_EIGHT)
    if m:
        ids = np.where(orphans > 0, orphans + n, ids)
    return _finish(ids, spec.min_area)


def _finish(ids: np.ndarray, min_area: int) -> np.ndarray:
    """Drop instances under ``min_area`` pixels and renumber the rest 1..N (int32)."""
    ids = ids.astype(np.int32, copy=False)
    if min_area > 1 and ids.max(initial=0) > 0:
        areas = np.bincount(ids.ravel())
        small = areas < min_area
        small[0] = False
        ids = np.where(small[ids], 0, ids)
    out: np.ndarray = relabel_sequential(ids)[0].astype(np.int32)
    return out


def instance_properties(ids: np.ndarray) -> list[dict[str, Any]]:
    """Each instance of (H, W) ids 1..N: ``id``, ``area`` (pixels), ``bbox`` [x, y, w, h] and ``centroid``
    [x, y] (the mean of its pixels' indices, rounded to 0.01), in id order."""
    n = int(ids.max(initial=0))
    if n == 0:
        return []
    out: list[dict[str, Any]] = []
    for i, box in enumerate(ndi.find_objects(ids, n), start=1):
        if box is None:  # an id with no pixels (ids not renumbered)
            continue
        rows, cols = box
        ys, xs = np.nonzero(ids[box] == i)
        out.append(
            {
                "id": i,
                "area": int(ys.size),
                "bbox": [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start],
                "centroid": [round(float(xs.mean()) + cols.start, 2), round(float(ys.mean()) + rows.start, 2)],
            }
        )
    return out


def iou_matrix(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(T, P) IoU of every true object with every predicted one; both (H, W) instance ids, 0 = background."""
    if truth.shape != pred.shape:
        raise ValueError(f"truth is {truth.shape}, prediction is {pred.shape}")
    t: np.ndarray = relabel_sequential(truth.astype(np.int64))[0].ravel()
    p: np.ndarray = relabel_sequential(pred.astype(np.int64))[0].ravel()
    n_t, n_p = int(t.max(initial=0)), int(p.max(initial=0))
    inter = np.bincount(t * (n_p + 1) + p, minlength=(n_t + 1) * (n_p + 1)).reshape(n_t + 1, n_p + 1)
    area_t, area_p = inter.sum(1), inter.sum(0)
    overlap = inter[1:, 1:].astype(np.float64)
    union = area_t[1:, None] + area_p[None, 1:] - overlap
    iou: np.ndarray = overlap / np.maximum(union, 1)
    return iou


def matches(iou: np.ndarray, threshold: float) -> int:
    """True positives at ``threshold``: pairs with IoU > threshold, each object in at most one pair.

    Pairs are taken greedily from the highest IoU. Above 0.5 this is the only matching there is (with
    objects that do not overlap each other, an object can have IoU > 0.5 with one partner at most); the
    rule matters only for lower thresholds.
    """
    rows, cols = np.nonzero(iou > threshold)
    if rows.size == 0:
        return 0
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_t: set[int] = set()
    used_p: set[int] = set()
    for i in order:
        r, c = int(rows[i]), int(cols[i])
        if r not in used_t and c not in used_p:
            used_t.add(r)
            used_p.add(c)
    return len(used_t)


def image_precisions(truth: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """(len(thresholds),) TP / (TP + FP + FN) of one image at each IoU threshold; its mean is the image's AP.

    The 2018 Data Science Bowl's definition (https://www.kaggle.com/competitions/data-science-bowl-2018,
    "Evaluation"): a prediction is a hit at threshold t when its IoU with a true object is > t, one match
    per object; the score is the mean over images of the mean over thresholds. Every image of that
    competition had nuclei, so its text never meets 0 / 0. An image with no true and no predicted object
    scores 1 here, as Kaggle scored empty images under the same metric in the TGS Salt Identification
    Challenge (2018): predicting nothing where there is nothing is right. Predictions on an image without
    true objects score 0 (all false positives), as do images whose objects are all missed.
    """
    iou = iou_matrix(truth, pred)
    n_t, n_p = iou.shape
    if n_t == 0 and n_p == 0:
        return np.ones(len(thresholds))
    out = np.empty(len(thresholds))
    for i, t in enumerate(thresholds):
        tp = matches(iou, t)
        out[i] = tp / (n_t + n_p - tp)  # TP + FP + FN = TP + (P - TP) + (T - TP)
    return out


def summarize_instances(
    precisions: Sequence[np.ndarray],
    stems: Sequence[str],
    counts: Sequence[tuple[int, int]],
    spec: InstanceSpec,
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict[str, Any]:
    """The report's "instances" section from per-image precisions and (true, predicted) object counts."""
    per = np.stack(list(precisions)) if precisions else np.zeros((0, len(thresholds)))  # (N, T)
    ap = per.mean(1) if len(per) else np.zeros(0)  # (N,) each image's AP
    q = np.percentile(ap, [0, 10, 25, 50, 75, 100]) if len(ap) else np.zeros(6)
    i50 = list(thresholds).index(0.5) if 0.5 in thresholds else 0
    return {
        "method": spec.to_dict(),
        "images": len(per),
        "empty_images": sum(1 for t, p in counts if t == 0 and p == 0),
        "true_objects": int(sum(t for t, _ in counts)),
        "predicted_objects": int(sum(p for _, p in counts)),
        "thresholds": list(thresholds),
        "ap_per_threshold": [float(v) for v in per.mean(0)] if len(per) else [0.0] * len(thresholds),
        "map": float(ap.mean()) if len(ap) else 0.0,
        "ap50": float(per[:, i50].mean()) if len(per) else 0.0,
        "per_image_ap": {
            **{k: float(v) for k, v in zip(("min", "p10", "p25", "median", "p75", "max"), q, strict=True)},
            "mean": float(ap.mean()) if len(ap) else 0.0,
        },
        "worst_images": [
            {"stem": stems[i], "ap": float(ap[i]), "true": counts[i][0], "predicted": counts[i][1]}
            for i in np.argsort(ap, kind="stable")[: min(5, len(stems))]
        ],
    }
