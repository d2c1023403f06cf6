"""``unetseg serve --ray``: run the service as Ray Serve applications (front ends, engines) until SIGTERM.

Without an address (``--ray-address`` or ``RAY_ADDRESS``) a Ray instance of this machine's cores is
started for the command and stopped with it; with one, the command joins that cluster and, on SIGTERM,
deletes only its own applications (and Serve, when no other application is left), leaving the cluster up.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from types import FrameType

import ray
from ray import serve

from app.config import Settings
from app.ray.deployment import APP_NAME, ENGINE_APP, applications, settings_overrides

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


def why_failed(app: str) -> str:
    """The error that failed the deployments of ``app`` (a replica's exception, e.g. a bad bundle): the last
    line of what Serve says, which ends with the replica's traceback."""
    status = serve.status().applications.get(app)
    said = [d.message for d in status.deployments.values() if d.message] if status is not None else []
    lines = [line for message in said for line in message.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no reason given"


def engine_plan(
    resources: Mapping[str, float], engines: int, gpus_per_engine: float | None, device: str
) -> tuple[int, float]:
    """(engine replicas, GPUs each): as given, else from the cluster's ``resources``: a whole GPU per engine
    where the cluster has GPUs (and ``device`` is not "cpu"), none otherwise; ``engines`` 0: as many as that
    fits on the cluster's GPUs, one without."""
    gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
    if gpus_per_engine is None:
        gpus_per_engine = 1.0 if gpus else 0.0
    if engines == 0:
        engines = max(1, int(gpus // gpus_per_engine)) if gpus_per_engine else 1
    return engines, gpus_per_engine


def run(
    settings: Settings,
    replicas: int,
    engines: int = 0,
    gpus_per_engine: float | None = None,
    address: str | None = None,
    cpus_per_replica: float = 1,
    grace_s: float = 30.0,
) -> int:
    """Serve ``replicas`` front ends and ``engines`` engine replicas (see ``engine_plan``) on
    ``settings.host:settings.port``; returns 0 after SIGTERM/SIGINT.

    Each replica finishes its in-flight requests (for up to ``grace_s``) before it stops; then the Serve
    application and the Ray processes this command started are shut down.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    stop = threading.Event()
    start_ray(address)
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    engines, gpus_per_engine = engine_plan(resources, engines, gpus_per_engine, settings.device)
    if gpus_per_engine and not resources.get("GPU"):
        log.warning("the engines ask for %g GPU each and the cluster has none (yet): they wait", gpus_per_engine)

    # ray.init's own SIGTERM handler (on an instance it starts) kills every Ray process at once and exits 1,
    # while requests are still in flight: this one lets the shutdown below drain them.
    def on_signal(sig: int, frame: FrameType | None) -> None:
        log.info("received %s: shutting down", signal.Signals(sig).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        fields = settings_overrides(settings)
        engine, frontend = applications(fields, replicas, engines, gpus_per_engine, cpus_per_replica, grace_s)
        for app, name, prefix in ((engine, ENGINE_APP, None), (frontend, APP_NAME, "/")):
            try:
                serve.run(app, name=name, route_prefix=prefix)
            except RuntimeError as exc:  # Serve's "Deploying application ... failed": say why, without a traceback
                log.error("%s (%s)", why_failed(name), exc)
                return 1
        log.info(
            "serving on http://%s:%d: %d front end(s), %d engine(s) with %g GPU each, on Ray %s (%s)",
            settings.host,
            settings.port,
            replicas,
            engines,
            gpus_per_engine,
            ray.__version__,
            f"cluster at {address}" if address else "a local instance",
        )
        while not stop.wait(0.5):
            pass
    finally:
        # Deleting the applications first lets each front end finish its requests (the proxy stays up to carry
        # their responses, the engines to answer them); serve.shutdown() alone stops the proxies at once and
        # cuts requests off mid-body.
        serve.delete(APP_NAME)
        serve.delete(ENGINE_APP)
        if not address or not serve.status().applications:
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
