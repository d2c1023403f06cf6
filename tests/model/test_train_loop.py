"""The loop's validation schedule (every K epochs, the last always), its time budget, the ImageNet checkpoint
given as a file, and runs written before these existed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.bundle import load_bundle
from model.encoders import EfficientNetLiteEncoder, checkpoint_keys
from model.train import main, train
from tests.model.synthetic import config, write_disc_dataset

VAL_KEYS = {"val_dice", "val_iou", "val_pixel_accuracy"}


def rows(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_validation_every_k_epochs_and_after_the_last(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    summary = train(config(tmp_path, data, epochs=5, val_every=2), log=False)
    validated = [r["epoch"] for r in rows(tmp_path / "run") if r.keys() >= VAL_KEYS]
    assert validated == [2, 4, 5]
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4, 5]
    assert summary["best_epoch"] in validated and summary["val_elapsed"] > 0
    card = load_bundle(tmp_path / "run" / "bundle").card
    assert card.training["val_every"] == 2 and card.training["epochs"] == 5


def test_patience_counts_validations(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    # lr 0: nothing improves after the first validation (epoch 2); two more validations (4, 6) end the run.
    summary = train(config(tmp_path, data, epochs=30, lr=0.0, patience=2, val_every=2), log=False)
    assert summary["stop"] == "early stopping" and summary["epoch"] == 6 and summary["best_epoch"] == 2


def test_a_time_budget_ends_the_run_on_a_validated_exported_epoch(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    cfg = config(tmp_path, data, epochs=4, val_every=3)
    summary = train(cfg, log=False, time_budget=1e-3)  # no second epoch fits
    assert summary["stop"] == "time budget" and summary["epoch"] == 1
    assert rows(tmp_path / "run")[0].keys() >= VAL_KEYS  # validated although 1 is not a multiple of 3
    assert load_bundle(cfg.out).card.training["epochs"] == 1
    # The run goes on where it stopped when resumed without a budget.
    summary = train(cfg, resume=True, log=False)
    assert summary["stop"] == "epochs" and summary["epoch"] == 4
    assert [r["epoch"] for r in rows(tmp_path / "run") if r.keys() >= VAL_KEYS] == [1, 3, 4]


def test_runs_written_before_val_every_resume_and_export(tmp_path: Path) -> None:
    data = write_disc_dataset(tmp_path / "data")
    cfg = config(tmp_path, data, epochs=3)
    train(cfg, max_epochs_this_run=2, log=False)
    # What an older version wrote: a config without the newer keys, a state without the validation time.
    run = tmp_path / "run"
    ckpt = torch.load(run / "last.pt", weights_only=True)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("val_every", "pretrained_weights")}
    state = {k: v for k, v in json.loads(ckpt["state"]).items() if k != "val_elapsed"}
    ckpt.update(config=json.dumps(old), state=json.dumps(state))
    torch.save(ckpt, run / "last.pt")
    (run / "config.json").write_text(json.dumps(old, indent=2) + "\n")
    assert main(["--data", str(data), "--name", "discs", "--run-dir", str(run), "--export"]) == 0
    assert load_bundle(run / "bundle").card.training["epochs"] == 2
    assert main(["--data", str(data), "--name", "discs", "--run-dir", str(run), "--resume"]) == 0
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    assert load_bundle(run / "bundle").card.training["epochs"] == 3


def test_an_imagenet_checkpoint_given_as_a_file(tmp_path: Path) -> None:
    # A stand-in for the published checkpoint: a random encoder's weights under the checkpoint's names.
    torch.manual_seed(5)
    source = EfficientNetLiteEncoder("efficientnet-lite0")
    ours = source.state_dict()
    path = tmp_path / "lite0.pth"
    torch.save({theirs: ours[key] for key, theirs in checkpoint_keys(source).items()}, path)
    data = write_disc_dataset(tmp_path / "data", n=6)
    kw = dict(encoder="efficientnet-lite0", depth=5, pretrained=True, epochs=1, lr=0.0, batch_size=2)
    train(config(tmp_path, data, pretrained_weights=str(path), **kw), log=False)
    encoder = load_bundle(tmp_path / "run" / "bundle").model.encoder
    assert encoder is not None
    torch.testing.assert_close(encoder.stem.conv.weight, source.stem.conv.weight.half().float())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--val-every", "0"], "--val-every"),
        (["--time-budget", "-1"], "--time-budget"),
        (["--pretrained-weights", "x.pth"], "--pretrained"),
        (["--device", "tpu"], "unsupported device"),
    ],
)
def test_bad_loop_flags_are_refused(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["--data", str(tmp_path), "--name", "x", *flags])


def test_python_m_model_train_is_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "model.train", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    ).stdout
    assert "unetseg train" in out and "--val-every" in out and "--time-budget" in out
