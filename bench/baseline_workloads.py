"""The workloads of ``bench/run.py seed`` for the baselines, shared by their drivers
(``seed_driver.py`` for pyLoadBalancer 0.2.0, ``celery_driver.py`` for Celery), each run in
the baseline's own venv: standard library only, never lbmqtt.

``measure`` runs one workload through two functions the driver gives: ``send(name, arg)``
submits a task (``NOOP`` with a number, ``SLEEP`` with its seconds) and returns its handle;
``wait(handles, poll_s, deadline)`` returns once every one of them is done (a driver that
polls does so every ``poll_s``: 10 ms for a batch, 1 ms for a lone task, as the old client's
README shows), or raises past ``deadline`` (``time.monotonic``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

Send = Callable[[str, Any], Any]
Wait = Callable[[list[Any], float, float], None]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def arguments() -> tuple[str, str, int, int, float]:
    """``OUT WORKLOAD TASKS WORKERS SLEEP_MS`` from the command line."""
    out, workload, tasks, workers, sleep_ms = sys.argv[1:6]
    return out, workload, int(tasks), int(workers), float(sleep_ms)


def measure(
    workload: str, tasks: int, workers: int, sleep_ms: float, send: Send, wait: Wait
) -> dict[str, Any]:
    """Warm up (two tasks per worker), then run ``workload``: its figures."""
    wait([send("NOOP", i) for i in range(workers * 2)], 0.01, time.monotonic() + 60)
    deadline = time.monotonic() + 600
    if workload == "throughput":
        t0 = time.perf_counter()
        handles = [send("NOOP", i) for i in range(tasks)]
        submitted = time.perf_counter()
        wait(handles, 0.01, deadline)
        elapsed = time.perf_counter() - t0
        return {
            "tasks": tasks,
            "seconds": elapsed,
            "tasks_per_s": tasks / elapsed,
            "submit_s": submitted - t0,
        }
    if workload == "latency":
        lat = []
        for i in range(tasks):
            t0 = time.perf_counter()
            wait([send("NOOP", i)], 0.001, deadline)
            lat.append(time.perf_counter() - t0)
        return {"tasks": tasks, "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99)}
    if workload == "sleep":
        t0 = time.perf_counter()
        handles = [send("SLEEP", sleep_ms / 1000) for _ in range(tasks)]
        wait(handles, 0.005, deadline)
        elapsed = time.perf_counter() - t0
        ideal = tasks * sleep_ms / 1000 / workers
        return {
            "tasks": tasks,
            "makespan_s": elapsed,
            "ideal_s": ideal,
            "efficiency": ideal / elapsed,
        }
    raise SystemExit(f"unknown workload {workload!r}")
