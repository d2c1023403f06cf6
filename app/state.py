"""What lives as long as the app: settings, the upload store, the engine, the I/O thread pool."""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass, field

from app.config import Settings
from app.inference import Inference
from app.store import UploadStore


@dataclass
class AppState:
    settings: Settings
    store: UploadStore | None = None
    engine: Inference | None = None  # the models: in this process, or an engine process's (--workers)
    executor: concurrent.futures.ThreadPoolExecutor | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    error: str | None = None  # why start-up failed, for /readyz
