"""A whole slide through the service as a job (and in-process): megapixels/s, peak memory, a restart mid-job.

    python -m bench.slide [--size 20000] [--model nuclei] [--kill-at 0.3] [--inprocess] [--out runs/slide-bench]

The slide is generated once (``OUT/slide-<size>.tif``): a ``size`` x ``size`` RGB mosaic of the 2018 Data
Science Bowl images (``$UNETSEG_DATASETS/dsb2018_nuclei``; generated blobs without it), written tile by tile
as a tiled pyramidal BigTIFF (256-px JPEG tiles, SubIFD levels), as scanners write them.

**Service** (the default): ``unetseg serve`` starts on 127.0.0.1 with its data in ``OUT/data``; its resident
memory once ready is the *idle* figure. The slide goes to ``POST /v1/jobs`` as a streamed body; the job is
polled every 2 s (progress printed), and the server's RSS sampled every 0.25 s. With ``--kill-at F`` the
server is killed with SIGKILL once the job's progress passes F, started again on the same data, and the job
followed to its end (it resumes from the regions saved). Then the mask pyramid and instance table are fetched
and checked (levels, the table's rows against the job's count). **In-process** (``--inprocess``): the same
pipeline without HTTP, ``unetseg segment SLIDE DST``, with this process's RSS sampled the same way.

One JSON object per run is printed (and appended to ``OUT/results.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tifffile
import torch
from PIL import Image

from bench import DATASETS
from model.train import hardware

ROOT = Path(__file__).resolve().parents[1]
TILE = 256


def mosaic_cells() -> list[np.ndarray]:
    """256 x 256 RGB cells: the DSB images (cropped or padded), else generated blobs."""
    folder = DATASETS / "dsb2018_nuclei" / "images"
    out = []
    for p in sorted(folder.glob("*.png"))[:400] if folder.is_dir() else []:
        im = np.asarray(Image.open(p).convert("RGB"))[:TILE, :TILE]
        cell = np.zeros((TILE, TILE, 3), dtype=np.uint8)
        cell[: im.shape[0], : im.shape[1]] = im
        out.append(cell)
    if not out:
        from tests.slides import cells

        out = [cells(TILE, TILE, seed=i) for i in range(64)]
    return out


def make_slide(path: Path, size: int) -> str:
    """Write the benchmark slide (if absent); where its pixels came from."""
    cells = mosaic_cells()
    source = f"{len(cells)} DSB 2018 images" if len(cells) != 64 else "generated blobs"
    if path.exists():
        return source
    n = len(cells)

    def cell(cy: int, cx: int) -> np.ndarray:
        return cells[(cy * 131 + cx * 31) % n]

    def level_tiles(k: int) -> Iterator[np.ndarray]:
        step = 2**k
        h = w = (size + step - 1) // step
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                block = np.zeros((TILE * step, TILE * step, 3), dtype=np.uint8)
                for i in range(step):
                    for j in range(step):
                        block[i * TILE : (i + 1) * TILE, j * TILE : (j + 1) * TILE] = cell(
                            ty * step // TILE + i, tx * step // TILE + j
                        )
                yield block[::step, ::step]

    levels = 1
    while (size + 2**levels - 1) // 2**levels >= 1024:
        levels += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    opts: dict[str, Any] = {"tile": (TILE, TILE), "compression": "jpeg", "compressionargs": {"level": 90}}
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k in range(levels):
            h = (size + 2**k - 1) // 2**k
            extra: dict[str, Any] = {"subifds": levels - 1} if k == 0 else {"subfiletype": 1}
            tw.write(level_tiles(k), shape=(h, h, 3), dtype=np.uint8, photometric="rgb", **opts, **extra)
    os.replace(tmp, path)
    return source


def rss(pid: int) -> int:
    """Resident bytes of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """The highest RSS of a process, sampled every 0.25 s in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                self.peak = max(self.peak, rss(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data: Path, log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    env = {**os.environ, "UNETSEG_DATA_DIR": str(data), "UNETSEG_DEVICE": "cpu", "UNETSEG_WEIGHTS_DIR": "weights"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=open(log, "ab"),  # noqa: SIM115 - the child keeps it
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return base, proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server was not ready after 300 s")


def service(slide: Path, out: Path, model: str, kill_at: float | None) -> dict[str, Any]:
    data = out / "data"
    log = out / "server.log"
    base, proc = start_server(data, log)
    time.sleep(2)
    idle = rss(proc.pid)
    sampler = Sampler(proc.pid)
    t0 = time.perf_counter()
    with open(slide, "rb") as f:
        r = httpx.post(
            f"{base}/v1/jobs",
            params={"model": model, "format": "slide"},
            content=f,
            headers={"Content-Type": "image/tiff", "Content-Length": str(slide.stat().st_size)},
            timeout=600,
        )
    r.raise_for_status()
    job_id = r.json()["id"]
    upload_s = time.perf_counter() - t0
    print(f"job {job_id} accepted after {upload_s:.1f} s", file=sys.stderr)
    peaks, restarts, down_s = [], 0, 0.0
    while True:
        job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
        p = job["progress"]
        print(
            f"{time.perf_counter() - t0:7.0f} s {job['state']:9} {p['stage']:10} regions {p['regions_done']}/"
            f"{p['regions_total']} tiles {p['tiles_done']}/{p['tiles_total']} ({p['fraction']:.1%}) "
            f"rss {rss(proc.pid) / 2**20:.0f} MiB",
            file=sys.stderr,
        )
        if job["state"] in ("done", "failed", "cancelled"):
            break
        if kill_at is not None and restarts == 0 and p["fraction"] >= kill_at:
            os.kill(proc.pid, signal.SIGKILL)  # the server this benchmark started
            proc.wait()
            peaks.append(sampler.close() - idle)
            restarts = 1
            t1 = time.perf_counter()
            base, proc = start_server(data, log)
            down_s = time.perf_counter() - t1
            time.sleep(2)
            idle = rss(proc.pid)
            sampler = Sampler(proc.pid)
            print(f"killed at {p['fraction']:.1%} and restarted in {down_s:.1f} s", file=sys.stderr)
            continue
        time.sleep(2)
    seconds = time.perf_counter() - t0
    peaks.append(sampler.close() - idle)
    row: dict[str, Any] = {"state": job["state"], "error": job["error"], "attempts": job["attempts"]}
    if job["state"] == "done":
        got = {}
        for fmt in ("tiff", "instances", "csv", "json"):
            if fmt in job["results"]:
                target = out / f"result.{fmt}"
                url = f"{base}/v1/jobs/{job_id}/result"
                with httpx.stream("GET", url, params={"format": fmt}, timeout=600) as s, open(target, "wb") as fh:
                    for chunk in s.iter_bytes():
                        fh.write(chunk)
                got[fmt] = target.stat().st_size
        with tifffile.TiffFile(out / "result.tiff") as tif:
            levels = [list(lv.shape) for lv in tif.series[0].levels]
        rows = len((out / "result.csv").read_text().splitlines()) - 1 if "csv" in got else None
        info = job["info"]
        row.update(
            {
                "count": info.get("count"),
                "table_rows": rows,
                "mask_levels": levels,
                "result_bytes": got,
                "regions": info["regions"],
                "resumed_regions": info["resumed_regions"],
                "timings_s": info["timings_s"],
            }
        )
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    pixels = slide_pixels(slide)
    return {
        **row,
        "mode": "service",
        "seconds": round(seconds, 1),
        "upload_s": round(upload_s, 1),
        "restart_s": round(down_s, 1),
        "megapixels_per_s": round(pixels / 1e6 / (seconds - down_s), 3),
        "idle_rss_mib": round(idle / 2**20),
        "peak_rss_above_idle_mib": round(max(peaks) / 2**20),
    }


def slide_pixels(slide: Path) -> int:
    with tifffile.TiffFile(slide) as tif:
        page = tif.series[0].levels[0].keyframe
        return int(page.imagelength) * int(page.imagewidth)


def inprocess(slide: Path, out: Path, model: str) -> dict[str, Any]:
    dst = out / "inprocess"
    cmd = [sys.executable, "-m", "app", "segment", str(slide), str(dst), "--model", model]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "UNETSEG_DEVICE": "cpu"})
    sampler = Sampler(proc.pid)
    proc.wait()
    seconds = time.perf_counter() - t0
    peak = sampler.close()
    return {
        "mode": "inprocess",
        "status": proc.returncode,
        "seconds": round(seconds, 1),
        "megapixels_per_s": round(slide_pixels(slide) / 1e6 / seconds, 3),
        "peak_rss_mib": round(peak / 2**20),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=20000, help="the slide's side in pixels")
    p.add_argument("--model", default="nuclei")
    p.add_argument("--kill-at", type=float, help="SIGKILL the server once the job's progress passes this fraction")
    p.add_argument("--inprocess", action="store_true", help="run `unetseg segment` on the slide instead")
    p.add_argument("--out", type=Path, default=Path("runs/slide-bench"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slide = args.out / f"slide-{args.size}.tif"
    t0 = time.perf_counter()
    source = make_slide(slide, args.size)
    print(
        f"slide {slide} ({slide.stat().st_size / 2**20:.0f} MiB) ready in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    if args.inprocess:
        row = inprocess(slide, args.out, args.model)
    else:
        run = args.out / f"run-{int(time.time())}"
        run.mkdir()
        row = service(slide, run, args.model, args.kill_at)
    row = {
        "slide": f"{args.size}x{args.size} RGB, {source}, 256-px JPEG tiles",
        "model": args.model,
        **row,
        "hardware": hardware(torch.device("cpu")),
        "load_average": os.getloadavg(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print(json.dumps(row))
    with open(args.out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
