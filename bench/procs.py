"""The CPU time of a server's process tree, from ``/proc`` (Linux): in all, and by role, so that a benchmark
can say which process was the limit (one at about 1.0 core busy is bound by its interpreter lock)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A process's role by the module it runs (``python -m MODULE``); anything else in the tree is "other".
ROLES = {"app.procs.server": "engine", "app.procs.frontend": "front end", "app": "server"}


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant living now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
    return out


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (and of its reaped children); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / CLOCK_TICKS  # utime, stime, cutime, cstime


def cpu_seconds(pids: list[int]) -> float:
    return sum(process_cpu(p) for p in pids)


def role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    if b"-m" in argv:
        module = argv[argv.index(b"-m") + 1].decode(errors="replace") if argv.index(b"-m") + 1 < len(argv) else ""
        return ROLES.get(module, module or "other")
    return "other"


@dataclass
class CpuMeter:
    """CPU used by a process tree (and by this process, the load generator) between ``start`` and ``stop``."""

    root: int
    pids: list[int] = field(default_factory=list)
    before: dict[int, float] = field(default_factory=dict)
    own_before: float = 0.0
    t0: float = 0.0

    def start(self) -> None:
        self.pids = tree(self.root)
        self.before = {p: process_cpu(p) for p in self.pids}
        times = os.times()
        self.own_before = times.user + times.system
        self.t0 = time.perf_counter()

    def stop(self, requests_per_s: float) -> dict[str, object]:
        """Cores busy by role (CPU seconds per wall second), the busiest single process, the server's CPU-ms
        per request at ``requests_per_s`` and the load generator's cores busy."""
        wall = time.perf_counter() - self.t0
        used = {p: process_cpu(p) - self.before[p] for p in self.pids}
        times = os.times()
        by_role: dict[str, float] = {}
        for p, seconds in used.items():
            by_role[role(p)] = by_role.get(role(p), 0.0) + seconds
        busiest = max(used, key=lambda p: used[p])
        total = sum(used.values())
        return {
            "server_cores_busy": round(total / wall, 2),
            "cores_busy_by_role": {k: round(v / wall, 2) for k, v in sorted(by_role.items())},
            "busiest_process": {"role": role(busiest), "cores_busy": round(used[busiest] / wall, 2)},
            "server_cpu_ms_per_request": round(1000 * total / wall / requests_per_s, 2) if requests_per_s else None,
            "loadgen_cores_busy": round((times.user + times.system - self.own_before) / wall, 2),
        }


def profile(root: int, seconds: float, out_dir: Path, label: str) -> list[subprocess.Popen[bytes]]:
    """Sample the engine process and one front end (or the server, where it is one process) with ``py-spy``
    for ``seconds``, into ``OUT_DIR/LABEL-ROLE.txt`` (collapsed stacks of the thread holding the interpreter
    lock: one line per stack and its count; where the lock is the limit, this is where its time goes).
    Nothing where py-spy is not installed; the caller waits for the returned processes."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    picked: dict[str, int] = {}
    for p in tree(root):
        picked.setdefault(role(p), p)
    targets = {r: p for r, p in picked.items() if r in ("engine", "front end")} or {"server": root}
    args = [
        "record",
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "200",
        "--nonblocking",
        "--gil",
        "--format",
        "raw",
    ]
    return [
        subprocess.Popen(
            [spy, *args, "--pid", str(p), "-o", str(out_dir / f"{label}-{r.replace(' ', '-')}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for r, p in targets.items()
    ]
