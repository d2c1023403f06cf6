"""Train the shipped models on one CUDA host, unattended, in at most 9 minutes: bundles and a summary.

    python scripts/pack_datasets.py DATASETS_DIR               # here: a reduced copy in artifacts/datasets
    python scripts/train_gpu.py artifacts/datasets             # on the CUDA host
    python scripts/train_gpu.py artifacts/datasets --dry-run   # anywhere: every step, tiny and on the CPU

The recipes are those of ``scripts/train-shipped.sh`` (polyp-v3, nuclei-v3, membrane 1.3) sized for an
H100/H200: larger batches (fewer, fuller steps; bf16 autocast and channels-last come with the device),
the data loaded to the device once, and validation batched on the device every few epochs (``--val-every``),
so that the device spends its time training. Each model gets a share of the wall-clock budget (what one
leaves is shared among the next) and stops after the last epoch that fits in it (``train --time-budget``);
the epochs are sized to end before it on an H200, the budget is the guard. Runs that were interrupted
resume when the command is run again; a model whose bundle exists is skipped.

Written to ``--runs`` (default runs/gpu): one run folder per model (``train``'s), ``summary.json`` and
``summary.md`` (per model: epochs, seconds, the share spent training, the bundle's validation metrics and
its path). ``--export-to DIR`` also copies each bundle (DIR/NAME/) and the summary there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STARTED = time.monotonic()  # the budget counts from the start of this process, imports included

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.bundle import load_bundle  # noqa: E402
from model.train import build_parser, config_from_args, train  # noqa: E402

POLYP = [
    "--mask", "binary:127", "--classes", "background,polyp", "--colors", "000000,ff3b30",
    "--sizing", "resize", "--size", "352", "--encoder", "efficientnet-lite0", "--pretrained", "--encoder-lr", "0.1",
    "--base-width", "16", "--batch-size", "16", "--epochs", "40", "--lr", "1e-3", "--warmup-epochs", "1",
    "--ema", "0.99", "--patience", "0", "--scale", "0.5,1.5", "--rotate", "180", "--shear", "22",
    "--brightness", "0.3", "--contrast", "0.3", "--saturation", "0.3", "--deep-supervision", "0.5",
    "--val-every", "2", "--version", "3.0.0-gpu",
    "--description", "Colorectal polyps in colonoscopy frames (binary).",
    "--dataset-name", "Kvasir-SEG", "--dataset-url", "https://datasets.simula.no/kvasir-seg/",
    "--dataset-license", "research and educational use; commercial use needs the authors' permission "
    "(the images also ship in HyperKvasir under CC BY 4.0)",
    "--dataset-citation", "Jha et al., Kvasir-SEG: A Segmented Polyp Dataset, MMM 2020",
]  # fmt: skip
NUCLEI = [
    "--mask", "instances:boundary=2", "--classes", "background,nucleus,boundary",
    "--colors", "000000,34c759,ffd60a", "--min-area", "16", "--sizing", "tile", "--size", "256",
    "--encoder", "efficientnet-lite0", "--pretrained", "--encoder-lr", "0.1", "--base-width", "16",
    "--epochs", "40", "--steps-per-epoch", "25", "--batch-size", "16", "--lr", "2e-3", "--warmup-epochs", "1",
    "--ema", "0.99", "--patience", "0", "--val-every", "8", "--version", "3.0.0-gpu",
    "--description", "Cell nuclei in fluorescence, brightfield and H&E microscopy, one instance per nucleus "
    "(interior and boundary classes, split by watershed).",
    "--dataset-name", "2018 Data Science Bowl stage1_train (BBBC038) with community mask fixes",
    "--dataset-url", "https://bbbc.broadinstitute.org/BBBC038", "--dataset-license", "CC0 1.0",
    "--dataset-citation", "Caicedo et al., Nucleus segmentation across imaging experiments: the 2018 Data "
    "Science Bowl, Nature Methods 16, 2019",
]  # fmt: skip
MEMBRANE = [
    "--mask", "binary-inverted:127", "--classes", "background,membrane", "--colors", "000000,0a84ff",
    "--channels", "1", "--sizing", "tile", "--size", "256", "--base-width", "32", "--steps-per-epoch", "25",
    "--batch-size", "16", "--val-fraction", "0.2", "--patience", "0", "--epochs", "60", "--lr", "2e-3",
    "--scale", "1,1", "--elastic", "8", "--ema", "0.99", "--border-crops", "0.5", "--val-every", "5",
    "--version", "1.3.0-gpu",
    "--description", "Neuronal membranes in serial-section electron microscopy (class 1 = membrane).",
    "--dataset-name", "ISBI 2012 EM segmentation challenge, training slices",
    "--dataset-url", "https://imagej.net/events/isbi-2012-segmentation-challenge",
    "--dataset-license", "non-commercial use in segmentation software only",
    "--dataset-citation", "Cardona et al., An integrated micro- and macroarchitectural analysis of the "
    "Drosophila brain by computer-assisted serial section electron microscopy, PLoS Biology 2010",
]  # fmt: skip


class Recipe:
    def __init__(self, name: str, folder: str, flags: list[str], share: float) -> None:
        self.name, self.folder, self.flags = name, folder, flags
        self.share = share  # of the wall-clock budget, against the other models still to run
        self.pretrained = "--pretrained" in flags


RECIPES = {
    "polyp": Recipe("polyp", "kvasir_seg", POLYP, 0.45),
    "nuclei": Recipe("nuclei", "dsb2018_nuclei", NUCLEI, 0.33),
    "membrane": Recipe("membrane", "isbi2012_em_membrane", MEMBRANE, 0.22),
}
# Every step at its smallest, on the CPU: one epoch of two batches of two at 128 px, a width-4 decoder, and
# 2% of the images validated (the validation and the card's evaluation are most of a dry run's time).
DRY_RUN = [
    "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--size", "128", "--base-width", "4",
    "--val-fraction", "0.02",
]  # fmt: skip
EXPORT_SECONDS = 25.0  # kept back per model for its export (the card's serving-pipeline evaluation)


def budgets(remaining: Sequence[Recipe], seconds_left: float) -> float:
    """The next model's training budget: its share of what is left once every remaining export is kept back."""
    usable = seconds_left - EXPORT_SECONDS * len(remaining)
    return max(1.0, usable * remaining[0].share / sum(r.share for r in remaining))


def run_model(
    recipe: Recipe,
    datasets: Path,
    runs: Path,
    extra: list[str],
    imagenet: Path | None,
    budget: float,
    before: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or resume) one model within ``budget`` seconds; its row of the summary. A model whose bundle
    exists is not trained again: its row is ``before`` (the last summary's), marked ``from_before``."""
    run_dir = runs / recipe.name
    bundle = run_dir / "bundle"
    argv = [
        "--data", str(datasets / recipe.folder), "--name", recipe.name, "--run-dir", str(run_dir),
        "--out", str(bundle), *recipe.flags, *extra,
    ]  # fmt: skip
    if recipe.pretrained and imagenet is not None:
        argv += ["--pretrained-weights", str(imagenet)]
    t0 = time.monotonic()
    row: dict[str, Any] = {"model": recipe.name, "budget_s": round(budget, 1)}
    if (bundle / "card.json").exists():
        if before is not None:
            return {**before, "from_before": True}
        row["stop"] = "done before"
    else:
        cfg = config_from_args(build_parser().parse_args(argv))
        resume = (run_dir / "last.pt").exists()
        summary = train(cfg, resume=resume, log=True, progress=False, time_budget=budget)
        row.update(
            stop=summary["stop"],
            train_s=round(summary["elapsed"] - summary["val_elapsed"], 3),
            val_s=round(summary["val_elapsed"], 3),
        )
    card = load_bundle(bundle).card
    row.update(
        seconds=round(time.monotonic() - t0, 1),
        epochs=card.training["epochs"],
        best_epoch=card.training["best_epoch"],
        metrics=card.metrics,
        hardware=card.training["hardware"],
        precision=card.training["precision"],
        bundle=str(bundle),
    )
    return row


SHOWN = ("val_dice", "val_iou", "val_pixel_accuracy", "val_map", "val_ap50")


def table(rows: Sequence[dict[str, Any]], total: float) -> str:
    """The summary as a Markdown table. "seconds" is the model's wall clock (loading, epochs, export);
    "training %" the share of its epochs' time spent in training steps rather than validation."""
    metrics = [m for m in SHOWN if any(m in r["metrics"] for r in rows)]
    head = ["model", "stop", "epochs", "best", "seconds", "train s", "val s", "training %", *metrics, "bundle"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        epochs_s = r.get("train_s", 0) + r.get("val_s", 0)
        share = f"{100 * r['train_s'] / epochs_s:.0f}" if epochs_s else "-"
        cells = [r["model"], r["stop"], r["epochs"], r["best_epoch"], r["seconds"]]
        cells += [r.get("train_s", "-"), r.get("val_s", "-"), share]
        cells += [f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-" for m in metrics] + [r["bundle"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + f"\n\n{len(rows)} models in {total:.0f} s\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the shipped models on a CUDA host within a time budget.")
    p.add_argument("datasets", type=Path, help="kvasir_seg/, dsb2018_nuclei/, isbi2012_em_membrane/ (packed)")
    p.add_argument("models", nargs="*", help=f"of {', '.join(RECIPES)} (default: all three)")
    p.add_argument("--runs", type=Path, default=Path("runs/gpu"), help="run folders and the summary")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for everything (default 9 minutes)")
    p.add_argument("--device", default="", help="default: cuda (cpu for --dry-run)")
    p.add_argument(
        "--imagenet",
        type=Path,
        default=None,
        help="ImageNet checkpoint for the pretrained recipes (default: DATASETS/efficientnet-lite0.pth if "
        "there, else the train extra's package)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="every step, tiny (1 epoch of 2 steps, 128 px, 2%% validated), on the CPU",
    )
    p.add_argument("--train-flags", default="", help="more flags for every model's run, e.g. '--seed 1'")
    p.add_argument("--export-to", type=Path, help="also copy each bundle (DIR/NAME/) and the summary here")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0 = torch's default; 1 for a dry run on a CPU that others share, where "
        "threads that wait for each other lose most of their time)",
    )
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in RECIPES]
    if unknown:
        p.error(f"unknown model {', '.join(unknown)}: choose from {', '.join(RECIPES)}")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    extra = ["--device", device] + ([*DRY_RUN, "--precision", "float32"] if args.dry_run else [])
    extra += shlex.split(args.train_flags)
    imagenet = args.imagenet
    if imagenet is None and (args.datasets / "efficientnet-lite0.pth").is_file():
        imagenet = args.datasets / "efficientnet-lite0.pth"
    recipes = [RECIPES[m] for m in (args.models or RECIPES)]
    deadline = STARTED + args.budget
    args.runs.mkdir(parents=True, exist_ok=True)
    last = args.runs / "summary.json"
    before = {r["model"]: r for r in json.loads(last.read_text())["models"]} if last.exists() else {}
    rows = []
    for i, recipe in enumerate(recipes):
        budget = 0.0 if args.dry_run else budgets(recipes[i:], deadline - time.monotonic())
        print(f"== {recipe.name}: {budget:.0f} s for training" if budget else f"== {recipe.name}", file=sys.stderr)
        rows.append(run_model(recipe, args.datasets, args.runs, extra, imagenet, budget, before.get(recipe.name)))
    total = time.monotonic() - STARTED
    summary = {"seconds": round(total, 1), "budget_s": args.budget, "dry_run": args.dry_run, "models": rows}
    (args.runs / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.runs / "summary.md").write_text(table(rows, total))
    print(table(rows, total))
    if args.export_to:
        for row in rows:
            dst = args.export_to / row["model"]
            dst.mkdir(parents=True, exist_ok=True)
            for f in Path(row["bundle"]).iterdir():
                shutil.copyfile(f, dst / f.name)
        for name in ("summary.json", "summary.md"):
            shutil.copyfile(args.runs / name, args.export_to / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
