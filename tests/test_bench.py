"""The benchmark scripts still run (tiny sizes) and end with their JSON line. Their figures
are read by people, never asserted here, except the chaos accounting, which is correctness."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def _bench(*args: str, timeout: float = 120) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def test_bench_nodes_runs() -> None:
    out = _bench("bench/nodes.py", "--nodes", "5", "--tasks", "50", "--rest-s", "0.5")
    assert out["nodes_used"] >= 1 and out["dispatch_tasks_per_s"] > 0


def test_bench_journal_runs() -> None:
    out = _bench("bench/journal.py", "--tasks", "2000", "--repeat", "1")
    assert out["restart_s"] >= 0 and out["journal_mb"] > 0


def test_bench_chaos_loses_nothing_in_a_short_run() -> None:
    out = _bench(
        "bench/chaos.py",
        "--seconds",
        "7",
        "--faults",
        "worker-kill,balancer-kill",
        "--interval",
        "2",
        "3",
        "--nodes",
        "2",
        "--seed",
        "3",
        timeout=240,
    )
    assert out["submitted"] > 0
    assert (out["lost"], out["duplicated"], out["wrong"]) == (0, 0, 0), out


def test_bench_run_idle_runs() -> None:
    out = _bench("bench/run.py", "idle", "--seconds", "1", "--workers", "1")
    assert out["processes"] >= 5 and out["cpu_pct_total"] >= 0


def test_bench_run_lan_runs() -> None:
    out = _bench(
        "bench/run.py", "lan", "--rounds", "1", "--tasks", "100", "--workers", "2", timeout=240
    )
    assert out["tasks_per_s_0ms"] > 0 and out["tasks_per_s_2ms"] > 0


def test_bench_run_scale_runs() -> None:
    out = _bench(
        "bench/run.py",
        "scale",
        "--tasks",
        "3000",
        "--nodes",
        "4",
        "--users",
        "3",
        "--seconds",
        "1",
        timeout=240,
    )
    assert out["queued"] == 3000 and out["accept_tasks_per_s"] > 0
    # (at this size the nodes may drain the queue before the timed window opens)
    assert out["rss_mb_queued"] > 0 and out["done_total"] > 0


def test_bench_run_seed_runs() -> None:
    # (installs pyLoadBalancer 0.2.0 from the package index in a venv of its own, once)
    out = _bench(
        "bench/run.py", "seed", "--rounds", "2", "--tasks", "100", "--latency-tasks", "3",
        "--sleep-tasks", "8", "--workers", "2", "--no-celery", timeout=600,
    )  # fmt: skip
    assert out["seed_throughput_tasks_per_s"] > 0 and out["lbmqtt_throughput_tasks_per_s"] > 0
    assert (
        len(out["latency_p50_seed_over_lbmqtt_per_round"]) == 2 and out["seed_latency_p50_ms"] > 0
    )
    assert out["seed_sleep_efficiency"] > 0 and out["lbmqtt_sleep_efficiency"] > 0


def test_bench_scheduling_scenarios_print_every_policy_against_the_bound() -> None:
    out = _bench("bench/scheduling.py", "--scenario", "slow-node-long-last", "--seeds", "2")
    for policy in ("lbmqtt", "round_robin", "least_loaded", "greedy", "clairvoyant"):
        # nothing beats the lower bound
        assert out[f"slow-node-long-last.{policy}.median"] >= 1.0
        assert (
            out[f"slow-node-long-last.{policy}.worst"]
            >= out[f"slow-node-long-last.{policy}.median"]
        )


def test_bench_run_unequal_runs_with_and_without_copies() -> None:
    out = _bench(
        "bench/run.py",
        "unequal",
        "--nodes",
        "2",
        "--tasks",
        "20",
        "--long",
        "1",
        "--rounds",
        "1",
        timeout=240,
    )
    # (the figures are read by people; a makespan below the bound would be a broken bench)
    assert out["over_bound_speculate_on"] >= 1.0 and out["over_bound_speculate_off"] >= 1.0


def test_bench_throughput_runs_and_accounts_each_process() -> None:
    out = _bench("bench/run.py", "throughput", "--tasks", "300", timeout=180)
    roles = {"balancer", "node", "broker", "client", "workers"}
    assert out["tasks_per_s"] > 0
    assert set(out["cpu_us_per_task"]) == roles | {"all"}
    assert set(out["runqueue_wait_pct"]) == roles
    assert all(v >= 0 for v in out["runqueue_wait_pct"].values())
    phases = out["cpu_pct_by_phase"]
    assert set(phases) == {"submit", "drain"}
    for pct in phases.values():
        assert set(pct) == roles | {"all"}
        assert all(v >= 0 for v in pct.values())
        assert pct["all"] == pytest.approx(sum(v for k, v in pct.items() if k != "all"), abs=1)
        assert pct["client"] > 0  # (it submits, then takes the results in, in each phase)
