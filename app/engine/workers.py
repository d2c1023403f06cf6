"""One model's worker threads: they take batches from its ``BatchQueue``, run them on its ``Runner``, deliver
each input's logits to its request's ``Work``, and keep failures local.

- **Failures stay local.** A batch that fails is retried input by input, so a failing input fails only its
  own request (500). An exception anywhere else in a worker fails the jobs of the batch it was forming or
  running and the worker carries on; a worker that ends anyway (a ``BaseException``) fails every job and
  marks the model unhealthy, which ``/readyz`` reports.
- **A batch is over before its requests hear of it**: the worker reports the batch finished to the queue
  first, then resolves the futures, so a request that follows finds the worker free.
- **Threads on the CPU.** With several workers each forward pass runs on its share of torch's threads,
  except a *wide* batch (``batching``), which runs on all of them.
- ``stop()`` refuses new jobs and finishes every job already queued before the workers exit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable

import torch

from app.engine.batching import Batch, BatchQueue, Formed, Job, Timing, Work
from app.engine.device import on_stream, set_own_threads, stream_threads, warmup_batches
from app.engine.runner import MEASURE_CAP, CudaGraphs, DeviceTimer, Runner, Staging, capture_graphs
from app.engine.work import TensorWork
from app.errors import InferenceFailed, NotReady, Overloaded
from model.bundle import Bundle

# One worker on a CPU runs its forward passes on one thread only where that makes them this many times as fast
# as on every thread (a model so small that waking the other threads costs more than they do). A margin well
# above the timing's noise: polyp's timings on a 2-core VM went either way by 10-30% (20.9 / 15.4, 11.7 / 13.2
# images/s), and one thread where two gain leaves a core idle under load (c8 fell below c1).
NARROW_GAIN = 1.5
# With several workers (one per thread) the cores are busy under load either way: a lone request runs on every
# thread only where that makes it this many times as fast, since their OpenMP team spins while it waits and
# costs CPU. A near-free model ran as fast on one thread as on two (1,411 / 1,418 images/s) for twice the CPU;
# polyp 3.0.0 in bfloat16 1.15-1.36 times as fast on two.
WIDE_GAIN = 1.1

log = logging.getLogger("unetseg.engine")


class EngineStats:
    def __init__(self) -> None:
        self.batches = 0
        self.items = 0
        self.failed = 0
        self.worker_errors = 0  # exceptions outside a forward pass, survived
        self.rejected = 0


class ModelEngine:
    """One model: its runner, its queue of jobs and the worker threads ("streams") that serve it.

    ``max_batch`` 0: measured at warm-up (``Runner.measure_batch_limit``, up to 64 inputs on a GPU, 16 on a
    CPU; 8 when there is no warm-up).
    """

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
        cuda_graphs: bool = True,
    ) -> None:
        if streams < 1:
            raise ValueError("streams must be at least 1")
        t0 = time.perf_counter()
        self.runner = Runner(bundle, device, dtype, compile, graph)
        self.card = bundle.card
        self.name = bundle.card.name
        self.device = device
        self.dtype = dtype
        self.streams = streams
        self.measure = max_batch == 0
        self.batch_rates: dict[int, float] = {}  # measured images/s per batch size, when measured
        self.use_cuda_graphs = cuda_graphs
        # On the CPU several streams share the cores: each worker runs its forward passes on its share.
        self.threads_per_stream = stream_threads(streams, device.type)
        # Every torch thread of the process, read now: a thread that starts later gets the count last set by
        # any thread (the I/O threads set theirs to 1), so each worker sets its own (``_run_stream``).
        self.threads_all = torch.get_num_threads()
        self.threads_wide = self.threads_all if self.threads_per_stream else 0
        self.queue = BatchQueue(max_batch or 8, max_wait_s, queue_size, streams, split=bool(self.threads_wide))
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self.item_s = 0.0  # moving average of the model time per input, for Retry-After
        self.failure: str | None = None  # why a worker ended, when one did
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()
        self._batches: dict[int, int] = {}  # forward passes by batch size, for metrics
        # Called after each forward pass with (model, batch size), from the worker thread: an observer's hook
        # (tracing, profiling). What it raises fails that batch's requests; the worker carries on.
        self.on_batch: Callable[[str, int], None] | None = None
        self.load_s = bundle.load_s + time.perf_counter() - t0  # read, moved to the device, (later) warmed up

    # --- what the runner decides, seen from here -------------------------------------------------

    @property
    def model(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward pass (tests wrap it to watch batches)."""
        return self.runner.model

    @model.setter
    def model(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.runner.model = fn

    @property
    def graph(self) -> str:
        return self.runner.graph

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def rejected(self) -> int:
        return self.stats.rejected

    def batch_counts(self) -> dict[int, int]:
        """Forward passes so far, by batch size."""
        with self._stats_lock:
            return dict(self._batches)

    @property
    def compiled(self) -> bool:
        return self.runner.compiled

    @compiled.setter
    def compiled(self, value: bool) -> None:
        self.runner.compiled = value

    @property
    def channels_last(self) -> bool:
        return self.runner.channels_last

    # --- life cycle ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """The frozen graph where asked for (once, before ``start``)."""
        self.runner.prepare()

    def warmup(self) -> None:
        """``prepare``; on the CPU, whether the model's forward pass gains from every core
        (``choose_threads``); measure the batch limit when asked to; run every input shape at batch 1 and a
        full batch, before reporting ready."""
        t0 = time.perf_counter()
        self.prepare()
        self.choose_threads()
        threads = torch.get_num_threads()
        if self.threads_per_stream:  # measured as the workers will run it
            torch.set_num_threads(self.threads_per_stream)
        try:
            if self.measure:
                self.max_batch, self.batch_rates = self.runner.measure_batch_limit(MEASURE_CAP[self.device.type])
                rates = ", ".join(f"{b}: {r:.1f}" for b, r in self.batch_rates.items())
                log.info("model %s: batches of up to %d (images/s by batch size: %s)", self.name, self.max_batch, rates)
            self.runner.warmup(warmup_batches(self.max_batch))
        finally:
            torch.set_num_threads(threads)
        self.load_s += time.perf_counter() - t0

    def choose_threads(self) -> None:
        """On the CPU, whether a lone forward pass runs on every torch thread or on one worker's share of them
        (one thread for a single worker). A small model can lose on every thread: waking the others for each of
        its many small operations costs about what they save. Timed at batch 1 both ways, twice, alternating
        (the best of each counts); one worker keeps every thread unless its share is ``NARROW_GAIN`` times as
        fast, several run a lone request wide only where that is ``WIDE_GAIN`` times as fast."""
        wide = torch.get_num_threads()
        narrow = self.threads_per_stream or 1
        if self.device.type != "cpu" or wide <= narrow:
            return
        rates = {wide: 0.0, narrow: 0.0}
        try:
            for _ in range(2):
                for n in (wide, narrow):
                    torch.set_num_threads(n)
                    rates[n] = max(rates[n], self.runner.rate(1))
        finally:
            torch.set_num_threads(wide)
        gain = rates[wide] / rates[narrow]
        if gain < (1 / NARROW_GAIN if self.streams == 1 else WIDE_GAIN):
            self.threads_per_stream = narrow
            self.threads_wide = 0
            self.queue.split = False
        log.info(
            "model %s: %d stream(s) of %d thread(s)%s (images/s at batch 1: %.1f on %d threads, %.1f on %d)",
            self.name,
            self.streams,
            self.threads_per_stream or wide,
            ", a lone request on all" if self.threads_wide else "",
            rates[wide],
            wide,
            rates[narrow],
            narrow,
        )

    def start(self) -> None:
        """Give each worker its CUDA stream, pinned staging buffer and CUDA graphs (captured here, before the
        model is reported ready), and start them. The capture counts in ``load_s``."""
        t0 = time.perf_counter()
        for i in range(self.streams):
            stream = self.runner.new_stream()
            staging = self.runner.staging(self.max_batch)
            graphs = capture_graphs(self.runner, self.max_batch, stream) if self.use_cuda_graphs else None
            t = threading.Thread(
                target=self._run_stream, args=(stream, staging, graphs), name=f"engine-{self.name}-{i}", daemon=True
            )
            self._threads.append(t)
            t.start()
        self.load_s += time.perf_counter() - t0

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is queued, and end the workers."""
        with self._cond:
            if self.queue.closed:
                return
            self.queue.closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    # --- public API ------------------------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        """The most inputs a forward pass takes (the queue's limit; measured at warm-up when asked)."""
        return self.queue.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        self.queue.max_batch = value

    @property
    def max_wait_s(self) -> float:
        return self.queue.max_wait_s

    @property
    def queue_size(self) -> int:
        return self.queue.queue_size

    @property
    def queue_depth(self) -> int:
        """Jobs admitted whose first input has not reached the model yet."""
        with self._cond:
            return self.queue.waiting

    @property
    def in_flight(self) -> int:
        """Jobs admitted and not finished (waiting or partly run)."""
        with self._cond:
            return len(self.queue.jobs)

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def pending_s(self) -> float:
        """A guess at the seconds until what is admitted now has run (for Retry-After)."""
        with self._cond:
            items = self.queue.remaining
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

        inner_ref = weakref.ref(inner)  # inner's callback (relay) holds ``result``: no cycle back to it

        def cancel_inner(f: concurrent.futures.Future[tuple[torch.Tensor, Timing]]) -> None:
            pending = inner_ref()
            if pending is not None and f.cancelled():
                pending.cancel()

        result.add_done_callback(cancel_inner)
        inner.add_done_callback(relay)
        return result

    def submit_work(self, work: Work, background: bool = False) -> concurrent.futures.Future[Timing]:
        """Queue a job; its future gives its timing once every input's logits went to ``work.put``.

        Cancelling the future drops the job at once: its slot is free and its remaining inputs never run.
        ``background``: after every interactive request (an asynchronous job's work).
        """
        if self.failure is not None:
            raise NotReady(f"model {self.name!r} is not serving: {self.failure}")
        fut: concurrent.futures.Future[Timing] = concurrent.futures.Future()
        with self._cond:  # closed is read under the lock: a job admitted here is one stop() will drain
            job = Job(work, fut, self.queue.clock(), background=background)
            try:
                self.queue.admit(job)
            except Overloaded:
                self.stats.rejected = self.queue.rejected
                if self.queue.closed:
                    raise
                raise Overloaded(
                    f"model {self.name!r} has {self.queue.queue_size} requests waiting; retry shortly"
                ) from None
            self._cond.notify()
        # The callback holds the job weakly. ``job.future`` is this future, which keeps its callbacks once
        # done: a strong reference back would make a cycle that keeps the job's work (an image, a slide
        # region's accumulator) alive after the request lets go of it, until the cyclic GC's next full pass.
        job_ref = weakref.ref(job)

        def drop_if_cancelled(f: concurrent.futures.Future[Timing]) -> None:
            queued = job_ref()
            if queued is not None and f.cancelled():
                self._drop(queued)

        fut.add_done_callback(drop_if_cancelled)
        return fut

    # --- bookkeeping -----------------------------------------------------------------------------

    def _drop(self, job: Job) -> None:
        with self._cond:
            self.queue.drop(job)
            self._cond.notify_all()

    def _failed(self, exc: BaseException) -> InferenceFailed:
        if isinstance(exc, InferenceFailed):
            return exc
        return InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}")

    def _resolve(self, outcomes: list[tuple[Job, BaseException | None]]) -> None:
        """Resolve finished jobs' futures (after their batch was reported finished)."""
        for job, exc in outcomes:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
                if exc is None:
                    job.future.set_result(job.timing)
                else:
                    job.future.set_exception(self._failed(exc))

    def _fail_now(self, job: Job, exc: BaseException) -> None:
        with self._stats_lock:
            self.stats.failed += 1
        self._drop(job)
        self._resolve([(job, exc)])

    # --- worker ----------------------------------------------------------------------------------

    def _next_batch(self) -> Formed | None:
        with self._cond:
            while True:
                got = self.queue.next()
                if got is None or isinstance(got, Formed):
                    return got
                self._cond.wait(None if math.isinf(got) else got)

    def _batch_done(self, formed: Formed) -> None:
        with self._cond:
            self.queue.finished(formed)
            self._cond.notify_all()

    def _run_stream(self, stream: torch.cuda.Stream | None, staging: Staging | None, graphs: CudaGraphs | None) -> None:
        # Each worker sets its own thread count, always: left alone, it would take whatever another thread set
        # last (one, once the I/O threads start).
        threads = self.threads_per_stream or self.threads_all
        set_own_threads(threads)
        try:
            while True:
                formed: Formed | None = None
                try:
                    formed = self._next_batch()
                    if formed is None:
                        return
                    try:
                        want = self.threads_wide if formed.wide else self.threads_per_stream
                        if want and want != threads:
                            torch.set_num_threads(want)
                            threads = want
                        outcomes = self._run_batch(formed.items, stream, staging, graphs)
                    finally:
                        self._batch_done(formed)
                    self._resolve(outcomes)
                    del outcomes  # not kept while this worker waits: the jobs' work is theirs to free
                except Exception as exc:  # a worker outlives any one batch: fail its jobs and carry on
                    log.exception("engine worker of model %s failed outside a forward pass", self.name)
                    with self._stats_lock:
                        self.stats.worker_errors += 1
                    for job in {id(j): j for j, _ in (formed.items if formed else [])}.values():
                        self._fail_now(job, exc)
        except BaseException as exc:  # noqa: BLE001 - the worker is gone: say why on /readyz
            self.failure = f"a worker of model {self.name!r} stopped: {type(exc).__name__}: {exc}"
            log.critical("%s", self.failure)
            with self._cond:
                jobs = list(self.queue.jobs)
            for job in jobs:
                self._fail_now(job, InferenceFailed(self.failure))
            # The thread ends here, reported on /readyz; re-raising would only print the traceback again.

    def _forward(
        self,
        batch: Batch,
        stream: torch.cuda.Stream | None,
        staging: Staging | None,
        graphs: CudaGraphs | None,
    ) -> tuple[float, float]:
        """Run ``batch`` and hand each input's logits to its work: (model seconds, post-processing seconds)."""
        made = [job.work.item(i) for job, i in batch]
        timer = DeviceTimer(self.device)
        with on_stream(stream):
            timer.mark()
            x = self.runner.to_device([m[0] for m in made], [m[1] for m in made], staging)
            y = graphs.forward(x) if graphs is not None else self.runner.forward(x)
            timer.mark()
            for (job, i), logits in zip(batch, y, strict=True):
                if not job.finished:
                    job.work.put(i, logits)
            timer.mark()
        model_s, post_s = timer.seconds()  # waits for the stream: outputs are ready for any thread
        return model_s, post_s

    def _run_batch(
        self,
        batch: Batch,
        stream: torch.cuda.Stream | None,
        staging: Staging | None,
        graphs: CudaGraphs | None,
    ) -> list[tuple[Job, BaseException | None]]:
        """Run a batch (or, when it fails, each of its inputs alone); the jobs it completed or failed."""
        batch = [(j, i) for j, i in batch if not j.finished]
        if not batch:
            return []
        outcomes: list[tuple[Job, BaseException | None]] = []
        try:
            model_s, post_s = self._forward(batch, stream, staging, graphs)
        except Exception:
            log.exception("batch of %d failed on model %s; retrying its items one by one", len(batch), self.name)
            for job, i in batch:
                if job.finished:
                    continue
                try:
                    one_model, one_post = self._forward([(job, i)], stream, None, None)
                except Exception as exc:  # noqa: BLE001 - reported to that request only
                    with self._stats_lock:
                        self.stats.failed += 1
                    self._drop(job)
                    outcomes.append((job, exc))
                    continue
                outcomes += self._count(job, one_model, one_post)
            return outcomes
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.items += len(batch)
            per_item = model_s / len(batch)
            self.item_s = per_item if not self.item_s else 0.9 * self.item_s + 0.1 * per_item
            self._batches[len(batch)] = self._batches.get(len(batch), 0) + 1
        if self.on_batch:
            self.on_batch(self.name, len(batch))
        shares: dict[int, tuple[Job, int]] = {}
        for job, _ in batch:
            _, n = shares.get(id(job), (job, 0))
            shares[id(job)] = (job, n + 1)
        for job, n in shares.values():
            # A job's model time is every pass that carried its inputs; post-processing, its own share.
            outcomes += self._count(job, model_s, post_s * n / len(batch), n)
        return outcomes

    def _count(
        self, job: Job, model_s: float, post_s: float, inputs: int = 1
    ) -> list[tuple[Job, BaseException | None]]:
        """Add a pass's times and ``inputs`` delivered to ``job``; the job when that completes it."""
        with self._cond:
            if job.finished:
                return []
            job.timing.model_s += model_s
            job.timing.post_s += post_s
            job.done += inputs
            if job.done < job.size:
                return []
            assert job.started is not None
            job.timing.queue_s = job.started - job.enqueued
            self.queue.drop(job)
            self._cond.notify_all()
        return [(job, None)]
