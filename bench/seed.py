"""``python bench/run.py seed``: lbmqtt against the system it descends from, and against
Celery, in one run.

pyLoadBalancer 0.2.0 is installed, when missing, in a venv of its own
(``$XDG_CACHE_HOME/lbmqtt/seed-pyLoadBalancer-0.2.0``, else ``~/.cache/...``; its setup
needs pyzmq, colorama and psutil first, and ``--no-build-isolation``); so is Celery 5 with
Redis support (``.../celery-5``), which runs when ``redis-server`` is installed (Debian:
``apt install redis-server``; ``--no-celery`` leaves it out). Then, for each of ``--rounds``
rounds, each system runs the three workloads on ``--workers`` workers, with a fresh start
of every process for each workload: no-op ``throughput`` (``--tasks``, one client),
``latency`` (``--latency-tasks`` tasks one at a time) and ``sleep`` (``--sleep-tasks``
tasks of ``--sleep-ms``). The order of the systems turns each round, so that a machine
growing busier or quieter during the run favours none. The last line printed is one JSON
object: the medians of each system and the ratios of lbmqtt to each (for latency, theirs
over lbmqtt's: how many times faster), medians of the ratios of each round, with every
round's figures beside them.

lbmqtt runs as in production: broker, balancer (journal on) and one node in their own
processes (``bench/run.py``'s set-up; ``--broker mosquitto`` for Mosquitto), the client here.
The seed runs its load balancer and one worker hub (``bench/seed_driver.py``, in the seed's
venv); its client polls ``getTask`` as its README shows (every 10 ms for a batch, 1 ms for a
lone task). Its health check and web monitor are not started: they take no part in a
task's path. Celery runs one prefork worker on a Redis of its own (broker and result
backend; ``bench/celery_driver.py``, in Celery's venv).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SEED = "pyLoadBalancer==0.2.0"
HERE = Path(__file__).resolve().parent
DRIVER = HERE / "seed_driver.py"
CELERY_DRIVER = HERE / "celery_driver.py"
WORKLOADS = ("throughput", "latency", "sleep")


def ensure_venv(venv: Path, imports: str, what: str, install: Callable[[list[str]], None]) -> Path:
    """The python of ``venv``, which can import ``imports``; when it cannot, the venv is made
    again and ``install(pip)`` fills it (``pip``: its ``pip install`` command)."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", f"import {imports}"]
    if py.exists() and subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return py
    print(f"installing {what} in {venv} (once) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    install([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"])
    subprocess.run(check, check=True)
    return py


def ensure_seed(venv: Path) -> Path:
    """The seed venv's python, installing pyLoadBalancer 0.2.0 there first if missing."""

    def install(pip: list[str]) -> None:
        subprocess.run([*pip, "pyzmq", "colorama", "psutil", "setuptools", "wheel"], check=True)
        sdist = venv / "sdist"
        subprocess.run(
            [pip[0], "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SEED,
             "-d", str(sdist)],
            check=True,
        )  # fmt: skip
        (archive,) = sdist.glob("pyLoadBalancer-*")
        subprocess.run([*pip, "--no-build-isolation", "--no-deps", str(archive)], check=True)

    return ensure_venv(venv, "pyLoadBalancer, zmq, psutil", SEED, install)


def ensure_celery(venv: Path) -> Path:
    """Celery's venv python, installing Celery 5 with Redis support there first if missing."""

    def install(pip: list[str]) -> None:
        subprocess.run([*pip, "celery[redis]>=5.3,<6"], check=True)

    return ensure_venv(venv, "celery, redis", "Celery", install)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A Redis of its own on a free loopback port, without persistence; yields its URL."""
    import run as bench  # (bench/run.py: this file is imported by it)

    exe = shutil.which("redis-server")
    assert exe is not None
    port = bench.free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        bench.wait_listening(proc, port, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def run_driver(
    py: Path,
    driver: Path,
    workload: str,
    args: argparse.Namespace,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One workload on a freshly started baseline (its driver leads a process group of its
    own, ended at once)."""
    n = {"throughput": args.tasks, "latency": args.latency_tasks, "sleep": args.sleep_tasks}
    fd, out = tempfile.mkstemp(prefix="seed-out-", suffix=".json")
    os.close(fd)
    cmd = [str(py), str(driver), out, workload, str(n[workload]), str(args.workers)]
    proc = subprocess.Popen(
        [*cmd, str(args.sleep_ms)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        _, err = proc.communicate(timeout=900)
    finally:
        # the driver and what it started (the seed's load balancer, worker hub, its manager
        # and workers; Celery's worker and its pool): all ours, all in the session it leads
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    figures: dict[str, Any] = json.loads(Path(out).read_text() or "{}")
    os.unlink(out)
    if proc.returncode != 0 or not figures:
        raise SystemExit(
            f"{driver.name} {workload} failed ({proc.returncode}): {err.decode()[-2000:]}"
        )
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
        LBMQTT_JOURNAL_PATH=str(workdir / "journal"),
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


KEYS = {"throughput": "tasks_per_s", "latency": "p50_ms", "sleep": "efficiency"}


def seed(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lbmqtt"
    seed_py = ensure_seed(
        Path(args.seed_venv) if args.seed_venv else cache / "seed-pyLoadBalancer-0.2.0"
    )
    systems = ["seed", "lbmqtt"]
    celery_py = None
    if args.celery and shutil.which("redis-server"):
        celery_py = ensure_celery(cache / "celery-5")
        systems.append("celery")
    elif args.celery:
        print("redis-server not found (apt install redis-server): Celery left out",
              file=sys.stderr, flush=True)  # fmt: skip

    def run_one(system: str, workload: str) -> dict[str, Any]:
        if system == "seed":
            return run_driver(seed_py, DRIVER, workload, args)
        if system == "lbmqtt":
            return run_lbmqtt(workload, args)
        assert celery_py is not None
        with redis_server() as url:
            return run_driver(celery_py, CELERY_DRIVER, workload, args, {"BENCH_REDIS_URL": url})

    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {s: [] for s in systems} for w in WORKLOADS
    }
    for r in range(args.rounds):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]
        for workload in WORKLOADS:
            for system in order:
                t0 = time.monotonic()
                figures = run_one(system, workload)
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
        for system in systems:
            out[f"{system}_{workload}_{key}"] = statistics.median(
                f[key] for f in rounds[workload][system]
            )
        if workload == "latency":
            for system in systems:
                out[f"{system}_latency_p99_ms"] = statistics.median(
                    f["p99_ms"] for f in rounds[workload][system]
                )
        for base in systems:
            if base == "lbmqtt":
                continue
            # same-round ratios, then their median: each pair ran in the same round
            pairs = zip(rounds[workload][base], rounds[workload]["lbmqtt"], strict=True)
            if workload == "latency":
                ratios = [b[key] / m[key] for b, m in pairs]
                name = f"latency_p50_{base}_over_lbmqtt"
            else:
                ratios = [m[key] / b[key] for b, m in pairs]
                name = f"{workload}_lbmqtt_over_{base}"
            out[name] = statistics.median(ratios)
            out[f"{name}_per_round"] = [round(x, 3) for x in ratios]
    out.update(
        systems=systems,
        rounds=args.rounds,
        tasks=args.tasks,
        latency_tasks=args.latency_tasks,
        sleep_tasks=args.sleep_tasks,
        sleep_ms=args.sleep_ms,
        per_round={w: rounds[w] for w in WORKLOADS},
    )
    return out
