"""Named scheduling scenarios on simulated unequal machines, and the policies they compare.

Used by ``bench/scheduling.py --scenario``. A scenario is a batch of tasks (work in seconds
at speed 1, a task name, an optional ``cost`` hint) submitted at once in a given order, and
machines with a number of slots and a true speed that may change at some moment (a node
slowing down midway). The simulator is discrete-event; every loop is bounded.

``lbmqtt`` drives the real pure :class:`lbmqtt.scheduler.Scheduler` as the balancer does:
speeds are hints only where the scenario declares them (else every node says 1.0), runtimes
are learned from zero as tasks end, an assignment reaches its node half a round trip after
the decision, a node holds pipelined tasks in a window (sized as the balancer sizes it) and
starts them as its slots free, running tasks report their progress every ``tick`` and the
scheduler is asked again on every event and tick (take-back of unstarted tasks and
speculative copies where the scheduler offers them; the first attempt to end wins, the
other is killed).

Baselines (FIFO queue, no pipelining, the same dispatch delay): ``round_robin`` (next node
in turn with a free slot), ``least_loaded`` (the free slot on the node with the smallest
busy fraction), ``greedy`` (the free slot of the fastest node, true speeds at the start);
``clairvoyant`` is a list scheduler that knows every true runtime (longest task first onto
the slot that finishes it first, the speed change included); ``bound`` is the lower bound:
max(total work / total capacity, the largest task alone on the fastest machine).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from lbmqtt.balancer.tasks import WINDOW_TASKS_MAX, window_per_slot
from lbmqtt.config import Settings
from lbmqtt.scheduler import Group, NodeCaps, QueuedTask, Scheduler

RTT_S = 0.005
"""Dispatch round trip of the simulated LAN (an assignment travels half of it)."""
WINDOW_MAX = Settings().pipeline_window_max
TICK_S = 0.25
"""How often running tasks report progress and the scheduler is asked again."""
MAX_EVENTS = 2_000_000


@dataclass(frozen=True)
class Machine:
    name: str
    slots: int
    speed: float
    """True speed (work per second) until ``change_at``."""
    hint: float = 1.0
    """What the node declares (NODE_SPEED)."""
    change_at: float = math.inf
    speed_after: float = 0.0

    def speed_at(self, t: float) -> float:
        return self.speed if t < self.change_at else self.speed_after

    def finish(self, start: float, work: float) -> float:
        """When ``work`` started at ``start`` ends here."""
        if start >= self.change_at:
            return start + work / self.speed_after
        end = start + work / self.speed
        if end <= self.change_at:
            return end
        left = work - (self.change_at - start) * self.speed
        return self.change_at + left / self.speed_after

    def done(self, start: float, t: float) -> float:
        """Work done by ``t`` of a task started at ``start``."""
        if t <= self.change_at:
            return (t - start) * self.speed
        if start >= self.change_at:
            return (t - start) * self.speed_after
        return (self.change_at - start) * self.speed + (t - self.change_at) * self.speed_after


@dataclass(frozen=True)
class Job:
    id: str
    name: str
    work: float
    cost: float | None = None


@dataclass(frozen=True)
class Case:
    machines: tuple[Machine, ...]
    jobs: tuple[Job, ...]


# ------------------------------------------------------------------------- scenarios


def _jobs(items: list[tuple[str, float]], costs: bool = False) -> tuple[Job, ...]:
    return tuple(
        Job(f"t{i:04d}", name, work, work if costs else None)
        for i, (name, work) in enumerate(items)
    )


def mixed(rng: random.Random) -> Case:
    """bench/scheduling.py makespan's batch: speeds 1, 2, 4 (declared), 2 slots each,
    300 tasks of 1-10 s of work, one task name per size class."""
    machines = tuple(Machine(f"n{i}", 2, sp, hint=sp) for i, sp in enumerate((1.0, 2.0, 4.0)))
    items = []
    for _ in range(300):
        d = rng.choice((1, 1, 1, 2, 2, 5, 10))
        items.append((f"W{d}", d * rng.uniform(0.8, 1.2)))
    return Case(machines, _jobs(items))


def heavy_tail(rng: random.Random) -> Case:
    """One task name, Pareto sizes (alpha 1.5, 0.2 s minimum, capped at 30 s), 200 tasks;
    speeds 1, 1, 2, 4 not declared."""
    machines = tuple(Machine(f"n{i}", 2, sp) for i, sp in enumerate((1.0, 1.0, 2.0, 4.0)))
    items = [("JOB", min(30.0, 0.2 * rng.paretovariate(1.5))) for _ in range(200)]
    return Case(machines, _jobs(items))


def short_then_long(rng: random.Random) -> Case:
    """200 short tasks of four names (0.1-0.3 s), then 6 long ones of a name not seen yet
    (8 s); speeds 1, 1, 2, 4 not declared."""
    machines = tuple(Machine(f"n{i}", 2, sp) for i, sp in enumerate((1.0, 1.0, 2.0, 4.0)))
    items = [(f"S{i % 4}", (0.1 + 0.05 * (i % 4)) * rng.uniform(0.8, 1.2)) for i in range(200)]
    items += [("LONG", 8.0 * rng.uniform(0.9, 1.1)) for _ in range(6)]
    return Case(machines, _jobs(items))


def slow_node(rng: random.Random) -> Case:
    """The issue's measurement: four nodes of 2 slots, one 8x slower than the other three,
    speeds not declared; 200 short tasks (0.1 s), then 4 long ones of a new name (2.6 s)."""
    machines = tuple(
        Machine(f"n{i}", 2, sp) for i, sp in enumerate((1.0, 1.0, 1.0, 0.125))
    )  # the slow one last: ties between idle nodes go by name
    items = [("SHORT", 0.1 * rng.uniform(0.8, 1.2)) for _ in range(200)]
    items += [("LONG", 2.6 * rng.uniform(0.9, 1.1)) for _ in range(4)]
    return Case(machines, _jobs(items))


def slowdown(rng: random.Random) -> Case:
    """Four equal nodes of 2 slots; one slows down 16x at 40 % of the ideal makespan;
    300 tasks of 0.5-4 s of five names."""
    sizes = (0.5, 1.0, 1.0, 2.0, 4.0)
    items = []
    for _ in range(300):
        d = rng.choice(sizes)
        items.append((f"W{d:g}", d * rng.uniform(0.8, 1.2)))
    total = sum(w for _, w in items)
    at = 0.4 * total / 8
    slow = rng.randrange(4)
    machines = tuple(
        Machine(f"n{i}", 2, 1.0, change_at=at if i == slow else math.inf, speed_after=1 / 16)
        for i in range(4)
    )
    return Case(machines, _jobs(items))


def unseen_names(rng: random.Random) -> Case:
    """120 tasks, each of a task name never seen before (0.5-2 s of work); speeds 1, 1, 2, 4
    and 0.25 not declared."""
    speeds = (1.0, 1.0, 2.0, 4.0, 0.25)
    machines = tuple(Machine(f"n{i}", 2, sp) for i, sp in enumerate(speeds))
    items = [(f"U{i}", rng.uniform(0.5, 2.0)) for i in range(120)]
    return Case(machines, _jobs(items))


def sized(rng: random.Random) -> Case:
    """heavy_tail with each task's ``cost`` given (its size): the size hint at work."""
    case = heavy_tail(rng)
    return Case(case.machines, tuple(Job(j.id, j.name, j.work, j.work) for j in case.jobs))


SCENARIOS: dict[str, Callable[[random.Random], Case]] = {
    "mixed": mixed,
    "heavy-tail": heavy_tail,
    "heavy-tail-cost": sized,
    "short-then-long": short_then_long,
    "slow-node-long-last": slow_node,
    "slowdown": slowdown,
    "unseen-names": unseen_names,
}


# ----------------------------------------------------------------------- references


def lower_bound(case: Case) -> float:
    """max(the time the whole capacity needs for the total work, the largest task alone on
    the machine that finishes it first)."""
    total = sum(j.work for j in case.jobs)
    biggest = max(j.work for j in case.jobs)
    alone = min(m.finish(0.0, biggest) for m in case.machines)

    def capacity(t: float) -> float:
        return sum(m.slots * m.done(0.0, t) for m in case.machines)

    lo, hi = 0.0, 1.0
    for _ in range(200):  # bounded: doubling until the capacity covers the work
        if capacity(hi) >= total:
            break
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if capacity(mid) >= total:
            hi = mid
        else:
            lo = mid
    return max(hi, alone)


def clairvoyant(case: Case) -> float:
    """Longest task first, onto the slot that finishes it first (true runtimes)."""
    free = [(0.0, m.name, k) for m in case.machines for k in range(m.slots)]
    by_name = {m.name: m for m in case.machines}
    end = 0.0
    for job in sorted(case.jobs, key=lambda j: -j.work):
        best = min(
            range(len(free)),
            key=lambda i: (by_name[free[i][1]].finish(free[i][0], job.work), free[i][1]),
        )
        t, node, k = free[best]
        f = by_name[node].finish(t, job.work)
        free[best] = (f, node, k)
        end = max(end, f)
    return end


def baseline(case: Case, policy: str) -> float:
    """FIFO queue; a free slot takes the head task by ``policy``; no pipelining."""
    machines = {m.name: m for m in case.machines}
    order = [m.name for m in case.machines]
    fastest = sorted(order, key=lambda n: (-machines[n].speed, n))
    busy = dict.fromkeys(order, 0)
    queue = list(case.jobs)
    queue.reverse()  # pop() from the end: FIFO
    events: list[tuple[float, int, str]] = []  # (end, n, node)
    now, rr, n, end = 0.0, 0, 0, 0.0
    for _ in range(MAX_EVENTS):
        while queue:
            free = [x for x in order if busy[x] < machines[x].slots]
            if not free:
                break
            if policy == "round_robin":
                while busy[order[rr % len(order)]] >= machines[order[rr % len(order)]].slots:
                    rr += 1
                node = order[rr % len(order)]
                rr += 1
            elif policy == "least_loaded":
                node = min(free, key=lambda x: (busy[x] / machines[x].slots, order.index(x)))
            else:  # greedy: the fastest machine with a free slot
                node = next(x for x in fastest if x in free)
            job = queue.pop()
            busy[node] += 1
            start = now + RTT_S / 2
            n += 1
            heapq.heappush(events, (machines[node].finish(start, job.work), n, node))
        if not events:
            break
        now, _, node = heapq.heappop(events)
        busy[node] -= 1
        end = now
    else:  # pragma: no cover - bounded
        raise RuntimeError("simulation did not end")
    return end


# ---------------------------------------------------------------------------- lbmqtt


@dataclass
class _Attempt:
    task: str
    node: str
    start: float
    end: float
    copy: bool
    alive: bool = True


@dataclass
class _Node:
    m: Machine
    running: int = 0
    held: list[str] = field(default_factory=list)
    """Pipelined tasks that reached the node, not started (FIFO)."""
    short_rt: float | None = None


@dataclass
class SimStats:
    makespan: float = 0.0
    copies: int = 0
    copies_won: int = 0
    taken_back: int = 0


def simulate_lbmqtt(
    case: Case, *, speculate: bool = True, take_back: bool = True, users: int = 3
) -> SimStats:
    """The batch through the real scheduler (see the module docstring)."""
    s = Scheduler()
    nodes = {m.name: _Node(m) for m in case.machines}
    jobs = {j.id: j for j in case.jobs}
    names = frozenset(j.name for j in case.jobs)
    for m in case.machines:
        s.set_node(NodeCaps(m.name, (Group(0, m.slots, 0, 10),), names, m.hint))
    has_cost = "cost" in QueuedTask.__dataclass_fields__
    for i, j in enumerate(case.jobs):
        extra = {"cost": j.cost} if j.cost is not None and has_cost else {}
        s.enqueue(QueuedTask(j.id, f"u{i % users}", j.name, 0, i, **extra))  # type: ignore[arg-type]
    has_spec = speculate and hasattr(s, "speculate")
    has_back = take_back and hasattr(s, "take_back")
    has_start = hasattr(s, "started")
    # events: (time, n, kind, payload)
    events: list[tuple[float, int, str, object]] = []
    attempts: dict[str, list[_Attempt]] = {}
    done: set[str] = set()
    st = SimStats()
    counter = 0
    now = 0.0

    def push(t: float, kind: str, payload: object) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, (t, counter, kind, payload))

    def start(tid: str, node: _Node, copy: bool) -> None:
        node.running += 1
        a = _Attempt(tid, node.m.name, now, node.m.finish(now, jobs[tid].work), copy)
        attempts.setdefault(tid, []).append(a)
        push(a.end, "end", a)
        if has_start and not copy:
            s.started(tid, now)

    def free_slot(node: _Node) -> None:
        node.running -= 1
        while node.held and node.running < node.m.slots:
            tid = node.held.pop(0)
            start(tid, node, False)

    def decide() -> None:
        if has_back:
            for tid in s.take_back(now):
                for n in nodes.values():
                    if tid in n.held:
                        n.held.remove(tid)
                        s.given_back(tid)
                        st.taken_back += 1
                        break
                else:
                    s.keep(tid)  # started meanwhile (cannot happen here: no delay)
        for p in s.schedule(now):
            push(now + RTT_S / 2, "arrive", (p.task.id, p.node, False))
        if has_spec:
            for c in s.speculate(now):
                st.copies += 1
                push(now + RTT_S / 2, "arrive", (c.task_id, c.node, True))

    def size_window(node: _Node) -> None:
        # (as TaskTable.size_window, the refill being the round trip alone: the simulated
        # balancer decides in no time)
        rt = node.short_rt
        window = (
            0
            if rt is None
            else window_per_slot(RTT_S, rt, node.m.slots, WINDOW_TASKS_MAX, WINDOW_MAX)
        )
        s.set_window(node.m.name, window, RTT_S)

    push(TICK_S, "tick", None)
    decide()
    for _ in range(MAX_EVENTS):
        if not events or len(done) == len(jobs):
            break
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            assert isinstance(payload, tuple)
            tid, name, copy = payload
            node = nodes[name]
            if tid in done:
                continue
            if copy:
                start(tid, node, True)  # copies go to idle slots only
            elif node.running < node.m.slots:
                start(tid, node, False)
            else:
                node.held.append(tid)
        elif kind == "end":
            a = payload
            assert isinstance(a, _Attempt)
            if not a.alive:
                continue
            a.alive = False
            node = nodes[a.node]
            job = jobs[a.task]
            if a.task not in done:
                done.add(a.task)
                st.makespan = max(st.makespan, now)
                if a.copy:
                    st.copies_won += 1
                rt = now - a.start
                extra = {"cost": job.cost} if job.cost is not None and has_cost else {}
                s.observe(job.name, a.node, rt, **extra)
                if rt < s.window_long_s:
                    node.short_rt = rt if node.short_rt is None else 0.7 * node.short_rt + 0.3 * rt
                    size_window(node)
                s.release(a.task)
                for other in attempts[a.task]:
                    if other.alive:  # the losing copy: killed, its slot freed
                        other.alive = False
                        free_slot(nodes[other.node])
            free_slot(node)
        else:  # tick: progress reports, then decide again
            if len(done) < len(jobs):
                push(now + TICK_S, "tick", None)
            if has_spec:
                for tid, atts in attempts.items():
                    for a in atts:
                        if a.alive and not a.copy:
                            m = nodes[a.node].m
                            frac = m.done(a.start, now) / jobs[tid].work
                            s.progress(tid, min(1.0, frac), now)
        decide()
    else:  # pragma: no cover - bounded
        raise RuntimeError("simulation did not end")
    if len(done) != len(jobs):
        raise RuntimeError(f"simulation stalled: {len(done)} of {len(jobs)} tasks done")
    return st
