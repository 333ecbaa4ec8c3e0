"""Scheduling benchmarks on the pure scheduler (no MQTT): ``python bench/scheduling.py``.

``select``   time to pick the next task (place one task on a freed slot) with 1k, 100k and
             1M queued tasks, and the balancer's memory (RSS) holding 1M queued tasks.
``runs``     the balancer's steady state under a burst of no-op tasks: 60,000 queued, each
             round releasing 60 placed tasks and placing again (nodes of 4 slots with a
             window of 32 each): microseconds per placement, median of ``--rounds`` runs,
             for 1 node, 1 user and 1 name, then 4 nodes, 3 users and 2 names.
``makespan`` a simulated cluster of unequal machines (speeds 1, 2 and 4, mixed task
             durations): makespan of lbmqtt's placement against round-robin, "least loaded
             first", and the lower bound (total work / total speed).

Each prints one JSON line with its figures; ``all`` runs both.

``--scenario NAME`` (or ``all``; repeatable) runs named scenarios of unequal machines
(``bench/scenarios.py``: the mixed batch above, heavy-tailed sizes, short-then-long, a slow
node with long tasks last, a node slowing down midway, unseen task names) with lbmqtt's real
scheduler learning from zero, against round-robin, least-loaded, speed-aware greedy and a
clairvoyant list scheduler: makespan over the lower bound, median and worst over ``--seeds``
seeds, as a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lbmqtt.scheduler import Group, NodeCaps, QueuedTask, Scheduler


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- select


def bench_select(sizes: list[int], users: int, names: int, picks: int) -> dict[str, Any]:
    """Median time of one release+schedule (one placement) at each queue size."""
    out: dict[str, Any] = {"users": users, "names": names}
    rng = random.Random(1)
    for n in sizes:
        gc.collect()
        s = Scheduler()
        s.set_node(
            NodeCaps(
                "n1",
                (Group(0, 4, 0, 9), Group(1, 2, 10, 1000)),
                frozenset(f"T{i}" for i in range(names)),
                1.0,
            )
        )
        s.set_node(
            NodeCaps("n2", (Group(0, 8, 0, 1000),), frozenset(f"T{i}" for i in range(names)), 2.0)
        )
        t0 = time.perf_counter()
        for i in range(n):
            s.enqueue(
                QueuedTask(
                    f"t{i:08d}",
                    f"u{i % users}",
                    f"T{rng.randrange(names)}",
                    rng.choice((0, 0, 0, 5, 50)),
                    i,
                )
            )
        fill = time.perf_counter() - t0
        placed = [p.task.id for p in s.schedule()]  # fill the 14 slots
        times = []
        for _ in range(min(picks, n - len(placed))):
            s.release(placed.pop(0))
            t0 = time.perf_counter()
            got = s.schedule()
            times.append(time.perf_counter() - t0)
            placed += [p.task.id for p in got]
        out[f"pick_us_{n}"] = round(1e6 * statistics.median(times), 1)
        out[f"enqueue_us_per_task_{n}"] = round(1e6 * fill / n, 2)
        del s
    return out


def _runs_once(nodes: int, users: int, names: int, n: int) -> float:
    s = Scheduler()
    for k in range(nodes):
        tasks = frozenset(f"T{i}" for i in range(names))
        s.set_node(NodeCaps(f"n{k}", (Group(0, 4, -1000, 1000),), tasks, 1.0, cores=4))
        s.set_window(f"n{k}", 32)
        for i in range(names):
            s.observe(f"T{i}", f"n{k}", 0.0001)  # known to be short: window places
    for i in range(n):
        s.enqueue(QueuedTask(f"t{i:08d}", f"u{i % users}", f"T{i % names}", 0, i))
    placed: list[str] = []
    now, count = 1000.0, 0
    t0 = time.perf_counter()
    for _ in range(10 * n):  # (bounded: each round places at least one task)
        if not s.queued:
            break
        got = s.schedule(now)
        count += len(got)
        placed += [p.task.id for p in got]
        for tid in placed[:60]:
            s.release(tid)
        del placed[:60]
        now += 0.01
    return 1e6 * (time.perf_counter() - t0) / max(1, count)


def bench_runs(n: int, rounds: int) -> dict[str, Any]:
    """Microseconds per placement while a burst drains (see the module docstring)."""
    out: dict[str, Any] = {"tasks": n, "rounds": rounds}
    for nodes, users, names in ((1, 1, 1), (4, 3, 2)):
        times = [_runs_once(nodes, users, names, n) for _ in range(rounds)]
        out[f"us_per_placement_{nodes}n_{users}u_{names}names"] = round(statistics.median(times), 2)
    return out


def bench_memory(n: int) -> dict[str, Any]:
    """RSS of a real Balancer holding ``n`` queued tasks (records + scheduler queues)."""
    import asyncio

    from lbmqtt.balancer import Balancer
    from lbmqtt.config import load_settings
    from lbmqtt.protocol import TaskSpec

    gc.collect()
    before = rss_mb()
    s = load_settings(None, env={}, overrides={"LB_QUEING_MAXPERUSER": 0})

    async def fill() -> Balancer:
        b = Balancer(s)  # not started: no MQTT needed to hold tasks
        now = time.time()
        for i in range(n):
            spec = TaskSpec(name="HELLO", args={"i": i}, notify="events")
            b.users.accept(sys.intern(f"user{i % 10}"), spec, now)
            if i % 100_000 == 0:
                b.outbox.states.clear()  # the tick would have published and dropped these
        b.outbox.states.clear()
        return b

    b = asyncio.run(fill())
    gc.collect()
    after = rss_mb()
    return {
        "tasks": n,
        "balancer_rss_mb": round(after, 1),
        "added_rss_mb": round(after - before, 1),
        "bytes_per_task": round((after - before) * 2**20 / n),
        "queued": b.scheduler.queued,
    }


# --------------------------------------------------------------------------- makespan


def simulate(
    policy: str,
    durations: list[float],
    speeds: list[float],
    slots: int,
    arrivals: list[float] | None = None,
) -> tuple[float, float]:
    """Discrete-event simulation of tasks (work units at speed 1) on nodes of given speeds.

    Returns (makespan, mean response time = finish - arrival).
    """
    n = len(durations)
    arrivals = arrivals or [0.0] * n
    kinds = {f"t{i}": f"W{int(d)}" for i, d in enumerate(durations)}  # a name per class
    nodes = [
        NodeCaps(f"n{i}", (Group(0, slots, 0, 10),), frozenset(set(kinds.values())), sp)
        for i, sp in enumerate(speeds)
    ]
    s = Scheduler()
    for c in nodes:
        s.set_node(c)
    work = {f"t{i}": d for i, d in enumerate(durations)}
    queue: list[str] = []  # FIFO for the baselines
    running: list[tuple[float, str, str]] = []  # (end time, task id, node)
    busy = {c.name: 0 for c in nodes}
    finish: dict[str, float] = {}
    now, rr, nxt = 0.0, 0, 0

    def start(tid: str, node: str) -> None:
        heapq.heappush(running, (now + work[tid] / speeds[int(node[1:])], tid, node))
        busy[node] += 1

    while nxt < n or queue or running or s.queued:
        while nxt < n and arrivals[nxt] <= now:  # arrivals up to now
            tid = f"t{nxt}"
            if policy == "lbmqtt":
                s.enqueue(QueuedTask(tid, f"u{nxt % 3}", kinds[tid], 0, nxt))
            else:
                queue.append(tid)
            nxt += 1
        if policy == "lbmqtt":
            for p in s.schedule(now):
                start(p.task.id, p.node)
        else:
            while queue:
                free = [c.name for c in nodes if busy[c.name] < slots]
                if not free:
                    break
                if policy == "round_robin":
                    while busy[nodes[rr % len(nodes)].name] >= slots:
                        rr += 1
                    node = nodes[rr % len(nodes)].name
                    rr += 1
                else:  # least loaded first (by busy fraction; ties: node order)
                    node = min(free, key=lambda x: (busy[x] / slots, x))
                start(queue.pop(0), node)
        next_arrival = arrivals[nxt] if nxt < n else float("inf")
        if running and running[0][0] <= next_arrival:
            end, tid, node = heapq.heappop(running)
            now = end
            finish[tid] = end
            busy[node] -= 1
            if policy == "lbmqtt":
                s.observe(kinds[tid], node, work[tid] / speeds[int(node[1:])])
                s.release(tid)
        elif next_arrival < float("inf"):
            now = next_arrival
        else:
            break
    response = statistics.mean(finish[f"t{i}"] - arrivals[i] for i in range(n))
    return now, response


POLICIES = ("lbmqtt", "round_robin", "least_loaded")


def bench_makespan(tasks: int, seeds: int) -> dict[str, Any]:
    """A batch of mixed tasks (all queued at once), and a stream at 40 % load."""
    speeds = [1.0, 2.0, 4.0]
    slots = 2
    capacity = sum(speeds) * slots
    batch: dict[str, list[float]] = {p: [] for p in POLICIES}
    stream: dict[str, list[float]] = {p: [] for p in POLICIES}
    for seed in range(seeds):
        rng = random.Random(seed)
        # mixed durations: many short, some medium, a few long (work units at speed 1)
        durations = [
            rng.choice((1, 1, 1, 2, 2, 5, 10)) * rng.uniform(0.8, 1.2) for _ in range(tasks)
        ]
        lower = sum(durations) / capacity
        mean_work = statistics.mean(durations)
        t, arrivals = 0.0, []
        for _ in range(tasks):  # Poisson arrivals at 40 % of the cluster's capacity
            t += rng.expovariate(0.4 * capacity / mean_work)
            arrivals.append(t)
        for policy in POLICIES:
            batch[policy].append(simulate(policy, durations, speeds, slots)[0] / lower)
            stream[policy].append(simulate(policy, durations, speeds, slots, arrivals)[1])
    out: dict[str, Any] = {
        "tasks": tasks,
        "speeds": speeds,
        "slots_per_node": slots,
        "seeds": seeds,
    }
    for p in POLICIES:
        out[f"batch_makespan_over_lower_bound_{p}"] = round(statistics.median(batch[p]), 3)
        out[f"batch_worst_{p}"] = round(max(batch[p]), 3)
        out[f"stream_mean_response_{p}"] = round(statistics.median(stream[p]), 3)
    return out


def bench_scenarios(names: list[str], seeds: int) -> dict[str, Any]:
    """Makespan / lower bound of every policy in each scenario: median and worst."""
    from scenarios import SCENARIOS, baseline, clairvoyant, lower_bound, simulate_lbmqtt

    policies = (
        "lbmqtt",
        "lbmqtt_no_copies",
        "round_robin",
        "least_loaded",
        "greedy",
        "clairvoyant",
    )
    out: dict[str, Any] = {"seeds": seeds}
    rows = []
    for name in names:
        ratios: dict[str, list[float]] = {p: [] for p in policies}
        copies: list[int] = []
        for seed in range(seeds):
            case = SCENARIOS[name](random.Random(seed))
            bound = lower_bound(case)
            st = simulate_lbmqtt(case)
            copies.append(st.copies)
            ratios["lbmqtt"].append(st.makespan / bound)
            ratios["lbmqtt_no_copies"].append(
                simulate_lbmqtt(case, speculate=False, take_back=False).makespan / bound
            )
            for p in ("round_robin", "least_loaded", "greedy"):
                ratios[p].append(baseline(case, p) / bound)
            ratios["clairvoyant"].append(clairvoyant(case) / bound)
        row = {p: (statistics.median(v), max(v)) for p, v in ratios.items()}
        rows.append((name, row, statistics.median(copies)))
        for p, (med, worst) in row.items():
            out[f"{name}.{p}.median"] = round(med, 3)
            out[f"{name}.{p}.worst"] = round(worst, 3)
        out[f"{name}.copies.median"] = statistics.median(copies)
    head = f"{'scenario (makespan / bound)':28}" + "".join(f"{p:>18}" for p in policies)
    print(head)
    print(f"{'':28}" + "".join(f"{'median  worst':>18}" for _ in policies))
    for name, row, _ in rows:
        print(f"{name:28}" + "".join(f"{row[p][0]:>11.2f}{row[p][1]:>7.2f}" for p in policies))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("scenario", nargs="?", choices=["select", "runs", "makespan", "all"])
    ap.add_argument(
        "--scenario",
        dest="named",
        action="append",
        metavar="NAME",
        help="a named scenario of unequal machines (bench/scenarios.py), or all",
    )
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--names", type=int, default=5)
    ap.add_argument("--picks", type=int, default=2000)
    ap.add_argument("--memory-tasks", type=int, default=1_000_000)
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--runs-tasks", type=int, default=60_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if a.named:
        from scenarios import SCENARIOS

        names = list(SCENARIOS) if "all" in a.named else a.named
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            ap.error(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}, all")
        print(json.dumps({"scenario": "scenarios", **bench_scenarios(names, a.seeds)}))
    elif a.scenario is None:
        ap.error("give select, runs, makespan, all, or --scenario NAME")
    if a.scenario in ("select", "all"):
        res = bench_select([int(x) for x in a.sizes.split(",")], a.users, a.names, a.picks)
        res.update(bench_memory(a.memory_tasks))
        print(json.dumps({"scenario": "select", **res}))
    if a.scenario in ("runs", "all"):
        print(json.dumps({"scenario": "runs", **bench_runs(a.runs_tasks, a.rounds)}))
    if a.scenario in ("makespan", "all"):
        print(json.dumps({"scenario": "makespan", **bench_makespan(a.tasks, a.seeds)}))


if __name__ == "__main__":
    main()
