"""Training's validation, batched on the device, gives the serving pipeline's numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.bundle import InstanceSpec, load_bundle
from model.data import MaskSpec, find_pairs, load_sample
from model.evaluate import confusion, confusion_on_device, evaluate_model
from model.inference import blended_logits, make_plan
from model.train import ValSet, validate
from tests.helpers import write_instance_bundle, write_tiny_bundle
from tests.model.synthetic import write_disc_dataset, write_touching_discs

CPU = torch.device("cpu")


def assert_same_report(a: Any, b: Any, path: str = "report") -> None:
    """Equal reports up to float rounding (the forward runs in other batch sizes)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_report(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_report(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-6), path
    else:
        assert a == b, path


def test_confusion_on_the_device_counts_as_on_the_host() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (37, 29)).astype(np.uint8)
    truth[:4] = 255  # ignored
    pred = rng.integers(0, 3, (37, 29))
    expected = confusion(pred, truth, 3)
    got = confusion_on_device(torch.from_numpy(pred), torch.from_numpy(truth), 3)
    assert got.dtype == np.int64 and got.tolist() == expected.tolist()
    assert got.sum() == 33 * 29


@pytest.mark.parametrize(
    ("sizing", "size", "image"),
    [("resize", 32, (48, 40)), ("tile", 32, (70, 50)), ("tile", 64, (48, 40))],  # the last: padded tiles
)
@pytest.mark.parametrize("batch_size", [1, 5])
def test_batched_validation_equals_the_serving_pipeline(
    tmp_path: Path, sizing: str, size: int, image: tuple[int, int], batch_size: int
) -> None:
    data = write_disc_dataset(tmp_path / "data", n=6, size=image)
    folder, card, _ = write_tiny_bundle(tmp_path / "b", sizing=sizing, size=size)
    model = load_bundle(folder).model
    samples = [load_sample(i, m, MaskSpec.parse("binary"), 3) for i, m in find_pairs(data)]
    names = [c.name for c in card.classes]
    expected = evaluate_model(model, samples, card.input, names, CPU)
    val = ValSet(samples, card.input, CPU)
    got = validate(model, val, names, batch_size=batch_size)
    assert_same_report(got, expected)
    assert 0 < got["dice"] < 1  # a random model: neither all right nor all wrong
    # Each image's logits are those the service blends (or resizes) at its own size.
    with torch.no_grad():
        outputs = model.eval()(val.inputs)
    for s, item in zip(samples, val.images, strict=True):
        plan = make_plan(s.image, card.input)
        reference = blended_logits(plan, outputs[item.start : item.start + plan.inputs.shape[0]])
        torch.testing.assert_close(val.logits(outputs, item), reference)


def test_batched_validation_scores_instances_as_the_serving_pipeline(tmp_path: Path) -> None:
    data = write_touching_discs(tmp_path / "data", n=4, size=(70, 50))
    spec = InstanceSpec("watershed", interior=1, boundary=2, min_area=4)
    folder, card = write_instance_bundle(tmp_path / "b", spec, classes=3, sizing="tile", size=32)
    model = load_bundle(folder).model
    mask = MaskSpec.parse("instances:boundary=2")
    samples = [load_sample(i, m, mask, 3) for i, m in find_pairs(data, "instances")]
    names = [c.name for c in card.classes]
    expected = evaluate_model(model, samples, card.input, names, CPU, instances=spec)
    got = validate(model, ValSet(samples, card.input, CPU), names, instances=spec, batch_size=3)
    assert_same_report(got, expected)
    assert got["instances"]["images"] == 4 and got["instances"]["predicted_objects"] > 0 and "foreground" in got


def test_validation_leaves_the_model_in_training_mode(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data", n=2)
    folder, card, _ = write_tiny_bundle(tmp_path / "b")
    model = load_bundle(folder).model.train()
    samples = [load_sample(i, m, MaskSpec.parse("binary"), 3) for i, m in find_pairs(data)]
    validate(model, ValSet(samples, card.input, CPU), ["background", "class1"])
    assert model.training
