"""The engine's instance ids: the blended logits it makes them from, for resized and tiled models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine import Engine, make_work
from app.engine.work import ResizedWork, TiledWork, work_bytes
from model.bundle import InstanceSpec, load_bundle
from model.inference import blended_logits, make_plan
from model.instances import instances_from_logits
from tests.helpers import tiny_card, write_instance_bundle

WATERSHED = InstanceSpec("watershed", interior=1, boundary=2)


@pytest.mark.parametrize(
    ("sizing", "classes", "spec"),
    [("resize", 3, WATERSHED), ("tile", 3, WATERSHED), ("tile", 2, InstanceSpec("components", interior=1))],
)
def test_the_engines_logits_and_instances_are_those_of_the_blended_logits(
    tmp_path: Path, sizing: str, classes: int, spec: InstanceSpec
) -> None:
    folder, card = write_instance_bundle(tmp_path / "m", spec, name="m", classes=classes, sizing=sizing, size=32)
    bundle = load_bundle(folder)
    image = np.random.default_rng(7).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    model = load_bundle(folder).model  # a copy of its own: the engine's may be moved or compiled
    plan = make_plan(image, card.input)
    with torch.no_grad():
        reference = blended_logits(plan, model(plan.inputs))  # (K, H, W)
    engine = Engine([bundle], torch.device("cpu"), precision="float32", max_batch=1)
    engine.start(warmup=False)
    try:
        work = make_work(engine.get("m"), image, None, keep_logits=True)
        engine.get("m").submit_work(work).result()
        assert isinstance(work, ResizedWork | TiledWork)
        logits = work.logits()
        assert logits.shape == (classes, 45, 70)
        if classes == 2:  # a binary tiled model keeps the difference: (0, class 1 - class 0)
            reference = torch.stack([torch.zeros_like(reference[0]), reference[1] - reference[0]])
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
        seg = engine.segment_sync("m", image, instances=True)
        assert seg.instances is not None and seg.instances.dtype == np.int32
        np.testing.assert_array_equal(seg.instances, instances_from_logits(logits, spec))
        assert seg.instances.max() >= 1
        assert engine.segment_sync("m", image).instances is None  # only when asked for
    finally:
        engine.stop()


def test_instances_are_counted_in_a_requests_memory() -> None:
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    for sizing in ("resize", "tile"):
        card = tiny_card(classes=3, sizing=sizing, size=32)
        plain = work_bytes(image, card.input, 3, None)
        assert work_bytes(image, card.input, 3, None, instances=True) == plain + 100 * 120 * (8 * 3 + 24)
