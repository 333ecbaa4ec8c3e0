"""``python bench/run.py seed``: lbmqtt against the system it descends from, in one run.

pyLoadBalancer 0.2.0 is installed, when missing, in a venv of its own
(``$XDG_CACHE_HOME/lbmqtt/seed-pyLoadBalancer-0.2.0``, else ``~/.cache/...``; its setup
needs pyzmq, colorama and psutil first, and ``--no-build-isolation``). Then, for each of
``--rounds`` rounds, each system runs the three workloads on ``--workers`` workers, with a
fresh start of every process for each workload: no-op ``throughput`` (``--tasks``, one
client), ``latency`` (``--latency-tasks`` tasks one at a time) and ``sleep``
(``--sleep-tasks`` tasks of ``--sleep-ms``). The order alternates (seed then lbmqtt, lbmqtt
then seed, ...), so that a machine growing busier or quieter during the run favours
neither. The last line printed is one JSON object: the medians of each system and the
ratios lbmqtt / seed (for latency, seed / lbmqtt: how many times faster), with every
round's figures beside them.

lbmqtt runs as in production: broker, balancer (journal on) and one node in their own
processes (``bench/run.py``'s set-up; ``--broker mosquitto`` for Mosquitto), the client here.
The seed runs its load balancer and one worker hub (``bench/seed_driver.py``, in the seed's
venv); its client polls ``getTask`` as its README shows (every 10 ms for a batch, 1 ms for a
lone task). Its health check and web monitor are not started: they take no part in a
task's path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

SEED = "pyLoadBalancer==0.2.0"
HERE = Path(__file__).resolve().parent
DRIVER = HERE / "seed_driver.py"
WORKLOADS = ("throughput", "latency", "sleep")


def seed_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lbmqtt" / "seed-pyLoadBalancer-0.2.0"


def ensure_seed(venv: Path) -> Path:
    """The seed venv's python, installing pyLoadBalancer 0.2.0 there first if missing."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import pyLoadBalancer, zmq, psutil"]
    if py.exists() and subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return py
    print(f"installing {SEED} in {venv} (once) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "pyzmq", "colorama", "psutil", "setuptools", "wheel"], check=True)
    sdist = venv / "sdist"
    subprocess.run(
        [str(py), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SEED,
         "-d", str(sdist)],
        check=True,
    )  # fmt: skip
    (archive,) = sdist.glob("pyLoadBalancer-*")
    subprocess.run([*pip, "--no-build-isolation", "--no-deps", str(archive)], check=True)
    subprocess.run(check, check=True)
    return py


def run_seed(py: Path, workload: str, args: argparse.Namespace) -> dict[str, Any]:
    """One workload on a freshly started seed (its own process group, ended at once)."""
    n = {"throughput": args.tasks, "latency": args.latency_tasks, "sleep": args.sleep_tasks}
    fd, out = tempfile.mkstemp(prefix="seed-out-", suffix=".json")
    os.close(fd)
    cmd = [str(py), str(DRIVER), out, workload, str(n[workload]), str(args.workers)]
    proc = subprocess.Popen(
        [*cmd, str(args.sleep_ms)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=900)
    finally:
        # the driver, its load balancer, worker hub, hub's manager and workers: all ours,
        # all in the session it leads
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    figures: dict[str, Any] = json.loads(Path(out).read_text() or "{}")
    os.unlink(out)
    if proc.returncode != 0 or not figures:
        raise SystemExit(f"seed {workload} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return figures


def run_lbmqtt(workload: str, args: argparse.Namespace) -> dict[str, Any]:
    """One workload on a freshly started lbmqtt (bench/run.py's set-up, journal on)."""
    import run as bench  # (bench/run.py: this file is imported by it)

    n = {"throughput": args.tasks, "latency": args.latency_tasks, "sleep": args.sleep_tasks}
    sargs = argparse.Namespace(
        scenario=workload,
        tasks=n[workload],
        workers=args.workers,
        sleep_ms=args.sleep_ms,
        stages=False,
    )
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="lbmqtt-seed-"))
    env = dict(os.environ)
    env.update(
        LBMQTT_LOG_LEVEL="WARNING",
        LBMQTT_LB_QUEING_MAXPERUSER="0",
        LBMQTT_METRICS_PORT="0",
        LBMQTT_JOURNAL_PATH=str(workdir / "journal.sqlite3"),
    )
    try:
        with bench.bench_broker(args.broker, env=env) as (port, _, children):
            common = ["--broker-port", str(port), "--prefix", prefix]
            node = ["node", *common, "--tasks", bench.DEMO, "--name", "bench"]
            children.append(bench._spawn("node", [*node, "--workers", str(args.workers)], env=env))
            children.append(bench._spawn("balancer", ["balancer", *common], env=env))
            return asyncio.run(bench.scenario(sargs, port, prefix))
    finally:
        for p in workdir.iterdir():
            p.unlink()
        workdir.rmdir()


SYSTEMS = ("seed", "lbmqtt")
KEYS = {"throughput": "tasks_per_s", "latency": "p50_ms", "sleep": "efficiency"}


def seed(args: argparse.Namespace) -> dict[str, Any]:
    py = ensure_seed(Path(args.seed_venv) if args.seed_venv else seed_venv())
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {"seed": [], "lbmqtt": []} for w in WORKLOADS
    }
    for r in range(args.rounds):
        order = ("seed", "lbmqtt") if r % 2 == 0 else ("lbmqtt", "seed")
        for workload in WORKLOADS:
            for system in order:
                t0 = time.monotonic()
                figures = (
                    run_seed(py, workload, args) if system == "seed" else run_lbmqtt(workload, args)
                )
                rounds[workload][system].append(figures)
                print(
                    f"round {r + 1}/{args.rounds} {workload:10} {system:6} "
                    f"{KEYS[workload]}={figures[KEYS[workload]]:.3f} "
                    f"({time.monotonic() - t0:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    out: dict[str, Any] = {}
    for workload, key in KEYS.items():
        med = {s: statistics.median(f[key] for f in rounds[workload][s]) for s in SYSTEMS}
        out[f"seed_{workload}_{key}"] = med["seed"]
        out[f"lbmqtt_{workload}_{key}"] = med["lbmqtt"]
        # same-round ratios, then their median: each pair ran back to back
        pairs = zip(rounds[workload]["seed"], rounds[workload]["lbmqtt"], strict=True)
        if workload == "latency":
            ratios = [s[key] / m[key] for s, m in pairs]
            out["latency_p50_seed_over_lbmqtt"] = statistics.median(ratios)
            out["seed_latency_p99_ms"] = statistics.median(
                f["p99_ms"] for f in rounds[workload]["seed"]
            )
            out["lbmqtt_latency_p99_ms"] = statistics.median(
                f["p99_ms"] for f in rounds[workload]["lbmqtt"]
            )
        else:
            ratios = [m[key] / s[key] for s, m in pairs]
            out[f"{workload}_lbmqtt_over_seed"] = statistics.median(ratios)
        out[f"{workload}_ratio_per_round"] = [round(x, 3) for x in ratios]
    out.update(
        rounds=args.rounds,
        tasks=args.tasks,
        latency_tasks=args.latency_tasks,
        sleep_tasks=args.sleep_tasks,
        sleep_ms=args.sleep_ms,
        per_round={w: rounds[w] for w in WORKLOADS},
    )
    return out
