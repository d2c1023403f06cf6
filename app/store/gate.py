"""Store calls from the event loop: in threads of their own, bounded, and watched for reachability.

The store is the one part of a request that waits on another machine (PostgreSQL, S3, a shared mount).
When that machine goes away, its calls must not hold the threads that decode and encode images for
requests that never touch the store, nor queue without bound:

- calls run in ``threads`` threads of their own (``UNETSEG_STORE_THREADS``), never in the I/O pool;
- a call that finds them all busy waits at most ``timeout_s`` for one, then is a 503 (``StoreUnavailable``);
- the backends bound their own waits by the same ``timeout_s`` (``postgres.py``, ``s3.py``).

``health`` says whether the store answered last time it was asked (every call tells it), and ``check()``
asks again when the last answer is older than a second: ``/readyz`` and the metrics report it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from app.errors import StoreUnavailable

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("unetseg.store")

PROBE_EVERY_S = 1.0  # /readyz asks the store at most this often
PROBE_TIMEOUT_S = 1.0  # ... and waits this long for its answer


@dataclass(frozen=True)
class StoreHealth:
    reachable: bool = True
    detail: str | None = None  # why not, when not
    since: float = 0.0  # time.time() of the last change


class StoreGate:
    def __init__(self, threads: int, timeout_s: float, probe: Callable[[], None]) -> None:
        self.threads = threads
        self.timeout_s = timeout_s
        self.executor = concurrent.futures.ThreadPoolExecutor(threads, "unetseg-store")
        self._probe = probe
        self._lock = threading.Lock()
        self.health = StoreHealth(since=time.time())
        self._checked_at = 0.0  # time.monotonic() of the last answer (or failure) to any call
        self._slots: asyncio.Semaphore | None = None  # made on the event loop that uses it
        self._probing: asyncio.Task[StoreHealth] | None = None

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args)`` in a store thread. StoreUnavailable when none is free within ``timeout_s``, or when the
        store itself does not answer."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.threads)
        slots = self._slots
        try:
            await asyncio.wait_for(slots.acquire(), self.timeout_s)
        except TimeoutError:
            detail = f"the upload store did not answer: its {self.threads} threads are still waiting on it"
            self._report(StoreUnavailable(detail))
            raise StoreUnavailable(detail) from None
        loop = asyncio.get_running_loop()
        future = self.executor.submit(functools.partial(self._call, functools.partial(fn, *args, **kwargs)))
        # The place is given back when the thread is done, not when the caller stops waiting: a caller that
        # is cancelled (its client left) does not let more calls in than there are threads.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(slots.release))
        return await asyncio.wrap_future(future)

    def run_now(self, fn: Callable[[], T], timeout_s: float = PROBE_TIMEOUT_S) -> T:
        """``fn()`` in a store thread from a thread that may block (the metrics scrape), for at most
        ``timeout_s``; at once StoreUnavailable while the store is known to be unreachable."""
        if not self.health.reachable:
            raise StoreUnavailable(self.health.detail or "the upload store is unreachable")
        try:
            return self.executor.submit(self._call, fn).result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise StoreUnavailable(f"the upload store did not answer within {timeout_s:g} s") from None

    async def check(self) -> StoreHealth:
        """The store's reachability, asked again (a round trip) when the last answer is older than a second."""
        if time.monotonic() - self._checked_at < PROBE_EVERY_S:
            return self.health
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self._probe_once())
        return await asyncio.shield(self._probing)

    async def _probe_once(self) -> StoreHealth:
        try:
            await asyncio.wait_for(self.run(self._probe), PROBE_TIMEOUT_S)
        except StoreUnavailable:
            pass  # reported by run
        except TimeoutError:
            self._report(StoreUnavailable(f"the upload store did not answer within {PROBE_TIMEOUT_S:g} s"))
        return self.health

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            result = fn()
        except StoreUnavailable as exc:
            self._report(exc)
            raise
        self._report(None)
        return result

    def _report(self, error: StoreUnavailable | None) -> None:
        with self._lock:
            self._checked_at = time.monotonic()
            was = self.health
            if error is None and not was.reachable:
                self.health = StoreHealth(True, None, time.time())
                log.warning("the upload store is reachable again (after %.1f s)", time.time() - was.since)
            elif error is not None and was.reachable:
                self.health = StoreHealth(False, error.detail, time.time())
                log.warning("the upload store is unreachable: %s", error.detail)
            elif error is not None:
                self.health = StoreHealth(False, error.detail, was.since)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
