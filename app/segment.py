"""Bulk segmentation: every image under a folder or an ``s3://`` prefix to its mask, and ``summary.csv``.

    unetseg segment SRC DST --model M [--ray [--ray-address ADDR]] [--workers N]

Each image ``SRC/a/b.jpg`` gets ``DST/a/b.png``: the same palette PNG that ``POST /v1/predict`` returns for
that image, made by the same function (``segment_image``). ``DST/summary.csv`` has one row per image: its
size and the pixel count and fraction of every class, or the error that kept it from being segmented.

- **Resumable.** A mask is written to a hidden temporary file in its folder and renamed into place, so a
  mask that exists is complete; a rerun skips it (and reads it back for the summary, which therefore
  always describes every mask on disk). Temporary files left by a killed run are removed at the start.
- **Unreadable images** (corrupt, truncated, not an image, over the pixel limit, a failed S3 read) get a
  row with their error and no mask; the job goes on, and a rerun tries them again.
- **In-process** (the default), threads read, decode and encode images while the engine batches their
  forward passes, as the service does for concurrent requests. **With ``--ray``**, Ray Data runs the same
  ``Segmenter`` in ``--workers`` actors (one GPU each when the cluster has GPUs) and the driver writes the
  masks it streams back, so only the driver needs DST; SRC and the bundle must be readable by every node.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import csv
import io
import os
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

import numpy as np
from PIL import Image

from app.config import Settings
from app.engine import Engine, Segmentation, resolve_device
from app.errors import ServiceError
from app.imaging import Decoded, decode, encode_mask_png
from model.bundle import Card, discover, load_bundle, read_card

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
SUMMARY = "summary.csv"
_PART = ".part"  # temporary masks: ".<name>.<random>.part" beside the mask they become


# --- one image: the service's pipeline ---------------------------------------------------------------


async def segment_image(
    engine: Engine,
    name: str | None,
    data: bytes,
    max_pixels: int,
    executor: concurrent.futures.Executor | None = None,
    full_image: bool = False,
    timeout_s: float | None = None,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> tuple[Decoded, Segmentation]:
    """Decode and segment image bytes, off the event loop: the pipeline of ``POST /v1/predict``,
    ``unetseg predict`` and ``unetseg segment``. Raises ServiceError.

    A model that resizes its input gets a JPEG decoded at a reduced scale, unless ``full_image`` (the
    caller draws the mask over the image's own pixels). ``timeout_s`` and ``disconnected`` as in
    ``Engine.segment``. The segmentation's timings add ``decode`` (seconds) to the engine's.
    """
    m = engine.get(name)
    policy = m.card.input
    reduce_to = policy.size if policy.sizing == "resize" and not full_image else None
    t0 = time.perf_counter()
    decoded = await asyncio.get_running_loop().run_in_executor(executor, decode, data, max_pixels, reduce_to)
    image = decoded.for_model(policy.channels)
    decode_s = time.perf_counter() - t0
    seg = await engine.segment(
        m.name, image, executor, timeout_s, (decoded.height, decoded.width), disconnected=disconnected
    )
    seg.timings["decode"] = decode_s
    return decoded, seg


def class_counts(mask: np.ndarray, num_classes: int) -> tuple[int, ...]:
    """(H, W) uint8 class ids -> pixels per class."""
    return tuple(int(n) for n in np.bincount(mask.ravel(), minlength=num_classes)[:num_classes])


# --- where the images come from ----------------------------------------------------------------------


class Source(Protocol):
    """Images addressed by relative POSIX paths; picklable, so that Ray actors read for themselves."""

    def list(self) -> list[str]:
        """Every image's relative path, sorted."""
        ...

    def read(self, rel: str) -> bytes:
        """The image's bytes; OSError when they cannot be read."""
        ...


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class FolderSource:
    root: Path
    exclude: Path | None = None  # DST, when it lies inside SRC

    def list(self) -> list[str]:
        out: list[str] = []
        for folder, dirs, files in os.walk(self.root):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() != self.exclude)
            out.extend((here / f).relative_to(self.root).as_posix() for f in files if is_image_name(f))
        return sorted(out)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


class S3Source:
    """``s3://bucket/prefix`` through boto3, with boto3's own configuration (credentials, region and
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for an S3-compatible server)."""

    def __init__(self, bucket: str, prefix: str) -> None:
        # A folder: s3://b/archive/2024 holds archive/2024/x.jpg, not archive/20240/x.jpg.
        folder = prefix.strip("/")
        self.bucket, self.prefix = bucket, f"{folder}/" if folder else ""
        self._client: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, str]:  # the client and lock stay behind; each process makes its own
        return {"bucket": self.bucket, "prefix": self.prefix}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["bucket"], state["prefix"])  # type: ignore[misc]

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3

                self._client = boto3.client("s3")
            return self._client

    def list(self) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        out = []
        try:
            for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix) :]
                    if rel and is_image_name(PurePosixPath(rel).name):
                        out.append(rel)
        except (BotoCoreError, ClientError) as exc:
            raise OSError(f"cannot list s3://{self.bucket}/{self.prefix}: {exc}") from None
        return sorted(out)

    def read(self, rel: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.prefix + rel
        try:
            body: bytes = self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise OSError(f"cannot read s3://{self.bucket}/{key}: {exc}") from None
        return body


def open_source(src: str, dst: Path) -> Source:
    if src.startswith("s3://"):
        bucket, _, prefix = src[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"{src!r} names no bucket (s3://bucket/prefix)")
        return S3Source(bucket, prefix)
    root = Path(src)
    if not root.is_dir():
        raise ValueError(f"{src} is not a folder (nor an s3:// prefix)")
    return FolderSource(root.resolve(), dst.resolve())


def mask_path(rel: str) -> str | None:
    """The mask's relative path for an image's, or None when the path would leave DST (an S3 key
    such as ``a/../../x.jpg``)."""
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        return None
    return p.with_suffix(".png").as_posix()


# --- the work ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    path: str  # the image's relative path
    png: bytes  # the mask; empty when the image could not be segmented
    width: int = 0
    height: int = 0
    counts: tuple[int, ...] = ()  # pixels per class
    error: str = ""
    finished: float = 0.0  # time.time() when its worker was done with it (throughput, across processes)


@dataclass(frozen=True)
class Options:
    """What a worker needs besides the source: picklable, taken from Settings on the driver."""

    bundle: Path
    device: str
    precision: str
    max_batch: int
    max_wait_s: float
    max_pixels: int
    compress_level: int
    streams: int

    @classmethod
    def from_settings(cls, bundle: Path, s: Settings) -> Options:
        return cls(
            bundle.resolve(),
            s.device,
            s.precision,
            s.max_batch,
            s.max_wait_ms / 1000,
            s.max_pixels,
            s.png_compress_level,
            s.streams,
        )


class Segmenter:
    """One model's engine, an event loop and a pool of threads that read, decode and encode images.

    Images go through the service's own path (``segment_image``), several at once, so that the engine
    batches their forward passes as it does for concurrent requests.
    """

    def __init__(self, source: Source, options: Options, threads: int) -> None:
        self.source = source
        self.options = options
        self.threads = max(1, threads)
        bundle = load_bundle(options.bundle)
        self.card = bundle.card
        self.colors = [c.color for c in self.card.classes]
        device = resolve_device(options.device)
        # A job that keeps the model busy gets more from one single-thread forward pass per core than from
        # one pass on every core (whose threads wait for each other, and for anything else on the machine).
        streams = max(options.streams, os.cpu_count() or 1) if device.type == "cpu" else options.streams
        self.engine = Engine(
            [bundle],
            device,
            precision=options.precision,
            max_batch=options.max_batch,
            max_wait_s=options.max_wait_s,
            queue_size=max(64, 2 * self.threads),
            streams=streams,
        )
        self.engine.start(warmup=False)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads, "unetseg-segment")
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="unetseg-segment-loop", daemon=True)
        self._loop_thread.start()

    def _encode(self, mask: np.ndarray) -> tuple[bytes, tuple[int, ...]]:
        return encode_mask_png(mask, self.colors, self.options.compress_level), class_counts(mask, len(self.colors))

    async def one(self, rel: str) -> Outcome:
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(self.pool, self.source.read, rel)
            decoded, seg = await segment_image(self.engine, self.card.name, data, self.options.max_pixels, self.pool)
        except (ServiceError, OSError) as exc:
            return Outcome(rel, b"", error=str(exc) or type(exc).__name__, finished=time.time())
        png, counts = await loop.run_in_executor(self.pool, self._encode, seg.mask)
        return Outcome(rel, png, decoded.width, decoded.height, counts, finished=time.time())

    def run(self, paths: Iterable[str]) -> Iterator[Outcome]:
        """Outcomes in the order they finish, with at most twice the thread count in flight."""
        pending: set[concurrent.futures.Future[Outcome]] = set()
        try:
            for rel in paths:
                pending.add(asyncio.run_coroutine_threadsafe(self.one(rel), self.loop))
                if len(pending) >= 2 * self.threads:
                    done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    yield from (f.result() for f in done)
            for f in concurrent.futures.as_completed(pending):
                yield f.result()
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join()
        self.loop.close()
        self.pool.shutdown()
        self.engine.stop()


class RayMapper:
    """The callable class of the Ray Data stage: a batch of relative paths in, their outcomes out."""

    def __init__(self, source: Source, options: Options, threads: int) -> None:
        self.segmenter = Segmenter(source, options, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = list(self.segmenter.run(str(p) for p in batch["path"]))
        k = len(self.segmenter.colors)
        return {
            "path": np.array([o.path for o in outcomes], dtype=object),
            "png": np.array([o.png for o in outcomes], dtype=object),
            "width": np.array([o.width for o in outcomes], dtype=np.int64),
            "height": np.array([o.height for o in outcomes], dtype=np.int64),
            "counts": np.array([o.counts or (0,) * k for o in outcomes], dtype=np.int64).reshape(len(outcomes), k),
            "error": np.array([o.error for o in outcomes], dtype=object),
            "finished": np.array([o.finished for o in outcomes], dtype=np.float64),
        }


# --- the output folder -------------------------------------------------------------------------------


def write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` so that ``target`` is either absent or complete, whenever the process dies."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}{_PART}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_partial(dst: Path) -> int:
    """Delete temporary files left by a run that was killed while writing."""
    removed = 0
    for p in dst.rglob(f".*{_PART}"):
        if p.is_file():
            p.unlink()
            removed += 1
    return removed


def read_mask(path: Path, card: Card) -> Outcome | None:
    """An existing mask's size and class counts; None when there is none, or it is not one of this model's."""
    try:
        with Image.open(path) as im:
            palette = (im.getpalette() or []) if im.mode == "P" else []
            if im.format != "PNG" or palette[: 3 * len(card.classes)] != [v for c in card.classes for v in c.color]:
                return None  # not a mask of this model's classes
            mask = np.asarray(im)
    except (OSError, SyntaxError, ValueError):  # FileNotFoundError included
        return None
    k = len(card.classes)
    if mask.ndim != 2 or (mask.size and int(mask.max()) >= k):
        return None
    h, w = mask.shape
    return Outcome("", b"", w, h, class_counts(mask, k))


def summary_header(card: Card) -> list[str]:
    names = [c.name for c in card.classes]
    return [
        "path",
        "mask",
        "width",
        "height",
        *(f"{n}_pixels" for n in names),
        *(f"{n}_fraction" for n in names),
        "error",
    ]


def summary_row(o: Outcome, card: Card) -> list[str]:
    if o.error:
        return [o.path, "", "", "", *([""] * (2 * len(card.classes))), o.error]
    total = o.width * o.height
    fractions = [f"{n / total:.6f}" if total else "0" for n in o.counts]
    return [o.path, mask_path(o.path) or "", str(o.width), str(o.height), *map(str, o.counts), *fractions, ""]


def write_summary(dst: Path, card: Card, outcomes: Iterable[Outcome]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(summary_header(card))
    for o in sorted(outcomes, key=lambda o: o.path):
        w.writerow(summary_row(o, card))
    write_atomic(dst / SUMMARY, buf.getvalue().encode())


class Progress:
    """``[#####.....] done/total images, N images/s, E errors``, redrawn on a terminal, else a line every 10 s."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.done = self.errors = 0
        self.t0 = self.shown = time.perf_counter()

    def update(self, error: bool) -> None:
        self.done += 1
        self.errors += error
        now = time.perf_counter()
        if now - self.shown >= (0.2 if self.tty else 10.0):
            self.shown = now
            self.show(end="\r" if self.tty else "\n")

    def show(self, end: str) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        filled = round(20 * self.done / self.total) if self.total else 20
        self.stream.write(
            f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} images, {rate:.1f} images/s, "
            f"{self.errors} errors{end}"
        )
        self.stream.flush()

    def close(self) -> None:
        self.show(end="\n")


# --- the job -----------------------------------------------------------------------------------------


@dataclass
class Report:
    images: int = 0  # every image under SRC
    skipped: int = 0  # masks already there
    written: int = 0
    errors: list[Outcome] = field(default_factory=list)
    done: int = 0  # images this run segmented or failed on
    seconds: float = 0.0  # from loading the model (and starting Ray) to the last mask written
    first_s: float = 0.0  # from the same start to when a worker finished the first image
    last_s: float = 0.0  # ... and the last one

    @property
    def images_per_s(self) -> float:
        """This run's images per second, start-up included."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Images per second between the workers' first and last finished image (start-up excluded)."""
        span = self.last_s - self.first_s
        return (self.done - 1) / span if self.done > 1 and span > 0 else 0.0


def find_bundle(model: str, weights_dir: Path) -> Path:
    """A bundle folder given as such, or the bundle named ``model`` under ``weights_dir``."""
    p = Path(model)
    if (p / "card.json").is_file():
        return p
    for folder in discover(weights_dir):
        if read_card(folder).name == model:
            return folder
    raise ValueError(f"no bundle named {model!r} in {weights_dir} (give a name there or a bundle folder)")


def run(
    src: str,
    dst: Path,
    bundle: Path,
    settings: Settings,
    use_ray: bool = False,
    ray_address: str | None = None,
    workers: int | None = None,
    progress: IO[str] | None = None,
) -> Report:
    """Segment every image under ``src`` that has no mask in ``dst`` yet, and rewrite ``dst/summary.csv``."""
    source = open_source(src, dst)
    card = read_card(bundle)
    dst.mkdir(parents=True, exist_ok=True)
    remove_partial(dst)
    report = Report()
    rows: dict[str, Outcome] = {}
    targets: dict[str, str] = {}  # image -> its mask's relative path
    claimed: dict[str, str] = {}  # mask -> the image it belongs to
    for rel in source.list():
        report.images += 1
        target = mask_path(rel)
        if target is None:
            rows[rel] = Outcome(rel, b"", error="the path has an empty, '.' or '..' part: it cannot be mirrored in DST")
        elif target in claimed:
            rows[rel] = Outcome(rel, b"", error=f"{claimed[target]} has the same mask path {target}")
        else:
            claimed[target] = rel
            targets[rel] = target
    report.errors = [o for o in rows.values() if o.error]
    # Masks already there are skipped; reading them back (in parallel) keeps their summary rows.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        existing = pool.map(lambda rel: read_mask(dst / targets[rel], card), targets)
        todo = []
        for rel, found in zip(targets, existing, strict=True):
            if found is None:
                todo.append(rel)
            else:
                rows[rel] = Outcome(rel, b"", found.width, found.height, found.counts)
                report.skipped += 1
    bar = Progress(len(todo), progress) if progress is not None and todo else None
    options = Options.from_settings(bundle, settings)
    t0 = time.time()
    first = last = t0
    try:
        with contextlib.ExitStack() as stack:
            if not todo:
                outcomes: Iterator[Outcome] = iter(())
            elif use_ray:
                outcomes = _ray_outcomes(source, options, todo, ray_address, workers)
            else:
                segmenter = Segmenter(source, options, workers or settings.io_threads or os.cpu_count() or 1)
                stack.callback(segmenter.close)
                outcomes = segmenter.run(todo)
            for o in outcomes:
                if o.error:
                    report.errors.append(o)
                else:
                    write_atomic(dst / targets[o.path], o.png)
                    report.written += 1
                rows[o.path] = Outcome(o.path, b"", o.width, o.height, o.counts, o.error)
                report.done += 1
                first = o.finished if report.done == 1 else min(first, o.finished)
                last = max(last, o.finished)
                if bar:
                    bar.update(bool(o.error))
        report.seconds = time.time() - t0
        report.first_s, report.last_s = first - t0, last - t0
    finally:  # also when interrupted: the summary then lists what is done so far
        if bar:
            bar.close()
        write_summary(dst, card, rows.values())
    return report


def _ray_outcomes(
    source: Source, options: Options, todo: Sequence[str], address: str | None, workers: int | None
) -> Iterator[Outcome]:
    """Segment ``todo`` on Ray Data: an actor pool of ``workers`` Segmenters, one GPU each when there are GPUs."""
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    try:
        resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        gpus = int(resources.get("GPU", 0))
        cpus = float(resources.get("CPU", 1))
        n = workers or max(1, gpus)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the job shows its own
        # Enough threads per actor to keep a batch in flight on a GPU; on the CPU the forward pass is the limit.
        threads = options.max_batch if gpus else 2
        ds = ray.data.from_items([{"path": p} for p in todo]).map_batches(
            RayMapper,
            fn_constructor_args=(source, options, threads),
            batch_size=max(8, 2 * threads),
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n),
            num_gpus=1 if gpus else None,
            num_cpus=None if gpus else min(1.0, cpus / n),  # n actors fit on the CPUs there are
        )
        for row in ds.iter_rows():
            yield Outcome(
                str(row["path"]),
                bytes(row["png"]),
                int(row["width"]),
                int(row["height"]),
                tuple(int(c) for c in row["counts"]),
                str(row["error"]),
                float(row["finished"]),
            )
    finally:
        if started:
            ray.shutdown()


def main(argv: Sequence[str]) -> int:
    defaults = Settings()
    p = argparse.ArgumentParser(
        prog="unetseg segment",
        description="Segment every image under a folder or s3:// prefix into DST (masks + summary.csv); resumable.",
    )
    p.add_argument("src", help="folder of images (searched recursively) or s3://bucket/prefix")
    p.add_argument("dst", type=Path, help="output folder: one .png mask per image, same relative path")
    p.add_argument("--model", default=defaults.default_model, help="model name in --weights-dir, or a bundle folder")
    p.add_argument("--weights-dir", type=Path, default=defaults.weights_dir)
    p.add_argument("--device", help="overrides UNETSEG_DEVICE (in every Ray actor too)")
    p.add_argument(
        "--ray", action="store_true", help="run on Ray Data (a local instance, or the cluster at --ray-address)"
    )
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else start a local one)")
    p.add_argument(
        "--workers",
        type=int,
        help="Ray actors (default: one per GPU, else 1); without --ray, threads around the engine (default: cores)",
    )
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    if args.ray_address and not args.ray:
        p.error("--ray-address needs --ray")
    settings = defaults.model_copy(update={"device": args.device}) if args.device else defaults
    try:
        bundle = find_bundle(args.model, args.weights_dir)
        report = run(args.src, args.dst, bundle, settings, args.ray, args.ray_address, args.workers, sys.stderr)
    except (ValueError, OSError) as exc:
        print(f"unetseg segment: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = {"ray": "--ray needs the ray extra: pip install 'unetseg[ray]'", "boto3": "s3:// needs boto3"}
        print(f"unetseg segment: {extra.get(str(exc.name).split('.')[0], exc)}", file=sys.stderr)
        return 2
    for o in report.errors:
        print(f"{o.path}: {o.error}", file=sys.stderr)
    print(
        f"{report.images} images: {report.written} masks written, {report.skipped} already there, "
        f"{len(report.errors)} errors ({report.images_per_s:.1f} images/s); summary in {args.dst / SUMMARY}"
    )
    return 1 if report.errors else 0
