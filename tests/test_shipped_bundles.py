"""The bundles shipped in weights/: they load, segment real images of their dataset, and agree across precisions.

Real images come from the datasets folder next to the repository; these tests skip, saying so, where it is
absent. The floors are well below the targets: they catch a broken bundle or pipeline, not a weak model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.engine import device_supports
from model.bundle import load_bundle
from model.data import MaskSpec, find_pairs, load_sample, split
from model.evaluate import confusion, predict_logits, summarize
from tests.helpers import DATASETS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {  # bundle -> (dataset folder, metric, floor)
    "polyp": ("kvasir_seg", "dice", 0.5),
    "nuclei": ("dsb2018_nuclei", "dice", 0.6),
    "membrane": ("isbi2012_em_membrane", "pixel_accuracy", 0.8),
}
N_IMAGES = 6


def shipped(name: str) -> Path:
    folder = ROOT / "weights" / name
    if not (folder / "card.json").exists():
        pytest.skip(f"weights/{name} is not in this checkout")
    return folder


def val_samples(name: str, n: int = N_IMAGES) -> list:  # type: ignore[type-arg]
    data = DATASETS / SHIPPED[name][0]
    if not data.is_dir():
        pytest.skip(f"the {SHIPPED[name][0]} dataset is not available at {data}")
    card = load_bundle(shipped(name)).card
    pairs = find_pairs(data)
    _, val = split(len(pairs), float(card.training["val_fraction"]), int(card.training["seed"]))
    spec = MaskSpec.parse(str(card.training["mask"]))
    return [load_sample(*pairs[i], spec, card.input.channels) for i in val[:n]]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_bundle_card_is_complete(name: str) -> None:
    card = load_bundle(shipped(name)).card
    assert card.name == name
    assert card.dataset.license and card.dataset.citation
    assert {"val_dice", "val_iou", "val_pixel_accuracy"} <= set(card.metrics)
    for key in ("hardware", "train_seconds", "epochs", "seed", "val_fraction", "mask"):
        assert key in card.training, key
    assert sum(f.stat().st_size for f in shipped(name).iterdir()) < 20 * 1024 * 1024


@pytest.mark.data
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_bundle_segments_its_dataset(name: str) -> None:
    bundle = load_bundle(shipped(name))
    samples = val_samples(name)
    k = bundle.card.architecture.num_classes
    matrices = [
        confusion(
            predict_logits(bundle.model, s.image, bundle.card.input, torch.device("cpu")).argmax(0).numpy(), s.mask, k
        )
        for s in samples
    ]
    report = summarize(matrices, [c.name for c in bundle.card.classes], [s.stem for s in samples])
    _, metric, floor = SHIPPED[name]
    assert report[metric] > floor, report


@pytest.mark.data
@pytest.mark.parametrize("name", sorted(SHIPPED))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_masks_agree_with_float32(name: str, dtype: torch.dtype) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not device_supports(dtype, device):
        pytest.skip(f"{dtype} inference is not supported on {device}")
    bundle = load_bundle(shipped(name))
    if str(dtype).removeprefix("torch.") not in bundle.card.precisions:
        pytest.skip(f"the {name} card does not list {dtype} as a checked precision")
    model = bundle.model.to(device)
    same = total = 0
    for s in val_samples(name, 4):
        a = predict_logits(model, s.image, bundle.card.input, device, torch.float32).argmax(0)
        b = predict_logits(model, s.image, bundle.card.input, device, dtype).argmax(0)
        same += int((a == b).sum())
        total += a.numel()
    assert same / total >= 0.995
