"""The predict pipeline's stages on an in-process engine: what a request reserves, and where its answer is made."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import pipeline
from app.engine import Engine
from app.pipeline import Ask


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def engine(weights_dir: Path) -> Iterator[Engine]:
    eng = Engine.from_folder(weights_dir, torch.device("cpu"), max_batch=2)
    eng.start(warmup=False)
    yield eng
    eng.stop()


def test_a_json_answer_reserves_a_byte_per_pixel_more_than_a_mask(engine: Engine) -> None:
    """A JSON answer holds a run-length code of every class: its size counts in the memory budget from the
    start, so that many large JSON answers are refused (503) rather than built past the budget."""
    data = png_bytes(300, 200)
    held = {}
    for fmt in ("png", "json"):
        _, prepared = pipeline.decode_request(engine, Ask("tiny", fmt), data, 10**8)  # type: ignore[arg-type]
        held[fmt] = prepared.nbytes
        engine.release(prepared)
    assert held["json"] - held["png"] == 300 * 200
    assert engine.budget.held == 0


def test_the_answer_is_encoded_off_the_event_loop(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoding (a JSON of every class's runs, a PNG) runs in an I/O thread: the loop keeps answering others."""
    threads: list[str] = []
    encode = pipeline.encode_response

    def spy(*args: object) -> pipeline.Answer:
        threads.append(threading.current_thread().name)
        return encode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "encode_response", spy)

    async def main() -> tuple[pipeline.Answer, str]:
        answer = await pipeline.predict(engine, Ask("tiny", "json"), png_bytes(64, 48), 10**8)
        return answer, threading.current_thread().name

    answer, loop_thread = asyncio.run(main())
    assert answer.media_type == "application/json" and answer.width == 64
    assert threads and threads[0] != loop_thread
