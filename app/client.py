"""``unetseg predict --url``: the predict command as a client of a running service.

Each image goes to ``POST /v1/predict`` as the request body itself, ``--concurrency`` at a time; the mask
(or overlay) the service returns is written where the local mode writes it, ``OUT/<stem>.png``. A 503
(models loading, queue full) is retried after its ``Retry-After``; any other error is one line on stderr
with the service's ``detail``, and the command exits 1. A progress bar runs on stderr when it is a terminal.

An image over predict's limits (``max_upload_bytes`` or ``max_pixels``, as ``GET /v1/jobs`` states them)
goes to ``POST /v1/jobs`` instead, streamed from the file, and the job is polled until it is done: an
image within the pixel limit gets the same ``OUT/<stem>.png``; a TIFF over it is a slide job, whose
results are written as ``OUT/<stem>.mask.tiff`` (class ids), ``.instances.tiff``, ``.csv`` and ``.geojson``
(models with instances) and ``.json`` (areas). A service without jobs gets the image as before.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

DEFAULT_CONCURRENCY = 4
DEFAULT_RETRIES = 20  # 503s answered per image before it counts as failed
JOB_POLL_S = 1.0
JOB_CHUNK = 1024 * 1024
# a slide job's results and where they are written: OUT/<stem><suffix>
SLIDE_FILES = {
    "tiff": ".mask.tiff",
    "instances": ".instances.tiff",
    "json": ".json",
    "csv": ".csv",
    "geojson": ".geojson",
}
MAX_RETRY_AFTER_S = 60.0
TIMEOUT_S = 300.0


class RemoteError(Exception):
    """The service cannot be used at all (unreachable, refused key, unknown model): nothing is sent."""


@dataclass
class Progress:
    """A one-line bar on ``stream`` (only when it is a terminal), kept below the lines printed meanwhile."""

    total: int
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    done: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        self.live = self.stream.isatty()
        self.draw()

    def draw(self) -> None:
        if not self.live:
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        failed = f", {self.failed} failed" if self.failed else ""
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r\033[K[{bar}] {self.done}/{self.total}{failed}")
        self.stream.flush()

    def print(self, text: str, stream: TextIO) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()
        print(text, file=stream, flush=True)
        self.draw()

    def advance(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        self.draw()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def retry_after_s(response: httpx.Response) -> float:
    """The response's ``Retry-After`` in seconds (1 when absent or a date), at most ``MAX_RETRY_AFTER_S``."""
    try:
        seconds = float(response.headers.get("retry-after", "1"))
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def detail(response: httpx.Response) -> str:
    """The service's words for an error response: ``detail`` (and ``request_id``) of its JSON body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if not isinstance(body, dict):
        return str(body)[:300]
    words = body.get("detail")
    if not isinstance(words, str):  # a list of field errors (422)
        words = "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in words or [])
    request_id = body.get("request_id")
    return f"{words} (request id {request_id})" if request_id else words


async def send(http: httpx.AsyncClient, method: str, url: str, retries: int, **kwargs: Any) -> httpx.Response:
    """One request; a 503 is sent again after its ``Retry-After``, up to ``retries`` times."""
    for _ in range(retries):
        response = await http.request(method, url, **kwargs)
        if response.status_code != 503:
            return response
        await asyncio.sleep(retry_after_s(response))
    return await http.request(method, url, **kwargs)


async def model_classes(http: httpx.AsyncClient, model: str | None, retries: int) -> tuple[str, list[tuple[int, str]]]:
    """The model the service will use, and its (class id, name) list; ``RemoteError`` when it cannot be used."""
    try:
        r = await send(http, "GET", "/v1/models", retries)
    except httpx.TransportError as exc:
        raise RemoteError(f"cannot reach {http.base_url}: {exc or type(exc).__name__}") from exc
    if r.status_code != 200:
        raise RemoteError(f"{http.base_url}v1/models answered {r.status_code}: {detail(r)}")
    listing = r.json()
    name = model or listing["default_model"]
    cards = {m["name"]: m for m in listing["models"]}
    if name not in cards:
        raise RemoteError(f"unknown model {name!r}; available: {', '.join(sorted(cards))}")
    return name, [(c["id"], c["name"]) for c in cards[name]["classes"]]


async def job_limits(http: httpx.AsyncClient, retries: int) -> dict[str, int] | None:
    """The limits ``GET /v1/jobs`` states (predict's and the jobs'), or None for a service without jobs."""
    r = await send(http, "GET", "/v1/jobs", retries, params={"limit": 1})
    if r.status_code != 200:
        return None
    limits: dict[str, int] = r.json().get("limits", {})
    return limits


def image_size(path: Path) -> tuple[int, int, bool]:
    """(width, height, is a TIFF) from the file's header, without decoding it; (0, 0, False) when unknown."""
    from PIL import Image, UnidentifiedImageError

    with open(path, "rb") as f:
        tiff = f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    if tiff:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.series[0].levels[0].keyframe
                return int(page.imagewidth), int(page.imagelength), True
        except (tifffile.TiffFileError, ValueError, IndexError):
            return 0, 0, True
    try:
        with Image.open(path) as im:
            return im.width, im.height, False
    except (UnidentifiedImageError, OSError):
        return 0, 0, False


def over_limits(path: Path, limits: dict[str, int]) -> tuple[bool, bool]:
    """(over predict's limits, a TIFF over its pixel limit: a slide)."""
    width, height, tiff = image_size(path)
    big_file = path.stat().st_size > limits.get("max_upload_bytes", 2**62)
    many = width * height > limits.get("max_pixels", 2**62)
    return big_file or many, tiff and many


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while chunk := await asyncio.to_thread(f.read, JOB_CHUNK):
            yield chunk


async def run_job(
    http: httpx.AsyncClient, path: Path, params: dict[str, str | float], slide: bool, retries: int
) -> tuple[dict[str, Any] | None, str]:
    """POST the file to /v1/jobs (streamed) and poll the job until it ends; (the job, '') or (None, why)."""
    params = {**params, "format": "slide" if slide else params["format"]}
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)}
    for _ in range(retries + 1):
        r = await http.post("/v1/jobs", params=params, content=file_chunks(path), headers=headers)
        if r.status_code != 503:
            break
        await asyncio.sleep(retry_after_s(r))
    if r.status_code != 202:
        return None, f"{r.status_code} {detail(r)}"
    job: dict[str, Any] = r.json()
    while job["state"] in ("queued", "running"):
        await asyncio.sleep(JOB_POLL_S)
        r = await send(http, "GET", f"/v1/jobs/{job['id']}", retries)
        if r.status_code != 200:
            return None, f"job {job['id']}: {r.status_code} {detail(r)}"
        job = r.json()
    if job["state"] != "done":
        return None, f"job {job['id']} {job['state']}: {job.get('error')}"
    return job, ""


async def fetch_result(http: httpx.AsyncClient, job: dict[str, Any], fmt: str, target: Path) -> None:
    """Stream one of a finished job's results to ``target``."""
    async with http.stream("GET", f"/v1/jobs/{job['id']}/result", params={"format": fmt}) as r:
        r.raise_for_status()
        with open(target, "wb") as f:
            async for chunk in r.aiter_bytes():
                await asyncio.to_thread(f.write, chunk)


def areas(png: bytes, classes: list[tuple[int, str]]) -> str:
    """``name share`` of each non-background class in a mask PNG (pixel value = class id), as local mode prints."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        ids = np.asarray(im)
    return ", ".join(f"{name} {float((ids == cid).mean()):.1%}" for cid, name in classes[1:])


async def predict_remote(
    images: Sequence[Path],
    url: str,
    out: Path,
    *,
    api_key: str | None = None,
    model: str | None = None,
    format: str = "png",
    concurrency: int = DEFAULT_CONCURRENCY,
    retries: int = DEFAULT_RETRIES,
    transport: httpx.AsyncBaseTransport | None = None,
    progress_stream: TextIO | None = None,
) -> int:
    """Segment ``images`` on the service at ``url``, writing ``out/<stem>.png``; the exit status (0, 1 or 2)."""
    headers = {"X-API-Key": api_key} if api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=TIMEOUT_S, transport=transport) as http:
        try:
            name, classes = await model_classes(http, model, retries)
        except RemoteError as exc:
            print(f"unetseg predict: {exc}", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        params: dict[str, str | float] = {"model": name, "format": format}
        if format == "overlay":
            params["alpha"] = 0.5
        progress = Progress(len(images), progress_stream or sys.stderr)
        gate = asyncio.Semaphore(max(concurrency, 1))

        limits = await job_limits(http, retries)

        async def as_job(path: Path, slide: bool) -> bool:
            try:
                job, why = await run_job(http, path, params, slide, retries)
                if job is None:
                    progress.print(f"{path}: {why}", sys.stderr)
                    return False
                if slide:
                    written = []
                    for fmt, suffix in SLIDE_FILES.items():
                        if fmt in job["results"]:
                            target = out / f"{path.stem}{suffix}"
                            await fetch_result(http, job, fmt, target)
                            written.append(str(target))
                    count = job["info"].get("count")
                    found = f", {count} instances" if count is not None else ""
                    progress.print(f"{path} -> {', '.join(written)} (job {job['id']}{found})", sys.stdout)
                    return True
                target = out / f"{path.stem}.png"
                await fetch_result(http, job, format, target)
            except (OSError, httpx.HTTPError) as exc:
                progress.print(f"{path}: {exc or type(exc).__name__}", sys.stderr)
                return False
            shares = f" ({areas(target.read_bytes(), classes)})" if format == "png" else ""
            progress.print(f"{path} -> {target}{shares} (job {job['id']})", sys.stdout)
            return True

        async def one(path: Path) -> bool:
            async with gate:
                if limits is not None:
                    try:
                        big, slide = await asyncio.to_thread(over_limits, path, limits)
                    except OSError as exc:
                        progress.print(f"{path}: {exc or type(exc).__name__}", sys.stderr)
                        return False
                    if big:
                        return await as_job(path, slide)
                try:
                    data = await asyncio.to_thread(path.read_bytes)
                    r = await send(
                        http,
                        "POST",
                        "/v1/predict",
                        retries,
                        params=params,
                        content=data,
                        headers={"Content-Type": "application/octet-stream"},
                    )
                except (OSError, httpx.HTTPError) as exc:
                    progress.print(f"{path}: {exc or type(exc).__name__}", sys.stderr)
                    return False
                if r.status_code != 200:
                    progress.print(f"{path}: {r.status_code} {detail(r)}", sys.stderr)
                    return False
                target = out / f"{path.stem}.png"
                await asyncio.to_thread(target.write_bytes, r.content)
                shares = f" ({areas(r.content, classes)})" if format == "png" else ""
                progress.print(f"{path} -> {target}{shares}", sys.stdout)
                return True

        async def counted(path: Path) -> bool:
            ok = await one(path)
            progress.advance(failed=not ok)
            return ok

        try:
            results = await asyncio.gather(*(counted(p) for p in images))
        finally:
            progress.close()
    return 0 if all(results) else 1


def main(
    images: Sequence[Path],
    url: str,
    out: Path,
    *,
    api_key: str | None,
    model: str | None,
    format: str,
    concurrency: int,
) -> int:
    return asyncio.run(
        predict_remote(images, url, out, api_key=api_key, model=model, format=format, concurrency=concurrency)
    )
