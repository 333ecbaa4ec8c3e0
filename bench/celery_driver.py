"""Celery's side of ``bench/run.py seed``: run in Celery's own venv.

``BENCH_REDIS_URL=URL python celery_driver.py OUT WORKLOAD TASKS WORKERS SLEEP_MS`` starts
one Celery worker (prefork, WORKERS processes) on the Redis at URL (broker and result
backend, as the usual Celery set-up has it), runs WORKLOAD from one client with ``delay()``
and ``AsyncResult.get()``, writes one JSON object of figures to OUT and stops the worker.

The workloads are ``baseline_workloads.measure``'s. Celery's settings are its defaults but
for the result backend. Standard library and Celery only: this file never imports lbmqtt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from baseline_workloads import arguments, measure
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


def wait_results(results: list[Any], poll_s: float, deadline: float) -> None:
    """Every result in hand (Celery's result backend notifies: ``poll_s`` is not used)."""
    for r in results:
        r.get(timeout=max(0.1, deadline - time.monotonic()))


def main() -> None:
    out, workload, tasks, workers, sleep_ms = arguments()
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
        figures = measure(
            workload,
            tasks,
            workers,
            sleep_ms,
            lambda name, arg: (noop if name == "NOOP" else sleeper).delay(arg),
            wait_results,
        )
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
