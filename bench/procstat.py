"""What the benchmarks read of their processes from Linux /proc: CPU seconds, and the
seconds their threads were ready to run but waited for a CPU."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from tests.cluster import children_of

__all__ = [
    "cpu_seconds",
    "oncpu_by_role",
    "oncpu_seconds",
    "process_times",
    "runqueue_wait_seconds",
]

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def _schedstat_seconds(pid: int, field: int) -> float:
    """A field of /proc/PID/task/*/schedstat summed over the process's threads, in
    seconds (0: on-CPU ns, 1: run-queue wait ns; 0 where the kernel does not keep it)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[field])
        except (OSError, IndexError, ValueError):
            continue  # (a thread gone meanwhile)
    return total / 1e9


def oncpu_seconds(pid: int) -> float:
    """Seconds the threads of a process have run on a CPU, to the nanosecond (schedstat):
    /proc/PID/stat's CPU ticks (:func:`cpu_seconds`) are 10 ms apart, too coarse for a
    phase of a fraction of a second."""
    return _schedstat_seconds(pid, 0)


def oncpu_by_role(pids: dict[str, int], workers: list[int]) -> dict[str, float]:
    """:func:`oncpu_seconds` of the bench's processes by role (:func:`_by_role`; the node's
    ``workers`` from :func:`children_of`, which scans /proc: ~1.6 ms, so the caller finds
    them once)."""
    return _by_role(oncpu_seconds, pids, workers)


def _by_role(
    read: Callable[[int], float],
    pids: dict[str, int],
    workers: list[int],
    client: float | None = None,
) -> dict[str, float]:
    """``read(pid)`` of the bench's processes by role: those of ``pids``, the client (this
    process; ``client`` instead if given) and the node's ``workers`` (summed)."""
    out = {k: read(p) for k, p in pids.items()}
    out["client"] = read(os.getpid()) if client is None else client
    out["workers"] = sum(read(p) for p in workers)
    return out


def runqueue_wait_seconds(pid: int) -> float:
    """Seconds the threads of a process have spent runnable but waiting for a CPU (Linux
    /proc/PID/task/*/schedstat, second field; 0 where the kernel does not keep it)."""
    return _schedstat_seconds(pid, 1)


def process_times(pids: dict[str, int], node_pid: int) -> tuple[dict[str, float], dict[str, float]]:
    """CPU seconds (:func:`cpu_seconds`) and run-queue wait seconds
    (:func:`runqueue_wait_seconds`) of the bench's processes by role: those of ``pids``,
    the client (this process) and the node's workers (summed)."""
    workers = children_of(node_pid)
    cpu = _by_role(cpu_seconds, pids, workers, client=time.process_time())
    wait = _by_role(runqueue_wait_seconds, pids, workers)
    return cpu, wait
