"""The bundles shipped in weights/: they load, segment real images of their dataset, and agree across precisions.

Real images come from the datasets folder next to the repository; these tests skip, saying so, where it is
absent. The floors are well below the targets: they catch a broken bundle or pipeline, not a weak model.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.engine import device_supports
from app.main import create_app
from model.bundle import load_bundle
from model.data import MaskSpec, find_pairs, load_sample, split
from model.evaluate import confusion, predict_logits, summarize
from model.instances import image_precisions
from tests.conftest import make_settings, wait_ready
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
    spec = MaskSpec.parse(str(card.training["mask"]))
    pairs = find_pairs(data, spec.folder)
    _, val = split(len(pairs), float(card.training["val_fraction"]), int(card.training["seed"]))
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
    spec = bundle.card.instances
    union = [spec.interior, spec.boundary] if spec is not None and spec.boundary is not None else []
    report = summarize(matrices, [c.name for c in bundle.card.classes], [s.stem for s in samples], union)
    _, metric, floor = SHIPPED[name]
    # An instance model's interior and boundary classes together are the objects: their union is scored.
    score = report["foreground"][metric] if union else report[metric]
    assert score > floor, report


@pytest.mark.data
def test_shipped_nuclei_separates_its_datasets_nuclei_through_the_api(tmp_path: Path) -> None:
    """format=instances and the JSON instances of the shipped nuclei model, scored with the 2018 DSB metric
    against the true instance ids of validation images."""
    card = load_bundle(shipped("nuclei")).card
    assert card.instances is not None, "the shipped nuclei model produces instances"
    samples = val_samples("nuclei", 4)
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "nuclei").symlink_to(shipped("nuclei"))
    settings = make_settings(tmp_path, weights, default_model="nuclei")
    aps = []
    with TestClient(create_app(settings)) as c:
        wait_ready(c, 120)
        for s in samples:
            buf = io.BytesIO()
            Image.fromarray(s.image).save(buf, format="PNG")
            files = {"file": ("a.png", buf.getvalue(), "image/png")}
            r = c.post("/v1/predict?model=nuclei&format=instances", files=files)
            assert r.status_code == 200, r.text
            ids = np.asarray(Image.open(io.BytesIO(r.content))).astype(np.int64)
            n = int(r.headers["x-instance-count"])
            assert ids.shape == s.mask.shape and ids.max() == n
            j = c.post("/v1/predict?model=nuclei&format=json", files=files).json()
            assert j["count"] == n and len(j["instances"]) == n
            assert s.instances is not None
            aps.append(image_precisions(s.instances, ids)[0])  # AP at IoU 0.5
    assert float(np.mean(aps)) > 0.5, aps


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
