"""Segmentation metrics and the evaluation CLI.

Metrics come from per-image confusion matrices (K x K, rows = truth, columns = prediction):

- per class c: Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN); an image where class c is
  absent from both truth and prediction counts as 1 (a correct empty prediction);
- ``dice`` / ``iou``: the mean over images, then over foreground classes (the Kvasir-SEG convention);
- ``pixel_accuracy``: correct pixels / all pixels, over the whole set;
- ``foreground`` (instance models with a boundary class): Dice and IoU of the union of the interior and
  boundary classes against the union of the objects, the number comparable with a binary model's Dice.

Instances (``model.instances``) are scored with the 2018 Data Science Bowl metric: per image, TP / (TP + FP
+ FN) at IoU thresholds 0.5, 0.55 ... 0.95 with one-to-one matching, averaged over the thresholds (the
image's AP) and then over images (``map``); ``ap50`` is the mean at 0.5 alone. Models whose card has
``instances`` are scored so against their masks' instance ids; a binary model is scored on the connected
components of its mask whenever the dataset folder has ``instances/`` (``--no-instances`` skips it).

Usage: ``unetseg evaluate --model weights/polyp DATA_DIR [--mask binary] [--tta] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.bundle import InputPolicy, InstanceSpec, load_bundle
from model.data import MaskSpec, Sample, find_pairs, index_folder, load_sample, split
from model.inference import blended_logits, make_plan
from model.instances import image_precisions, instances_from_logits, summarize_instances


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts of (truth, prediction) pairs; truth values >= K (ignore) are skipped."""
    t = truth.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    keep = t < num_classes
    idx = t[keep] * num_classes + p[keep]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_on_device(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> np.ndarray:
    """``confusion`` of two (H, W) integer tensors on their own device (no copy of the maps to the host):
    the same (K, K) int64 counts, truth values >= K (ignore) skipped."""
    k = num_classes
    t = truth.reshape(-1).long()
    p = pred.reshape(-1).long()
    # Skipped pixels go to an extra bin that is dropped, so no boolean indexing (a device sync) is needed.
    idx = torch.where(t < k, t * k + p, k * k)
    return torch.bincount(idx, minlength=k * k + 1)[: k * k].reshape(k, k).cpu().numpy()


def class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (Dice, IoU) arrays of length K from one confusion matrix; 1.0 where a class is absent."""
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    denom_d = 2 * tp + fp + fn
    denom_i = tp + fp + fn
    dice = np.where(denom_d > 0, 2 * tp / np.maximum(denom_d, 1), 1.0)
    iou = np.where(denom_i > 0, tp / np.maximum(denom_i, 1), 1.0)
    return dice, iou


def merged(cm: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """(2, 2) confusion of "any of ``classes``" against the rest, from a (K, K) one."""
    inside = np.zeros(cm.shape[0], dtype=bool)
    inside[list(classes)] = True
    return np.array(
        [
            [cm[~inside][:, ~inside].sum(), cm[~inside][:, inside].sum()],
            [cm[inside][:, ~inside].sum(), cm[inside][:, inside].sum()],
        ]
    )


def summarize(
    matrices: Sequence[np.ndarray],
    class_names: Sequence[str],
    stems: Sequence[str],
    foreground: Sequence[int] = (),
) -> dict[str, Any]:
    """Aggregate per-image confusion matrices into the report ``evaluate`` prints and writes.

    ``foreground``: classes that together make the objects (an instance model's interior and boundary);
    their union is scored as one class in ``report["foreground"]``.
    """
    k = len(class_names)
    per_image = [class_scores(cm) for cm in matrices]
    dice = np.stack([d for d, _ in per_image])  # (N, K)
    iou = np.stack([i for _, i in per_image])
    total = np.sum(matrices, axis=0)
    g_dice, g_iou = class_scores(total)
    fg = list(range(1, k)) if k > 1 else [0]
    img_dice = dice[:, fg].mean(1)  # (N,) foreground Dice per image

    def dist(values: np.ndarray) -> dict[str, float]:
        q = np.percentile(values, [0, 10, 25, 50, 75, 100])
        return {
            "min": float(q[0]),
            "p10": float(q[1]),
            "p25": float(q[2]),
            "median": float(q[3]),
            "p75": float(q[4]),
            "max": float(q[5]),
            "mean": float(values.mean()),
        }

    union: dict[str, Any] = {}
    if foreground:
        scores = [class_scores(merged(cm, foreground)) for cm in matrices]
        u_dice = np.array([d[1] for d, _ in scores])
        u_total = class_scores(merged(total, foreground))
        union = {
            "foreground": {
                "classes": [class_names[c] for c in foreground],
                "dice": float(u_dice.mean()),
                "iou": float(np.mean([i[1] for _, i in scores])),
                "dice_global": float(u_total[0][1]),
                "iou_global": float(u_total[1][1]),
                "per_image_dice": dist(u_dice),
            }
        }
    return {
        "images": len(matrices),
        "dice": float(dice[:, fg].mean()),
        "iou": float(iou[:, fg].mean()),
        "pixel_accuracy": float(np.trace(total) / max(1, total.sum())),
        "classes": [
            {
                "id": c,
                "name": class_names[c],
                "dice": float(dice[:, c].mean()),
                "iou": float(iou[:, c].mean()),
                "dice_global": float(g_dice[c]),
                "iou_global": float(g_iou[c]),
            }
            for c in range(k)
        ],
        "per_image_dice": dist(img_dice),
        "worst_images": [
            {"stem": stems[i], "dice": float(img_dice[i])} for i in np.argsort(img_dice)[: min(5, len(stems))]
        ],
        **union,
    }


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    image: np.ndarray,
    policy: InputPolicy,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    tta: bool = False,
    max_batch: int = 16,
) -> torch.Tensor:
    """(K, H, W) float32 logits for one (H, W[, C]) uint8 image, with optional flip TTA."""
    plan = make_plan(image, policy)
    inputs = plan.inputs
    views = [(False, False)] + ([(True, False), (False, True), (True, True)] if tta else [])
    total: torch.Tensor | None = None
    for fh, fv in views:
        dims = [d for d, on in ((-1, fh), (-2, fv)) if on]
        x = inputs.flip(dims) if dims else inputs
        outs = []
        for start in range(0, x.shape[0], max_batch):
            chunk = x[start : start + max_batch].to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(chunk)
            outs.append(out.float().cpu())
        logits = torch.cat(outs)
        logits = logits.flip(dims) if dims else logits
        total = logits if total is None else total + logits
    assert total is not None
    return blended_logits(plan, total / len(views))


class Scorer:
    """The report of a set of images, built image by image from each one's logits at its own size.

    Both evaluation paths feed it, so their numbers come from one piece of arithmetic: ``evaluate_model``
    (the serving pipeline, logits on the host) and training's batched validation (logits on the device).
    """

    def __init__(self, class_names: Sequence[str], instances: InstanceSpec | None = None) -> None:
        self.class_names = list(class_names)
        self.instances = instances
        self.matrices: list[np.ndarray] = []
        self.stems: list[str] = []
        self.precisions: list[np.ndarray] = []
        self.inst_stems: list[str] = []
        self.counts: list[tuple[int, int]] = []

    def add(
        self, stem: str, logits: torch.Tensor, mask: np.ndarray | torch.Tensor, truth_ids: np.ndarray | None = None
    ) -> None:
        """Score one image: ``logits`` (K, H, W) float32 on any device; ``mask`` (H, W) class ids, a tensor on
        the logits' device or an array; ``truth_ids`` (H, W) instance ids, scored when instances are."""
        k = len(self.class_names)
        if isinstance(mask, torch.Tensor):
            self.matrices.append(confusion_on_device(logits.argmax(0), mask, k))
        else:
            self.matrices.append(confusion(logits.argmax(0).cpu().numpy(), mask, k))
        self.stems.append(stem)
        if self.instances is not None and truth_ids is not None:
            ids = instances_from_logits(logits.cpu(), self.instances)
            self.precisions.append(image_precisions(truth_ids, ids))
            self.inst_stems.append(stem)
            self.counts.append((len(np.unique(truth_ids[truth_ids > 0])), int(ids.max(initial=0))))

    def report(self) -> dict[str, Any]:
        spec = self.instances
        union = [spec.interior, spec.boundary] if spec is not None and spec.boundary else []
        report = summarize(self.matrices, self.class_names, self.stems, union)
        if spec is not None:
            report["instances"] = summarize_instances(self.precisions, self.inst_stems, self.counts, spec)
        return report


def evaluate_model(
    model: torch.nn.Module,
    samples: Iterable[Sample],
    policy: InputPolicy,
    class_names: Sequence[str],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    tta: bool = False,
    instances: InstanceSpec | None = None,
) -> dict[str, Any]:
    """Run the serving pipeline (plan -> forward -> resize/blend -> argmax) and score every sample.

    With ``instances``, the logits are also made into instances and scored against the samples' instance
    ids (``report["instances"]``, over the samples that have them).
    """
    was_training = model.training
    model.eval()
    scorer = Scorer(class_names, instances)
    for s in samples:
        scorer.add(s.stem, predict_logits(model, s.image, policy, device, dtype, tta), s.mask, s.instances)
    model.train(was_training)
    return scorer.report()


def format_report(report: dict[str, Any], title: str) -> str:
    lines = [f"{title}: {report['images']} images"]
    lines.append(f"{'class':<16}{'dice':>8}{'iou':>8}{'dice(global)':>14}{'iou(global)':>13}")
    for c in report["classes"]:
        lines.append(
            f"{c['name']:<16}{c['dice']:>8.4f}{c['iou']:>8.4f}{c['dice_global']:>14.4f}{c['iou_global']:>13.4f}"
        )
    d = report["per_image_dice"]
    lines.append(
        f"foreground dice {report['dice']:.4f}  iou {report['iou']:.4f}  pixel accuracy {report['pixel_accuracy']:.4f}"
    )
    lines.append("per-image dice: " + _quantiles(d))
    if "foreground" in report:
        u = report["foreground"]
        lines.append(
            f"foreground ({' + '.join(u['classes'])}) dice {u['dice']:.4f}  iou {u['iou']:.4f}  "
            f"dice(global) {u['dice_global']:.4f}"
        )
        lines.append("per-image foreground dice: " + _quantiles(u["per_image_dice"]))
    if "instances" in report:
        r = report["instances"]
        how = ", ".join(f"{k} {v}" for k, v in r["method"].items())
        lines.append(
            f"instances ({how}): {r['images']} images, {r['true_objects']} true / {r['predicted_objects']} "
            f"predicted objects"
        )
        lines.append("IoU threshold " + "".join(f"{t:>7.2f}" for t in r["thresholds"]))
        lines.append("AP            " + "".join(f"{v:>7.3f}" for v in r["ap_per_threshold"]))
        lines.append(f"mAP (DSB 2018) {r['map']:.4f}  AP@0.5 {r['ap50']:.4f}")
        lines.append("per-image AP: " + _quantiles(r["per_image_ap"]))
    return "\n".join(lines)


def _quantiles(d: dict[str, float]) -> str:
    return "  ".join(f"{k} {d[k]:.3f}" for k in ("min", "p10", "p25", "median", "p75", "max"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="unetseg evaluate", description="Score a model bundle on a folder dataset.")
    p.add_argument("data_dir", type=Path, help="folder with images/ and masks/")
    p.add_argument("--model", required=True, type=Path, help="bundle folder, e.g. weights/polyp")
    p.add_argument("--mask", help="mask spec (default: the one the bundle was trained with)")
    p.add_argument(
        "--split",
        choices=["all", "val", "train"],
        default="all",
        help="'val' re-creates the bundle's own validation split from its card (seed and fraction)",
    )
    p.add_argument("--tta", action="store_true", help="also report flip test-time augmentation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=0, help="score only the first N images (0 = all)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument(
        "--no-instances",
        action="store_true",
        help="skip the instance metric (by default: for instance models, and for binary models on a dataset "
        "with instances/)",
    )
    p.add_argument(
        "--min-area",
        type=int,
        default=None,
        metavar="PX",
        help="drop predicted instances under PX pixels (default: the card's, 0 for connected components)",
    )
    args = p.parse_args(argv)

    bundle = load_bundle(args.model)
    card = bundle.card
    spec_text = args.mask or card.training.get("mask")
    if not spec_text:
        p.error("the bundle's card names no mask spec: pass --mask")
    spec = MaskSpec.parse(str(spec_text))
    if args.min_area is not None and args.min_area < 0:
        p.error("--min-area takes a number of pixels >= 0")
    pairs = find_pairs(args.data_dir, spec.folder)
    if args.split != "all":
        seed = int(card.training.get("split_seed", card.training.get("seed", 0)))
        frac = float(card.training.get("val_fraction", 0.1))
        train_idx, val_idx = split(len(pairs), frac, seed)
        pairs = [pairs[i] for i in (val_idx if args.split == "val" else train_idx)]
    if args.limit:
        pairs = pairs[: args.limit]
    device = torch.device(args.device)
    model = bundle.model.to(device)
    names = [c.name for c in card.classes]
    instances = None if args.no_instances else card.instances
    has_ids = (args.data_dir / "instances").is_dir()
    if instances is None and not args.no_instances and len(names) == 2 and has_ids:
        # A binary model: its mask's connected components against the true instances.
        instances = InstanceSpec("components", 1)
    # Under another mask spec than "instances", the true instance ids are read beside the masks.
    truth_ids = index_folder(args.data_dir / "instances") if instances and has_ids and spec.kind != "instances" else {}
    if instances is not None and args.min_area is not None:
        instances = replace(instances, min_area=args.min_area)
    samples = [load_sample(i, m, spec, card.input.channels, truth_ids.get(i.stem)) for i, m in pairs]
    result: dict[str, Any] = {
        "model": card.name,
        "version": card.version,
        "data_dir": str(args.data_dir),
        "split": args.split,
        "mask": str(spec),
    }
    result["plain"] = evaluate_model(model, samples, card.input, names, device, instances=instances)
    print(format_report(result["plain"], f"{card.name} on {args.data_dir} ({args.split})"))
    if args.tta:
        result["tta"] = evaluate_model(model, samples, card.input, names, device, tta=True, instances=instances)
        print(format_report(result["tta"], "with flip TTA"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
