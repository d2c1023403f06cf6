"""The CUDA-host profile (scripts/train_gpu.py) and the reduced datasets it travels with
(scripts/pack_datasets.py), run end to end on generated images: the profile's --dry-run on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import load_bundle
from model.data import MaskSpec, find_pairs, load_sample
from model.encoders import EfficientNetLiteEncoder, checkpoint_keys
from tests.model.synthetic import write_disc_dataset, write_touching_discs

ROOT = Path(__file__).resolve().parents[1]


def script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_datasets(root: Path) -> Path:
    """The three dataset folders, generated: frames larger than the packed side, RGBA nuclei (as the Data
    Science Bowl ships them) with instance ids, gray membranes."""
    write_disc_dataset(root / "kvasir_seg", n=10, size=(120, 90))
    nuclei = write_touching_discs(root / "dsb2018_nuclei", n=10, size=(70, 50))
    for f in (nuclei / "images").iterdir():
        Image.open(f).convert("RGBA").save(f)
    membrane = write_disc_dataset(root / "isbi2012_em_membrane", n=10, size=(64, 64), seed=3)
    for f in (membrane / "images").iterdir():
        Image.open(f).convert("L").save(f)
    # A stand-in for the ImageNet checkpoint, under the published names (the package is not needed).
    torch.manual_seed(0)
    encoder = EfficientNetLiteEncoder("efficientnet-lite0")
    ours = encoder.state_dict()
    torch.save({theirs: ours[key] for key, theirs in checkpoint_keys(encoder).items()}, root / "lite0.pth")
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_datasets(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="module")
def packed(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = datasets
    out = tmp_path_factory.mktemp("packed") / "datasets"
    pack = script("pack_datasets")
    checkpoint = pack.pack_checkpoint
    pack.pack_checkpoint = lambda dst, name="efficientnet-lite0", source=None: checkpoint(dst, name, src / "lite0.pth")
    assert pack.main([str(src), "--out", str(out), "--polyp-side", "64"]) == 0
    return out


def test_the_packed_copy_keeps_what_training_reads(datasets: Path, packed: Path) -> None:
    polyp = load_sample(*find_pairs(packed / "kvasir_seg")[0], MaskSpec.parse("binary:127"), 3)
    assert max(polyp.image.shape[:2]) == 64 and polyp.mask.shape == polyp.image.shape[:2]
    assert set(np.unique(polyp.mask)) == {0, 1}
    spec = MaskSpec.parse("instances:boundary=2")
    a = load_sample(*find_pairs(packed / "dsb2018_nuclei", "instances")[0], spec, 3)
    b = load_sample(*find_pairs(datasets / "dsb2018_nuclei", "instances")[0], spec, 3)
    assert np.array_equal(a.instances, b.instances) and np.array_equal(a.mask, b.mask)  # lossless ids
    assert a.image.shape == b.image.shape  # native size; JPEG: the pixels are close, not equal
    assert np.corrcoef(a.image.ravel(), b.image.ravel())[0, 1] > 0.9
    assert not (packed / "dsb2018_nuclei" / "masks").exists()
    assert len(find_pairs(packed / "isbi2012_em_membrane")) == 10
    state = torch.load(packed / "efficientnet-lite0.pth", weights_only=True)
    assert state["_conv_stem.weight"].dtype == torch.float16 and "_fc.weight" not in state


def test_the_gpu_profile_dry_runs_on_the_cpu(packed: Path, tmp_path: Path) -> None:
    gpu = script("train_gpu")
    runs, out = tmp_path / "runs", tmp_path / "out"
    flags = "--size 64"  # smaller still than the dry run's 128 px, for a test
    assert (
        gpu.main([str(packed), "--dry-run", "--runs", str(runs), "--export-to", str(out), "--train-flags", flags]) == 0
    )
    summary = json.loads((runs / "summary.json").read_text())
    assert summary["dry_run"] and [r["model"] for r in summary["models"]] == ["polyp", "nuclei", "membrane"]
    for row in summary["models"]:
        assert row["stop"] == "epochs" and row["epochs"] == 1 and row["precision"] == "float32"
        card = load_bundle(out / row["model"]).card
        assert card.metrics == row["metrics"] and row["train_s"] > 0 and row["val_s"] > 0
        assert card.training["val_every"] > 1  # the recipes' own schedule; the last epoch validated anyway
    cards = {r["model"]: load_bundle(out / r["model"]).card for r in summary["models"]}
    assert cards["polyp"].architecture.encoder == "efficientnet-lite0" and cards["polyp"].input.size == 64
    assert cards["nuclei"].instances is not None and "val_map" in cards["nuclei"].metrics
    assert cards["membrane"].input.channels == 1 and cards["membrane"].architecture.encoder == "plain"
    table = (runs / "summary.md").read_text()
    assert table.startswith("| model | stop | epochs |") and "| val_map |" in table and "3 models in" in table
    assert sorted(p.name for p in out.iterdir()) == ["membrane", "nuclei", "polyp", "summary.json", "summary.md"]
    # Run again: every bundle exists, so nothing is trained twice, and the summary keeps what was measured.
    assert gpu.main([str(packed), "--dry-run", "--runs", str(runs), "--train-flags", flags]) == 0
    again = json.loads((runs / "summary.json").read_text())
    assert again["models"] == [{**r, "from_before": True} for r in summary["models"]]


def test_each_model_gets_its_share_of_what_is_left() -> None:
    gpu = script("train_gpu")
    recipes = list(gpu.RECIPES.values())
    first = gpu.budgets(recipes, 540.0)
    assert first == pytest.approx((540 - 3 * gpu.EXPORT_SECONDS) * 0.45)
    # Time the first model leaves unused goes to the next ones.
    assert gpu.budgets(recipes[1:], 540.0 - first / 2) > gpu.budgets(recipes[1:], 540.0 - first)
    assert gpu.budgets(recipes[2:], 10.0) == 1.0  # never zero or negative: the model still runs an epoch
