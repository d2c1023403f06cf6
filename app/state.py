"""What lives as long as the app: settings, the upload store and its threads, the engine, the I/O thread pool."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from app.config import Settings
from app.errors import NotReady
from app.inference import Inference, RemoteInference
from app.store import UploadStore
from app.store.gate import StoreGate


@dataclass
class AppState:
    settings: Settings
    store: UploadStore | None = None
    store_gate: StoreGate | None = None  # every store call from a request goes through it
    engine: Inference | None = None  # the models: in this process, or an engine process's (--workers)
    executor: concurrent.futures.ThreadPoolExecutor | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    error: str | None = None  # why start-up failed, for /readyz
    # With --workers: ask the engine process whether it is ready now, rather than at the next poll.
    confirm_ready: Callable[[], Awaitable[None]] | None = None
    # A front end whose engine is elsewhere other than behind UNETSEG_ENGINE_SOCKET (Ray's engine replicas).
    remote_engine: Callable[[Settings], RemoteInference] | None = None

    def gate(self) -> StoreGate:
        """The store's threads; 503 before the store is open."""
        if self.store_gate is None:
            raise NotReady("the upload store is not open")
        return self.store_gate
