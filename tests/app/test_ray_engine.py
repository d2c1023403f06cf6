"""A Ray front end's view of several engine replicas: one status from each, merged into what /readyz and
/metrics report."""

from __future__ import annotations

import os
from typing import Any

import pytest

if os.environ.get("CI") == "true":
    import ray  # noqa: F401  (CI installs the ray extra: without it these tests must fail, not skip)
else:
    pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")

from app.ray.frontend import RayEngine
from tests.helpers import tiny_card

pytestmark = pytest.mark.ray


def status(
    replica: str, ready: bool, depth: int, batches: dict[str, int], failure: str | None = None
) -> dict[str, Any]:
    return {
        "replica": replica,
        "ready": ready,
        "failure": failure,
        "models": {
            "tiny": {
                "queue_depth": depth,
                "rejected": 1,
                "load_s": 0.5 if replica == "a" else 0.7,
                "graph": "eager",
                "max_batch": 8,
                "batches": batches,
            }
        },
        "gpu": {"cuda:0": [10, 20]},
    }


def engine() -> tuple[RayEngine, list[str]]:
    view = RayEngine(handle=None)  # type: ignore[arg-type]  (the merge never calls it)
    card = tiny_card()
    view._hello(
        {
            "default_model": card.name,
            "models": [
                {"card": card.to_dict(), "device": "cuda:0", "precision": "bfloat16", "graph": "eager", "max_batch": 8}
            ],
        }
    )
    calls: list[str] = []
    view._on_ready = lambda: calls.append("ready")
    return view, calls


def test_the_replicas_statuses_add_up_and_one_ready_replica_makes_the_front_end_ready() -> None:
    view, calls = engine()
    view._merge([status("a", True, 3, {"1": 2, "8": 5}), status("b", False, 4, {"8": 1}, "loading")])
    m = view.get(None)
    assert (m.queue_depth, m.rejected, m.load_s) == (7, 2, 0.7)
    assert m.batch_counts() == {1: 2, 8: 6}
    assert view.failure() is None and calls == ["ready"]
    assert view.gpu_memory() == {"a/cuda:0": (10, 20), "b/cuda:0": (10, 20)}
    view._merge([status("a", True, 0, {"1": 2, "8": 5})])  # one replica: its devices keep their names
    assert view.gpu_memory() == {"cuda:0": (10, 20)}
    assert calls == ["ready"]  # once


def test_no_answer_and_no_ready_replica_are_failures_with_a_reason() -> None:
    view, calls = engine()
    view._merge([status("a", False, 0, {})])
    assert view.failure() is None and calls == []  # still loading the first time: /readyz says so
    view._merge([status("a", True, 0, {})])
    view._merge([])
    assert view.failure() == RayEngine.NOT_ANSWERING
    view._merge([status("a", False, 0, {}, "warm-up failed: boom")])
    assert view.failure() == "warm-up failed: boom"
