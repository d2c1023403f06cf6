"""A model on its device: the engine's only torch code besides the device choice (``device``) and the frozen
graph (``graph``).

What crosses to the device and back is small and typed. In: a batch of (C, h, w) uint8 inputs, stacked
into a pinned staging buffer on CUDA and copied asynchronously on the worker's stream. On the device: the
conversion to float and the normalisation (``model.inference.normalize``), the forward pass (eager, a
frozen TorchScript graph, ``torch.compile``, or CUDA graphs replayed per batch size), and the
post-processing each request's ``Work`` queues in ``put`` (upsampling and the class map, or blending
tiles). Out: (H, W) uint8 masks, copied when the request's answer is encoded.

On the CPU the same code runs with the same arithmetic as ``model.inference`` (masks byte for byte those of
the offline pipeline).

``measure_batch_limit`` times forward passes at batch 1, 2, 4, ... at warm-up and keeps the largest batch
that still gives more images per second, so a model that slows down per image in large batches (a wide
model on a small CPU) is never fed them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from app.engine.device import input_shapes, new_stream, on_stream
from app.engine.graph import script_graph, wants_script
from model.bundle import Bundle
from model.inference import normalize, statistics

log = logging.getLogger("unetseg.engine")

# Batch sizes tried when the limit is measured, and the most it may reach per device type.
MEASURE_CAP = {"cuda": 64, "cpu": 16}
# The limit is the smallest batch that reaches this share of the best throughput measured.
MEASURE_SHARE = 0.95
# Each batch size is timed at least this many times and for at least this long (the best time counts).
MEASURE_REPEATS = 3
MEASURE_SECONDS = 0.2


class DeviceTimer:
    """Seconds between marks, as the device counts them: CUDA events on a GPU (device time, no host
    waits in between), the host's clock elsewhere. ``seconds()`` waits for the last mark."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """The time between each pair of consecutive marks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


class Staging:
    """A pinned host buffer per worker that uint8 batches are stacked into before their copy to the GPU
    (a copy from pageable memory would be synchronous). Reused batch after batch: the worker waits for its
    batch's work on the device before the next one is stacked."""

    def __init__(self, shape: tuple[int, int, int], max_batch: int) -> None:
        self.buffer = torch.empty((max_batch, *shape), dtype=torch.uint8).pin_memory()

    def stack(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(items) > self.buffer.shape[0]:
            self.buffer = torch.empty((len(items), *self.buffer.shape[1:]), dtype=torch.uint8).pin_memory()
        out = self.buffer[: len(items)]
        torch.stack(list(items), out=out)
        return out


class Runner:
    """One model moved to ``device`` in ``dtype``, and how its forward passes run."""

    def __init__(
        self, bundle: Bundle, device: torch.device, dtype: torch.dtype, compile: bool = False, graph: str = "auto"
    ) -> None:
        self.card = bundle.card
        self.name = bundle.card.name
        self.device = device
        self.dtype = dtype
        self.compiled = compile
        self.channels_last = device.type == "cuda" or dtype != torch.float32
        model = bundle.model.to(device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if compile else model
        self._module = model
        self._script = wants_script(graph, device, compile)
        # How the forward pass runs: "eager" (PyTorch modules), "compiled" (torch.compile) or "script" (a
        # frozen TorchScript graph, made by ``prepare``; see app.engine.graph).
        self.graph = "compiled" if compile else "eager"
        self.mean, self.std = statistics(self.card.input, device)
        self.cuda = device.type == "cuda"

    def prepare(self) -> None:
        """Trace the model into a frozen graph where that is asked for (``graph``; once, before serving).

        Not when ``model`` was replaced (a test's wrapper) or the policy has several input shapes.
        """
        shapes = input_shapes(self.card.input)
        if not self._script or self.model is not self._module or len(shapes) != 1:
            return
        example = torch.zeros(1, *shapes[0]).to(self.device)
        if self.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        traced = script_graph(self._module, example, self.dtype, self.name)
        if traced is not None:
            self.model = traced
            self.graph = "script"

    def new_stream(self) -> torch.cuda.Stream | None:
        """A CUDA stream of its own for one worker (so that workers overlap), None off CUDA."""
        return new_stream(self.device)

    def staging(self, max_batch: int) -> Staging | None:
        if not self.cuda:
            return None
        return Staging(input_shapes(self.card.input)[0], max_batch)

    def to_device(
        self, items: Sequence[torch.Tensor], valid: Sequence[tuple[int, int] | None], staging: Staging | None = None
    ) -> torch.Tensor:
        """Stack (C, h, w) inputs and make the (B, C, h, w) float32 model input on the device: uint8 ones are
        copied as uint8 and normalised there (padding set to the mean), float ones taken as normalised."""
        if items[0].dtype != torch.uint8:
            return torch.stack(list(items)).to(self.device, non_blocking=True)
        batch = staging.stack(items) if staging is not None else torch.stack(list(items))
        x = batch.to(self.device, non_blocking=True)
        pads = None if all(v is None for v in valid) else [v or tuple(x.shape[-2:]) for v in valid]
        return normalize(x, self.mean, self.std, pads)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, dynamic: bool = False, cache: bool = True) -> torch.Tensor:
        """(B, C, h, w) float32 on the device -> (B, K, h, w) float32 logits on the device (queued on the
        current stream: nothing waits for them here). ``cache=False`` for a CUDA graph's capture (autocast's
        weight cache would hold tensors made outside the graph)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if dynamic and self.compiled:
            torch._dynamo.mark_dynamic(x, 0)  # one graph for every batch size above 1
        autocast = torch.autocast(
            self.device.type, self.dtype, enabled=self.dtype != torch.float32, cache_enabled=cache
        )
        with torch.inference_mode(), autocast:
            y = self.model(x)
        return y.float()

    def warmup(self, batches: Sequence[int]) -> None:
        """Run every input shape the policy can produce at each of ``batches``."""
        for c, h, w in input_shapes(self.card.input):
            for n in batches:
                self.forward(torch.zeros(n, c, h, w, device=self.device), dynamic=n > 1)
        self.synchronize_device()

    def synchronize_device(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def rate(self, batch: int) -> float:
        """Images per second of the forward pass at ``batch``: the best of at least ``MEASURE_REPEATS`` passes
        and ``MEASURE_SECONDS`` after one warm pass (the best, because other work on the machine only ever
        slows a pass down)."""
        c, h, w = input_shapes(self.card.input)[0]
        x = torch.zeros(batch, c, h, w, device=self.device)
        self.forward(x, dynamic=batch > 1)
        best, spent, runs = float("inf"), 0.0, 0
        while runs < MEASURE_REPEATS or spent < MEASURE_SECONDS:
            timer = DeviceTimer(self.device)
            timer.mark()
            self.forward(x, dynamic=batch > 1)
            timer.mark()
            took = timer.seconds()[0]
            best, spent, runs = min(best, took), spent + took, runs + 1
        return batch / max(best, 1e-9)

    def measure_batch_limit(self, cap: int) -> tuple[int, dict[int, float]]:
        """Time batches of 1, 2, 4, ... (at most ``cap``; stopping after two doublings in a row that add under 5%)
        and choose the smallest that reaches ``MEASURE_SHARE`` of the best images per second: throughput
        within a few percent of the most, at the lowest latency. Returns it and the rates (batch -> images/s)."""
        rates = {1: self.rate(1)}
        batch, flat = 1, 0
        while batch * 2 <= cap and flat < 2:
            batch *= 2
            rates[batch] = self.rate(batch)
            flat = flat + 1 if rates[batch] < 1.05 * max(r for b, r in rates.items() if b < batch) else 0
        top = max(rates.values())
        return min(b for b, r in rates.items() if r >= MEASURE_SHARE * top), rates


class CudaGraphs:
    """One worker's forward passes captured as CUDA graphs, one per batch size in ``sizes``, and replayed: a
    replay launches the whole forward pass (normalised input to logits) at once, without a return to Python
    or a kernel launch per layer. A batch runs in the smallest captured size that holds it, the rest of the
    static input zeroed. The outputs are views of the graph's static memory: read them (queue work on the
    same stream) before the next replay.

    Each graph is checked against the model at capture (class maps on random inputs); a capture that fails
    or disagrees leaves the worker on plain forward passes, logged.
    """

    def __init__(self, runner: Runner, sizes: Sequence[int], stream: torch.cuda.Stream) -> None:
        c, h, w = input_shapes(runner.card.input)[0]
        self.runner = runner
        self.sizes = sorted(sizes)
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, Any] = {}
        pool = torch.cuda.graph_pool_handle()
        gen = torch.Generator(device="cpu").manual_seed(0)
        with on_stream(stream):
            for n in reversed(self.sizes):  # the largest first: the smaller ones reuse its memory pool
                x = torch.zeros(n, c, h, w, device=runner.device)
                for _ in range(2):  # warm-up on the capture stream (cuDNN picks its algorithms here)
                    runner.forward(x, cache=False)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    y = runner.forward(x, cache=False)
                probe = torch.randn((n, c, h, w), generator=gen).to(runner.device)
                x.copy_(probe)
                graph.replay()
                want = runner.forward(probe)
                agree = float((y.argmax(1) == want.argmax(1)).float().mean())
                if agree < 0.999 or not bool(torch.isfinite(y).all()):
                    raise RuntimeError(f"the graph of batch {n} agrees with the model on {agree:.4f} of pixels")
                self.inputs[n], self.outputs[n], self.graphs[n] = x, y, graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        n = next((s for s in self.sizes if s >= b), None)
        if n is None:
            return self.runner.forward(x)
        static = self.inputs[n]
        static[:b].copy_(x)
        if b < n:
            static[b:].zero_()
        self.graphs[n].replay()
        return self.outputs[n][:b]


def capture_graphs(runner: Runner, max_batch: int, stream: torch.cuda.Stream | None) -> CudaGraphs | None:
    """CUDA graphs for batch sizes 1, 2, 4, ... up to ``max_batch`` (and ``max_batch`` itself), or None (logged)
    where they do not apply (not CUDA, a compiled model) or the capture fails."""
    if stream is None or runner.compiled:
        return None
    sizes = sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | {max_batch})
    try:
        return CudaGraphs(runner, sizes, stream)
    except Exception as exc:  # noqa: BLE001 - any failure leaves plain forward passes in place
        log.warning("model %s runs without CUDA graphs: %s: %s", runner.name, type(exc).__name__, exc)
        return None
