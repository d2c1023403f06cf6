"""What the service costs outside the model: server CPU milliseconds per answered request, with a model that
costs nearly nothing (width 4, depth 2, a 64-pixel input), so that decoding, the hand-offs, HTTP and encoding
are all that is left.

    python -m bench.frontend [--workers 1 2] [--clients 1 8] [--seconds 10] [--image-side 512] [--code DIR]

For each worker count the real ``unetseg serve`` runs on a 512 x 512 JPEG (format png: a palette mask of the
image's size comes back); the CPU time of the server's whole process tree (``/proc``: the supervisor, the
engine process and the front ends, user + system) over the measured seconds is divided by the requests it
answered. The load generator runs in this process (its CPU is not counted). ``--code DIR`` runs the server
from another checkout (e.g. a ``git worktree`` of an earlier commit, for a before/after comparison; one process
there: ``--workers 1``). Results: a table and JSON.

``--inprocess N`` measures the pipeline alone, without HTTP and steadier on a noisy machine: ``N`` requests one
after another through ``app.pipeline.predict`` (decode, the engine, encode: its two hand-offs and its worker
thread) on an engine in this process, as ``unetseg serve`` sets it up (but with the OpenMP settings of this
process's environment: torch is loaded before ``serve``'s defaults could apply); this process's CPU per
request.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import ROOT
from bench.loadgen import multipart_request, run_load
from bench.procs import cpu_seconds, tree
from bench.run import free_port, server
from model.bundle import Card, ClassInfo, Dataset, InputPolicy, save_bundle
from model.train import hardware
from model.unet import UNet, UNetConfig


def near_free_bundle(folder: Path) -> Path:
    """A U-Net of width 4 and depth 2 on a 64-pixel input: a forward pass costs next to nothing."""
    card = Card(
        name="free",
        version="1.0.0",
        architecture=UNetConfig(in_channels=3, num_classes=2, base_width=4, depth=2),
        classes=(ClassInfo(0, "background", (0, 0, 0)), ClassInfo(1, "object", (255, 0, 0))),
        input=InputPolicy(3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "resize", 64),
        dataset=Dataset("none"),
    )
    torch.manual_seed(0)
    save_bundle(folder / "free", card, UNet(card.architecture).eval(), "float32")
    return folder


def jpeg(side: int) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def measure(port: int, root_pid: int, request: bytes, clients: int, seconds: float) -> dict[str, Any]:
    warm = asyncio.run(run_load("127.0.0.1", port, request, clients, 2.0))
    assert warm.ok, f"no answer during the warm-up: {warm.errors}"
    pids = tree(root_pid)
    before, t0 = cpu_seconds(pids), time.perf_counter()
    result = asyncio.run(run_load("127.0.0.1", port, request, clients, seconds))
    wall = time.perf_counter() - t0
    used = cpu_seconds(pids) - before
    return {
        "clients": clients,
        "requests": result.ok,
        "errors": dict(result.errors),
        "requests_per_s": round(result.ok / wall, 1),
        "p50_ms": round(result.percentile(50) * 1000, 2),
        "server_cpu_ms_per_request": round(1000 * used / max(1, result.ok), 2),
        "server_cores_busy": round(used / wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.frontend", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--image-side", type=int, default=512)
    ap.add_argument("--code", type=Path, default=ROOT, help="the checkout whose server is measured")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "frontend.json")
    ap.add_argument("--inprocess", type=int, metavar="N", help="N requests through the pipeline, without HTTP")
    a = ap.parse_args(argv)
    image = jpeg(a.image_side)
    if a.inprocess:
        print(json.dumps(inprocess(image, a.inprocess)))
        return 0
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "hardware": hardware(torch.device("cpu")),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "image": f"{a.image_side}x{a.image_side} JPEG, format=png",
        "code": str(a.code),
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        weights = near_free_bundle(Path(tmp) / "weights")
        for workers in a.workers:
            port = free_port()
            env = {
                "UNETSEG_WEIGHTS_DIR": str(weights),
                "UNETSEG_DATA_DIR": str(Path(tmp) / f"data-{workers}"),
                "UNETSEG_DEVICE": "cpu",
                "UNETSEG_LOG_LEVEL": "warning",
                "UNETSEG_QUEUE_SIZE": "256",
            }
            cmd = [sys.executable, "-m", "app", "serve", "--port", str(port)]
            cmd += ["--workers", str(workers)] if workers != 1 else []
            request = multipart_request("127.0.0.1", port, "/v1/predict", "file", "x.jpg", image, "image/jpeg")
            env["PYTHONPATH"] = str(a.code)
            with server(cmd, port, "/readyz", env, cwd=a.code) as proc:
                for clients in a.clients:
                    row = {"workers": workers, **measure(port, proc.pid, request, clients, a.seconds)}
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    return 0


def inprocess(image: bytes, n: int) -> dict[str, Any]:
    """CPU milliseconds of this process per request through ``app.pipeline.predict``, one at a time."""
    from app.engine import Engine
    from app.engine.device import resolve_streams
    from app.pipeline import Ask, predict

    async def run(count: int) -> None:
        for _ in range(count):
            await predict(engine, ask, image, 10**9)

    with tempfile.TemporaryDirectory() as tmp:
        device = torch.device("cpu")
        engine = Engine.from_folder(
            near_free_bundle(Path(tmp)), device, precision="float32", streams=resolve_streams(0, device)
        )
        engine.start(warmup=True)
        ask = Ask("free", "png", 0.5, 1)
        try:
            asyncio.run(run(max(10, n // 10)))
            cpu, wall = time.process_time(), time.perf_counter()
            asyncio.run(run(n))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            engine.stop()
    return {
        "requests": n,
        "cpu_ms_per_request": round(1000 * cpu / n, 3),
        "wall_ms_per_request": round(1000 * wall / n, 3),
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['image']} on {report['machine']['hardware']}",
        "",
        "| workers | clients | requests/s | p50 ms | server CPU-ms per request | server cores busy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['workers']} | {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | "
            f"{r['server_cpu_ms_per_request']} | {r['server_cores_busy']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
