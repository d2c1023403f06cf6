"""Ray Serve against the one-process service, on this machine: one run, ratios.

    python -m bench.ray_serve [--seconds 8] [--clients 8] [--models tiny polyp] [--out bench/results/ray_serve.json]

For each model (``tiny``: a base-width-4, depth-2 U-Net at 256 px, whose forward is nearly free, so the
front end (HTTP, multipart, decode, encode) is what is measured; ``polyp``: the shipped bundle) it starts,
one at a time and each alone on the machine:
1. ``unetseg serve`` (one process);
2. ``unetseg serve --ray --replicas 1`` (one front end, one engine replica);
3. ``unetseg serve --ray --replicas 2`` (two front ends, one engine replica);
4. the same with ``RAY_SERVE_ENABLE_HA_PROXY=1`` (Serve's HAProxy ingress instead of its Python proxy);
and measures a 512x512 JPEG prediction at ``--clients`` concurrent keep-alive clients (images/s, p50, p99)
and at one client, plus ``GET /healthz`` at one client (the per-request cost of the path alone: for Ray,
the proxy's extra hop). Reported: 2 front ends / 1, Ray with 1 front end / one process, and the added
milliseconds per request. Every server gets the same settings (``UNETSEG_STREAMS=1``, torch threads =
``--cpus-per-replica``); each Ray replica reserves half a core, so that two front ends and an engine fit a
2-core machine. Last, what a bare handle call carrying a decoded image costs (the hop from a front end to
an engine replica).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from bench import ROOT
from bench.loadgen import LoadResult, multipart_request, run_load
from bench.run import free_port, make_images
from model.bundle import Card, ClassInfo, Dataset, InputPolicy, save_bundle
from model.unet import UNet, UNetConfig

HEALTH_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"


def tiny_bundle(folder: Path) -> Path:
    """A weights folder holding one base-width-4, depth-2 U-Net bundle that resizes its input to 256 px."""
    card = Card(
        name="tiny",
        version="0.0.1",
        architecture=UNetConfig(in_channels=3, num_classes=2, base_width=4, depth=2),
        classes=(ClassInfo(0, "background", (0, 0, 0)), ClassInfo(1, "foreground", (255, 0, 0))),
        input=InputPolicy(3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "resize", 256, 0.25),
        dataset=Dataset("none: random weights", license="CC0"),
        metrics={},
    )
    torch.manual_seed(0)
    save_bundle(folder / "tiny", card, UNet(card.architecture).eval(), "float32")
    return folder


@contextmanager
def serving(args: list[str], port: int, env: dict[str, str]) -> Iterator[int]:
    """Run ``unetseg serve ARGS`` until /readyz answers 200; yields its pid; SIGTERM (an orderly stop) after."""
    log = tempfile.NamedTemporaryFile(prefix="bench-ray-", suffix=".log", delete=False)  # noqa: SIM115
    cmd = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(args)} exited: {Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(args)} not ready: {Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(120)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is left
        proc.wait()
        log.close()
        os.unlink(log.name)


def measure(port: int, image: bytes, model: str, clients: int, seconds: float) -> dict[str, Any]:
    predict = multipart_request("127.0.0.1", port, f"/v1/predict?model={model}", "file", "a.jpg", image, "image/jpeg")

    def load(request: bytes, n: int, s: float) -> LoadResult:
        return asyncio.run(run_load("127.0.0.1", port, request, n, s, warmup_s=min(3.0, s / 2)))

    return {
        "predict": load(predict, clients, seconds).summary(),
        "predict_1": load(predict, 1, seconds / 2).summary(),
        "healthz_1": load(HEALTH_REQUEST, 1, seconds / 4).summary(),
    }


def handle_hop(seconds: float) -> dict[str, Any]:
    """What the split adds per request, bare (front-end replicas calling an engine replica through a handle):
    a handle call carrying a decoded 512x512 RGB image (uint8) and returning a mask of its size,
    against a call carrying nothing, at 1 and 8 calls in flight, on a local Ray instance."""
    import numpy as np
    import ray
    from ray import serve

    class Echo:
        def __call__(self, image: np.ndarray | None) -> np.ndarray | None:
            return None if image is None else np.zeros(image.shape[:2], np.uint8)

    echo = serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})(Echo)

    ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count())
    try:
        handle = serve.run(echo.bind(), name="hop", route_prefix=None)
        image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        out: dict[str, Any] = {}
        for label, payload in (("empty", None), ("512x512x3 uint8 image", image)):
            for inflight in (1, 8):
                handle.remote(payload).result()
                done, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    for r in [handle.remote(payload) for _ in range(inflight)]:
                        r.result()
                    done += inflight
                elapsed = time.perf_counter() - t0
                out[f"{label}, {inflight} in flight"] = {
                    "calls_per_s": round(done / elapsed, 1),
                    "ms_per_call": round(elapsed / done * 1000, 2),
                }
        return out
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


def save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ray_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights-dir", type=Path, default=ROOT / "weights")
    p.add_argument("--models", nargs="*", default=["tiny", "polyp"], help="none: the handle-call measurement only")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--cpus-per-replica", type=int, default=1, help="torch threads of each server process")
    p.add_argument("--no-haproxy", action="store_true", help="skip the HAProxy-ingress row")
    p.add_argument("--no-hop", action="store_true", help="skip the handle-call measurement")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ray_serve.json")
    args = p.parse_args(argv)

    image, _, origin = make_images(4000)
    side = Image.open(io.BytesIO(image)).size
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "image": f"{side[0]}x{side[1]} JPEG, {len(image)} bytes, from {origin}",
        "clients": args.clients,
        "seconds": args.seconds,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        for model in args.models:
            weights = tiny_bundle(Path(tmp) / "tiny-weights") if model == "tiny" else args.weights_dir
            env = {
                "UNETSEG_WEIGHTS_DIR": str(weights),
                "UNETSEG_DATA_DIR": str(Path(tmp) / "data"),
                "UNETSEG_DEVICE": "cpu",
                "UNETSEG_DEFAULT_MODEL": model,
                "UNETSEG_TORCH_THREADS": str(args.cpus_per_replica),
                "UNETSEG_STREAMS": "1",
                "RAY_USAGE_STATS_ENABLED": "0",
            }
            rows: dict[str, Any] = {}
            ray = ["--ray", "--cpus-per-replica", "0.5", "--replicas"]
            for name, extra, extra_env in [
                ("one process", [], {}),
                ("ray, 1 front end", [*ray, "1"], {}),
                ("ray, 2 front ends", [*ray, "2"], {}),
                # Serve's HAProxy ingress in place of its Python proxy (a feature flag in 2.60).
                ("ray, 2 front ends, HAProxy", [*ray, "2"], {"RAY_SERVE_ENABLE_HA_PROXY": "1"}),
            ]:
                if "HAProxy" in name and args.no_haproxy:
                    continue
                port = free_port()
                try:
                    with serving(extra, port, {**env, **extra_env}):
                        rows[name] = measure(port, image, model, args.clients, args.seconds)
                except RuntimeError as exc:  # the flag is experimental: record why instead of stopping the run
                    if not extra_env:
                        raise
                    rows[name] = {"error": str(exc)[-1500:]}
                print(model, name, json.dumps(rows[name]), flush=True)
                results["models"][model] = rows
                save(args.out, results)  # a run cut short keeps what it measured
            one, r1, r2 = (rows[k] for k in ("one process", "ray, 1 front end", "ray, 2 front ends"))
            rows["ratios"] = {
                "2 front ends / 1": round(r2["predict"]["images_per_s"] / r1["predict"]["images_per_s"], 2),
                "ray 1 front end / one process": round(
                    r1["predict"]["images_per_s"] / one["predict"]["images_per_s"], 2
                ),
                "ray 2 front ends / one process": round(
                    r2["predict"]["images_per_s"] / one["predict"]["images_per_s"], 2
                ),
                "added ms per request, healthz p50": round(r1["healthz_1"]["p50_ms"] - one["healthz_1"]["p50_ms"], 1),
                "added ms per request, predict p50 at 1 client": round(
                    r1["predict_1"]["p50_ms"] - one["predict_1"]["p50_ms"], 1
                ),
            }
            print(model, "ratios", json.dumps(rows["ratios"]), flush=True)
            results["models"][model] = rows
    if not args.no_hop:
        results["handle_hop"] = handle_hop(args.seconds / 2)
        print("handle hop", json.dumps(results["handle_hop"]), flush=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    save(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
