"""Frozen TorchScript graphs: which models run as one, that they give the eager model's results, and that
anything the tracer cannot reproduce stays eager."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.engine import Engine, ModelEngine
from app.engine.graph import script_graph, wants_script
from app.main import create_app
from model.bundle import load_bundle
from tests.conftest import make_settings, wait_ready
from tests.helpers import write_tiny_bundle


def test_which_models_are_traced() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert wants_script("auto", cpu, compile=False)
    assert not wants_script("auto", cuda, compile=False)  # not measured on a GPU: eager there unless asked
    assert wants_script("script", cuda, compile=False)
    assert not wants_script("eager", cpu, compile=False)
    assert not wants_script("script", cpu, compile=True)  # torch.compile wins
    with pytest.raises(ValueError, match="graph mode"):
        wants_script("fast", cpu, compile=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizing", ["resize", "tile"])
def test_a_traced_engine_gives_the_eager_models_logits(tmp_path: Path, dtype: torch.dtype, sizing: str) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny", sizing=sizing)
    eager = load_bundle(folder).model.eval()  # a copy of its own
    eng = ModelEngine(load_bundle(folder), torch.device("cpu"), dtype, max_batch=4)
    assert eng.graph == "eager"
    eng.warmup()
    assert eng.graph == "script" and isinstance(eng.model, torch.jit.ScriptModule)
    eng.start()
    try:
        side = eng.card.input.size
        x = torch.randn(3, 3, side, side)
        got, _ = eng.submit(x).result(20)
        with torch.inference_mode(), torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            want = eager(x).float()
        tol = 1e-4 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    finally:
        eng.stop(20)


def test_graph_eager_leaves_the_modules(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny")
    eng = ModelEngine(load_bundle(folder), torch.device("cpu"), torch.float32, graph="eager")
    eng.warmup()
    assert eng.graph == "eager" and isinstance(eng.model, torch.nn.Module)


class BatchOfOne(torch.nn.Module):
    """Python control flow on the batch size: a trace made at batch 1 records the batch-1 branch only."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.inner(x)
        return y if x.shape[0] == 1 else -y


class Untraceable(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x}  # the tracer refuses dicts unless told to allow them


@pytest.mark.parametrize("model", [BatchOfOne, Untraceable])
def test_what_the_tracer_gets_wrong_stays_eager_and_is_logged(
    tmp_path: Path, model: type, caplog: pytest.LogCaptureFixture
) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny")
    inner = load_bundle(folder).model.eval()
    module = model(inner) if model is BatchOfOne else model()
    with caplog.at_level(logging.WARNING, logger="unetseg.engine"):
        assert script_graph(module, torch.zeros(1, 3, 16, 16), torch.float32, "odd") is None
    assert "model odd runs eagerly" in caplog.text


def test_the_service_lists_how_each_model_runs(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "weights" / "tiny")
    for graph, expected in [("auto", "script"), ("eager", "eager")]:
        with TestClient(create_app(make_settings(tmp_path, folder.parent, graph=graph))) as c:
            wait_ready(c)
            (tiny,) = c.get("/v1/models").json()["models"]
            assert tiny["graph"] == expected


def test_bulk_and_service_engines_trace_without_warm_up_too(tmp_path: Path) -> None:
    folder, _, _ = write_tiny_bundle(tmp_path / "tiny")
    engine = Engine([load_bundle(folder)], torch.device("cpu"), precision="float32")
    engine.start(warmup=False)
    try:
        assert engine.get("tiny").graph == "script"
    finally:
        engine.stop()
