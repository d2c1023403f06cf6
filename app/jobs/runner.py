"""Each replica's job runner: it claims queued jobs from the store, runs them, renews their heartbeat, and
takes back the jobs of replicas that died.

- **Claiming** is one transaction under the store's write lock (``JobStore.claim``): any number of replicas
  share one queue, each job runs in one of them.
- **Heartbeat.** While a job runs, its row's heartbeat is renewed every third of ``UNETSEG_JOB_LEASE_S`` (and
  its progress after each slide region). A renewal that finds the job no longer the runner's (cancelled or
  deleted, or taken over after a stall) stops it.
- **Restart.** A replica killed mid-job leaves its job ``running`` with an old heartbeat; the next claim of
  any replica (at once, for a restarted process on the same host, whose predecessor's pid is gone) queues
  it again, and its next run resumes from the regions already saved. After ``UNETSEG_JOB_ATTEMPTS`` starts
  it is failed with the reason instead. A replica stopped in order (SIGTERM) gives its jobs back at once.
- **Retention.** Finished jobs older than ``UNETSEG_JOB_RETENTION_S`` and job folders that never got a row
  are removed, at start-up and then every ``SWEEP_S``.
- Jobs run in their own threads (``job_concurrency + 1``), never in the I/O threads of interactive requests;
  the runner's heartbeats, claims and ends of runs (short row operations) in two more, never behind a job's
  long file work (writing outputs, uploads to a bucket), so a busy replica does not miss its lease.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.config import Settings
from app.errors import ServiceError, StoreUnavailable
from app.jobs import engine as adapter
from app.jobs.pipeline import IMAGE_RESULTS, INPUT, OUT, SLIDE_RESULTS, SlideParams, run_image, run_slide
from app.jobs.store import ORPHAN_GRACE_S, Job, JobFiles, JobStore, open_job_files, owner_token
from app.pipeline import Ask
from app.state import AppState

log = logging.getLogger("unetseg.jobs")

POLL_S = 1.0  # how often an idle runner looks for queued jobs (a job posted to this replica wakes it at once)
SWEEP_S = 600.0
PROGRESS_EVERY_S = 0.5  # progress is written to the row at most this often (and at every heartbeat)
T = TypeVar("T")


class JobLost(Exception):
    """The job is no longer this runner's: cancelled, deleted or taken over by another replica."""


class JobMetrics:
    """The jobs' series, in the app's registry: counted as they happen, and jobs per state at scrape time."""

    def __init__(self, registry: CollectorRegistry, app: FastAPI) -> None:
        self.finished = Counter(
            "unetseg_jobs_finished",
            "Jobs this replica ended, by kind and final state.",
            ["kind", "state"],
            registry=registry,
        )
        self.tiles = Counter(
            "unetseg_job_tiles", "Model inputs (tiles) this replica segmented for jobs.", ["model"], registry=registry
        )
        self.duration = Histogram(
            "unetseg_job_duration_seconds",
            "Seconds from a job's start on this replica to its end.",
            ["kind"],
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
            registry=registry,
        )
        registry.register(_JobCounts(app))


class _JobCounts(Collector):
    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> list[Metric]:
        service: JobService | None = getattr(self.app.state, "jobs", None)
        gauge = GaugeMetricFamily("unetseg_jobs", "Jobs in the store by state (every replica's).", labels=["state"])
        if service is None:
            return [gauge]
        gate = self.app.state.unetseg.store_gate
        try:  # as the uploads' series: a store that does not answer costs the scrape a second, then nothing
            counts = gate.run_now(service.store.counts) if gate is not None else service.store.counts()
        except StoreUnavailable:
            return []  # unetseg_store_up says why
        for state, n in counts.items():
            gauge.add_metric([state], n)
        return [gauge]


def result_files(job: Job) -> dict[str, tuple[str, str]]:
    """format -> (file under the job's folder, media type) of the results a finished job has."""
    table = SLIDE_RESULTS if job.kind == "slide" else {job.format: IMAGE_RESULTS[job.format]}
    return {fmt: (f"{OUT}/{name}", media) for fmt, (name, media) in table.items() if fmt in job.results}


@dataclass
class JobService:
    """What the routes need: the rows, the files, the runner, the settings."""

    settings: Settings
    store: JobStore
    files: JobFiles
    executor: concurrent.futures.ThreadPoolExecutor
    rows: concurrent.futures.ThreadPoolExecutor
    runner: JobRunner | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call, off the event loop (in the jobs' threads: never the interactive I/O threads')."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def row(self, fn: Callable[..., T], *args: Any) -> T:
        """A short row operation of the runner (a heartbeat, a claim, a run's end), in threads of its own: never
        queued behind the long file work that fills the jobs' threads."""
        return await asyncio.get_running_loop().run_in_executor(self.rows, fn, *args)


@dataclass
class JobRunner:
    service: JobService
    state: AppState
    metrics: JobMetrics | None = None
    owner: str = field(default_factory=owner_token)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)  # jobs stopped because they are no longer ours (cancelled)
    stopping: bool = False

    @property
    def settings(self) -> Settings:
        return self.service.settings

    async def run(self) -> None:
        """Claim and run jobs until cancelled (the app's shutdown)."""
        while not self.state.ready.is_set():  # the models load in a thread; /readyz tells the same story
            await asyncio.sleep(0.2)
        last_sweep = 0.0
        while True:
            if time.monotonic() - last_sweep > SWEEP_S:
                last_sweep = time.monotonic()
                try:
                    await self.service.call(self.sweep)
                except Exception:  # a sweep that fails is tried again at the next one
                    log.exception("job sweep failed")
            while len(self.tasks) < self.settings.job_concurrency:
                try:
                    job, failed = await self.service.row(
                        self.service.store.claim,
                        self.owner,
                        self.settings.job_lease_s,
                        self.settings.job_attempts,
                        frozenset(self.tasks),
                    )
                except Exception:  # the database away for a moment: the next poll tries again
                    log.exception("claiming a job failed")
                    break
                for f in failed:
                    log.warning("job %s failed: %s", f.id, f.error)
                    if self.metrics:
                        self.metrics.finished.labels(f.kind, "failed").inc()
                if job is None:
                    break
                task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
                task.add_done_callback(functools.partial(self._done, job.id))
                self.tasks[job.id] = task
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_S)

    def _done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self.tasks.pop(job_id, None)
        self.wake.set()

    def sweep(self) -> None:
        """Remove expired jobs, and job folders without a row (a body that never became a job)."""
        store, files = self.service.store, self.service.files
        if self.settings.job_retention_s:
            for job_id in store.expired(self.settings.job_retention_s):
                files.delete(job_id)
                store.delete(job_id)
        known = store.ids()
        now = time.time()
        for job_id, mtime in list(files.job_ids()):
            if job_id not in known and now - mtime > ORPHAN_GRACE_S:
                files.delete(job_id)

    async def stop(self) -> None:
        """Stop every job this replica runs and give them back to the queue (their regions stay)."""
        self.stopping = True
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _heartbeat(self, job: Job, progress: dict[str, Any], task: asyncio.Task[None]) -> None:
        """Renew the job's heartbeat until it ends; stop ``task`` when the job is no longer this runner's. A
        renewal that fails (the database away for a moment) is tried again at the next beat."""
        while True:
            await asyncio.sleep(self.settings.job_lease_s / 3)
            try:
                ours = await self.service.row(self.service.store.beat, job.id, self.owner, dict(progress))
            except Exception:
                log.exception("renewing the heartbeat of job %s failed", job.id)
                continue
            if not ours:
                self.lost.add(job.id)
                task.cancel()
                return

    async def _run(self, job: Job) -> None:
        task = asyncio.current_task()
        assert task is not None
        store, files = self.service.store, self.service.files
        progress: dict[str, Any] = dict(job.progress)
        beat = asyncio.create_task(self._heartbeat(job, progress, task))
        t0 = time.perf_counter()
        state, changes = "failed", dict[str, Any]()
        try:
            info = await self._work(job, progress)
            results: dict[str, Any] = {}
            for fmt, (rel, media) in result_files_of(job).items():
                size = await self.service.call(files.size, job.id, rel)
                if size is not None:
                    results[fmt] = {"bytes": size, "media_type": media}
            state = "done"
            changes = {"results": results, "info": {**job.info, **info}, "progress": {**progress, "stage": "done"}}
        except (asyncio.CancelledError, JobLost):
            beat.cancel()
            if job.id in self.lost:  # cancelled (or taken over): whoever has it now owns its files
                self.lost.discard(job.id)
                log.info("job %s stopped: it was cancelled or taken over", job.id)
                latest = await self.service.row(store.get, job.id)
                if latest is None or latest.state == "cancelled":
                    await self.service.call(files.delete, job.id)
                return
            if self.stopping:  # an orderly stop: the job goes back to the queue, its regions kept
                give_back = functools.partial(store.finish, job.id, self.owner, "queued", progress=progress)
                await asyncio.shield(self.service.row(give_back))
            raise
        except ServiceError as exc:
            changes = {"error": exc.detail}
        except Exception as exc:
            log.exception("job %s failed", job.id)
            changes = {"error": f"internal error: {type(exc).__name__}: {exc}"}
        finally:
            beat.cancel()
        ended = await self.service.row(functools.partial(store.finish, job.id, self.owner, state, **changes))
        if ended is None:  # cancelled (or taken over) while it was finishing
            latest = await self.service.row(store.get, job.id)
            if latest is None or latest.state == "cancelled":
                await self.service.call(files.delete, job.id)
            return
        await self.service.call(files.prune, job.id)  # the input and regions are not needed any more
        if self.metrics:
            self.metrics.finished.labels(job.kind, state).inc()
            self.metrics.duration.labels(job.kind).observe(time.perf_counter() - t0)
        took = time.perf_counter() - t0
        log.info("job %s %s in %.1f s%s", job.id, state, took, f": {ended.error}" if ended.error else "")

    async def _work(self, job: Job, progress: dict[str, Any]) -> dict[str, Any]:
        engine = self.state.engine
        assert engine is not None
        files, executor = self.service.files, self.service.executor
        await self.service.call(files.fetch, job.id)
        work = files.workdir(job.id)
        card = adapter.model_card(engine, job.model)
        loop = asyncio.get_running_loop()

        async def save(rel: str) -> None:
            await loop.run_in_executor(executor, files.save, job.id, rel)

        if job.kind == "image":
            ask = Ask(
                card.name,
                job.format,  # type: ignore[arg-type]
                float(job.params.get("alpha", 0.5)),
                self.settings.png_compress_level,
            )
            return await run_image(
                work / INPUT,
                work,
                job.format,
                lambda data: adapter.predict_bytes(engine, ask, data, self.settings.max_pixels, executor),
                executor,
                save,
            )
        last = 0.0

        async def report(p: dict[str, Any]) -> None:
            nonlocal last
            if self.metrics and p["tiles_done"] > progress.get("tiles_done", 0) and p["stage"] == "segmenting":
                self.metrics.tiles.labels(card.name).inc(p["tiles_done"] - progress.get("tiles_done", 0))
            progress.update(p)
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S or p["stage"] != "segmenting":
                last = now
                if not await self.service.row(self.service.store.beat, job.id, self.owner, dict(progress)):
                    self.lost.add(job.id)
                    raise JobLost(job.id)

        return await run_slide(
            work / INPUT,
            work,
            card,
            slide_params(job, self.settings),
            lambda region: adapter.segment_region(engine, card.name, region, executor, card.instances is not None),
            lambda h, w: adapter.tiles_for(card, h, w),
            executor,
            report,
            save,
        )


def result_files_of(job: Job) -> dict[str, tuple[str, str]]:
    """format -> (file, media type) a job of this kind and format produces (before it has any)."""
    table = SLIDE_RESULTS if job.kind == "slide" else {job.format: IMAGE_RESULTS[job.format]}
    return {fmt: (f"{OUT}/{name}", media) for fmt, (name, media) in table.items()}


def slide_params(job: Job, settings: Settings) -> SlideParams:
    """A slide job's parameters: the level was chosen when the job was created (request, else card)."""
    p = job.params
    return SlideParams(
        level=p.get("level"),
        region_px=int(p.get("region_px", settings.job_region_px)),
        halo_px=int(p.get("halo_px", settings.job_halo_px)),
    )


@asynccontextmanager
async def job_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the job rows and folders in the upload store, start this replica's runner; stop it at the end."""
    state: AppState = app.state.unetseg
    assert state.store is not None
    s = state.settings
    executor = concurrent.futures.ThreadPoolExecutor(s.job_concurrency + 1, "unetseg-jobs")
    rows = concurrent.futures.ThreadPoolExecutor(2, "unetseg-job-rows")
    files = open_job_files(state.store.blobs, Path(s.data_dir))
    service = JobService(s, JobStore(state.store.meta, s.max_jobs), files, executor, rows)
    runner = JobRunner(service, state, getattr(app.state, "job_metrics", None))
    service.runner = runner
    app.state.jobs = service
    task = asyncio.create_task(runner.run(), name="unetseg-jobs") if s.job_concurrency else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runner.stop()
        executor.shutdown(wait=True)
        rows.shutdown(wait=True)
