from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.bundle import (
    CARD_FILE,
    WEIGHTS_FILE,
    BundleError,
    InstanceSpec,
    SlideSpec,
    discover,
    load_bundle,
    read_card,
)
from tests.helpers import write_tiny_bundle


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    folder, card, model = write_tiny_bundle(tmp_path / "b")
    loaded = load_bundle(folder)
    assert loaded.card == card
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_float16_storage_is_close_and_smaller(tmp_path: Path) -> None:
    from model.bundle import save_bundle

    folder, card, model = write_tiny_bundle(tmp_path / "b")
    half = save_bundle(tmp_path / "h", card, model, "float16")
    assert (half / WEIGHTS_FILE).stat().st_size < (folder / WEIGHTS_FILE).stat().st_size
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), load_bundle(half).model(x), atol=1e-2)


def test_card_json_has_the_documented_fields(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "b")
    data = json.loads((folder / CARD_FILE).read_text())
    assert {
        "format",
        "name",
        "version",
        "architecture",
        "classes",
        "input",
        "dataset",
        "metrics",
        "training",
        "precisions",
    } <= set(data)
    assert data["classes"][1] == {"id": 1, "name": "class1", "color": [255, 0, 0]}
    assert data["input"]["sizing"] == "resize"


def _break(folder: Path, edit: dict[str, object]) -> None:
    path = folder / CARD_FILE
    data = json.loads(path.read_text())
    for dotted, value in edit.items():
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"version": KeyError}, "version"),
        ({"architecture.depth": 0}, "architecture"),
        ({"architecture.num_classes": 3}, "classes"),
        ({"classes.1.color": [300, 0, 0]}, "classes[1].color"),
        ({"classes.1.id": 5}, "classes[1].id"),
        ({"input.channels": 1}, "input.channels"),
        ({"input.std": [0, 1, 1]}, "input.std"),
        ({"input.mean": [0.5]}, "input.mean"),
        ({"input.sizing": "crop"}, "input.sizing"),
        ({"input.size": 2}, "input.size"),
        ({"input.overlap": 0.95}, "input.overlap"),
        ({"precisions": ["int8"]}, "precisions"),
        ({"dataset": KeyError}, "dataset"),
        ({"metrics.val_dice": "high"}, "metrics.val_dice"),
        ({"format": "other/2"}, "format"),
    ],
)
def test_bad_cards_name_the_file_and_field(tmp_path: Path, edit: dict[str, object], field: str) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "b")
    _break(folder, edit)
    with pytest.raises(BundleError) as info:
        load_bundle(folder)
    assert str(folder / CARD_FILE) in str(info.value)
    assert f": {field}:" in str(info.value)


def test_unreadable_card_and_missing_files(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "b")
    (folder / CARD_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_card(folder)
    folder, _, _ = write_tiny_bundle(tmp_path / "c")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors: missing"):
        load_bundle(folder)
    with pytest.raises(BundleError, match=r"card\.json: missing"):
        load_bundle(tmp_path / "nothing")


def test_weights_that_do_not_match_the_architecture(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "b")
    state = load_file(str(folder / WEIGHTS_FILE))
    key = "outc.conv.weight"
    state[key] = torch.zeros(3, 4, 1, 1)
    save_file(state, str(folder / WEIGHTS_FILE))
    with pytest.raises(BundleError, match=rf"model\.safetensors: {key}: has shape \(3, 4, 1, 1\)"):
        load_bundle(folder)
    del state[key]
    save_file(state, str(folder / WEIGHTS_FILE))
    with pytest.raises(BundleError, match="missing tensors"):
        load_bundle(folder)


def test_nan_weights_and_garbage_files_are_rejected(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "b")
    state = load_file(str(folder / WEIGHTS_FILE))
    state["outc.conv.bias"] = torch.full_like(state["outc.conv.bias"], float("nan"))
    save_file(state, str(folder / WEIGHTS_FILE))
    with pytest.raises(BundleError, match="NaN"):
        load_bundle(folder)
    (folder / WEIGHTS_FILE).write_bytes(b"\x80\x04pickle bytes are not safetensors")
    with pytest.raises(BundleError, match="not a valid safetensors file"):
        load_bundle(folder)


def test_discover_lists_bundle_folders_in_order(tmp_path: Path) -> None:
    write_tiny_bundle(tmp_path / "b", name="b")
    write_tiny_bundle(tmp_path / "a", name="a")
    (tmp_path / "notes").mkdir()
    assert [p.name for p in discover(tmp_path)] == ["a", "b"]
    assert list(discover(tmp_path / "absent")) == []


def test_float16_storage_keeps_what_float16_cannot_hold(tmp_path: Path) -> None:
    from model.bundle import save_bundle

    _, card, model = write_tiny_bundle(tmp_path / "b")
    bn = model.inc.body[1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    with torch.no_grad():
        bn.running_var[0] = 1e6  # past float16's 65504
    folder = save_bundle(tmp_path / "h", card, model, "float16")
    stored = load_file(str(folder / WEIGHTS_FILE))
    assert stored["inc.body.1.running_var"].dtype == torch.float32
    assert stored["inc.body.0.weight"].dtype == torch.float16
    loaded = load_bundle(folder)  # no overflow to inf, so it validates
    assert float(loaded.model.inc.body[1].running_var[0]) == 1e6


def test_an_instance_card_round_trips_and_a_semantic_one_has_no_instances(tmp_path: Path) -> None:
    spec = InstanceSpec("watershed", interior=1, boundary=2, min_area=16)
    folder, _, _ = write_tiny_bundle(tmp_path / "i", classes=3, instances=spec)
    data = json.loads((folder / CARD_FILE).read_text())
    assert data["instances"] == {"method": "watershed", "interior": 1, "boundary": 2, "min_area": 16}
    assert load_bundle(folder).card.instances == spec
    plain, _, _ = write_tiny_bundle(tmp_path / "p")
    assert "instances" not in json.loads((plain / CARD_FILE).read_text())  # older cards look the same
    assert load_bundle(plain).card.instances is None
    comp, _, _ = write_tiny_bundle(tmp_path / "c", instances=InstanceSpec("components", 1))
    assert json.loads((comp / CARD_FILE).read_text())["instances"] == {
        "method": "components",
        "interior": 1,
        "min_area": 0,
    }
    assert load_bundle(comp).card.instances == InstanceSpec("components", 1)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"instances": [1, 2]}, "instances"),
        ({"instances.method": "grow"}, "instances.method"),
        ({"instances.interior": 0}, "instances.interior"),
        ({"instances.interior": 3}, "instances.interior"),
        ({"instances.boundary": 1}, "instances.boundary"),
        ({"instances.boundary": KeyError}, "instances.boundary"),
        ({"instances.method": "components"}, "instances.boundary"),
        ({"instances.min_area": -1}, "instances.min_area"),
    ],
)
def test_bad_instance_fields_name_the_field(tmp_path: Path, edit: dict[str, object], field: str) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "b", classes=3, instances=InstanceSpec("watershed", 1, 2))
    _break(folder, edit)
    with pytest.raises(BundleError) as info:
        load_bundle(folder)
    assert f": {field}:" in str(info.value)


def test_a_slide_spec_round_trips_and_bad_ones_name_the_field(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "s", slide=SlideSpec(mpp=0.5))
    assert json.loads((folder / CARD_FILE).read_text())["slide"] == {"mpp": 0.5}
    assert load_bundle(folder).card.slide == SlideSpec(mpp=0.5)
    for edit, field in (
        ({"slide.mpp": 0}, "slide.mpp"),
        ({"slide.mpp": "fine"}, "slide.mpp"),
        ({"slide.level": -1}, "slide.level"),
        ({"slide.zoom": 2}, "slide"),
    ):
        _break(folder, edit)
        with pytest.raises(BundleError) as info:
            load_bundle(folder)
        assert f": {field}:" in str(info.value)
        write_tiny_bundle(folder, slide=SlideSpec(mpp=0.5))


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_save_that_crashes_between_its_renames_never_leaves_new_weights_with_the_old_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int
) -> None:
    """Retraining over a bundle: the process dies at the first or the second rename into place. The folder
    is then the old bundle, whole, or one that load refuses with how to finish the save; never the new
    weights described by the old card."""
    import dataclasses

    from model.bundle import save_bundle

    folder, old_card, old_model = write_tiny_bundle(tmp_path / "b", seed=0)
    new_card = dataclasses.replace(old_card, version="9.9.9")
    _, _, new_model = write_tiny_bundle(tmp_path / "scratch", seed=7)
    renames = 0
    real_replace = Path.replace

    def replace(self: Path, target: Path) -> Path:
        nonlocal renames
        renames += 1
        if renames == crash_at:
            raise KeyboardInterrupt("the process dies here")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_bundle(folder, new_card, new_model, "float32")
    monkeypatch.undo()
    on_disk = load_file(str(folder / WEIGHTS_FILE))
    new_weights = all(torch.equal(on_disk[k], v) for k, v in new_model.state_dict().items())
    assert not (new_weights and read_card(folder).version == old_card.version)
    if read_card(folder) == old_card:
        loaded = load_bundle(folder)  # the old bundle, whole
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(loaded.model(x), old_model(x))
    else:
        with pytest.raises(BundleError, match=r"a save was interrupted.*model.safetensors.tmp"):
            load_bundle(folder)
        (folder / (WEIGHTS_FILE + ".tmp")).replace(folder / WEIGHTS_FILE)  # what the message says to do
        assert load_bundle(folder).card == new_card


def test_a_hand_edited_card_still_loads(tmp_path: Path) -> None:
    """The check for an interrupted save looks only at a pending ``.tmp``: editing a card is not refused."""
    folder, _, _ = write_tiny_bundle(tmp_path / "b")
    data = json.loads((folder / CARD_FILE).read_text())
    data["description"] = "edited by hand"
    (folder / CARD_FILE).write_text(json.dumps(data))
    assert load_bundle(folder).card.description == "edited by hand"
