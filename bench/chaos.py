"""Chaos run: a steady stream of tasks through random faults for a set time, then an
accounting. ``python bench/chaos.py [--seconds 60] [--broker embedded|mosquitto]
[--nodes 3] [--workers 2] [--rate 25] [--task-ms 150] [--faults a,b,...] [--seed N]``

Faults (default: all but ``netcut``, which needs root and iproute2):
``worker-kill`` SIGKILL one worker process; ``node-kill`` SIGKILL a node daemon and start
it again; ``node-stop`` SIGSTOP a node (and its workers) past the heartbeat deadline, then
SIGCONT; ``node-drain`` SIGTERM a node (graceful) and start it again; ``balancer-kill``
SIGKILL the balancer and start it again; ``broker-restart`` SIGKILL the broker and start it
again (no persistence: sessions and retained messages are gone); ``netcut`` a node in its
own network namespace loses its link for a few seconds.

Every component is a real process on loopback (``netcut``: a namespace this script
makes). The last line printed is one JSON object: submitted / done / failed / lost /
duplicated (ran to completion more often than a retry explains) / reruns (completions
explained by retries) / faults injected.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster, NetNs, Stream, account  # noqa: E402

ALL_FAULTS = [
    "worker-kill",
    "node-kill",
    "node-stop",
    "node-drain",
    "balancer-kill",
    "broker-restart",
    "netcut",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--seconds", type=float, default=120.0, help="how long tasks flow and faults are injected"
    )
    ap.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="worker slots per node")
    ap.add_argument("--rate", type=float, default=25.0, help="tasks submitted per second")
    ap.add_argument("--task-ms", type=float, default=150.0, help="duration of each task")
    ap.add_argument(
        "--interval",
        type=float,
        nargs=2,
        default=[2.0, 5.0],
        metavar=("MIN", "MAX"),
        help="seconds between faults (uniform)",
    )
    ap.add_argument("--faults", help=f"comma-separated, from {','.join(ALL_FAULTS)}")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument(
        "--journal-format",
        choices=["sqlite", "log"],
        default=None,
        help="the balancer's JOURNAL_FORMAT (default: the project's)",
    )
    ns = ap.parse_args()

    seed = ns.seed if ns.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    faults = ns.faults.split(",") if ns.faults else [f for f in ALL_FAULTS if f != "netcut"]
    unknown = set(faults) - set(ALL_FAULTS)
    if unknown:
        ap.error(f"unknown faults: {', '.join(sorted(unknown))}")
    if "netcut" in faults and NetNs.available():
        ap.error(f"netcut {NetNs.available()}")
    workdir = Path(tempfile.mkdtemp(prefix="lbmqtt-chaos-"))
    injected = Counter[str]()
    with ExitStack() as stack:
        ns_far = stack.enter_context(NetNs()) if "netcut" in faults else None
        cluster = Cluster(
            workdir,
            broker=ns.broker,
            host=ns_far.host_ip if ns_far else "127.0.0.1",
            overrides={"JOURNAL_FORMAT": ns.journal_format} if ns.journal_format else None,
        )
        stack.callback(cluster.close)
        cluster.start_broker()
        cluster.start_balancer()
        names = [f"n{i + 1}" for i in range(ns.nodes)]

        def start_node(name: str) -> None:
            wrap = ns_far.wrap if ns_far and name == names[-1] else ()
            cluster.start_node(name, workers=ns.workers, wrap=wrap)

        for name in names:
            start_node(name)
        batch = max(1, round(ns.rate / 20))
        stream = Stream(
            cluster, count=10**9, interval_s=batch / ns.rate, task_ms=ns.task_ms, batch=batch
        )
        stream.start()
        t_end = time.monotonic() + ns.seconds
        print(
            f"chaos: seed {seed}, {len(names)} nodes x {ns.workers} slots, "
            f"{ns.rate:g} tasks/s of {ns.task_ms:g} ms, faults {', '.join(faults)}, "
            f"logs in {workdir}",
            flush=True,
        )
        while True:
            pause = rng.uniform(*ns.interval)
            if time.monotonic() + pause > t_end:
                break
            time.sleep(pause)  # a chaos schedule, not a wait for a condition
            fault = rng.choice(faults)
            node = rng.choice(names)
            if fault == "netcut" and ns_far is not None:
                node = names[-1]
            where = "" if fault in ("balancer-kill", "broker-restart") else f" {node}"
            print(
                f"  {time.strftime('%H:%M:%S')} {fault}{where} ({len(stream.expected)} submitted)",
                flush=True,
            )
            if fault == "worker-kill":
                workers = cluster.workers_of(node)
                if workers:
                    os.kill(rng.choice(workers), signal.SIGKILL)
            elif fault == "node-kill":
                cluster.kill(node, signal.SIGKILL)
                start_node(node)
            elif fault == "node-stop":
                pids = [cluster.pid(node), *cluster.workers_of(node)]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):  # (one that just ended)
                        os.kill(pid, signal.SIGSTOP)
                time.sleep(3.5)  # past NODE_TIMEOUT_S and 1.5 x keep-alive
                # the workers first: the node, continued, may at once kill a worker whose
                # task was moved meanwhile, and the pid would be gone
                for pid in reversed(pids):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            elif fault == "node-drain":
                cluster.kill(node, signal.SIGTERM, timeout=30)
                start_node(node)
            elif fault == "balancer-kill":
                cluster.kill("balancer", signal.SIGKILL)
                cluster.start_balancer()
            elif fault == "broker-restart":
                cluster.kill("broker", signal.SIGKILL)
                cluster.start_broker()
            elif fault == "netcut" and ns_far is not None:
                ns_far.cut()
                time.sleep(rng.uniform(1.0, 5.0))
                ns_far.mend()
            injected[fault] += 1
        stream.stop.set()
        t0 = time.monotonic()
        states = stream.collect(timeout=300)
        drain_s = time.monotonic() - t0
        stream.close()
        acc = account(stream.expected, states, cluster.runs_log)
        for line in acc.problems[:20]:
            print("  problem:", line)
        journal_format = cluster.journal_format()  # (by the file's header: what ran)
        if acc.lost or acc.duplicated or acc.wrong:
            ns.keep = True
            print(cluster.log_tail(20))
        if not ns.keep:
            stack.callback(lambda: __import__("shutil").rmtree(workdir, ignore_errors=True))
    figures = {
        "bench": "chaos",
        **acc.summary(),
        "seconds": ns.seconds,
        "drain_after_s": round(drain_s, 2),
        "faults": dict(injected),
        "seed": seed,
        "broker": ns.broker,
        "journal": journal_format,
        "nodes": ns.nodes,
        "workers": ns.workers,
        "rate": ns.rate,
        "task_ms": ns.task_ms,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "workdir": str(workdir) if ns.keep else None,
    }
    print(json.dumps(figures))
    return 1 if acc.lost or acc.duplicated or acc.wrong else 0


if __name__ == "__main__":
    sys.exit(main())
