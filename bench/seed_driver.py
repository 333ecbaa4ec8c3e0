"""The seed's side of ``bench/run.py seed``: run in pyLoadBalancer 0.2.0's own venv.

``python seed_driver.py OUT WORKLOAD TASKS WORKERS SLEEP_MS`` starts the old load balancer
and one worker hub with WORKERS workers (one priority band, free ports), runs WORKLOAD
from one client the way the old client is used (``sendTask``, then ``getTask`` polled until
progress 100), writes one JSON object of figures to OUT and stops everything.

Workloads: ``throughput`` (TASKS no-op tasks sent, then polled together with ``getTask``
of a list), ``latency`` (one task at a time, polled every millisecond), ``sleep`` (TASKS
tasks of SLEEP_MS each). Standard library and pyLoadBalancer only: this file never imports
lbmqtt (it runs where lbmqtt is not installed).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from typing import Any


def noop(**kwargs: Any) -> None:
    return None


def sleeper(**kwargs: Any) -> bool:
    time.sleep(kwargs["task"]["seconds"])
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def wait_done(client: Any, ids: list[str], poll_s: float, deadline: float) -> None:
    """Poll the old balancer until every task of ``ids`` reports progress 100."""
    pending = list(ids)
    while pending:
        if time.monotonic() > deadline:
            raise SystemExit(f"seed: {len(pending)} tasks not done in time")
        answer = (
            client.getTask(pending)
            if len(pending) > 1
            else {pending[0]: client.getTask(pending[0])}
        )
        pending = [t for t in pending if (answer.get(t) or {}).get("progress") != 100]
        if pending:
            time.sleep(poll_s)


def main() -> None:
    out, workload, tasks, workers, sleep_ms = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        float(sys.argv[5]),
    )
    params = {
        "SOCKET_TIMEOUT": 2000,
        "LB_IP": "127.0.0.1",
        "LB_WKPULLPORT": free_port(),
        "LB_HCREPPORT": free_port(),
        "LB_CLIENTPULLPORT": free_port(),
        "MONITOR_IP": "127.0.0.1",
        "MONITOR_PORT": free_port(),
        "WKHUB_IP": "127.0.0.1",
        "WKHUB_LBPORT": free_port(),
        "WKHUB_HCPORT": free_port(),
        "WKHUB_WORKERS": [{"nWorkers": workers, "minP": 0, "maxP": 1000, "processP": 0}],
        "LB_QUEING_MAXPERUSER": 0,
    }
    fd, pfile = tempfile.mkstemp(prefix="seed-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(params, f)

    from pyLoadBalancer import Client
    from pyLoadBalancer.StartAll import startLBProcess
    from pyLoadBalancer.StartWorkerHub import startWorkerHub

    lb = multiprocessing.Process(target=startLBProcess, args=(pfile,))
    lb.start()
    hub = startWorkerHub(pfile, {"NOOP": noop, "SLEEP": sleeper}, False)
    client = Client(parametersfile=pfile)
    figures: dict[str, Any] = {}
    try:
        # warm-up: once a task of each worker's worth is done, every worker has said hello
        deadline = time.monotonic() + 60
        ids = [client.sendTask("NOOP", {"i": i})["taskid"] for i in range(workers * 2)]
        wait_done(client, ids, 0.01, deadline)
        deadline = time.monotonic() + 600
        if workload == "throughput":
            t0 = time.perf_counter()
            ids = [client.sendTask("NOOP", {"i": i})["taskid"] for i in range(tasks)]
            submitted = time.perf_counter()
            wait_done(client, ids, 0.01, deadline)
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
                tid = client.sendTask("NOOP", {"i": i})["taskid"]
                wait_done(client, [tid], 0.001, deadline)
                lat.append(time.perf_counter() - t0)
            figures = {"tasks": tasks, "p50_ms": 1000 * pct(lat, 0.5)}
            figures["p99_ms"] = 1000 * pct(lat, 0.99)
        elif workload == "sleep":
            t0 = time.perf_counter()
            task = {"seconds": sleep_ms / 1000}
            ids = [client.sendTask("SLEEP", task)["taskid"] for _ in range(tasks)]
            wait_done(client, ids, 0.005, deadline)
            elapsed = time.perf_counter() - t0
            ideal = tasks * sleep_ms / 1000 / workers
            figures = {
                "tasks": tasks,
                "makespan_s": elapsed,
                "ideal_s": ideal,
                "efficiency": ideal / elapsed,
            }
        else:
            raise SystemExit(f"seed: unknown workload {workload!r}")
    finally:
        with open(out, "w") as f:
            json.dump(figures, f)
        for p in (hub, lb):
            p.terminate()
        for p in (hub, lb):
            p.join(10)
        os.unlink(pfile)


if __name__ == "__main__":
    main()
