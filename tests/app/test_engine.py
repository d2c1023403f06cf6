from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.engine import Engine, ModelEngine, Timing, resolve_device, resolve_dtype
from app.engine.batching import Formed
from app.errors import InferenceFailed, Overloaded, UnknownModel
from app.pipeline import segment
from model.bundle import load_bundle
from tests.helpers import tiny_card, write_tiny_bundle


class Recorder(torch.nn.Module):
    """Wraps a model: records batch shapes, can hold the worker until released, fails on NaN inputs."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.gate.wait(10)
        self.shapes.append(tuple(x.shape))
        if torch.isnan(x).any():
            raise ValueError("NaN input")
        out: torch.Tensor = self.inner(x)
        return out


def tiny_engine(tmp_path: Path) -> ModelEngine:
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny")
    eng = ModelEngine(
        load_bundle(folder), torch.device("cpu"), torch.float32, max_batch=4, max_wait_s=0.001, queue_size=3
    )
    eng.model = Recorder(eng.model)  # type: ignore[arg-type]
    return eng


@pytest.fixture
def engine(tmp_path: Path) -> ModelEngine:
    return tiny_engine(tmp_path)


def rec(engine: ModelEngine) -> Recorder:
    assert isinstance(engine.model, Recorder)
    return engine.model


def hold(engine: ModelEngine) -> Future[tuple[torch.Tensor, Timing]]:
    """Occupy the worker with one job that waits at the gate."""
    r = rec(engine)
    r.gate.clear()
    r.entered.clear()
    fut = engine.submit(torch.randn(1, 3, 8, 8))
    assert r.entered.wait(10)
    return fut


def test_each_request_gets_its_own_result(engine: ModelEngine) -> None:
    engine.start()
    inputs = [torch.randn(n, 3, 16, 16) for n in (1, 2, 1)]
    blocker = hold(engine)
    futs = [engine.submit(x) for x in inputs]
    rec(engine).gate.set()
    blocker.result(10)
    with torch.no_grad():
        expected = [rec(engine).inner(x) for x in inputs]
    for fut, want in zip(futs, expected, strict=True):
        got, timing = fut.result(10)
        assert torch.allclose(got, want, atol=1e-5)
        assert timing.queue_s >= 0 and timing.model_s > 0
    # The three waiting jobs (4 inputs) went through as one batch.
    assert (4, 3, 16, 16) in rec(engine).shapes
    engine.stop()


def test_batches_hold_only_one_input_shape(engine: ModelEngine) -> None:
    engine.start()
    blocker = hold(engine)
    a = engine.submit(torch.randn(1, 3, 16, 16))
    b = engine.submit(torch.randn(1, 3, 24, 24))
    c = engine.submit(torch.randn(1, 3, 16, 16))
    rec(engine).gate.set()
    for f in (blocker, a, b, c):
        f.result(10)
    shapes = rec(engine).shapes[1:]
    assert sorted(shapes) == [(1, 3, 24, 24), (2, 3, 16, 16)]
    engine.stop()


def test_large_jobs_are_split_into_max_batch_pieces(engine: ModelEngine) -> None:
    engine.start()
    logits, _ = engine.submit(torch.randn(10, 3, 8, 8)).result(10)
    assert logits.shape == (10, 2, 8, 8)
    assert [s[0] for s in rec(engine).shapes] == [4, 4, 2]
    engine.stop()


def test_a_full_queue_answers_overloaded_at_once(engine: ModelEngine) -> None:
    engine.start()
    blocker = hold(engine)
    queued = [engine.submit(torch.randn(1, 3, 8, 8)) for _ in range(3)]
    with pytest.raises(Overloaded) as info:
        engine.submit(torch.randn(1, 3, 8, 8))
    assert info.value.status_code == 503 and info.value.headers["Retry-After"] == "1"
    assert engine.stats.rejected == 1
    rec(engine).gate.set()
    for f in [blocker, *queued]:
        f.result(10)
    engine.stop()


def test_a_failing_item_fails_alone(engine: ModelEngine) -> None:
    engine.start()
    blocker = hold(engine)
    good = engine.submit(torch.randn(1, 3, 8, 8))
    bad = engine.submit(torch.full((1, 3, 8, 8), float("nan")))
    good2 = engine.submit(torch.randn(1, 3, 8, 8))
    rec(engine).gate.set()
    blocker.result(10)
    assert good.result(10)[0].shape == (1, 2, 8, 8)
    assert good2.result(10)[0].shape == (1, 2, 8, 8)
    with pytest.raises(InferenceFailed, match="NaN input"):
        bad.result(10)
    engine.stop()


def test_stop_drains_the_queue_then_refuses(engine: ModelEngine) -> None:
    engine.start()
    blocker = hold(engine)
    queued = [engine.submit(torch.randn(1, 3, 8, 8)) for _ in range(3)]
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    rec(engine).gate.set()
    stopper.join(10)
    assert not stopper.is_alive()
    for f in [blocker, *queued]:
        assert f.result(0)[0].shape == (1, 2, 8, 8)
    with pytest.raises(Overloaded, match="shutting down"):
        engine.submit(torch.randn(1, 3, 8, 8))


def test_cancelled_jobs_are_skipped(engine: ModelEngine) -> None:
    engine.start()
    blocker = hold(engine)
    gone = engine.submit(torch.randn(1, 3, 32, 32))
    assert gone.cancel()
    rec(engine).gate.set()
    blocker.result(10)
    engine.stop()
    assert (1, 3, 32, 32) not in rec(engine).shapes


def freed_without_the_cyclic_gc(refs: list[weakref.ref[Any]]) -> bool:
    """Whether every object of ``refs`` goes within a few seconds (a worker drops its last references after
    it resolved the futures) while the cyclic GC is off: only reference counting frees them."""
    deadline = time.monotonic() + 10
    while any(r() is not None for r in refs) and time.monotonic() < deadline:
        time.sleep(0.01)
    return all(r() is None for r in refs)


def test_a_requests_work_is_freed_when_it_ends_not_by_the_cyclic_gc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished request's work (its image, a tiled image's accumulator: a whole slide region's) is freed
    as soon as the request lets go of it. A reference cycle through its job's future (which keeps its done
    callbacks) left each one to the cyclic GC's rare full passes: a slide job's memory grew region by region."""
    write_tiny_bundle(tmp_path / "t", name="t", sizing="tile", size=32)
    eng = Engine.from_folder(tmp_path, torch.device("cpu"), precision="float32", streams=2)
    eng.start(warmup=False)
    works: list[weakref.ref[Any]] = []
    prepare = eng.prepare

    def recording(*args: Any, **kwargs: Any) -> Any:
        prepared = prepare(*args, **kwargs)
        works.append(weakref.ref(prepared.work))
        return prepared

    monkeypatch.setattr(eng, "prepare", recording)
    image = np.zeros((100, 90, 3), np.uint8)
    gc.disable()
    try:
        for _ in range(3):
            mask, _, _ = asyncio.run(segment(eng, None, image, background=True))
            assert mask.shape == (100, 90)
        assert len(works) == 3
        assert freed_without_the_cyclic_gc(works)
    finally:
        gc.enable()
        eng.stop()


def test_a_submitted_batchs_future_is_freed_when_dropped_not_by_the_cyclic_gc(engine: ModelEngine) -> None:
    engine.start()
    refs: list[weakref.ref[Any]] = []
    gc.disable()
    try:
        for n in (1, 5):
            fut = engine.submit(torch.randn(n, 3, 8, 8))
            assert fut.result(10)[0].shape == (n, 2, 8, 8)
            refs.append(weakref.ref(fut))
            del fut
        assert freed_without_the_cyclic_gc(refs)
    finally:
        gc.enable()
        engine.stop()


def test_engine_registry_and_sync_pipeline(tmp_path: Path) -> None:
    write_tiny_bundle(tmp_path / "a", name="a")
    write_tiny_bundle(tmp_path / "b", name="b", channels=1, sizing="tile", size=32)
    eng = Engine.from_folder(tmp_path, torch.device("cpu"), precision="float32", default_model="b")
    assert eng.default_model == "b"
    eng.start()
    seg = eng.segment_sync(None, np.zeros((50, 70), np.uint8))
    assert seg.mask.shape == (50, 70) and seg.model == "b"
    with pytest.raises(UnknownModel, match="available: a, b"):
        eng.get("c")
    eng.stop()
    with pytest.raises(ValueError, match="no model bundle"):
        Engine.from_folder(tmp_path / "empty", torch.device("cpu"))
    write_tiny_bundle(tmp_path / "dup", name="a")
    with pytest.raises(ValueError, match="two bundles are named 'a'"):
        Engine.from_folder(tmp_path, torch.device("cpu"))


def test_device_and_precision_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    card = tiny_card(precisions=("float16", "float32"))
    assert resolve_dtype("auto", card, torch.device("cpu")) == torch.float32  # no float16 autocast on CPU
    assert resolve_dtype("float32", card, torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="not supported"):
        resolve_dtype("float16", card, torch.device("cpu"))


class Pairs(torch.nn.Module):
    """Passes only when two forward passes are inside it at the same time (while ``barrier`` is set)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.barrier: threading.Barrier | None = threading.Barrier(2)
        self.threads: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(torch.get_num_threads())
        if self.barrier is not None:
            self.barrier.wait(10)  # BrokenBarrierError (the job fails) unless another stream is here too
        out: torch.Tensor = self.inner(x)
        return out


def test_streams_run_forward_passes_at_once_share_the_threads_and_drain(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny")
    threads = torch.get_num_threads()
    eng = ModelEngine(load_bundle(folder), torch.device("cpu"), torch.float32, max_batch=1, queue_size=16, streams=2)
    pairs = Pairs(eng.model)  # type: ignore[arg-type]
    eng.model = pairs
    try:
        # Both queued before the workers start: split between them (a lone input would run wide, alone).
        both = [eng.submit(torch.randn(1, 3, 8, 8)) for _ in range(2)]
        eng.start()
        for f in both:
            assert f.result(20)[0].shape == (1, 2, 8, 8)
        assert pairs.threads == [max(1, threads // 2)] * 2
        pairs.barrier = None
        queued = [eng.submit(torch.randn(1, 3, 8, 8)) for _ in range(8)]
        eng.stop(20)
        assert all(f.result(0)[0].shape == (1, 2, 8, 8) for f in queued)
        assert not any(t.is_alive() for t in eng._threads)
        assert eng.stats.items == 10
    finally:
        torch.set_num_threads(threads)  # a worker's setting is also the default of threads started later


def test_streams_must_be_positive(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny")
    with pytest.raises(ValueError, match="streams"):
        ModelEngine(load_bundle(folder), torch.device("cpu"), torch.float32, streams=0)


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("shape", [(20, 27), (70, 45), (33, 100)])
def test_lazy_tiles_give_the_plans_mask(classes: int, shape: tuple[int, int]) -> None:
    # The engine cuts tiles as it batches them; evaluation (and the card's metrics) use the whole plan.
    # Both must give one mask, for images smaller than a tile along one axis or both too.
    from app.engine.work import TiledWork
    from model.inference import finish, make_plan, normalize, statistics
    from model.unet import UNet

    card = tiny_card(classes=classes, sizing="tile", size=32)
    torch.manual_seed(0)
    model = UNet(card.architecture).eval()
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    plan = make_plan(image, card.input)
    mean, std = statistics(card.input)
    with torch.no_grad():
        expected = finish(plan, model(plan.inputs))
        work = TiledWork(image, card.input, classes)
        assert work.size == plan.inputs.shape[0]
        for i in range(work.size):
            tile, valid = work.item(i)
            assert tile.dtype == torch.uint8  # what crosses to the device
            x = normalize(tile[None], mean, std, None if valid is None else [valid])[0]
            assert torch.equal(x, plan.inputs[i])
            work.put(i, model(x[None])[0])
    # One tiling plan and one blending, written once in model.inference: the same mask to the bit.
    assert np.array_equal(work.mask(), expected)


@pytest.mark.parametrize(
    ("rates", "wide"), [({1: 100.0, 2: 50.0}, False), ({1: 100.0, 2: 105.0}, False), ({1: 100.0, 2: 115.0}, True)]
)
def test_on_the_cpu_several_streams_run_a_lone_request_wide_only_where_every_thread_pays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rates: dict[int, float], wide: bool
) -> None:
    """Two single-thread streams: a lone request runs on both threads only where that is 1.1 times as fast (else
    no batch ever runs wide, and what waits is not held back for one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny")
    engine = ModelEngine(load_bundle(folder), torch.device("cpu"), torch.float32, max_batch=4, streams=2)
    try:
        monkeypatch.setattr(engine.runner, "rate", lambda batch: rates[torch.get_num_threads()])
        engine.warmup()
        assert engine.threads_per_stream == 1
        assert (engine.threads_wide, engine.queue.split) == ((2, True) if wide else (0, False))
        engine.start()
        assert engine.submit(torch.randn(1, 3, 8, 8)).result(10)[0].shape == (1, 2, 8, 8)
    finally:
        engine.stop()
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("rates", "threads"),
    # 0: every thread. Slower on two threads by less than the margin (timing noise) keeps both.
    [({1: 100.0, 2: 50.0}, 1), ({1: 100.0, 2: 70.0}, 0), ({1: 100.0, 2: 105.0}, 0), ({1: 100.0, 2: 170.0}, 0)],
)
def test_on_the_cpu_a_model_too_small_to_gain_from_every_core_runs_on_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rates: dict[int, float], threads: int
) -> None:
    """Timed at warm-up: the forward pass runs on one thread only where that makes it 1.5 times as fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    engine = tiny_engine(tmp_path)  # made on a process of two torch threads
    seen: list[int] = []

    def rate(batch: int) -> float:
        seen.append(torch.get_num_threads())
        return rates[torch.get_num_threads()]

    monkeypatch.setattr(engine.runner, "rate", rate)
    try:
        engine.warmup()
        assert seen == [2, 1, 2, 1] and torch.get_num_threads() == 2  # timed both ways, the caller's count restored
        assert engine.threads_per_stream == threads
        ran_on: list[int] = []
        forward = engine.model

        def watched(x: torch.Tensor) -> torch.Tensor:
            ran_on.append(torch.get_num_threads())
            return forward(x)

        engine.model = watched
        waiting = threading.Event()
        next_batch = engine._next_batch

        def watched_next() -> Formed | None:
            waiting.set()
            return next_batch()

        monkeypatch.setattr(engine, "_next_batch", watched_next)

        def io_thread_sets_one() -> None:  # as the service's I/O threads do when they start, with torch's call
            pool = concurrent.futures.ThreadPoolExecutor(1, initializer=lambda: torch.set_num_threads(1))
            assert pool.submit(torch.get_num_threads).result() == 1
            pool.shutdown()

        # I/O threads set their own count to 1 before the worker starts and after it is waiting for work (the
        # service starts them at its first request): the worker still runs on the count it chose. It once took
        # the 1 of an I/O thread started after it, and left a core idle.
        io_thread_sets_one()
        engine.start()
        assert waiting.wait(10)
        io_thread_sets_one()
        assert engine.submit(torch.randn(1, 3, 8, 8)).result(10)[0].shape == (1, 2, 8, 8)
        assert ran_on == [threads or 2]  # the worker ran it on one thread, or on both
    finally:
        engine.stop()
        torch.set_num_threads(before)
