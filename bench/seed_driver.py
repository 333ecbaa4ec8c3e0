"""The seed's side of ``bench/run.py seed``: run in pyLoadBalancer 0.2.0's own venv.

``python seed_driver.py OUT WORKLOAD TASKS WORKERS SLEEP_MS`` starts the old load balancer
and one worker hub with WORKERS workers (one priority band, free ports), runs WORKLOAD
from one client the way the old client is used (``sendTask``, then ``getTask`` polled until
progress 100), writes one JSON object of figures to OUT and stops everything.

The workloads are ``baseline_workloads.measure``'s; a batch is polled with ``getTask`` of a
list. Standard library and pyLoadBalancer only: this file never imports lbmqtt (it runs
where lbmqtt is not installed).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from baseline_workloads import arguments, measure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.ports import free_port  # (standard library only)


def noop(**kwargs: Any) -> None:
    return None


def sleeper(**kwargs: Any) -> bool:
    time.sleep(kwargs["task"]["seconds"])
    return True


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
    out, workload, tasks, workers, sleep_ms = arguments()
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

    def send(name: str, arg: Any) -> str:
        task = {"i": arg} if name == "NOOP" else {"seconds": arg}
        return str(client.sendTask(name, task)["taskid"])

    figures: dict[str, Any] = {}
    try:
        figures = measure(
            workload,
            tasks,
            workers,
            sleep_ms,
            send,
            lambda ids, poll, end: wait_done(client, ids, poll, end),
        )
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
