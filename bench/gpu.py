"""The GPU host check, in one unattended command: the CUDA tests, GPU-vs-CPU mask parity on real frames, the
serving benchmark against the naive server and LitServe, and the front-end worker sweep.

    python -m bench.gpu [--frames DIR] [--budget-s 540]        # on a CUDA host
    python -m bench.gpu --device cpu --dry-run                 # the same steps, small, on any machine

Each step gets a share of ``--budget-s`` (default 9 minutes: on the H200 host a service took 37 s from its start
to ready, and the sweep starts five) and its result, or why it failed, goes into
``--out``/gpu-check.json with a Markdown table beside it (gpu-check.md). Steps:

1. the engine's tests on the device (``tests/app``: device, engine, batching, graph; CUDA tests skip without one);
2. parity: every shipped model on ``--frames`` (a folder of images, e.g. a resized copy of the datasets made
   by ``scripts/pack_datasets.py``; generated images without one) through the engine on the device in the
   card's precision and on the CPU in float32: the share of pixels whose class agrees, per model;
3. ``bench.run``: raw forward at batches up to 64, the service (its batch limit measured) against the naive
   server and LitServe at 1, 8, 64 and 128 clients;
4. the worker sweep: the service alone with ``--workers`` 1, 2, 4, 8 and 12 at 64 and 128 clients, each with the
   batch limit the serving step measured (so that its start skips the measurement).

``--steps`` runs some of them; every load also records the CPU each server process used, by role (engine
process, front ends), so that the table says which process was the limit, and ``--profile`` adds py-spy
samples (collapsed stacks) of the engine process and a front end at the largest load, where py-spy is
installed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.engine import Engine, resolve_device
from app.pipeline import Ask, predict_sync
from bench import ROOT
from model.bundle import discover, load_bundle
from model.train import hardware

STEPS = ("tests", "parity", "serving", "sweep")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def frames(folder: Path | None, per_model: int) -> list[bytes]:
    """Up to ``per_model`` image files from ``folder`` (recursively), else generated smooth images."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder else []
    if files:
        step = max(1, len(files) // per_model)
        return [p.read_bytes() for p in files[::step][:per_model]]
    rng = np.random.default_rng(0)
    out = []
    for i in range(per_model):
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((384 + 32 * i, 288), Image.Resampling.BICUBIC).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def masks(engine: Engine, model: str, images: list[bytes]) -> list[np.ndarray]:
    out = []
    for data in images:
        png = predict_sync(engine, Ask(model, "png"), data, 10**9).body
        out.append(np.asarray(Image.open(io.BytesIO(png))))
    return out


def parity(weights: Path, device: torch.device, images: list[bytes]) -> dict[str, Any]:
    """Per model: the share of pixels whose class agrees between ``device`` (card precision) and CPU float32."""
    result: dict[str, Any] = {}
    for folder in discover(weights):
        name = load_bundle(folder).card.name
        engines = {
            "device": Engine([load_bundle(folder)], device, precision="auto", max_batch=4),
            "cpu": Engine([load_bundle(folder)], torch.device("cpu"), precision="float32", max_batch=4),
        }
        for e in engines.values():
            e.start(warmup=False)
        try:
            got = masks(engines["device"], name, images)
            want = masks(engines["cpu"], name, images)
        finally:
            for e in engines.values():
                e.stop()
        same = sum(int((a == b).sum()) for a, b in zip(got, want, strict=True))
        total = sum(a.size for a in want)
        result[name] = {
            "precision": engines["device"].get(name).precision,
            "images": len(images),
            "pixel_agreement": round(same / total, 5),
            "meets_99_5": same / total >= 0.995,
        }
        print(f"  parity {name}: {result[name]}", flush=True)
    return result


def step(name: str, cmd: list[str], timeout: float, out: Path) -> dict[str, Any]:
    """Run a command with a time limit; its exit code, seconds and the last of its output."""
    t0 = time.monotonic()
    log = out / f"{name}.log"
    try:
        with log.open("wb") as fh:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    tail = log.read_text(errors="replace")[-3000:]
    print(f"  {name}: exit {code} in {time.monotonic() - t0:.0f} s", flush=True)
    return {"exit": code, "seconds": round(time.monotonic() - t0, 1), "tail": tail}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--weights-dir", type=Path, default=ROOT / "weights")
    ap.add_argument("--model", default="polyp", help="the model bench.run serves")
    ap.add_argument("--frames", type=Path, help="images for the parity check (default: generated)")
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--dry-run", action="store_true", help="every step, small and short (for a CPU)")
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "gpu-check")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="the steps to run (default: all)")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per load")
    ap.add_argument("--sweep", nargs="+", default=["1", "2", "4", "8", "12"], help="front-end counts to sweep")
    ap.add_argument("--profile", action="store_true", help="py-spy samples of the servers at the largest load")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(a.device)
    start = time.monotonic()
    budget = a.budget_s
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "hardware": hardware(device),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "dry_run": a.dry_run,
    }
    tests = ["tests/app/test_device.py", "tests/app/test_engine.py", "tests/app/test_batching.py"]
    tests += ["tests/app/test_graph.py", "tests/app/test_engine_instances.py"]

    # The dry run checks that every step works: each gets the whole budget (a CPU is slow at this).
    def share(part: float) -> float:
        return float(budget if a.dry_run else budget * part)

    if "tests" in a.steps:
        print("1. engine tests", flush=True)
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
        report["tests"] = step("tests", pytest, share(0.08), a.out)

    if "parity" in a.steps:
        print("2. parity", flush=True)
        images = frames(a.frames, 4 if a.dry_run else 40)
        report["parity"] = parity(a.weights_dir, device, images)

    seconds = "1" if a.dry_run else str(a.seconds)
    clients = ["1", "8"] if a.dry_run else ["1", "8", "64", "128"]
    batches = ["1", "2"] if a.dry_run else ["1", "2", "4", "8", "16", "32", "64"]
    common = ["--weights-dir", str(a.weights_dir), "--model", a.model, "--device", str(device), "--seconds", seconds]
    if "serving" in a.steps:
        print("3. serving benchmark", flush=True)
        run_json = a.out / "serving.json"
        cmd = [sys.executable, "-m", "bench.run", *common, "--clients", *clients, "--raw-batches", *batches]
        cmd += ["--large-side", "1024" if a.dry_run else "4000", "--out", str(run_json)]
        cmd += ["--profile", str(a.out / "profiles")] if a.profile else []
        workers = "1" if device.type == "cpu" else "0"
        report["serving"] = step("serving", [*cmd, "--workers", workers], share(0.3), a.out)
        if run_json.exists():  # what it measured before it stopped, if it did not finish
            report["serving"]["result"] = json.loads(run_json.read_text())

    sweep: dict[str, Any] = {}
    counts = a.sweep[:2] if a.dry_run else a.sweep
    if "sweep" in a.steps:
        print("4. worker sweep", flush=True)
    for i, n in enumerate(counts if "sweep" in a.steps else []):
        left = budget if a.dry_run else budget - (time.monotonic() - start)
        if left < 20:
            sweep[n] = {"skipped": "out of time"}
            continue
        out_json = a.out / f"workers-{n}.json"
        cmd = [sys.executable, "-m", "bench.run", *common, "--peers", "--raw-batches", "1"]
        # The serving step's measured batch limit, so that each sweep server starts without measuring it again.
        chosen = report.get("serving", {}).get("result", {}).get("service", {}).get("max_batch")
        cmd += ["--max-batch", str(chosen)] if chosen else []
        cmd += ["--clients", *(clients[-2:]), "--large-side", "512", "--workers", n, "--out", str(out_json)]
        sweep[n] = step(f"workers-{n}", cmd, left / (len(counts) - i), a.out)
        if out_json.exists():
            result = json.loads(out_json.read_text())
            loads = result.get("service", {}).get("loads", [])
            sweep[n]["images_per_s"] = {str(r["clients"]): r["images_per_s"] for r in loads}
            sweep[n]["cpu"] = {str(r["clients"]): r.get("cpu") for r in loads}
    report["worker_sweep"] = sweep
    report["seconds"] = round(time.monotonic() - start, 1)
    (a.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (a.out / "gpu-check.md").write_text(render(report) + "\n")
    print(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['hardware']} ({report['device']}), torch {report['torch']}, {report['seconds']} s", ""]
    if "tests" in report:
        tail = report["tests"]["tail"].strip().splitlines()[-1:]
        lines.append(f"Engine tests: exit {report['tests']['exit']}: {tail}")
    if "parity" in report:
        lines += ["", "| model | precision | images | pixel agreement with CPU float32 |", "|---|---|---:|---:|"]
        for name, p in report["parity"].items():
            lines.append(f"| {name} | {p['precision']} | {p['images']} | {p['pixel_agreement']} |")
    result = report.get("serving", {}).get("result")
    if result:
        from bench.run import render as render_run

        lines += ["", render_run(result)]
    lines += ["", "| front ends | images/s by clients | cores busy by role (busiest process) |", "|---:|---|---|"]
    for n, row in report["worker_sweep"].items():
        cpu = {
            c: f"{v['cores_busy_by_role']} ({v['busiest_process']['cores_busy']})"
            for c, v in row.get("cpu", {}).items()
            if v
        }
        lines.append(f"| {n} | {row.get('images_per_s', row.get('skipped', row.get('exit')))} | {cpu or '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
