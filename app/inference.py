"""What the service asks of inference, whether its models run in this process (``app.engine.Engine``), in
one engine process per device that several HTTP front ends share (``app.procs.client.RemoteEngine``), or in
engine replicas of a Ray Serve application (``app.ray.frontend.RayEngine``).

Plain Python: a front end imports no torch. The pipeline (``app.pipeline``), the routes and the metrics see
only these protocols.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from app.errors import RequestTimeout, ServiceError
from model.card import Card, InstanceSpec

# How often a request waiting for the model checks whether its client is still there.
DISCONNECT_POLL_S = 0.1


class ClientGone(ServiceError):
    """The client closed the connection before its prediction was ready: the job was dropped."""

    status_code = 499  # as nginx logs it: nobody reads this response


@dataclass
class Timing:
    queue_s: float = 0.0  # from admission to the first forward pass that took one of its inputs
    model_s: float = 0.0  # forward passes that carried its inputs (device time on a GPU)
    post_s: float = 0.0  # after the model: upsampling, the class map, its copy to the host, instances


class ModelInfo(Protocol):
    """One served model as the routes and metrics see it."""

    @property
    def name(self) -> str: ...
    @property
    def card(self) -> Card: ...
    @property
    def device_name(self) -> str: ...
    @property
    def precision(self) -> str: ...
    @property
    def graph(self) -> str: ...
    @property
    def max_batch(self) -> int: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def load_s(self) -> float: ...
    def batch_counts(self) -> dict[int, int]:
        """Forward passes so far, by batch size."""
        ...


class PreparedWork(Protocol):
    """A request's work for one model between ``prepare`` and ``release``."""

    @property
    def card(self) -> Card: ...
    @property
    def spec(self) -> InstanceSpec | None: ...
    @property
    def timing(self) -> Timing: ...


class Inference(Protocol):
    """The service's models and the three steps of a request (``app.pipeline`` runs them)."""

    @property
    def default_model(self) -> str: ...
    @property
    def models(self) -> Mapping[str, ModelInfo]: ...
    def get(self, name: str | None) -> ModelInfo:
        """The named model (the default for None); UnknownModel (404) otherwise."""
        ...

    def failure(self) -> str | None:
        """Why inference stopped serving, or None while it serves."""
        ...

    def gpu_memory(self) -> dict[str, tuple[int, int]]:
        """Per CUDA device: (bytes allocated, bytes reserved); empty off CUDA."""
        ...

    def prepare(
        self,
        name: str | None,
        image: np.ndarray,
        size: tuple[int, int] | None = None,
        instances: bool = False,
        extra_bytes: int = 0,
    ) -> Any:
        """(an I/O thread) Make the work for an (H, W[, C]) uint8 image in the model's channels."""
        ...

    async def run(
        self,
        prepared: Any,
        timeout_s: float | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        background: bool = False,
    ) -> Timing:
        """Wait for the model (the event loop stays free)."""
        ...

    def finish(self, prepared: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """(an I/O thread) The (H, W) uint8 class map and the (H, W) int32 instance ids (when asked for)."""
        ...

    def release(self, prepared: Any) -> None:
        """Give back what the request held (once; later calls do nothing)."""
        ...


class RemoteInference(Inference, Protocol):
    """Inference in another process: a front end keeps in touch with it while the app runs."""

    async def start(self, on_ready: Callable[[], None]) -> None:
        """Keep in touch with the engine in a background task; ``on_ready`` once it first says it is warm."""
        ...

    async def confirm_ready(self) -> None:
        """Ask the engine now whether it is ready (a front end about to answer "still loading" does)."""
        ...

    async def stop(self) -> None: ...


async def wait_for(
    waiting: asyncio.Future[Any],
    timeout_s: float | None,
    disconnected: Callable[[], Awaitable[bool]] | None,
) -> Any:
    """The future's result, without blocking the loop; RequestTimeout (504) past ``timeout_s``, ClientGone when
    ``disconnected`` (polled every ``DISCONNECT_POLL_S``) says the client left. The caller cancels the work."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    while True:
        step = DISCONNECT_POLL_S if disconnected is not None else None
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                raise RequestTimeout(f"the prediction did not finish within {timeout_s:g} s")
            step = left if step is None else min(step, left)
        done, _ = await asyncio.wait({waiting}, timeout=step)
        if done:
            return waiting.result()
        if disconnected is not None and await disconnected():
            raise ClientGone("the client closed the connection; its prediction was dropped")
