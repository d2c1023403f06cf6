"""GPU choices, checked without a GPU: native bf16 on the configured cuda:N only, one warm-up shape class per
input policy (so a compiled model never meets a new shape), and a CUDA stream per worker (none on the CPU)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import omp_wait_defaults
from app.engine import ModelEngine, device_supports, make_work, native_bf16
from app.engine.device import input_shapes, new_stream, on_stream, resolve_streams, set_own_threads, warmup_batches
from model.bundle import load_bundle
from tests.helpers import FakeCuda, install_fake_cuda, tiny_card, write_tiny_bundle


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    return install_fake_cuda(monkeypatch, {0: (8, 6), 1: (7, 5)})  # an Ampere card and a T4 beside it


def test_bf16_only_where_native_and_on_the_configured_device(fake_cuda: FakeCuda) -> None:
    assert native_bf16(torch.device("cuda:0"))
    assert not native_bf16(torch.device("cuda:1"))  # emulated bf16 on a T4 does not count
    assert ("capability", 1, None) in fake_cuda.asked  # the configured device, not the current one (0)
    assert all(emulation is False for kind, _, emulation in fake_cuda.asked if kind == "bf16")
    assert not device_supports(torch.bfloat16, torch.device("cuda:1"))
    assert device_supports(torch.float16, torch.device("cuda:1"))
    fake_cuda.current = 1
    assert not native_bf16(torch.device("cuda"))  # plain "cuda" is the current device
    fake_cuda.current = 0
    assert native_bf16(torch.device("cuda"))
    assert device_supports(torch.bfloat16, torch.device("cuda:0"))


@pytest.mark.parametrize(
    "size",
    [(1, 1), (1, 5000), (20, 20), (31, 33), (32, 32), (50, 70), (100, 33), (129, 257)],
)
def test_every_tile_has_the_one_warmed_up_shape(tmp_path: Path, size: tuple[int, int]) -> None:
    folder, card, _ = write_tiny_bundle(tmp_path / "t", channels=1, sizing="tile", size=32)
    engine = ModelEngine(load_bundle(folder), torch.device("cpu"), torch.float32)
    work = make_work(engine, np.zeros(size, np.uint8), None)
    shapes = {tuple(work.item(i)[0].shape) for i in range(work.size)}
    assert shapes <= set(input_shapes(card.input)) and len(shapes) == 1


def test_resize_inputs_have_the_warmed_up_shape(tmp_path: Path) -> None:
    folder, card, _ = write_tiny_bundle(tmp_path / "r", sizing="resize", size=32)
    engine = ModelEngine(load_bundle(folder), torch.device("cpu"), torch.float32)
    for size in [(1, 1), (100, 33), (480, 640)]:
        work = make_work(engine, np.zeros((*size, 3), np.uint8), size)
        assert {tuple(work.item(i)[0].shape) for i in range(work.size)} <= set(input_shapes(card.input))


def test_warmup_runs_every_shape_class_at_batch_1_and_a_full_batch(tmp_path: Path) -> None:
    folder, card, _ = write_tiny_bundle(tmp_path / "t", channels=1, sizing="tile", size=32)
    engine = ModelEngine(load_bundle(folder), torch.device("cpu"), torch.float32, max_batch=6)
    inner = engine.model
    seen: list[tuple[int, ...]] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return inner(x)

    engine.model = record
    engine.choose_threads = lambda: None  # type: ignore[method-assign]  # its timing passes are its own test's
    engine.warmup()
    assert warmup_batches(6) == [1, 6]
    assert sorted(seen) == sorted((n, *shape) for shape in input_shapes(card.input) for n in (1, 6))
    assert input_shapes(tiny_card(sizing="resize", size=48).input) == [(3, 48, 48)]


def test_no_cuda_stream_on_the_cpu() -> None:
    assert new_stream(torch.device("cpu")) is None
    with on_stream(None):
        assert torch.ones(2).sum() == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_each_cuda_worker_has_its_own_stream(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "t")
    engine = ModelEngine(load_bundle(folder), torch.device("cuda"), torch.float32, streams=2)
    inner = engine.model
    streams: set[int] = set()

    def record(x: torch.Tensor) -> torch.Tensor:
        streams.add(torch.cuda.current_stream().cuda_stream)
        return inner(x)

    engine.model = record
    engine.start()
    futs = [engine.submit(torch.randn(1, 3, 32, 32)) for _ in range(32)]
    for f in futs:
        f.result(60)
    engine.stop()
    assert torch.cuda.default_stream().cuda_stream not in streams
    assert 1 <= len(streams) <= 2


def test_a_compiled_model_meets_no_new_shape_after_warmup(tmp_path: Path) -> None:
    """Dynamo's own guards decide: after warm-up, other batch sizes and small or odd images add no graph.

    (The eager backend: the same tracing and guards as UNETSEG_COMPILE, without generating code.)
    """
    from torch._dynamo.utils import counters

    folder, _, _ = write_tiny_bundle(tmp_path / "t", channels=1, sizing="tile", size=32)
    engine = ModelEngine(load_bundle(folder), torch.device("cpu"), torch.float32, max_batch=8)
    engine.model = torch.compile(engine.model, backend="eager")
    engine.compiled = True
    torch._dynamo.reset()
    counters.clear()
    engine.warmup()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    engine.start()
    try:
        for n in (3, 5, 7, 2, 8, 1):
            engine.submit(torch.zeros(n, 1, 32, 32)).result(60)
        for size in [(10, 10), (50, 70), (1, 300)]:
            engine.submit_work(make_work(engine, np.zeros(size, np.uint8), None)).result(60)
    finally:
        engine.stop()
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == graphs


def test_streams_default_to_one_per_torch_thread_on_the_cpu_and_one_elsewhere() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert resolve_streams(0, torch.device("cpu")) == 3
        assert resolve_streams(0, torch.device("cpu"), cores=5) == 5  # a share of a cluster's cores
        assert resolve_streams(0, torch.device("cpu"), cores=64) == 8  # each stream holds a batch's activations
        assert resolve_streams(0, torch.device("cuda")) == 1
        assert resolve_streams(2, torch.device("cpu")) == 2  # the setting, when given, on either
        assert resolve_streams(4, torch.device("cuda")) == 4
    finally:
        torch.set_num_threads(before)


def count_after_another_thread_sets_one(setter: Callable[[int], None]) -> int:
    """A thread sets 2 with ``setter``; another thread then sets 1; the first reads its count."""
    set_two, set_one = threading.Event(), threading.Event()
    seen: list[int] = []

    def worker() -> None:
        setter(2)
        set_two.set()
        set_one.wait(10)
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=worker)
    t.start()
    assert set_two.wait(10)
    other = threading.Thread(target=torch.set_num_threads, args=(1,))
    other.start()
    other.join()
    set_one.set()
    t.join()
    return seen[0]


def test_a_thread_keeps_the_torch_thread_count_it_sets() -> None:
    """torch's first read of a thread's count takes the last count any thread set: set_own_threads survives
    another thread setting one after it (torch.set_num_threads alone does not)."""
    before = torch.get_num_threads()
    try:
        assert count_after_another_thread_sets_one(torch.set_num_threads) == 1
        assert count_after_another_thread_sets_one(set_own_threads) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("env", "spin"),
    [({}, "10000"), ({"OMP_WAIT_POLICY": "PASSIVE"}, None), ({"GOMP_SPINCOUNT": "0"}, "0")],
)
def test_serve_sets_a_short_openmp_spin_unless_the_environment_chose_one(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], spin: str | None
) -> None:
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # set first, so that the test's own setting is undone too
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    omp_wait_defaults()
    assert os.environ.get("GOMP_SPINCOUNT") == spin
