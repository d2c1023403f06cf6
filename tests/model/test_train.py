from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model.bundle import InstanceSpec, load_bundle
from model.train import (
    SideOutputs,
    TrainConfig,
    ce_loss,
    dice_ce_loss,
    load_data,
    lr_factor,
    main,
    structure_loss,
    train,
)
from tests.model.synthetic import config, write_disc_dataset, write_touching_discs

CPU = torch.device("cpu")


def test_training_writes_a_valid_bundle_with_metrics_logs_and_plot(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    summary = train(config(tmp_path, data), log=False)
    run = tmp_path / "run"
    bundle = load_bundle(run / "bundle")
    card = bundle.card
    assert card.name == "discs" and [c.name for c in card.classes] == ["background", "disc"]
    assert set(card.metrics) == {"val_dice", "val_iou", "val_pixel_accuracy"}
    assert 0 <= card.metrics["val_dice"] <= 1
    assert card.training["epochs"] == 3 and card.training["train_images"] == 9
    assert card.training["mask"] == "binary:127" and "hardware" in card.training
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((run / "grad_norms.json").read_text())) == summary["step"]
    # Stored as float16, as shipped bundles are, but for the normalisation statistics (float32).
    for key, t in load_file(str(run / "bundle" / "model.safetensors")).items():
        if key.endswith(("running_mean", "running_var")):
            assert t.dtype == torch.float32, key
        else:
            assert t.dtype in (torch.float16, torch.int64), key


def test_a_short_run_learns_the_discs(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data", n=16)
    train(config(tmp_path, data, epochs=12, base_width=8), log=False)
    assert load_bundle(tmp_path / "run" / "bundle").card.metrics["val_dice"] > 0.6


@pytest.mark.parametrize(("ema", "deep"), [(0.0, 0.0), (0.8, 0.0), (0.0, 0.5)])
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path: Path, ema: float, deep: float) -> None:
    data = write_disc_dataset(tmp_path / "data")
    kw = dict(ema=ema, deep_supervision=deep, depth=3)
    train(config(tmp_path, data, run="straight", **kw), log=False)
    paused = train(config(tmp_path, data, run="split", **kw), max_epochs_this_run=2, log=False)
    assert paused["stop"] == "paused" and paused["epoch"] == 2
    assert not (tmp_path / "split" / "bundle").exists()
    train(config(tmp_path, data, run="split", **kw), resume=True, log=False)
    a = load_file(str(tmp_path / "straight" / "bundle" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "bundle" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(la) == strip(lb)


def test_a_run_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    train(config(tmp_path, data, epochs=1), log=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config(tmp_path, data, epochs=1), log=False)


def test_early_stopping_stops(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    summary = train(config(tmp_path, data, epochs=30, lr=0.0, patience=2), log=False)
    assert summary["stop"] == "early stopping" and summary["epoch"] == 3


def test_tile_training_and_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_disc_dataset(tmp_path / "data", size=(70, 50))
    code = main(
        [
            "--data",
            str(data),
            "--name",
            "tiled",
            "--run-dir",
            str(tmp_path / "r"),
            "--sizing",
            "tile",
            "--size",
            "32",
            "--base-width",
            "4",
            "--depth",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--steps-per-epoch",
            "3",
            "--classes",
            "background,disc",
            "--colors",
            "000000,00ff00",
            "--precision",
            "float32",
            "--device",
            "cpu",
            "--no-skip",
            "--elastic",
            "3",
            "--scale",
            "0.9,1.1",
            "--rotate",
            "0",
            "--seed",
            "4",
            "--split-seed",
            "2",
            "--loss",
            "ce",
            "--border-crops",
            "0.5",
        ]
    )
    assert code == 0
    card = load_bundle(tmp_path / "r" / "bundle").card
    assert card.input.sizing == "tile" and card.architecture.skip is False
    aug = card.training["augment"]
    assert (aug["elastic_px"], aug["scale"], aug["rotate_deg"]) == (3.0, [0.9, 1.1], 0.0)
    assert (card.training["seed"], card.training["split_seed"]) == (4, 2)
    assert card.training["loss"] == "ce" and aug["border_crops"] == 0.5
    assert card.classes[1].color == (0, 255, 0)
    assert '"stop": "epochs"' in capsys.readouterr().out


def test_loss_and_schedule() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    perfect = torch.stack([(target == 0).float(), (target == 1).float()], 1) * 20
    assert float(dice_ce_loss(perfect, target)) < 0.01
    assert float(dice_ce_loss(-perfect, target)) > 1.5
    ignored = target.clone()
    ignored[0, 0, 0] = 255
    assert torch.isfinite(dice_ce_loss(perfect, ignored))
    logits = torch.randn(2, 2, 8, 8)
    both = torch.cat([target, ignored])
    assert float(ce_loss(logits, both)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, both, ignore_index=255))
    )
    assert float(dice_ce_loss(logits, both)) > float(ce_loss(logits, both))  # + (1 - Dice) > 0
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.01)


def test_structure_loss_weights_boundary_errors_more() -> None:
    target = torch.zeros(1, 64, 64, dtype=torch.long)
    target[0, 8:56, 8:56] = 1
    perfect = torch.stack([(target == 0).float(), (target == 1).float()], 1) * 20
    assert float(structure_loss(perfect, target)) < 0.01
    assert float(structure_loss(-perfect, target)) > 1.5
    ignored = target.clone()
    ignored[0, :4] = 255
    assert torch.isfinite(structure_loss(perfect, ignored))

    def wrong(rows: slice, cols: slice) -> float:  # the same 16 pixels predicted wrongly
        logits = perfect.clone()
        logits[:, :, rows, cols] = logits[:, :, rows, cols].flip(1)
        return float(structure_loss(logits, target))

    at_edge, deep_inside = wrong(slice(8, 12), slice(30, 34)), wrong(slice(30, 34), slice(30, 34))
    assert at_edge > 1.5 * deep_inside


def test_side_outputs_give_full_size_logits_and_train() -> None:
    from model.unet import UNet, UNetConfig

    model = UNet(UNetConfig(base_width=4, depth=3))
    side = SideOutputs(model)
    x = torch.randn(2, 3, 37, 29)  # not a multiple of 8: the model pads, the side outputs crop
    model(x)
    outs = side.logits((37, 29))
    assert [tuple(o.shape) for o in outs] == [(2, 2, 37, 29)] * 2
    sum(o.mean() for o in outs).backward()  # type: ignore[union-attr]
    assert all(h.weight.grad is not None for h in side.heads)
    assert model.first_layer.weight.grad is not None
    model.eval()
    with torch.no_grad():
        model(x)
    assert side.logits((37, 29)) == []  # eval forwards leave nothing behind


def test_deep_supervision_reaches_the_training_step(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    first = {}
    for w in (0.0, 1.0):
        run = f"ds{w}"
        train(config(tmp_path, data, run=run, deep_supervision=w, depth=3, epochs=1, steps_per_epoch=1), log=False)
        first[w] = json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    assert first[1.0] > first[0.0] + 0.5  # the side outputs' loss is added (an untrained head is far off)
    assert load_bundle(tmp_path / "ds1.0" / "bundle").card.training["deep_supervision"] == 1.0


def test_the_loss_flag_reaches_the_training_step(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    first = {}
    for loss in ("dice_ce", "ce"):
        train(config(tmp_path, data, run=loss, loss=loss, epochs=1, steps_per_epoch=1), log=False)
        first[loss] = json.loads((tmp_path / loss / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    # Same seed, so the same weights and batch: the step's loss differs only by the soft-Dice term.
    assert 0.05 < first["dice_ce"] - first["ce"] < 1.0


def test_a_paused_run_can_be_exported(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    cfg = config(tmp_path, data, epochs=4)
    train(cfg, max_epochs_this_run=2, log=False)
    code = main(["--data", str(data), "--name", "discs", "--run-dir", cfg.run_dir, "--export"])
    assert code == 0
    card = load_bundle(tmp_path / "run" / "bundle").card
    assert card.training["epochs"] == 2 and card.architecture.base_width == 4


def test_a_run_can_start_from_a_bundle(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    train(config(tmp_path, data, run="first", epochs=2), log=False)
    first = tmp_path / "first" / "bundle"
    # lr 0: the fine-tuning run changes nothing, so it must start from (and export) the first run's weights.
    train(config(tmp_path, data, run="tuned", epochs=1, lr=0.0, init=str(first)), log=False)
    a = load_file(str(first / "model.safetensors"))
    b = load_file(str(tmp_path / "tuned" / "bundle" / "model.safetensors"))
    for k in a:
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):  # BN stats move in train mode
            assert torch.equal(a[k], b[k]), k
    card = load_bundle(tmp_path / "tuned" / "bundle").card
    before = load_bundle(first).card
    assert card.training["init_from"]["name"] == "discs"
    assert card.training["init_from"]["epochs"] == 2
    assert card.training["init_from"]["metrics"] == before.metrics


def test_init_refuses_another_architecture(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    train(config(tmp_path, data, run="first", epochs=1), log=False)
    with pytest.raises(ValueError, match="architecture"):
        train(config(tmp_path, data, run="wide", base_width=8, init=str(tmp_path / "first" / "bundle")), log=False)


def test_split_seed_holds_the_split_while_the_seed_changes(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    stems = {
        (seed, split_seed): [
            s.stem for s in load_data(config(tmp_path, data, seed=seed, split_seed=split_seed), CPU).val
        ]
        for seed, split_seed in ((0, None), (1, None), (1, 0))
    }
    assert stems[(0, None)] != stems[(1, None)]  # by default the seed also draws the split
    assert stems[(1, 0)] == stems[(0, None)]
    cfg = config(tmp_path, data, seed=1, split_seed=0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_evaluate_split_val_uses_the_cards_split_seed(tmp_path: Path) -> None:
    from model.evaluate import main as evaluate

    data = write_disc_dataset(tmp_path / "data")
    cfg = config(tmp_path, data, epochs=1, seed=1, split_seed=0)
    train(cfg, log=False)
    out = tmp_path / "report.json"
    assert evaluate([str(data), "--model", cfg.out, "--split", "val", "--json", str(out)]) == 0
    scored = {w["stem"] for w in json.loads(out.read_text())["plain"]["worst_images"]}
    assert scored == {s.stem for s in load_data(cfg, CPU).val}
    assert scored != {s.stem for s in load_data(config(tmp_path, data, seed=1), CPU).val}


def test_ema_exports_the_averaged_weights(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    train(config(tmp_path, data, epochs=1, ema=0.5), log=False)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    exported = load_file(str(tmp_path / "run" / "bundle" / "model.safetensors"))
    averaged = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert exported.keys() <= averaged.keys()
    differs = 0
    for k, v in exported.items():
        if v.is_floating_point():
            assert torch.allclose(v.float(), averaged[k].float(), atol=1e-2, rtol=1e-2), k
            differs += not torch.allclose(v.float(), ckpt["model"][k].float(), atol=1e-3)
    assert differs > 0  # the average is not the last step's weights
    assert load_bundle(tmp_path / "run" / "bundle").card.training["ema"] == 0.5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--scale", "1"], "--scale"),
        (["--scale", "a,b"], "--scale"),
        (["--scale", "1.2,0.8"], "--scale"),
        (["--scale", "0,1"], "--scale"),
        (["--ema", "1"], "--ema"),
        (["--ema", "-0.5"], "--ema"),
        (["--elastic", "-1"], "--elastic"),
        (["--border-crops", "1.5"], "--border-crops"),
        (["--shear", "90"], "--shear"),
        (["--shear", "-5"], "--shear"),
        (["--saturation", "1"], "--saturation"),
        (["--brightness", "-0.1"], "--brightness"),
        (["--deep-supervision", "-1"], "--deep-supervision"),
    ],
)
def test_bad_augmentation_flags_are_refused(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["--data", str(tmp_path), "--name", "x", *flags])


def test_extra_data_joins_the_training_split_only(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    extra = write_disc_dataset(tmp_path / "extra", n=5, seed=1)
    # Index masks with ignored pixels (255), as the pseudo-labeller writes them.
    for f in (extra / "masks").iterdir():
        ids = (np.asarray(Image.open(f)) > 127).astype(np.uint8)
        ids[:, :10] = 255
        Image.fromarray(ids).save(f)
    plain = load_data(config(tmp_path, data, sizing="tile"), CPU)
    cfg = config(tmp_path, data, sizing="tile", extra_data=(str(extra),), extra_mask="index", epochs=1)
    mixed = load_data(cfg, CPU)
    assert [s.stem for s in mixed.val] == [s.stem for s in plain.val]
    assert len(mixed.train_x) == len(plain.train_x) + 5 and mixed.extra_images == 5
    assert int(mixed.train_y[-1][:, :10].min()) == 255 and int(mixed.train_y[-1].max()) == 255
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    train(cfg, log=False)
    card = load_bundle(tmp_path / "run" / "bundle").card
    assert card.training["train_images"] == len(plain.train_x)
    assert (card.training["extra_images"], card.training["extra_mask"]) == (5, "index")
    assert card.training["extra_data"] == ["extra"]


def test_extra_data_with_an_unnamed_class_is_refused(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    extra = write_disc_dataset(tmp_path / "extra", n=2, seed=1)
    for f in (extra / "masks").iterdir():
        Image.fromarray(np.full((40, 48), 2, np.uint8)).save(f)
    with pytest.raises(ValueError, match="class id 2"):
        load_data(config(tmp_path, data, extra_data=(str(extra),), extra_mask="index"), CPU)


def test_instance_masks_train_three_classes_and_the_card_says_how_to_split_them(tmp_path: Path) -> None:
    data = write_touching_discs(tmp_path / "data", n=8)
    cfg = config(
        tmp_path,
        data,
        mask="instances:boundary=2",
        class_names=("background", "nucleus", "boundary"),
        epochs=2,
        min_area=4,
    )
    loaded = load_data(cfg, CPU)
    assert {int(v) for y in loaded.train_y for v in y.unique()} == {0, 1, 2}
    assert all(s.instances is not None and s.instances.max() == 2 for s in loaded.val)
    summary = train(cfg, log=False)
    card = load_bundle(tmp_path / "run" / "bundle").card
    assert card.instances == InstanceSpec("watershed", interior=1, boundary=2, min_area=4)
    assert card.training["mask"] == "instances:boundary=2"
    assert {"val_map", "val_ap50", "val_foreground_dice", "val_foreground_iou"} <= set(card.metrics)
    assert card.training["val_report"]["instances"]["true_objects"] == 2 * len(loaded.val)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # The best epoch is the one with the highest validation mAP.
    assert summary["best"] == max(r["val_map"] for r in rows)
    assert rows[summary["best_epoch"] - 1]["val_map"] == summary["best"]


def test_configs_written_before_instances_resume_unchanged(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data", n=4)
    old = config(tmp_path, data).to_dict()
    del old["min_area"]
    cfg = TrainConfig.from_dict(old)
    assert cfg == config(tmp_path, data) and cfg.min_area == 16 and cfg.instance_spec() is None
    assert config(tmp_path, data, mask="instances").instance_spec() == InstanceSpec("components", 1, min_area=16)


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--mask", "instances:boundary=0"], "boundary=W"), (["--min-area", "-1"], "--min-area")],
)
def test_bad_instance_flags_are_refused(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["--data", str(tmp_path), "--name", "x", *flags])
