"""The engine under heavy load: resident memory for large tiled requests, a small request behind a large one.

    python -m bench.engine_load [--model nuclei] [--side 6324] [--window 20] [--code DIR]

Each scenario runs against a fresh ``unetseg serve`` (so that its peak resident memory is the scenario's
own) whose weights folder holds the one model:
1. ``one``: one request with a small-file 40 MP PNG (a few hundred KB: flat background, a few blobs);
2. ``eight``: eight such requests at once;
3. ``small-behind-large``: one large request, then (once the server has decoded it) a 64x64 request,
   whose latency and Server-Timing queue share are reported.
Large requests on a CPU take minutes, so clients give up after ``--window`` seconds (they disconnect);
the report gives each request's status or ``abandoned``, the server's peak resident memory (VmHWM) and
its resident memory 5 s after the clients left. ``--code DIR`` runs the server from another checkout (the
committed code in a ``git worktree``, for a before/after comparison) with this checkout's weights.
A watchdog stops the server when it passes ``--max-rss-gb`` (reported as such) so as to spare the machine.

``--trim-check`` instead measures, in this process, what ``malloc_trim`` gives back after one large tiled
job: the model's card and tiling with a width-4 U-Net in place of its weights (so 40 MP take seconds), the
resident memory before the job, after it, and after ``trim_memory()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

from bench import ROOT


def large_png(side: int) -> bytes:
    """A side x side RGB PNG that compresses to almost nothing: dark background, bright discs."""
    im = Image.new("RGB", (side, side), (12, 10, 14))
    draw = ImageDraw.Draw(im)
    rng = np.random.default_rng(0)
    for _ in range(400):
        x, y = (int(v) for v in rng.integers(0, side, 2))
        r = int(rng.integers(6, 30))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(200, 180, 210))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def small_png(side: int = 64) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Watch:
    """Samples the server's VmRSS; stops the server (and says so) above ``cap_kb``."""

    def __init__(self, proc: subprocess.Popen[bytes], cap_kb: int) -> None:
        self.proc, self.cap_kb = proc, cap_kb
        self.peak_kb = 0
        self.capped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                rss = status_kb(self.proc.pid, "VmRSS")
            except (FileNotFoundError, ProcessLookupError):
                return
            self.peak_kb = max(self.peak_kb, rss)
            if rss > self.cap_kb:
                self.capped = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def server(code: Path, weights: Path, port: int, cap_kb: int, env: dict[str, str]) -> Iterator[tuple[int, Watch]]:
    data = tempfile.mkdtemp(prefix="bench-data-")
    log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)  # noqa: SIM115
    cmd = [sys.executable, "-m", "app", "serve", "--port", str(port), "--weights-dir", str(weights), "--data-dir", data]
    proc = subprocess.Popen(
        cmd, cwd=code, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    watch = Watch(proc, cap_kb)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(log.name).read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.2)
        yield proc.pid, watch
    finally:
        watch.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        os.unlink(log.name)


async def post(client: httpx.AsyncClient, url: str, data: bytes, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        r = await asyncio.wait_for(client.post(url, files={"file": ("x.png", data, "image/png")}), timeout)
    except TimeoutError:
        return {"status": "abandoned", "s": round(time.perf_counter() - t0, 2)}
    out: dict[str, Any] = {"status": r.status_code, "s": round(time.perf_counter() - t0, 2)}
    if "server-timing" in r.headers:
        out["server_timing"] = r.headers["server-timing"]
    if r.status_code != 200:
        out["detail"] = r.text[:200]
    return out


async def scenario(name: str, port: int, large: bytes, small: bytes, model: str, window: float) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/v1/predict?model={model}"
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        if name in ("one", "eight"):
            n = 1 if name == "one" else 8
            results = await asyncio.gather(*(post(client, url, large, window) for _ in range(n)))
            return {"large": list(results)}
        big = asyncio.create_task(post(client, url, large, window + 10))
        await asyncio.sleep(5)  # the large image is decoded and its tiles queued by now
        small_result = await post(client, url, small, window)
        big.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await big
        return {"small": small_result}


def trim_check(weights: Path, side: int) -> dict[str, Any]:
    import torch

    from app.engine import Engine
    from app.heap import trim_memory
    from model.bundle import load_bundle
    from model.unet import UNet, UNetConfig

    bundle = load_bundle(weights)
    arch = UNetConfig(bundle.card.input.channels, len(bundle.card.classes), base_width=4, depth=2)
    bundle.model = UNet(arch).eval()
    engine = Engine([bundle], torch.device("cpu"), precision="float32")
    engine.start(warmup=True)
    image = np.asarray(Image.open(io.BytesIO(large_png(side))).convert("RGB"))
    pid = os.getpid()
    before = status_kb(pid, "VmRSS")
    t0 = time.perf_counter()
    mask = engine.segment_sync(None, image).mask
    seconds = time.perf_counter() - t0
    del mask
    after = status_kb(pid, "VmRSS")
    trimmed = trim_memory()
    after_trim = status_kb(pid, "VmRSS")
    engine.stop()
    mib = 1024
    return {
        "side": side,
        "job_s": round(seconds, 1),
        "rss_before_mib": before // mib,
        "rss_after_job_mib": after // mib,
        "rss_after_trim_mib": after_trim // mib,
        "malloc_trim": trimmed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights-dir", type=Path, default=ROOT / "weights")
    p.add_argument("--model", default="nuclei")
    p.add_argument("--side", type=int, default=6324, help="side of the square large image (6324: 40.0 MP)")
    p.add_argument("--window", type=float, default=20.0, help="seconds a client waits before hanging up")
    p.add_argument("--code", type=Path, default=ROOT, help="checkout whose server to run")
    p.add_argument("--max-rss-gb", type=float, default=12.0)
    p.add_argument("--scenarios", nargs="+", default=["one", "eight", "small-behind-large"])
    p.add_argument("--out", type=Path)
    p.add_argument("--trim-check", action="store_true", help="measure malloc_trim after one large job, in-process")
    args = p.parse_args(argv)
    if args.trim_check:
        print(json.dumps(trim_check(args.weights_dir / args.model, args.side)))
        return 0

    weights = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    (weights / args.model).symlink_to((args.weights_dir / args.model).resolve())
    large, small = large_png(args.side), small_png()
    print(f"large PNG: {args.side}x{args.side}, {len(large) / 1024:.0f} KB; code: {args.code}", flush=True)
    env = {"UNETSEG_DEFAULT_MODEL": args.model, "UNETSEG_LOG_LEVEL": "warning"}
    report: dict[str, Any] = {"side": args.side, "png_bytes": len(large), "window_s": args.window, "scenarios": {}}
    for name in args.scenarios:
        port = free_port()
        with server(args.code, weights, port, int(args.max_rss_gb * 1024 * 1024), env) as (pid, watch):
            ready_kb = status_kb(pid, "VmRSS")
            result = asyncio.run(scenario(name, port, large, small, args.model, args.window))
            time.sleep(5)
            alive = not watch.capped
            result |= {
                "rss_ready_mib": round(ready_kb / 1024),
                "rss_peak_mib": round(max(watch.peak_kb, status_kb(pid, "VmHWM") if alive else 0) / 1024),
                "rss_after_5s_mib": round(status_kb(pid, "VmRSS") / 1024) if alive else None,
                "killed_over_cap": watch.capped,
            }
            if alive:
                with contextlib.suppress(httpx.TransportError):
                    result["readyz_after"] = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
        report["scenarios"][name] = result
        print(name, json.dumps(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
