"""Celery's side of ``bench/run.py seed``: run in Celery's own venv.

``python celery_driver.py OUT WORKLOAD TASKS WORKERS SLEEP_MS REDIS_URL`` starts one Celery
worker (prefork, WORKERS processes) on the Redis at REDIS_URL (broker and result backend, as
the usual Celery set-up has it), runs WORKLOAD from one client with ``delay()`` and
``AsyncResult.get()``, writes one JSON object of figures to OUT and stops the worker.

Workloads as in ``seed_driver.py``: ``throughput`` (TASKS no-op tasks sent, then every
result awaited), ``latency`` (one task at a time), ``sleep`` (TASKS tasks of SLEEP_MS).
Celery's settings are its defaults but for the result backend. Standard library and Celery
only: this file never imports lbmqtt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("celery_driver", broker=REDIS_URL, backend=REDIS_URL)
app.conf.broker_connection_retry_on_startup = True


@app.task
def noop(i: Any) -> None:
    return None


@app.task
def sleeper(seconds: float) -> bool:
    time.sleep(seconds)
    return True


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def main() -> None:
    out, workload, tasks, workers, sleep_ms = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        float(sys.argv[5]),
    )
    here = os.path.dirname(os.path.abspath(__file__))
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "celery_driver", "worker"),
            *("--pool", "prefork", "--concurrency", str(workers), "--loglevel", "WARNING"),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        ],
        cwd=here,
        env={**os.environ, "PYTHONPATH": here},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    figures: dict[str, Any] = {}
    try:
        # warm-up: the worker is up once a few tasks came back
        for r in [noop.delay(i) for i in range(workers * 2)]:
            r.get(timeout=60)
        if workload == "throughput":
            t0 = time.perf_counter()
            results = [noop.delay(i) for i in range(tasks)]
            submitted = time.perf_counter()
            for r in results:
                r.get(timeout=600)
            elapsed = time.perf_counter() - t0
            figures = {
                "tasks": tasks,
                "seconds": elapsed,
                "tasks_per_s": tasks / elapsed,
                "submit_s": submitted - t0,
            }
        elif workload == "latency":
            lat = []
            for i in range(tasks):
                t0 = time.perf_counter()
                noop.delay(i).get(timeout=60)
                lat.append(time.perf_counter() - t0)
            figures = {"tasks": tasks, "p50_ms": 1000 * pct(lat, 0.5)}
            figures["p99_ms"] = 1000 * pct(lat, 0.99)
        elif workload == "sleep":
            t0 = time.perf_counter()
            results = [sleeper.delay(sleep_ms / 1000) for _ in range(tasks)]
            for r in results:
                r.get(timeout=600)
            elapsed = time.perf_counter() - t0
            ideal = tasks * sleep_ms / 1000 / workers
            figures = {
                "tasks": tasks,
                "makespan_s": elapsed,
                "ideal_s": ideal,
                "efficiency": ideal / elapsed,
            }
        else:
            raise SystemExit(f"celery: unknown workload {workload!r}")
    finally:
        with open(out, "w") as f:
            json.dump(figures, f)
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)


if __name__ == "__main__":
    main()
