"""``unetseg predict --url``: the predict command as a client of a running service.

Each image goes to ``POST /v1/predict`` as the request body itself, ``--concurrency`` at a time; the mask
(or overlay) the service returns is written where the local mode writes it, ``OUT/<stem>.png``. A 503
(models loading, queue full) is retried after its ``Retry-After``; any other error is one line on stderr
with the service's ``detail``, and the command exits 1. A progress bar runs on stderr when it is a terminal.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

DEFAULT_CONCURRENCY = 4
DEFAULT_RETRIES = 20  # 503s answered per image before it counts as failed
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

        async def one(path: Path) -> bool:
            async with gate:
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
