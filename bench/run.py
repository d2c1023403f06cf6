"""The serving benchmark: one command, one machine, the same images for every contestant.

    python -m bench.run [--weights-dir weights] [--model polyp] [--seconds 15] [--clients 1 8 32] [--workers N]

Measures, in this order (each server runs alone):
1. the raw model forward in-process at batch sizes 1..16, the best of which is the ceiling a server tends to;
2. this service over real HTTP (``unetseg serve``) at each client count: images/s, p50, p99, and the share
   of a round trip not spent in the model (its Server-Timing ``model`` entry against the time measured);
3. a naive FastAPI service with one forward per request (``bench/naive_server.py``);
4. LitServe serving the same model with its own batching (``bench/litserve_server.py``), if installed;
then single-client latency on a large image for each server. Everything uses the same precision (the
service's choice for the model on this device). Results: a table on stdout and JSON in ``--out``.

A tiled model's raw rate is in tiles: its ceiling in images is that divided by the tiles of the 512 x 512
image. The naive server and LitServe resize every image to one model input, so for a tiled model they do a
fraction of the service's work (and give a different mask): compare them on a "resize" model.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from app.engine import resolve_device, resolve_dtype, stream_threads
from app.engine.device import resolve_streams, set_own_threads
from app.engine.graph import GRAPHS, script_graph, wants_script
from bench import DATASETS, ROOT
from bench.loadgen import LoadResult, json_request, multipart_request, run_load
from bench.procs import CpuMeter, profile
from model.bundle import Card, discover, load_bundle
from model.device import hardware
from model.inference import TileGrid

DATASET_IMAGES = DATASETS / "kvasir_seg" / "images"


def inputs_per_image(card: Card) -> int:
    """Forward-pass inputs one 512 x 512 image makes: its tiles for a tiled model, else one."""
    return len(TileGrid(512, 512, card.input)) if card.input.sizing == "tile" else 1


def make_images(large_side: int) -> tuple[bytes, bytes, str]:
    """(512x512 JPEG, large JPEG, where the pixels came from)."""
    files = sorted(DATASET_IMAGES.glob("*.jpg")) if DATASET_IMAGES.is_dir() else []
    if files:
        src = Image.open(files[0]).convert("RGB")
        origin = f"a Kvasir-SEG frame ({files[0].name}), resized"
    else:
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        src = Image.fromarray(small).resize((512, 512), Image.Resampling.BICUBIC)
        origin = "a generated smooth random image"

    def jpeg(size: tuple[int, int]) -> bytes:
        buf = io.BytesIO()
        src.resize(size, Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    return jpeg((512, 512)), jpeg((large_side, large_side * 3 // 4)), origin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(
    cmd: list[str],
    port: int,
    health: str,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    keep_log: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A server started with ``cmd``, once ``health`` answers 200 (at most 180 s); stopped afterwards, its output
    copied to ``keep_log`` where given."""
    log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)  # noqa: SIM115
    # A session of its own, so that stopping it also stops the worker processes some servers fork.
    proc = subprocess.Popen(
        cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        started = time.monotonic()
        deadline = started + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[2]} not ready: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.2)
        print(f"  {cmd[2]} ready in {time.monotonic() - started:.1f} s", flush=True)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        proc.wait()
        log.close()
        if keep_log is not None:
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log.name, keep_log)
        os.unlink(log.name)


# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (no sparsity).
GPU_PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def flops_per_image(bundle_dir: Path) -> float:
    """Forward FLOPs for one input at the model's input size (a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    bundle = load_bundle(bundle_dir)
    p = bundle.card.input
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bundle.model(torch.zeros(1, p.channels, p.size, p.size))
    return float(counter.get_total_flops())


def gpu_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in GPU_PEAK_BF16_TFLOPS.items():
        if all(part in name for part in key.split()):
            return value
    return None


def _forward_rate(model: Any, x: torch.Tensor, device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    n = 0
    with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
        model(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def bare_model(
    bundle_dir: Path, device: torch.device, dtype: torch.dtype, graph: str = "auto"
) -> tuple[Any, Callable[[int], torch.Tensor]]:
    """The bundle's model on ``device`` as the engine runs it (channels-last unless float32, a frozen graph
    where ``graph`` asks for one), and a maker of random input batches in the same layout."""
    bundle = load_bundle(bundle_dir)
    model = bundle.model.to(device).eval()
    p = bundle.card.input
    layout = torch.channels_last if device.type == "cuda" or dtype != torch.float32 else torch.contiguous_format
    model = model.to(memory_format=layout)  # type: ignore[call-overload]

    def inputs(batch: int) -> torch.Tensor:
        return torch.randn(batch, p.channels, p.size, p.size, device=device).contiguous(memory_format=layout)

    if wants_script(graph, device, compile=False):
        model = script_graph(model, inputs(1), dtype, bundle.card.name) or model
    return model, inputs


def raw_rate(
    model: Any,
    inputs: Callable[[int], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    streams: int,
    seconds: float,
) -> float:
    """Images/s of the bare forward pass (inputs already on the device) at ``batch``, with ``streams``
    threads each running forward passes (on the CPU each with its share of the torch threads), as the
    service's engine does with UNETSEG_STREAMS."""
    threads = torch.get_num_threads()
    share = stream_threads(streams, device.type)
    x = inputs(batch)
    rates: list[float] = []

    def stream() -> None:
        if share:
            set_own_threads(share)
        rates.append(_forward_rate(model, x, device, dtype, seconds))

    workers = [threading.Thread(target=stream) for _ in range(streams)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    torch.set_num_threads(threads)
    return round(sum(rates), 2)


def raw_forward(
    model: Any,
    inputs: Callable[[int], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    seconds: float,
    streams: int,
    batches: tuple[int, ...] = (1, 2, 4, 8, 16),
) -> dict[str, Any]:
    """The raw forward at ``batches``, with one stream and (if asked) the service's streams."""
    rows: dict[str, dict[int, float]] = {}
    for s in sorted({1, streams}):
        share = seconds / len(batches)
        rows[str(s)] = {bs: raw_rate(model, inputs, device, dtype, bs, s, share) for bs in batches}
        print(f"  {s} stream(s): {rows[str(s)]}", flush=True)
    best_s, best_bs = max(((s, bs) for s in rows for bs in rows[s]), key=lambda k: rows[k[0]][k[1]])
    return {
        "images_per_s_by_streams_and_batch": rows,
        "best_streams": int(best_s),
        "best_batch": best_bs,
        "best_images_per_s": rows[best_s][best_bs],
    }


def log_path(out: Path, name: str) -> Path:
    """Where a server's output is kept: beside the report."""
    return out.with_name(f"{out.stem}-{name}.log")


def model_load_seconds(port: int) -> dict[str, float]:
    """Each model's load and warm-up time, CUDA graphs included (the service's ``unetseg_model_load_seconds``)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = re.findall(r'^unetseg_model_load_seconds\{model="([^"]+)"\} (\S+)$', text, re.MULTILINE)
    return {name: round(float(value), 1) for name, value in found}


def served_max_batch(port: int, model: str) -> int:
    """The batch limit the service chose for ``model`` (measured at warm-up unless set)."""
    return int(httpx.get(f"http://127.0.0.1:{port}/v1/models/{model}", timeout=10).json()["max_batch"])


def save(report: dict[str, Any], out: Path) -> None:
    """The report so far (each server's section is kept even if a later one fails or the run is stopped)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def load(port: int, request: bytes, clients: int, seconds: float) -> LoadResult:
    return asyncio.run(run_load("127.0.0.1", port, request, clients, seconds, warmup_s=min(3.0, seconds / 3)))


def measure(
    name: str,
    proc: subprocess.Popen[bytes],
    port: int,
    small: bytes,
    large: bytes,
    clients: list[int],
    seconds: float,
    build: Any,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """Each client count's load on a server, with the CPU its processes (by role) and the load generator used;
    with ``profile_dir``, the largest load is also sampled by py-spy (``bench.procs.profile``)."""
    out: dict[str, Any] = {"loads": []}
    meter = CpuMeter(proc.pid)
    for c in clients:
        spies = profile(proc.pid, seconds, profile_dir, f"{name}-{c}") if profile_dir and c == max(clients) else []
        meter.start()
        r = load(port, build(small), c, seconds)
        for spy in spies:
            spy.wait(30)
        out["loads"].append({**r.summary(), "cpu": meter.stop(r.throughput)})
        cpu = out["loads"][-1]["cpu"]
        print(
            f"  {name:<10} {c:>3} clients: {r.throughput:7.2f} img/s  p50 {r.percentile(50) * 1000:7.1f} ms  "
            f"p99 {r.percentile(99) * 1000:7.1f} ms  errors {r.errors}"
            + (f"  non-model share {out['loads'][-1]['non_model_share_p50']}" if r.non_model else "")
            + f"  cores busy {cpu['cores_busy_by_role']} (busiest process {cpu['busiest_process']['cores_busy']},"
            f" load generator {cpu['loadgen_cores_busy']})",
            flush=True,
        )
    big = load(port, build(large), 1, max(3.0, seconds / 2))
    out["large"] = big.summary()
    print(f"  {name:<10} large image, 1 client: p50 {big.percentile(50) * 1000:.1f} ms", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights-dir", type=Path, default=ROOT / "weights")
    ap.add_argument("--model", default="polyp")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per client count")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--large-side", type=int, default=4000)
    ap.add_argument(
        "--max-batch", type=int, default=0, help="UNETSEG_MAX_BATCH (0: measured) and LitServe's batch (0: 8)"
    )
    ap.add_argument("--workers", type=int, default=1, help="front-end processes of the service (serve --workers)")
    ap.add_argument("--raw-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="raw forward batch sizes")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument(
        "--streams",
        type=int,
        default=0,
        help="UNETSEG_STREAMS for the service, workers for LitServe (0: the service's default for the device)",
    )
    ap.add_argument("--graph", default="auto", choices=GRAPHS, help="UNETSEG_GRAPH for the service and the raw forward")
    ap.add_argument("--peers", nargs="*", default=["naive", "litserve"], choices=["naive", "litserve"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    ap.add_argument("--profile", type=Path, help="a folder for py-spy samples of each server at the largest load")
    a = ap.parse_args(argv)

    folders = {load_bundle(f).card.name: f for f in discover(a.weights_dir)}
    if a.model not in folders:
        ap.error(f"no bundle named {a.model!r} in {a.weights_dir} (found: {', '.join(folders) or 'none'})")
    bundle_dir = folders[a.model]
    device = resolve_device(a.device)
    card = load_bundle(bundle_dir).card
    dtype = resolve_dtype("auto", card, device)
    dname = str(dtype).removeprefix("torch.")
    a.streams = resolve_streams(a.streams, device)
    small, large, origin = make_images(a.large_side)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "hardware": hardware(device),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "model": {
            "name": card.name,
            "version": card.version,
            "input": f"{card.input.sizing} {card.input.size}",
            "architecture": card.architecture.to_dict(),
            "inputs_per_image": inputs_per_image(card),
        },
        "device": str(device),
        "precision": dname,
        "images": {"small": "512x512 JPEG", "large": f"{a.large_side}x{a.large_side * 3 // 4} JPEG", "source": origin},
        "seconds": a.seconds,
        "max_batch": a.max_batch,
        "workers": a.workers,
        "max_wait_ms": a.max_wait_ms,
        "streams": a.streams,
        "graph": a.graph,
    }
    print(f"raw forward ({card.name}, {device}, {dname}):", flush=True)
    model, inputs = bare_model(bundle_dir, device, dtype, a.graph)
    report["raw"] = raw_forward(model, inputs, device, dtype, a.seconds, a.streams, tuple(a.raw_batches))
    flops = flops_per_image(bundle_dir)
    report["raw"]["gflop_per_image"] = round(flops / 1e9, 3)
    report["raw"]["achieved_tflops"] = round(flops * report["raw"]["best_images_per_s"] / 1e12, 4)
    peak = gpu_peak_tflops(device)
    if peak:
        report["raw"]["peak_bf16_tflops"] = peak
        report["raw"]["peak_images_per_s"] = round(peak * 1e12 / flops, 1)
        report["raw"]["fraction_of_peak"] = round(report["raw"]["achieved_tflops"] / peak, 4)
    print(f"  {report['raw']}", flush=True)

    # The service serves the measured model alone, as its peers do (and warms up only that one).
    with tempfile.TemporaryDirectory() as data_dir, tempfile.TemporaryDirectory() as served:
        (Path(served) / bundle_dir.name).symlink_to(bundle_dir.resolve(), target_is_directory=True)
        port = free_port()
        env = {
            "UNETSEG_WEIGHTS_DIR": served,
            "UNETSEG_DATA_DIR": data_dir,
            "UNETSEG_DEVICE": str(device),
            "UNETSEG_MAX_BATCH": str(a.max_batch),
            "UNETSEG_MAX_WAIT_MS": str(a.max_wait_ms),
            "UNETSEG_STREAMS": str(a.streams),
            "UNETSEG_GRAPH": a.graph,
            "UNETSEG_QUEUE_SIZE": "256",
            "UNETSEG_LOG_LEVEL": "warning",
        }
        cmd = [sys.executable, "-m", "app", "serve", "--port", str(port), "--workers", str(a.workers)]
        started = time.monotonic()
        with server(cmd, port, "/readyz", env, keep_log=log_path(a.out, "service")) as proc:
            ready_s = round(time.monotonic() - started, 1)
            load_s = model_load_seconds(port)
            chosen = served_max_batch(port, card.name)
            report["service"] = measure(
                "service",
                proc,
                port,
                small,
                large,
                a.clients,
                a.seconds,
                lambda data: multipart_request(
                    "127.0.0.1", port, f"/v1/predict?model={card.name}", "file", "x.jpg", data, "image/jpeg"
                ),
                a.profile,
            )
            report["service"].update(ready_s=ready_s, model_load_s=load_s, max_batch=chosen)
        save(report, a.out)
    if "naive" in a.peers:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "bench.naive_server",
            str(bundle_dir),
            str(port),
            "--dtype",
            dname,
            "--device",
            device.type,
        ]
        started = time.monotonic()
        with server(cmd, port, "/docs", keep_log=log_path(a.out, "naive")) as proc:
            ready_s = round(time.monotonic() - started, 1)
            report["naive"] = measure(
                "naive",
                proc,
                port,
                small,
                large,
                a.clients,
                a.seconds,
                lambda data: multipart_request("127.0.0.1", port, "/predict", "file", "x.jpg", data, "image/jpeg"),
                a.profile,
            )
            report["naive"]["ready_s"] = ready_s
        save(report, a.out)
    if "litserve" in a.peers:
        try:
            import litserve  # noqa: F401
        except ImportError:
            print("  litserve is not installed: pip install litserve (or: pip install -e '.[bench]')")
        else:
            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "bench.litserve_server",
                str(bundle_dir),
                str(port),
                "--dtype",
                dname,
                "--device",
                device.type,
                "--max-batch",
                str(a.max_batch or 8),
                "--wait-s",
                str(a.max_wait_ms / 1000),
                "--workers",
                str(a.streams),
            ]
            started = time.monotonic()
            with server(cmd, port, "/health", keep_log=log_path(a.out, "litserve")) as proc:
                ready_s = round(time.monotonic() - started, 1)
                report["litserve"] = measure(
                    "litserve",
                    proc,
                    port,
                    small,
                    large,
                    a.clients,
                    a.seconds,
                    lambda data: json_request(
                        "127.0.0.1", port, "/predict", json.dumps({"image": base64.b64encode(data).decode()}).encode()
                    ),
                    a.profile,
                )
                report["litserve"]["ready_s"] = ready_s
            save(report, a.out)

    # The machine's speed can drift during a run: the ceiling is the best raw setting measured again now,
    # averaged with the first measurement.
    raw = report["raw"]
    again = raw_rate(model, inputs, device, dtype, raw["best_batch"], raw["best_streams"], a.seconds / 2)
    raw["best_images_per_s_after"] = again
    raw["ceiling_images_per_s"] = round((raw["best_images_per_s"] + again) / 2 / report["model"]["inputs_per_image"], 2)
    print(f"  raw forward again at the best setting: {again} img/s", flush=True)

    def tput(name: str, clients: int) -> float | None:
        for row in report.get(name, {}).get("loads", []):
            if row["clients"] == clients:
                return float(row["images_per_s"])
        return None

    ratios: dict[str, dict[str, float]] = {}
    for c in a.clients:
        s = tput("service", c)
        if not s:
            continue
        r: dict[str, float] = {"service_vs_raw": round(s / raw["ceiling_images_per_s"], 3)}
        for peer in ("naive", "litserve"):
            v = tput(peer, c)
            if v:
                r[f"service_vs_{peer}"] = round(s / v, 3)
        ratios[str(c)] = r
    report["ratios"] = ratios
    save(report, a.out)
    print(render(report))
    print(f"\nwritten to {a.out}")
    return 0


def render(report: dict[str, Any]) -> str:
    """The report as Markdown tables (also a partial one: a run stopped before its end)."""
    raw = report["raw"]
    ceiling = raw.get("ceiling_images_per_s", raw["best_images_per_s"] / report["model"].get("inputs_per_image", 1))
    lines = [
        f"{report['model']['name']} ({report['model']['input']}) on {report['machine']['hardware']}, "
        f"{report['precision']}, graph {report.get('graph', 'eager')}, service streams {report['streams']}, "
        f"workers {report.get('workers', 1)}, max batch {report['max_batch'] or 'measured'}; "
        f"raw forward best {raw['best_images_per_s']} img/s "
        f"(again at the end: {raw.get('best_images_per_s_after', '-')}; "
        f"ceiling {ceiling}) at batch {raw['best_batch']} x {raw['best_streams']} stream(s) "
        f"({raw['gflop_per_image']} GFLOP/image, {raw['achieved_tflops']} TFLOP/s"
        + (
            f", {raw['fraction_of_peak']:.1%} of the {raw['peak_bf16_tflops']} TFLOP/s bf16 peak)"
            if "peak_bf16_tflops" in raw
            else ")"
        ),
        "",
        "| server | clients | images/s | p50 ms | p99 ms | errors | vs raw | non-model share (p50) "
        "| cores busy: server (busiest process) | load generator |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("service", "naive", "litserve"):
        for row in report.get(name, {}).get("loads", []):
            vs = row["images_per_s"] / ceiling
            errors = sum(row["errors"].values())
            cpu = row.get("cpu", {})
            busy = f"{cpu['server_cores_busy']} ({cpu['busiest_process']['cores_busy']})" if cpu else "-"
            lines.append(
                f"| {name} | {row['clients']} | {row['images_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
                f"{errors} | {vs:.2f} | {row.get('non_model_share_p50', '-')} | {busy} | "
                f"{cpu.get('loadgen_cores_busy', '-')} |"
            )
    ready = [
        f"{n} {report[n]['ready_s']} s" for n in ("service", "naive", "litserve") if "ready_s" in report.get(n, {})
    ]
    if ready:
        loads = report.get("service", {}).get("model_load_s") or {}
        lines += ["", "Start to ready: " + ", ".join(ready) + (f" (the service's models: {loads} s)" if loads else "")]
    lines += ["", "| server | large image p50 ms |", "|---|---:|"]
    for name in ("service", "naive", "litserve"):
        if "large" in report.get(name, {}):
            lines.append(f"| {name} | {report[name]['large']['p50_ms']} |")
    lines += ["", "| clients | service/raw | service/naive | service/LitServe |", "|---:|---:|---:|---:|"]
    for c, r in report.get("ratios", {}).items():
        lines.append(
            f"| {c} | {r.get('service_vs_raw', '-')} | {r.get('service_vs_naive', '-')} | "
            f"{r.get('service_vs_litserve', '-')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
