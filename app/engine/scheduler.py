"""One model's workers: admission, fair dynamic batching across jobs, cancellation and worker health.

A job is one request's inputs (``Work``): one resized image, or the tiles of a large image, made as they
are batched. Each batch is formed when a worker is free:

- **No batching tax.** A worker takes what is waiting at once. It waits only when requests have lately
  been arriving faster than ``max_wait`` apart, and then only until the oldest waiting one has waited
  ``max_wait`` or none came for twice the usual gap: a lone request starts immediately, and a busy model
  batches what queued while it ran.
- **Fair.** A job that has not started yet goes first (oldest first), then jobs by when they were last
  served; the batch takes inputs round-robin from every job of the same input shape. A small request
  behind any number of large tiled jobs is in the next batch. A started job passed over for two batches
  in a row goes before new ones, so a stream of small requests cannot starve a large one.
- **Dead jobs go at once.** A job whose future is cancelled (its request timed out or the client went
  away) or that failed leaves the queue at that moment, frees its slot, and its remaining inputs are
  never made or run.
- **Failures stay local.** A batch that fails is retried input by input, so a failing input fails only
  its own request (500). An exception anywhere else in a worker fails the jobs of the batch it was
  forming or running and the worker carries on; a worker that ends anyway (a ``BaseException``) fails
  every job and marks the model unhealthy, which ``/readyz`` reports.
- **Wide when alone, narrow under load (CPU, several streams).** Each worker's forward passes run on its
  share of torch's threads, so that under load the streams do not wait for each other, and what waits is
  split between the idle workers (7 inputs, 2 idle workers: batches of 4 and 3). But a batch that takes
  everything waiting while no other worker is busy runs on all the threads (a lone request is not slowed
  by the split), and no other batch starts until it is done (what arrives meanwhile is batched).
- ``stop()`` refuses new jobs and finishes every job already queued before the workers exit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.engine.device import input_shapes, new_stream, on_stream, stream_threads, warmup_batches
from app.engine.graph import script_graph, wants_script
from app.engine.work import TensorWork, Work
from app.errors import InferenceFailed, NotReady, Overloaded
from model.bundle import Bundle

log = logging.getLogger("unetseg.engine")


@dataclass
class Timing:
    queue_s: float = 0.0
    model_s: float = 0.0


@dataclass(eq=False)  # identity comparison: jobs hold tensors
class Job:
    work: Work
    future: concurrent.futures.Future[Timing]
    enqueued: float
    scheduled: int = 0  # inputs handed to a batch
    done: int = 0  # inputs whose logits are in
    started: float | None = None
    last_served: float = 0.0
    passed_over: int = 0  # batches in a row this job had inputs left but got none
    model_s: float = 0.0
    finished: bool = False  # delivered, failed or cancelled: never touched again

    @property
    def size(self) -> int:
        return self.work.size

    @property
    def remaining(self) -> int:
        return self.work.size - self.scheduled


@dataclass
class EngineStats:
    batches: int = 0
    items: int = 0
    rejected: int = 0
    failed: int = 0
    worker_errors: int = 0  # exceptions outside a forward pass, survived


Batch = list[tuple[Job, int]]


class ModelEngine:
    def __init__(
        self,
        bundle: Bundle,
        device: torch.device,
        dtype: torch.dtype,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        queue_size: int = 64,
        compile: bool = False,
        streams: int = 1,
        graph: str = "auto",
    ) -> None:
        if streams < 1:
            raise ValueError("streams must be at least 1")
        self.card = bundle.card
        self.name = bundle.card.name
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.compiled = compile
        self.channels_last = device.type == "cuda" or dtype != torch.float32
        t0 = time.perf_counter()
        model = bundle.model.to(device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if compile else model
        self._module = model
        self._script = wants_script(graph, device, compile)
        # How the forward pass runs: "eager" (PyTorch modules), "compiled" (torch.compile) or "script" (a
        # frozen TorchScript graph, made at warm-up; see app.engine.graph).
        self.graph = "compiled" if compile else "eager"
        self.to_device_s = time.perf_counter() - t0
        self._jobs: list[Job] = []  # admitted and not finished, in arrival order
        self._cond = threading.Condition()
        self._closed = False
        self._arrival_gap = float("inf")  # moving average of the time between submissions
        self._last_arrival = 0.0
        self.item_s = 0.0  # moving average of the model time per input, for Retry-After
        self.failure: str | None = None  # why a worker ended, when one did
        self.streams = streams
        # On the CPU several streams share the cores: each worker runs its forward passes on its share.
        self.threads_per_stream = stream_threads(streams, device.type)
        self.threads_wide = torch.get_num_threads() if self.threads_per_stream else 0
        self._busy = 0  # workers running a batch
        self._wide = False  # one of them runs on every thread: the others wait for it
        self._threads = [
            threading.Thread(target=self._run_stream, name=f"engine-{self.name}-{i}", daemon=True)
            for i in range(streams)
        ]
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()
        self.on_batch: Callable[[str, int], None] | None = None  # (model, batch size), for metrics
        self.load_s = bundle.load_s + self.to_device_s  # read, moved to the device and (later) warmed up

    # --- public API ------------------------------------------------------------------------------

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def warmup(self) -> None:
        """``prepare``, then run every input shape the policy can produce at batch 1 and a full batch, before
        reporting ready."""
        t0 = time.perf_counter()
        self.prepare()
        for c, h, w in input_shapes(self.card.input):
            for n in warmup_batches(self.max_batch):
                self._forward(torch.zeros(n, c, h, w), dynamic=n > 1)
        self.load_s += time.perf_counter() - t0

    def prepare(self) -> None:
        """Trace the model into a frozen graph where that is asked for (``graph``; once, before ``start``).

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

    @property
    def queue_depth(self) -> int:
        """Jobs admitted whose first input has not reached the model yet."""
        with self._cond:
            return sum(1 for j in self._jobs if j.started is None)

    @property
    def in_flight(self) -> int:
        """Jobs admitted and not finished (waiting or partly run)."""
        with self._cond:
            return len(self._jobs)

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def pending_s(self) -> float:
        """A guess at the seconds until what is admitted now has run (for Retry-After)."""
        with self._cond:
            items = sum(j.remaining for j in self._jobs)
        return items * self.item_s / self.streams

    def submit(self, inputs: torch.Tensor) -> concurrent.futures.Future[tuple[torch.Tensor, Timing]]:
        """Queue (N, C, h, w) inputs; the future gives (logits (N, K, h, w) float32 CPU, timing)."""
        work = TensorWork(inputs)
        result: concurrent.futures.Future[tuple[torch.Tensor, Timing]] = concurrent.futures.Future()
        inner = self.submit_work(work)

        def relay(f: concurrent.futures.Future[Timing]) -> None:
            if f.cancelled():
                result.cancel()
            elif (exc := f.exception()) is not None:
                result.set_exception(exc)
            else:
                assert work.outputs is not None
                result.set_result((work.outputs, f.result()))

        def cancel_inner(f: concurrent.futures.Future[tuple[torch.Tensor, Timing]]) -> None:
            if f.cancelled():
                inner.cancel()

        result.add_done_callback(cancel_inner)
        inner.add_done_callback(relay)
        return result

    def submit_work(self, work: Work) -> concurrent.futures.Future[Timing]:
        """Queue a job; its future gives its timing once every input's logits went to ``work.put``.

        Cancelling the future drops the job at once: its slot is free and its remaining inputs never run.
        """
        if self._closed:
            raise Overloaded("the service is shutting down", retry_after_s=5)
        if self.failure is not None:
            raise NotReady(f"model {self.name!r} is not serving: {self.failure}")
        fut: concurrent.futures.Future[Timing] = concurrent.futures.Future()
        now = time.perf_counter()
        job = Job(work, fut, now, last_served=now)
        with self._cond:
            if sum(1 for j in self._jobs if j.started is None) >= self.queue_size:
                self.stats.rejected += 1
                raise Overloaded(f"model {self.name!r} has {self.queue_size} requests waiting; retry shortly")
            if self._last_arrival:
                self._arrival_gap = min(self._arrival_gap, 1.0) * 0.8 + (now - self._last_arrival) * 0.2
            self._last_arrival = now
            self._jobs.append(job)
            self._cond.notify()
        fut.add_done_callback(lambda f: self._drop(job) if f.cancelled() else None)
        return fut

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is queued, and end the workers."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    # --- bookkeeping -----------------------------------------------------------------------------

    def _drop(self, job: Job) -> None:
        """Take a job out of the queue at once (cancelled, failed or done)."""
        with self._cond:
            job.finished = True
            with contextlib.suppress(ValueError):
                self._jobs.remove(job)
            self._cond.notify_all()

    def _fail(self, job: Job, exc: BaseException) -> None:
        with self._stats_lock:
            self.stats.failed += 1
        self._drop(job)
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
            job.future.set_exception(exc if isinstance(exc, InferenceFailed) else self._failed(exc))

    @staticmethod
    def _failed(exc: BaseException) -> InferenceFailed:
        return InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}")

    # --- scheduling ------------------------------------------------------------------------------

    def _next_batch(self) -> tuple[Batch, bool] | None:
        """Block until there is work; form a fair batch and say whether it runs wide (on every thread).

        None: stop (closed and nothing left). The caller reports the batch's end with ``_batch_done``.
        """
        with self._cond:
            while True:
                ready = [j for j in self._jobs if j.remaining > 0]
                if self._wide:  # a batch runs on every thread: what comes meanwhile waits for it
                    self._cond.wait(0.5)
                    continue
                if not ready:
                    if self._closed and not self._jobs:
                        return None
                    self._cond.wait(0.5 if self._closed else None)
                    continue
                waiting = sum(j.remaining for j in ready)
                gap = self._arrival_gap
                if not self._closed and waiting < self.max_batch and gap < self.max_wait_s:
                    # Requests are arriving faster than max_wait: wait for the next ones, until the oldest
                    # has waited max_wait or none came for twice the usual gap (the burst is over).
                    until = min(min(j.enqueued for j in ready) + self.max_wait_s, self._last_arrival + 2 * gap)
                    left = until - time.perf_counter()
                    if left > 0:
                        self._cond.wait(left)
                        continue  # look again: more may have come, or the wait is over
                limit = self.max_batch
                if self.threads_wide:  # split what waits between the idle workers; alone, run it wide
                    limit = min(limit, -(-waiting // (self.streams - self._busy)))
                batch = self._form_batch(ready, limit)
                wide = bool(self.threads_wide) and self._busy == 0 and len(batch) == waiting
                self._busy += 1
                self._wide = wide
                return batch, wide

    def _batch_done(self, wide: bool) -> None:
        with self._cond:
            self._busy -= 1
            if wide:
                self._wide = False
            self._cond.notify_all()

    def _form_batch(self, ready: list[Job], limit: int) -> Batch:
        """(Called under the lock.) Choose the batch's shape by priority, then fill it round-robin."""

        def priority(j: Job) -> tuple[int, float]:
            if j.started is not None and j.passed_over >= 2:
                return (0, j.last_served)
            return (1, j.enqueued) if j.started is None else (2, j.last_served)

        ready.sort(key=priority)
        shape = ready[0].work.shape
        members = [j for j in ready if j.work.shape == shape]
        batch: Batch = []
        while len(batch) < limit:
            progressed = False
            for job in members:
                if job.remaining > 0 and len(batch) < limit:
                    batch.append((job, job.scheduled))
                    job.scheduled += 1
                    progressed = True
            if not progressed:
                break
        now = time.perf_counter()
        served = {id(j) for j, _ in batch}
        for job in ready:
            if id(job) in served:
                job.passed_over = 0
                job.last_served = now
                if job.started is None:
                    job.started = now
            elif job.started is not None:
                job.passed_over += 1
        return batch

    # --- worker ----------------------------------------------------------------------------------

    def _forward(self, x: torch.Tensor, dynamic: bool = False, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """(B, C, h, w) CPU float32 -> (B, K, h, w) CPU float32, on ``stream`` when given (CUDA)."""
        with on_stream(stream):
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if dynamic and self.compiled:
                torch._dynamo.mark_dynamic(x, 0)  # one graph for every batch size above 1
            with (
                torch.inference_mode(),
                torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32),
            ):
                y = self.model(x)
            return y.float().cpu()  # waits for the stream's work

    def _run_stream(self) -> None:
        # torch.set_num_threads sets the calling thread's OpenMP team size: each worker sets its own.
        threads = self.threads_per_stream
        if threads:
            torch.set_num_threads(threads)
        stream = new_stream(self.device)
        try:
            while True:
                batch: Batch = []
                try:
                    got = self._next_batch()
                    if got is None:
                        return
                    batch, wide = got
                    try:
                        want = self.threads_wide if wide else self.threads_per_stream
                        if want and want != threads:
                            torch.set_num_threads(want)
                            threads = want
                        self._run_batch(batch, stream)
                    finally:
                        self._batch_done(wide)
                except Exception as exc:  # a worker outlives any one batch: fail its jobs and carry on
                    log.exception("engine worker of model %s failed outside a forward pass", self.name)
                    with self._stats_lock:
                        self.stats.worker_errors += 1
                    for job in {id(j): j for j, _ in batch}.values():
                        self._fail(job, exc)
        except BaseException as exc:  # noqa: BLE001 - the worker is gone: say why on /readyz
            self.failure = f"a worker of model {self.name!r} stopped: {type(exc).__name__}: {exc}"
            log.critical("%s", self.failure)
            with self._cond:
                jobs = list(self._jobs)
            for job in jobs:
                self._fail(job, InferenceFailed(self.failure))
            # The thread ends here, reported on /readyz; re-raising would only print the traceback again.

    def _run_batch(self, batch: Batch, stream: torch.cuda.Stream | None) -> None:
        batch = [(j, i) for j, i in batch if not j.finished]
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            x = torch.stack([job.work.item(i) for job, i in batch])
            out = self._forward(x, stream=stream)
        except Exception:
            log.exception("batch of %d failed on model %s; retrying its items one by one", len(batch), self.name)
            for job, i in batch:
                if job.finished:
                    continue
                t1 = time.perf_counter()
                try:
                    y = self._forward(job.work.item(i)[None], stream=stream)[0]
                except Exception as exc:  # noqa: BLE001 - reported to that request only
                    self._fail(job, exc)
                    continue
                with self._cond:
                    job.model_s += time.perf_counter() - t1
                self._deliver(job, i, y)
            return
        elapsed = time.perf_counter() - t0
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.items += len(batch)
            per_item = elapsed / len(batch)
            self.item_s = per_item if not self.item_s else 0.9 * self.item_s + 0.1 * per_item
        if self.on_batch:
            self.on_batch(self.name, len(batch))
        with self._cond:
            for job in {id(j): j for j, _ in batch}.values():
                job.model_s += elapsed
        for (job, i), y in zip(batch, out, strict=True):
            self._deliver(job, i, y)

    def _deliver(self, job: Job, index: int, logits: torch.Tensor) -> None:
        if job.finished:
            return
        job.work.put(index, logits)
        with self._cond:
            job.done += 1
            complete = job.done == job.size
        if complete:
            self._drop(job)
            assert job.started is not None
            timing = Timing(queue_s=job.started - job.enqueued, model_s=job.model_s)
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
                job.future.set_result(timing)
