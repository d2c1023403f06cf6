"""A process's memory budget: bytes held by requests in flight against a limit, in plain Python (no torch).

The engine counts the work of decoded images in one (``UNETSEG_MAX_INFLIGHT_MB``); the HTTP front end counts
the request bodies it is reading and holding in another of the same size (``BodyLimitMiddleware``).
"""

from __future__ import annotations

import math
import threading

from app.errors import ImageTooLarge, Overloaded

MIB = 1024 * 1024


class MemoryBudget:
    """Bytes held by requests in flight, across every model: over ``limit`` a request is refused.

    A request that alone would pass the limit is refused for good (413); one that does not fit beside
    those in flight gets 503 with ``Retry-After`` (they finish and free their share). ``limit`` 0: none.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    def fits_alone(self, nbytes: int) -> bool:
        """Whether ``nbytes`` could ever be held: not over the limit on its own (always, without a limit)."""
        return not self.limit or nbytes <= self.limit

    def try_reserve(self, nbytes: int) -> bool:
        """Hold ``nbytes`` if they fit beside what is held (always, without a limit); else hold nothing."""
        with self._lock:
            if self.limit and self.held + nbytes > self.limit:
                return False
            self.held += nbytes
            self.peak = max(self.peak, self.held)
            return True

    def reserve(self, nbytes: int, retry_after_s: int = 1) -> None:
        """Hold the ``nbytes`` an image's work needs, or raise the error that refuses it (413 or 503)."""
        if not self.fits_alone(nbytes):
            raise ImageTooLarge(
                f"this image needs about {math.ceil(nbytes / MIB)} MiB to segment; "
                f"the service allows {self.limit // MIB} MiB of work in flight"
            )
        if not self.try_reserve(nbytes):
            raise Overloaded(
                f"the service is segmenting {math.ceil(self.held / MIB)} MiB of images, this one needs "
                f"{math.ceil(nbytes / MIB)} MiB and the limit is {self.limit // MIB} MiB; retry shortly",
                retry_after_s=retry_after_s,
            )

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes
