"""Which inputs run together, and when: admission, fair dynamic batching across jobs, plain Python.

A job is one request's inputs (``Work``): one resized image, or the tiles of a large image, made as they
are batched. ``BatchQueue`` holds the jobs of one model and, asked by a free worker, either forms a batch,
says how long to wait before asking again, or says to stop. It knows no threads and no torch: the worker
module calls it under its lock, and tests drive it with a clock of their own.

- **No batching tax.** A worker takes what is waiting at once. It waits only when requests have lately
  been arriving faster than ``max_wait`` apart, and then only until the oldest waiting one has waited
  ``max_wait`` or none came for twice the usual gap: a lone request starts immediately, and a busy model
  batches what queued while it ran.
- **Fair.** A job that has not started yet goes first (oldest first), then jobs by when they were last
  served; the batch takes inputs round-robin from every job of the same input shape. A small request
  behind any number of large tiled jobs is in the next batch. A started job passed over for two batches
  in a row goes before new ones, so a stream of small requests cannot starve a large one.
- **Background jobs yield.** Work submitted as background (an asynchronous job's regions) goes after every
  interactive request under the same rules, and is never starved either (the two-batch rule).
- **Dead jobs go at once.** A job whose future is cancelled (its request timed out or the client went
  away) or that failed leaves the queue at that moment, frees its slot, and its remaining inputs are
  never made or run.
- **Wide when alone, narrow under load (CPU, several workers).** With ``split``, what waits is divided
  between the idle workers (7 inputs, 2 idle workers: batches of 4 and 3), but a batch that takes
  everything waiting while no other worker is busy runs *wide* (on every thread), and no other batch
  starts until it is done.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from app.errors import Overloaded
from app.inference import Timing

__all__ = ["Batch", "BatchQueue", "Formed", "Job", "Timing", "Work"]


class Work(Protocol):
    """What the engine runs for one request: ``size`` inputs of one shape, each made on demand."""

    size: int
    shape: tuple[int, int, int]  # (C, h, w) of every input

    def item(self, index: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Input ``index``: (C, h, w) uint8 on the CPU (or float32, already normalised), and the (height,
        width) of its real pixels when it is padded (None when all are)."""
        ...

    def put(self, index: int, logits: torch.Tensor) -> None:
        """Take the (K, h, w) float32 logits of input ``index``, on the model's device (called by the worker
        that ran it; each index once). Post-processing queued here runs on the device."""
        ...


@dataclass(eq=False)  # identity comparison: jobs hold tensors
class Job:
    work: Work
    future: concurrent.futures.Future[Timing]
    enqueued: float
    background: bool = False
    scheduled: int = 0  # inputs handed to a batch
    done: int = 0  # inputs whose logits are in
    started: float | None = None
    last_served: float = 0.0
    passed_over: int = 0  # batches in a row this job had inputs left but got none
    timing: Timing = field(default_factory=Timing)
    finished: bool = False  # delivered, failed or cancelled: never touched again

    @property
    def size(self) -> int:
        return self.work.size

    @property
    def remaining(self) -> int:
        return self.work.size - self.scheduled


Batch = list[tuple[Job, int]]


@dataclass
class Formed:
    """A batch to run now; ``wide``: on every thread, the other workers waiting for it."""

    items: Batch
    wide: bool


class BatchQueue:
    """One model's admitted jobs and the decisions of its workers. Not thread-safe: callers hold a lock.

    ``next()`` answers a free worker: a ``Formed`` batch, a number of seconds to wait before asking again
    (``math.inf``: until something changes), or None (closed and nothing left: stop). ``finished`` reports
    the end of a batch ``next`` formed.
    """

    def __init__(
        self,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        workers: int = 1,
        split: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.workers = workers
        self.split = split and workers > 1
        self.clock = clock
        self.jobs: list[Job] = []  # admitted and not finished, in arrival order
        self.closed = False
        self.busy = 0  # workers running a batch
        self.wide = False  # one of them runs on every thread: the others wait for it
        self.arrival_gap = math.inf  # moving average of the time between admissions
        self.last_arrival = 0.0
        self.rejected = 0

    @property
    def waiting(self) -> int:
        """Jobs admitted whose first input has not reached a batch yet."""
        return sum(1 for j in self.jobs if j.started is None)

    @property
    def remaining(self) -> int:
        """Inputs admitted and not yet in a batch."""
        return sum(j.remaining for j in self.jobs)

    def admit(self, job: Job) -> None:
        """Queue ``job``; Overloaded (503) when closed or ``queue_size`` requests are already waiting."""
        if self.closed:
            raise Overloaded("the service is shutting down", retry_after_s=5)
        if self.waiting >= self.queue_size:
            self.rejected += 1
            raise Overloaded(f"{self.queue_size} requests are waiting for this model; retry shortly")
        now = job.enqueued
        if self.last_arrival:
            self.arrival_gap = min(self.arrival_gap, 1.0) * 0.8 + (now - self.last_arrival) * 0.2
        self.last_arrival = now
        job.last_served = now
        self.jobs.append(job)

    def drop(self, job: Job) -> None:
        """Take a job out at once (cancelled, failed or done)."""
        job.finished = True
        with contextlib.suppress(ValueError):
            self.jobs.remove(job)

    def next(self) -> Formed | float | None:
        if self.wide:  # a batch runs on every thread: what comes meanwhile waits for it
            return math.inf
        ready = [j for j in self.jobs if j.remaining > 0]
        if not ready:
            return None if self.closed and not self.jobs else math.inf
        waiting = sum(j.remaining for j in ready)
        gap = self.arrival_gap
        if not self.closed and waiting < self.max_batch and gap < self.max_wait_s:
            # Requests are arriving faster than max_wait: wait for the next ones, until the oldest has
            # waited max_wait or none came for twice the usual gap (the burst is over).
            until = min(min(j.enqueued for j in ready) + self.max_wait_s, self.last_arrival + 2 * gap)
            left = until - self.clock()
            if left > 0:
                return left
        limit = self.max_batch
        if self.split:  # divide what waits between the idle workers; alone, run it wide
            limit = min(limit, -(-waiting // (self.workers - self.busy)))
        items = self._form(ready, limit)
        wide = self.split and self.busy == 0 and len(items) == waiting
        self.busy += 1
        self.wide = wide
        return Formed(items, wide)

    def finished(self, formed: Formed) -> None:
        self.busy -= 1
        if formed.wide:
            self.wide = False

    def _form(self, ready: list[Job], limit: int) -> Batch:
        """Choose the batch's shape by priority, then fill it round-robin from every job of that shape."""

        def priority(j: Job) -> tuple[int, float]:
            if j.started is not None and j.passed_over >= 2:
                return (0, j.last_served)
            later = 2 if j.background else 0
            return (1 + later, j.enqueued) if j.started is None else (2 + later, j.last_served)

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
        now = self.clock()
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
