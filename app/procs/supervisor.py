"""``unetseg serve --workers N``: one engine process and N HTTP front ends on one port.

The command binds the port first (a port in use fails at once, before any model loads); the supervisor starts
the engine process (``server``) and the front ends (``frontend``), each given its own listening socket on the
port (one SO_REUSEPORT group: the kernel spreads the connections over them), and then watches them: a front
end that exits is started again on its socket; an engine process that exits is started again, unless it
never got going (a bad bundle: the command exits 3 with its message). The front ends connect to the engine
process through a Unix socket in a private run folder, which also holds the Prometheus multiprocess files
(every front end's request counts, summed by whichever front end answers ``/metrics``). Only the first front
end runs jobs (``UNETSEG_JOB_CONCURRENCY`` as set); the others are given 0: they take jobs and answer about
them from the store, as a replica that runs none does.

SIGTERM (or SIGINT): the front ends get SIGTERM and finish their requests (up to the grace period) while the
engine process still serves them; then the engine process drains its queue and stops; the command exits 0.
Every child gets SIGTERM if the supervisor itself dies (Linux's parent-death signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from app.config import Settings
from app.procs.protocol import remove_leftovers
from app.serving import reuse_port_group

log = logging.getLogger("unetseg")

# An engine process that exits sooner than this after its start is not restarted: it cannot start.
START_GRACE_S = 15.0
_PR_SET_PDEATHSIG = 1


def default_workers() -> int:
    """Front ends for ``--workers 0``: one per two CPU cores, at most 8, on a CUDA host; 1 (one process) on a CPU,
    whose cores the model needs."""
    import torch

    if not torch.cuda.is_available():
        return 1
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as the UNETSEG_* variables the child processes read them from."""
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"UNETSEG_{name.upper()}"] = text
    return env


def _die_with_parent() -> None:
    """(in the child, before exec) SIGTERM when the supervisor dies, however it dies."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, settings: Settings, workers: int, grace_s: float) -> None:
        self.settings = settings
        self.workers = workers
        self.grace_s = grace_s
        self.stopping = False
        self.rundir = Path(tempfile.mkdtemp(prefix="unetseg-"))
        self.socket_path = self.rundir / "engine.sock"
        metrics_dir = self.rundir / "metrics"
        metrics_dir.mkdir()
        self.env = {**os.environ, **settings_env(settings)}
        self.front_env = {
            **self.env,
            "UNETSEG_ENGINE_SOCKET": str(self.socket_path),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }

    def _start(self, args: list[str], env: dict[str, str], fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            env=env,
            pass_fds=fds,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def start_engine(self) -> subprocess.Popen[bytes]:
        return self._start(["app.procs.server", "--socket", str(self.socket_path)], self.env)

    def front_env_of(self, index: int) -> dict[str, str]:
        """The environment of front end ``index``: only the first runs jobs (as many as the settings say)."""
        if index == 0:
            return self.front_env
        return {**self.front_env, "UNETSEG_JOB_CONCURRENCY": "0"}

    def start_front(self, fd: int, index: int) -> subprocess.Popen[bytes]:
        args = ["app.procs.frontend", "--fd", str(fd), "--grace", str(self.grace_s)]
        return self._start(args, self.front_env_of(index), (fd,))

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self, sock: socket.socket) -> int:
        """Serve on ``sock`` (bound by ``app.serving.bind``) until SIGTERM or SIGINT; 0, or 3 when the engine
        process cannot start."""
        s = self.settings
        # A listening socket per front end (one SO_REUSEPORT group), kept here so that a front end started
        # again takes over its predecessor's socket and the connections waiting in it.
        listeners = reuse_port_group(sock, self.workers) if self.workers > 1 else [sock]
        for listener in listeners:
            listener.listen(2048)
            listener.set_inheritable(True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        engine = self.start_engine()
        engine_started = time.monotonic()
        fronts = [self.start_front(listeners[i].fileno(), i) for i in range(self.workers)]
        log.info(
            "serving on http://%s:%d with %d front ends and engine process %d", s.host, s.port, self.workers, engine.pid
        )
        code = 0
        try:
            while not self.stopping:
                time.sleep(0.2)
                if (rc := engine.poll()) is not None:
                    if time.monotonic() - engine_started < START_GRACE_S:
                        log.error("the engine process could not start (exit %s)", rc)
                        code = 3
                        break
                    log.error("the engine process exited (%s); starting it again", rc)
                    engine, engine_started = self.start_engine(), time.monotonic()
                for i, front in enumerate(fronts):
                    if (rc := front.poll()) is not None and not self.stopping:
                        log.warning("front end %d exited (%s); starting another", front.pid, rc)
                        remove_leftovers(front.pid)
                        fronts[i] = self.start_front(listeners[i].fileno(), i)
        finally:
            self._stop(fronts, engine, listeners)
        return code

    def _stop(
        self, fronts: list[subprocess.Popen[bytes]], engine: subprocess.Popen[bytes], listeners: list[socket.socket]
    ) -> None:
        """Front ends first (they finish their requests, which still need the engine), then the engine."""
        for front in fronts:
            with contextlib.suppress(ProcessLookupError):
                front.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 10
        for front in fronts:
            try:
                front.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                front.kill()
                front.wait()
            remove_leftovers(front.pid)
        for listener in listeners:
            listener.close()
        with contextlib.suppress(ProcessLookupError):
            engine.send_signal(signal.SIGTERM)
        try:
            engine.wait(60)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
        shutil.rmtree(self.rundir, ignore_errors=True)


def run(settings: Settings, workers: int, grace_s: float, sock: socket.socket) -> int:
    return Supervisor(settings, workers, grace_s).run(sock)
