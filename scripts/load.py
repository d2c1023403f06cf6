"""Load a running unetseg server with a mix of real requests and report what happened.

    python scripts/load.py [--url http://127.0.0.1:8000] [--requests 2000] [--concurrency 8] [--duration 60]
                           [--warmup 0] [--pid PID] [--mix predict,json,overlay,upload,by-id,models]
                           [--model NAME ...] [--size 640x480] [--api-key KEY] [--json FILE]

Each of ``--concurrency`` clients (one thread and one keep-alive connection each) sends one request after
another, cycling through the mix, until ``--requests`` have been sent or ``--duration`` seconds have
passed, whichever comes first; ``--warmup`` requests go first and are not counted. Reported: requests,
errors by status (0 = no answer), p50/p99 latency, throughput, and, with ``--pid`` (the server's process
id, on this machine), its resident memory after the warm-up and at the end. Exit status 1 if any request
failed.

Requests go to the loopback interface only, unless ``--allow-remote`` says otherwise.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

KINDS = ("predict", "json", "overlay", "upload", "by-id", "models")


def make_images(count: int, width: int, height: int) -> list[bytes]:
    """Smooth random color fields as JPEG (the size of a camera frame's file, not of noise)."""
    images = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    return images


def rss_kib(pid: int) -> int:
    """Resident memory of a process on this machine, in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for process {pid}")


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


@dataclass
class Report:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, every answered request
    statuses: Counter[int] = field(default_factory=Counter)  # 0 = no answer (connection error, timeout)
    by_kind: Counter[str] = field(default_factory=Counter)
    rss_before_kib: int | None = None
    rss_after_kib: int | None = None

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> dict[int, int]:
        return {s: n for s, n in sorted(self.statuses.items()) if not 200 <= s < 300}

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "errors": self.errors,
            "statuses": dict(sorted(self.statuses.items())),
            "by_kind": dict(sorted(self.by_kind.items())),
            "seconds": round(self.seconds, 2),
            "throughput_rps": round(self.requests / self.seconds, 2) if self.seconds else 0.0,
            "p50_ms": round(self.percentile(50) * 1000, 1),
            "p99_ms": round(self.percentile(99) * 1000, 1),
        }
        if self.rss_before_kib is not None and self.rss_after_kib is not None:
            out["rss_before_mib"] = round(self.rss_before_kib / 1024, 1)
            out["rss_after_mib"] = round(self.rss_after_kib / 1024, 1)
            out["rss_change_pct"] = round(100 * (self.rss_after_kib / self.rss_before_kib - 1), 2)
        return out


def send(client: httpx.Client, kind: str, image: bytes, model: str | None, upload_id: str) -> httpx.Response:
    query = f"?model={model}" if model else ""
    files = {"file": ("image.jpg", image, "image/jpeg")}
    if kind == "predict":
        return client.post(f"/v1/predict{query}", files=files)
    if kind == "json":
        return client.post(f"/v1/predict{query}{'&' if query else '?'}format=json", files=files)
    if kind == "overlay":
        return client.post(f"/v1/predict{query}{'&' if query else '?'}format=overlay", files=files)
    if kind == "upload":
        return client.post("/v1/uploads", files=files)
    if kind == "by-id":
        return client.post(f"/v1/predict{query}", data={"upload_id": upload_id})
    if kind == "models":
        return client.get("/v1/models")
    raise ValueError(f"unknown request kind {kind!r}; known: {', '.join(KINDS)}")


def run_load(
    url: str,
    requests: int,
    concurrency: int,
    duration: float,
    mix: list[str],
    models: list[str | None],
    images: list[bytes],
    headers: dict[str, str] | None = None,
    pid: int | None = None,
    timeout: float = 120.0,
    warmup: int = 0,
) -> Report:
    """Send up to ``requests`` requests in ``duration`` seconds from ``concurrency`` clients; see the module doc.

    ``warmup`` requests are sent first and not counted; the memory before is read after them.
    """
    for kind in mix:
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}; known: {', '.join(KINDS)}")
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as setup:
        upload_ids = []
        for image in images:  # what "by-id" predicts on
            r = setup.post("/v1/uploads", files={"file": ("image.jpg", image, "image/jpeg")})
            r.raise_for_status()
            upload_ids.append(r.json()["id"])

    def drive(report: Report, count: int, seconds: float) -> None:
        lock = threading.Lock()
        counter = iter(range(count))
        deadline = time.monotonic() + seconds

        def client_loop() -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
                while time.monotonic() < deadline:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    kind = mix[i % len(mix)]
                    image = i % len(images)
                    t0 = time.perf_counter()
                    try:
                        r = send(client, kind, images[image], models[i % len(models)], upload_ids[image])
                        status = r.status_code
                    except httpx.HTTPError:
                        status = 0
                    elapsed = time.perf_counter() - t0
                    with lock:
                        report.statuses[status] += 1
                        report.by_kind[kind] += 1
                        if status:
                            report.latencies.append(elapsed)

        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop, name=f"load-{n}") for n in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report.seconds = time.perf_counter() - start

    if warmup:
        drive(Report(), warmup, duration)
    report = Report()
    if pid is not None:
        report.rss_before_kib = rss_kib(pid)
    drive(report, requests, duration)
    if pid is not None:
        report.rss_after_kib = rss_kib(pid)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--requests", type=int, default=2000, help="most requests to send (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="clients sending at once (default: %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="most seconds to run (default: %(default)s)")
    p.add_argument("--pid", type=int, help="the server's process id, to report its memory before and after")
    p.add_argument("--warmup", type=int, default=0, help="requests sent first, not counted (default: %(default)s)")
    p.add_argument("--mix", default=",".join(KINDS), help="request kinds, sent in turn (default: %(default)s)")
    p.add_argument("--model", action="append", help="model(s) to predict with, in turn (default: the server's)")
    p.add_argument("--images", type=int, default=8, help="distinct images sent (default: %(default)s)")
    p.add_argument("--size", default="640x480", help="image width x height (default: %(default)s)")
    p.add_argument("--api-key", help="sent as X-API-Key")
    p.add_argument("--json", type=Path, help="also write the report here as JSON")
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    args = p.parse_args(argv)
    if not args.allow_remote and not is_loopback(args.url):
        p.error(f"{args.url} is not a loopback address (pass --allow-remote to load another host)")
    width, height = (int(v) for v in args.size.lower().split("x"))
    images = make_images(args.images, width, height)
    headers = {"X-API-Key": args.api_key} if args.api_key else None
    try:
        report = run_load(
            args.url,
            args.requests,
            args.concurrency,
            args.duration,
            [k.strip() for k in args.mix.split(",") if k.strip()],
            list(args.model or [None]),
            images,
            headers=headers,
            pid=args.pid,
            warmup=args.warmup,
        )
    except httpx.HTTPError as exc:  # the setup uploads failed: no server there, or a wrong key
        print(f"{args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    summary = report.summary()
    print(
        f"{summary['requests']} requests in {summary['seconds']} s at concurrency {args.concurrency}: "
        f"{summary['throughput_rps']} req/s, p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms"
    )
    print(f"statuses: {summary['statuses']}; errors: {summary['errors'] or 'none'}")
    print(f"by kind: {summary['by_kind']}")
    if "rss_before_mib" in summary:
        print(
            f"server memory (VmRSS): {summary['rss_before_mib']} MiB before, {summary['rss_after_mib']} MiB after "
            f"({summary['rss_change_pct']:+.2f}%)"
        )
    if args.json:
        shown = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "api_key"}
        args.json.write_text(json.dumps({"args": shown, **summary}, indent=2))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
