"""The job runner's parts on their own: the engine adapter's waits, heartbeats, claims and the orphan sweep."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.errors import NotReady, Overloaded, StoreUnavailable
from app.jobs import engine as adapter
from app.jobs.runner import JobRunner, JobService
from app.jobs.store import ORPHAN_GRACE_S, Job, JobStore, new_job_id, open_job_files
from app.state import AppState
from app.store import open_store


def test_job_work_waits_while_the_engine_is_full_or_restarting() -> None:
    refusals: list[Exception] = [NotReady("the engine process went away; retry shortly"), Overloaded("queue full")]

    async def attempt() -> int:
        if refusals:
            raise refusals.pop(0)
        return 7

    assert asyncio.run(adapter._with_room(attempt)) == 7
    assert not refusals


def test_job_work_fails_when_the_engine_stays_away() -> None:
    """A model whose worker ended answers NotReady for good: the job fails with that reason, once the engine
    has been away for longer than an engine process takes to come back."""
    calls = 0

    async def attempt() -> int:
        nonlocal calls
        calls += 1
        raise NotReady("model 'm' stopped serving: its worker ended")

    with pytest.raises(NotReady, match="stopped serving"):
        asyncio.run(adapter._with_room(attempt, not_ready_s=0.0))
    assert calls == 2  # the first refusal starts the clock, the next one is past it


@contextmanager
def a_runner(tmp_path: Path, **kw: Any) -> Iterator[JobRunner]:
    """A runner on a SQLite store in ``tmp_path``, not started: its parts are called one at a time."""
    settings = Settings(data_dir=tmp_path / "data", **kw)
    uploads = open_store(settings)
    executor = concurrent.futures.ThreadPoolExecutor(settings.job_concurrency + 1, "test-jobs")
    rows = concurrent.futures.ThreadPoolExecutor(2, "test-job-rows")
    try:
        files = open_job_files(uploads.blobs, settings.data_dir)
        service = JobService(settings, JobStore(uploads.meta), files, executor, rows)
        yield JobRunner(service, AppState(settings=settings))
    finally:
        executor.shutdown(wait=True)
        rows.shutdown(wait=True)
        uploads.close()


def running_job(runner: JobRunner) -> Job:
    store = runner.service.store
    store.create(Job(new_job_id(), "queued", store.clock(), "image", "tiny", "png"))
    job, _ = store.claim(runner.owner, runner.settings.job_lease_s, 3)
    assert job is not None
    return job


def test_a_heartbeat_that_fails_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with a_runner(tmp_path, job_lease_s=0.03) as runner:
        store = runner.service.store
        job = running_job(runner)
        renew = store.beat

        async def check() -> None:
            loop = asyncio.get_running_loop()
            third = asyncio.Event()
            calls: list[str] = []

            def beat(job_id: str, owner: str, progress: dict[str, Any] | None = None) -> bool:
                calls.append(job_id)
                if len(calls) == 1:
                    raise StoreUnavailable("the database did not answer")
                if len(calls) == 3:
                    loop.call_soon_threadsafe(third.set)
                return renew(job_id, owner, progress)

            monkeypatch.setattr(store, "beat", beat)
            work = asyncio.create_task(asyncio.Event().wait())  # stands for the job's own task
            heartbeat = asyncio.create_task(runner._heartbeat(job, {}, work))
            waiting = asyncio.create_task(third.wait())
            await asyncio.wait({heartbeat, waiting}, return_when=asyncio.FIRST_COMPLETED)
            try:
                assert waiting.done() and not heartbeat.done() and not work.done()
            finally:
                for t in (heartbeat, waiting, work):
                    t.cancel()
                await asyncio.gather(heartbeat, waiting, work, return_exceptions=True)

        asyncio.run(check())


def test_a_heartbeat_is_not_held_up_by_long_file_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with a_runner(tmp_path, job_lease_s=0.03, job_concurrency=1) as runner:
        store = runner.service.store
        job = running_job(runner)
        renew = store.beat
        release = threading.Event()

        async def check() -> None:
            loop = asyncio.get_running_loop()
            beaten = asyncio.Event()

            def beat(job_id: str, owner: str, progress: dict[str, Any] | None = None) -> bool:
                loop.call_soon_threadsafe(beaten.set)
                return renew(job_id, owner, progress)

            monkeypatch.setattr(store, "beat", beat)
            # every one of the jobs' threads busy with long work (outputs written, uploaded to a bucket)
            held = [loop.run_in_executor(runner.service.executor, release.wait) for _ in range(2)]
            work = asyncio.create_task(asyncio.Event().wait())
            heartbeat = asyncio.create_task(runner._heartbeat(job, {}, work))
            try:
                await asyncio.wait_for(beaten.wait(), 60)
            finally:
                release.set()
                heartbeat.cancel()
                work.cancel()
                await asyncio.gather(heartbeat, work, *held, return_exceptions=True)

        asyncio.run(check())


def test_the_sweep_leaves_a_body_that_is_still_arriving(tmp_path: Path) -> None:
    with a_runner(tmp_path) as runner:
        folder = runner.service.files.workdir(new_job_id())
        (folder / "input").write_bytes(b"the first part of a long upload")
        long_ago = time.time() - 2 * ORPHAN_GRACE_S
        os.utime(folder, (long_ago, long_ago))  # the folder made long ago, its input written to since
        runner.sweep()
        assert (folder / "input").is_file()
        os.utime(folder / "input", (long_ago, long_ago))  # nothing written for long: a body that never came whole
        runner.sweep()
        assert not folder.exists()
