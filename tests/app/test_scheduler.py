"""The scheduler under load, counted in batches and forward passes (never in seconds): fair batches across
jobs, dead jobs leaving the queue at once, no waiting for a lone request, worker failures, the memory budget."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from app.engine import MemoryBudget, ModelEngine
from app.engine.work import TensorWork
from app.errors import ImageTooLarge, InferenceFailed, NotReady, Overloaded
from model.bundle import load_bundle
from tests.helpers import write_tiny_bundle


class Stepper(torch.nn.Module):
    """Wraps a model: each forward pass waits for a permit, then records the markers (first pixel) it saw."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.permits = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)
        self.batches: list[list[float]] = []
        self.free = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.release()
        if not self.free:
            assert self.permits.acquire(timeout=20), "the test never let this batch run"
        self.batches.append([round(float(v), 3) for v in x[:, 0, 0, 0]])
        if torch.isnan(x).any():
            raise ValueError("NaN input")
        out: torch.Tensor = self.inner(x)
        return out

    def step(self) -> None:
        """Let one batch run and wait until the next one has entered the model."""
        self.permits.release()
        assert self.entered.acquire(timeout=20), "no next batch"

    def run_free(self) -> None:
        self.free = True
        for _ in range(100):
            self.permits.release()


def marked(n: int, marker: float, side: int = 8) -> torch.Tensor:
    return torch.full((n, 3, side, side), marker)


@pytest.fixture
def engine(tmp_path: Path) -> ModelEngine:
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny")
    eng = ModelEngine(load_bundle(folder), torch.device("cpu"), torch.float32, max_batch=8, queue_size=4)
    eng.model = Stepper(eng.model)  # type: ignore[arg-type]
    return eng


def stepper(engine: ModelEngine) -> Stepper:
    assert isinstance(engine.model, Stepper)
    return engine.model


def first_batch_with(batches: list[list[float]], marker: float) -> int:
    return next(i for i, b in enumerate(batches) if marker in b)


@pytest.mark.parametrize("small_side", [8, 16], ids=["same-shape", "other-shape"])
def test_a_small_job_runs_in_the_next_batch_behind_any_number_of_large_ones(
    engine: ModelEngine, small_side: int
) -> None:
    s = stepper(engine)
    engine.start()
    blocker = engine.submit(marked(1, 0.5))
    assert s.entered.acquire(timeout=20)  # batch 0 (the blocker) is in the model
    large = [engine.submit(marked(40, float(k))) for k in (1, 2, 3)]  # 120 inputs: 15 full batches
    s.step()  # batch 0 ran; batch 1, of the large jobs, is in the model: formed before the small job came
    small = engine.submit(marked(1, 9.0, small_side))
    s.run_free()
    assert small.result(20)[0].shape == (1, 2, small_side, small_side)
    for f in [blocker, *large]:
        f.result(20)
    batches = s.batches
    assert first_batch_with(batches, 9.0) == 2, batches  # the first batch formed after it arrived
    # Round-robin: a batch of the large jobs draws from all three while all three have inputs left.
    assert set(batches[1]) == {1.0, 2.0, 3.0}
    engine.stop()


def test_a_started_job_passed_over_is_not_starved_by_new_ones(engine: ModelEngine) -> None:
    s = stepper(engine)
    engine.start()
    large = engine.submit(marked(20, 1.0))
    assert s.entered.acquire(timeout=20)
    smalls = []
    for k in range(6):  # a new small job of another shape arrives during every batch
        smalls.append(engine.submit(marked(1, 10.0 + k, 16)))
        s.step()
    s.run_free()
    large.result(20)
    for f in smalls:
        f.result(20)
    # Batch 0 was the large job's; after two batches passed it over it got the third.
    has_large = [1.0 in b for b in s.batches]
    assert has_large[:4] == [True, False, False, True], s.batches
    engine.stop()


def test_a_cancelled_job_frees_its_slot_at_once_and_never_runs(engine: ModelEngine) -> None:
    s = stepper(engine)
    engine.start()
    held = engine.submit(marked(1, 1.0))
    assert s.entered.acquire(timeout=20)  # the worker is busy: nothing below is taken before we say so
    waiting = [engine.submit(marked(1, 2.0 + k)) for k in range(4)]
    with pytest.raises(Overloaded):
        engine.submit(marked(1, 7.0))
    assert engine.queue_depth == 4
    assert waiting[0].cancel()
    assert engine.queue_depth == 3  # at once: the worker is still inside the first batch
    late = engine.submit(marked(1, 8.0))
    s.run_free()
    for f in [held, *waiting[1:], late]:
        f.result(20)
    assert not any(2.0 in b for b in s.batches)
    assert engine.in_flight == 0
    engine.stop()


def test_a_failed_job_leaves_at_once_and_its_other_inputs_never_run(engine: ModelEngine) -> None:
    s = stepper(engine)
    s.run_free()
    engine.max_batch = 4
    engine.start()
    x = marked(20, 5.0)
    x[0] = float("nan")  # the first input fails: the batch is retried one by one, and that fails the job
    bad = engine.submit(x)
    with pytest.raises(InferenceFailed, match="NaN input"):
        bad.result(20)
    good = engine.submit(marked(1, 6.0))
    good.result(20)
    passes_of_bad = sum(1 for b in s.batches if 5.0 in b or any(v != v for v in b))
    assert passes_of_bad == 2  # the failed batch and the retry of its first input; none of the other 19
    assert engine.in_flight == 0 and engine.stats.failed == 1
    engine.stop()


def test_a_lone_request_does_not_wait_for_a_batch(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny")
    # A wait so long that the test would time out if the worker waited for others to fill the batch.
    eng = ModelEngine(load_bundle(folder), torch.device("cpu"), torch.float32, max_batch=8, max_wait_s=600)
    eng.start()
    for _ in range(3):  # spaced-out requests: each starts at once
        assert eng.submit(marked(1, 1.0)).result(30)[0].shape == (1, 2, 8, 8)
    eng.stop()


class Kill(BaseException):
    """Escapes every ``except Exception``: ends the worker thread it is raised in."""


def test_a_killed_worker_fails_its_jobs_and_marks_the_model_unhealthy(engine: ModelEngine) -> None:
    s = stepper(engine)
    s.run_free()
    inner = s.inner

    def killer(x: torch.Tensor) -> torch.Tensor:
        raise Kill("killed on purpose")

    engine.model = killer
    engine.start()
    fut = engine.submit(marked(2, 1.0))
    with pytest.raises(InferenceFailed, match="stopped: Kill: killed on purpose"):
        fut.result(20)
    assert not engine.healthy and engine.failure is not None
    with pytest.raises(NotReady, match="not serving"):
        engine.submit(marked(1, 1.0))
    engine.model = inner
    engine.stop(5)


class FailingWork(TensorWork):
    """Inputs that cannot be made: as if torch.stack or a tile ran out of memory."""

    def item(self, index: int) -> torch.Tensor:
        raise MemoryError("no memory for this tile")


def test_a_worker_survives_errors_outside_the_forward_pass(engine: ModelEngine) -> None:
    s = stepper(engine)
    s.run_free()
    engine.start()
    fut = engine.submit_work(FailingWork(marked(3, 1.0)))
    with pytest.raises(InferenceFailed, match="MemoryError: no memory for this tile"):
        fut.result(20)

    def broken_hook(name: str, size: int) -> None:
        raise RuntimeError("metrics hook broke")

    engine.on_batch = broken_hook
    with pytest.raises(InferenceFailed, match="metrics hook broke"):
        engine.submit(marked(1, 2.0)).result(20)
    engine.on_batch = None
    assert engine.submit(marked(1, 3.0)).result(20)[0].shape == (1, 2, 8, 8)  # the same worker, still serving
    assert engine.healthy and engine.stats.worker_errors == 1
    engine.stop()


def test_the_memory_budget_refuses_what_would_pass_it() -> None:
    mib = 1024 * 1024
    budget = MemoryBudget(10 * mib)
    budget.reserve(6 * mib)
    with pytest.raises(Overloaded, match="retry shortly") as info:
        budget.reserve(5 * mib, retry_after_s=7)
    assert info.value.headers["Retry-After"] == "7"
    with pytest.raises(ImageTooLarge, match="allows 10 MiB"):
        budget.reserve(11 * mib)  # could never fit: 413, not 503
    budget.reserve(4 * mib)
    assert budget.held == 10 * mib
    budget.release(6 * mib)
    budget.reserve(5 * mib)
    assert budget.peak == 10 * mib
    MemoryBudget(0).reserve(10**15)  # 0: no limit


class ThreadRecorder(torch.nn.Module):
    """Wraps a model: records, per forward pass, its batch size and the torch threads of the calling worker;
    each pass waits for a permit, and the passes in the model at once are counted."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.permits = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.passes: list[tuple[int, int]] = []  # (batch size, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.passes.append((x.shape[0], torch.get_num_threads()))
        self.entered.release()
        assert self.permits.acquire(timeout=20), "the test never let this pass run"
        with self.lock:
            self.running -= 1
        out: torch.Tensor = self.inner(x)
        return out


def test_on_the_cpu_a_lone_batch_runs_on_every_thread_and_load_is_split_between_narrow_streams(
    tmp_path: Path,
) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        eng = ModelEngine(load_bundle(folder), torch.device("cpu"), torch.float32, max_batch=8, streams=2)
    finally:
        torch.set_num_threads(before)
    assert (eng.threads_per_stream, eng.threads_wide) == (1, 2)
    rec = ThreadRecorder(eng.model)  # type: ignore[arg-type]
    eng.model = rec  # type: ignore[assignment]
    eng.start()
    try:
        lone = eng.submit(marked(1, 0.1))
        assert rec.entered.acquire(timeout=20)
        # While the lone request runs wide, nothing else starts: seven more inputs wait for it.
        rest = [eng.submit(marked(1, 0.2 + i / 100)) for i in range(7)]
        assert not rec.entered.acquire(timeout=0.3)
        rec.permits.release()
        lone.result(timeout=20)
        # Then the seven are split between the two workers, each on its one thread, both in the model at once.
        assert rec.entered.acquire(timeout=20) and rec.entered.acquire(timeout=20)
        assert rec.most_at_once == 2
        rec.permits.release(2)
        for f in rest:
            f.result(timeout=20)
        assert rec.passes[0] == (1, 2)
        assert sorted(rec.passes[1:]) == [(3, 1), (4, 1)]
        # Idle again: the next lone request is wide again.
        rec.permits.release()
        eng.submit(marked(1, 0.9)).result(timeout=20)
        assert rec.passes[-1] == (1, 2)
    finally:
        rec.permits.release(10)
        eng.stop(timeout=20)
