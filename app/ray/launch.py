"""``unetseg serve --ray``: run the service as a Ray Serve application until SIGTERM.

Without an address (``--ray-address`` or ``RAY_ADDRESS``) a Ray instance of this machine's cores is
started for the command and stopped with it; with one, the command joins that cluster and, on SIGTERM,
deletes only its own application (and Serve, when no other application is left), leaving the cluster up.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import ray
from ray import serve

from app.config import Settings
from app.ray.deployment import APP_NAME, application, settings_overrides

log = logging.getLogger("unetseg")


def start_ray(address: str | None, attempts: int = 2) -> None:
    """Join the cluster at ``address``, or start a local instance ("local": a bare ``ray.init()`` would join
    an instance that ``ray start`` left running).

    On a loaded machine a new instance can miss Ray's fixed 30 s for its node to register (Ray then raises a
    plain ``Exception``); that start is tried once more.
    """
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
            return
        except Exception as exc:  # Ray's start-up timeout is a bare Exception; anything else is raised again
            if address or attempt == attempts or "timed out during startup" not in str(exc):
                raise
            log.warning("Ray's node did not start in time (%s); starting it once more", exc)
            ray.shutdown()


def run(
    settings: Settings,
    replicas: int,
    address: str | None = None,
    gpus_per_replica: float = 0,
    cpus_per_replica: float = 1,
    grace_s: float = 30.0,
) -> int:
    """Serve ``replicas`` whole-app replicas on ``settings.host:settings.port``; returns 0 after SIGTERM/SIGINT.

    Each replica finishes its in-flight requests (for up to ``grace_s``) before it stops; then the Serve
    application and the Ray processes this command started are shut down.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    stop = threading.Event()
    start_ray(address)

    # ray.init's own SIGTERM handler (on an instance it starts) kills every Ray process at once and exits 1,
    # while requests are still in flight: this one lets the shutdown below drain them.
    def on_signal(sig: int, frame: FrameType | None) -> None:
        log.info("received %s: shutting down", signal.Signals(sig).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(
            application(settings_overrides(settings), replicas, gpus_per_replica, cpus_per_replica, grace_s),
            name=APP_NAME,
            route_prefix="/",
        )
        log.info(
            "serving on http://%s:%d: %d replica(s) on Ray %s (%s)",
            settings.host,
            settings.port,
            replicas,
            ray.__version__,
            f"cluster at {address}" if address else "a local instance",
        )
        while not stop.wait(0.5):
            pass
    finally:
        # Deleting the application first lets each replica finish its requests (the proxy stays up to carry
        # their responses); serve.shutdown() alone stops the proxies at once and cuts requests off mid-body.
        serve.delete(APP_NAME)
        if not address or not serve.status().applications:
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
