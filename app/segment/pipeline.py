"""The workers that run the service's pipeline (``app.pipeline``) on many images: in-process or as Ray actors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app import pipeline
from app.config import Settings
from app.engine import Engine, resolve_device
from app.engine.device import resolve_streams, set_own_threads
from app.errors import ServiceError
from app.pipeline import INSTANCES_KEY, Ask, class_counts
from app.segment.sources import Source
from model.bundle import load_bundle

__all__ = ["INSTANCES_KEY", "Options", "Outcome", "RayMapper", "Segmenter", "class_counts", "ray_outcomes"]

log = logging.getLogger("unetseg.segment")


@dataclass(frozen=True)
class Outcome:
    path: str  # the image's relative path
    png: bytes  # the mask; empty when the image could not be segmented
    width: int = 0
    height: int = 0
    counts: tuple[int, ...] = ()  # pixels per class
    error: str = ""
    instances: int | None = None  # instances found, for a model with instances
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
    graph: str = "auto"

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
            s.graph,
        )


class Segmenter:
    """One model's engine, an event loop and a pool of threads that read, decode and encode images.

    Images go through the service's own path (``app.pipeline``), several at once, so that the engine
    batches their forward passes as it does for concurrent requests.
    """

    def __init__(self, source: Source, options: Options, threads: int, cores: int | None = None) -> None:
        """``threads`` read, decode and encode; ``cores``: the CPU cores this worker may use (default: all)."""
        self.source = source
        self.options = options
        self.threads = max(1, threads)
        bundle = load_bundle(options.bundle)
        self.card = bundle.card
        self.colors = [c.color for c in self.card.classes]
        self.ask = Ask(self.card.name, "png", compress_level=options.compress_level, bulk=True)
        device = resolve_device(options.device)
        streams = resolve_streams(options.streams, device, cores)
        self.engine = Engine(
            [bundle],
            device,
            precision=options.precision,
            max_batch=options.max_batch,
            max_wait_s=options.max_wait_s,
            queue_size=max(64, 2 * self.threads),
            streams=streams,
            graph=options.graph,
        )
        self.engine.start(warmup=options.max_batch == 0)  # the warm-up measures the batch limit
        # On the CPU the cores are the streams'; the threads' own torch work (resizing the input, upsampling
        # the logits) runs on one thread each, not in parallel regions that contend with the streams'.
        self.pool = concurrent.futures.ThreadPoolExecutor(
            self.threads, "unetseg-segment", initializer=lambda: set_own_threads(1) if device.type == "cpu" else None
        )
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="unetseg-segment-loop", daemon=True)
        self._loop_thread.start()

    async def one(self, rel: str) -> Outcome:
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(self.pool, self.source.read, rel)
            answer = await pipeline.predict(self.engine, self.ask, data, self.options.max_pixels, self.pool)
        except (ServiceError, OSError) as exc:
            return Outcome(rel, b"", error=str(exc) or type(exc).__name__, finished=time.time())
        except Exception as exc:  # anything else on one image (a bug, MemoryError) is its error, not the job's end
            log.exception("unexpected error on %r", rel)
            return Outcome(rel, b"", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        a = answer
        return Outcome(rel, a.body, a.width, a.height, a.counts, instances=a.instances, finished=time.time())

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

    def __init__(self, source: Source, options: Options, threads: int, cores: int | None) -> None:
        self.segmenter = Segmenter(source, options, threads, cores)

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
            "instances": np.array([-1 if o.instances is None else o.instances for o in outcomes], dtype=np.int64),
            "finished": np.array([o.finished for o in outcomes], dtype=np.float64),
        }


def ray_outcomes(
    source: Source, options: Options, todo: Sequence[str], address: str | None, workers: int | None
) -> Iterator[Outcome]:
    """Segment ``todo`` on Ray Data: an actor pool of ``workers`` Segmenters, each with a GPU when the cluster
    has enough (a share of one when there are more workers than GPUs), else an equal share of the CPUs."""
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
        threads = (options.max_batch or 16) if gpus else 2
        ds = ray.data.from_items([{"path": p} for p in todo]).map_batches(
            RayMapper,
            fn_constructor_args=(source, options, threads, None if gpus else max(1, int(cpus / n))),
            batch_size=max(8, 2 * threads),
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n),
            num_gpus=min(1.0, gpus / n) if gpus else None,
            num_cpus=None if gpus else cpus / n,
        )
        for row in ds.iter_rows():
            yield Outcome(
                str(row["path"]),
                bytes(row["png"]),
                int(row["width"]),
                int(row["height"]),
                tuple(int(c) for c in row["counts"]),
                str(row["error"]),
                None if int(row["instances"]) < 0 else int(row["instances"]),
                float(row["finished"]),
            )
    finally:
        if started:
            ray.shutdown()
