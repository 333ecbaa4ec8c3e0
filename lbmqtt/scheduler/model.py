"""The scheduler's plain data: tasks, node capabilities, placements, observed runtimes."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# (what lbmqtt.scheduler re-exports; SlotKey is the scheduler's own)
__all__ = [
    "NO_TAGS",
    "Copy",
    "Group",
    "NodeCaps",
    "Placement",
    "Queued",
    "QueuedTask",
    "Requires",
    "Runtimes",
    "Shape",
    "queue_order",
    "requires_of",
    "why_waiting",
]

Requires = tuple[tuple[str, float], ...]
Shape = tuple[Requires, frozenset[str]]
SlotKey = tuple[float, float, float, str, int]
"""(expected finish, -speed, load, node, group): how a free place ranks for a task."""
NO_TAGS: frozenset[str] = frozenset()


def requires_of(mapping: Mapping[str, float] | None) -> Requires:
    """Canonical form of a task's counted-resource requirements."""
    if not mapping:
        return ()  # (most tasks: 0.07 us, against 1.17 for sorting nothing)
    return tuple(sorted((k, float(v)) for k, v in mapping.items() if v))


class Queued(Protocol):
    """What the scheduler needs to know about a queued task: any object with these
    attributes, which must not change while the scheduler holds it (queued or placed).

    The balancer queues its task records themselves (a :class:`QueuedTask` beside each
    record cost 104 bytes a task: ~100 MB of the balancer's ~715 MB with a million tasks
    queued); the scheduler's tests and benches use :class:`QueuedTask`. The scheduler
    tells a queued entry from a stale one by identity (``PriorityQueue``), never by
    equality or hash."""

    @property
    def id(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def seq(self) -> int:
        """Submission order; a requeued task keeps its seq, so it returns to the head."""

    @property
    def requires(self) -> Requires: ...
    @property
    def tags(self) -> frozenset[str]: ...
    @property
    def cost(self) -> float | None: ...
    @property
    def speculate(self) -> bool: ...
    @property
    def shape(self) -> Shape:
        """``(requires, tags)``: which nodes can run it."""

    def __lt__(self, other: Any) -> bool:
        """Heap order within one priority: FIFO by ``(seq, id)``."""


def queue_order(a: Queued, b: Queued) -> bool:
    """``a < b`` in a queue's heap (one priority): FIFO by seq, then id. The task itself is
    the heap entry (no ``(seq, n, task)`` tuple: a million queued tasks cost ~100 bytes
    less each), and no tuple is built per comparison either (~14 per task placed)."""
    seq, other = a.seq, b.seq
    return seq < other or (seq == other and a.id < b.id)


@dataclass(frozen=True, slots=True)
class QueuedTask:
    """A queued task as the scheduler's tests and benches give it (:class:`Queued`)."""

    id: str
    user: str
    name: str
    priority: int
    seq: int
    """Submission order; a requeued task keeps its seq, so it returns to the head."""
    requires: Requires = ()
    tags: frozenset[str] = NO_TAGS
    cost: float | None = None
    """Relative work (a size hint): runtime estimates scale with it when given."""
    speculate: bool = True
    """Whether a speculative copy may run (False for work with side effects)."""

    @property
    def shape(self) -> Shape:
        return (self.requires, self.tags)

    def __lt__(self, other: Queued) -> bool:
        return queue_order(self, other)


@dataclass(frozen=True, slots=True)
class Group:
    """A group of ``workers`` slots on a node accepting priorities ``min_p..max_p``."""

    index: int
    workers: int
    min_p: int
    max_p: int

    def accepts(self, priority: int) -> bool:
        return self.min_p <= priority <= self.max_p


@dataclass(frozen=True, slots=True)
class NodeCaps:
    """What an online node offers."""

    name: str
    groups: tuple[Group, ...]
    tasks: frozenset[str]
    speed: float = 1.0
    resources: Mapping[str, float] = field(default_factory=dict)
    """Counted resources (``cores``, ``memory_mb``, ``gpu``, anything): capacity."""
    tags: frozenset[str] = NO_TAGS
    cores: int = 0

    @property
    def slots(self) -> int:
        return sum(g.workers for g in self.groups)


@dataclass(frozen=True, slots=True)
class Placement:
    """Decision: run ``task`` on ``node`` in a slot of group ``group``."""

    task: Queued
    node: str
    group: int


@dataclass(frozen=True, slots=True)
class Copy:
    """Decision: start a speculative copy of the running task ``task_id`` on ``node`` in a
    slot of group ``group`` (the first attempt to end wins; the other is killed)."""

    task_id: str
    node: str
    group: int


MIN_SPEED = 1e-6
"""The smallest speed an estimate divides by."""
_LOG2 = math.log(2.0)
MAX_RUNTIME_S = 1e7
"""A reported runtime above this (115 days) is not learned from."""


class Runtimes:
    """What runs how fast: each node's relative speed, and each task name's work.

    Work is measured in seconds at speed 1 per unit of ``cost`` (a task without a cost
    hint is one unit). A node's speed starts at its declared ``NODE_SPEED`` and is learned
    from every task it runs, whatever its name: the ratio of the name's work (as seen on
    all nodes) to the runtime here is one sample, and samples move the speed by a moving
    average in log space, so a task name never seen before is expected to run slower on a
    slow machine, and a machine that slows down (throttling, another user's load) is
    known for it within a few tasks. The per-(name, node) runtime keeps what is particular
    to a pair (a node without the GPU a name wants); it is scaled by how the node's speed
    changed since it was last seen.
    """

    ALPHA = 0.3
    SPEED_ALPHA = 0.5
    TYPICAL_ALPHA = 0.2
    MIN_WORK_S = 1e-6
    """The work expected of a name only ever reported as taking 0 s (:attr:`instant`)."""
    UNKNOWN_WORK = 1.0
    """Work assumed for a task name never seen while no name has been (1 s at speed 1);
    then the typical work of names (:attr:`typical`)."""

    def __init__(self) -> None:
        self.by_node: dict[tuple[str, str], tuple[float, float]] = {}
        """(moving average of seconds per cost unit, the node's speed then) per (name, node)."""
        self.work: dict[str, float] = {}
        self.instant: set[str] = set()
        """Names only ever reported as taking 0 s (short, but nothing to learn from)."""
        self.speed: dict[str, float] = {}
        """Learned from names also seen elsewhere."""
        self.ran_on: dict[str, set[str]] = {}
        """The nodes each name has run on."""
        self.nodes_seen: set[str] = set()
        """The nodes any task has run on."""
        self._hints: dict[str, float] = {}
        """The declared speed of each node in ``speed`` when it was first learned."""
        self._log_drift = 0.0
        """Sum of log(speed / declared speed) over ``speed``."""
        self.guess: dict[str, float] = {}
        """Learned from first-seen names against the typical work (until ``speed`` is)."""
        self._log_work = 0.0
        """Sum of log(work) over the names in ``work`` (their geometric mean: typical)."""
        self._n_work = 0

    @property
    def typical(self) -> float | None:
        """The typical work of a task name: the geometric mean of the names' works (in the
        current scale of the speeds, which drifts as they are learned), or None."""
        return math.exp(self._log_work / self._n_work) if self._n_work else None

    def speed_of(self, node: str, hint: float) -> float:
        """The node's learned relative speed (its declared ``hint`` before any sample)."""
        v = self.speed.get(node)
        if v is None:
            v = self.guess.get(node, hint)
        return v if v > MIN_SPEED else MIN_SPEED

    def observe(
        self, name: str, node: str, speed: float, runtime_s: float, cost: float | None = None
    ) -> None:
        """A task of ``name`` (of ``cost`` units) ran ``runtime_s`` on ``node`` (declared
        ``speed``)."""
        if not 0.0 <= runtime_s <= MAX_RUNTIME_S:
            return  # (NaN, infinite or absurd: a node's report, nothing to learn from)
        per = runtime_s / (cost if cost is not None and cost > 0 else 1.0)
        ref = self.work.get(name)
        ran = self.ran_on.setdefault(name, set())
        ran.add(node)
        self.nodes_seen.add(node)
        if per > 0:
            if ref is not None and ref > 0 and len(ran) > 1:
                # the name's work as seen on the nodes (a name only this node has run is
                # measured against itself: that says nothing of its speed)
                v = self.speed_of(node, speed)
                self._set_speed(node, speed, _toward(v, ref / per, self.SPEED_ALPHA))
            elif self.typical is not None and len(self.nodes_seen) > 1:
                # a name seen for the first time: against the typical work of names, a
                # weaker reference, used only while the node has no better one (so that
                # a slow machine is known even when every task has a name of its own),
                # and only once the typical work is not this node's alone
                v = self.guess.get(node, self.speed_of(node, speed))
                self.guess[node] = _toward(v, self.typical / per, self.TYPICAL_ALPHA)
        v = self.speed_of(node, speed)
        w = per * v
        key = (name, node)
        old = self.by_node.get(key)
        per_avg = per if old is None else old[0] + self.ALPHA * (per - old[0])
        self.by_node[key] = (per_avg, v)
        # the name's work moves in log space, as the speeds do: a moving average of the
        # samples themselves sits above their geometric mean (by half their log variance),
        # and the speeds are learned against it, so each node's speed and every name's work
        # grew together without end (no-op tasks: 1e12 within 1,000 to 10,000 tasks, then
        # inf and NaN, on which the placement loop never ended). In log space the next
        # speed sample and the work move against each other and their scale stays put.
        # A 0 s sample (below the node's clock) says nothing of the work's size: it only
        # marks the name as short while nothing else is known (``instant``).
        if w > 0:
            new = w if ref is None or ref <= 0 else _toward(ref, w, self.ALPHA)
        else:
            new = 0.0 if ref is None else ref
        if new > 0 and new != ref:
            self.instant.discard(name)
            if ref is not None and ref > 0:
                self._log_work -= math.log(ref)
            else:
                self._n_work += 1
            self._log_work += math.log(new)
            self.work[name] = new
        elif ref is None:
            # too quick for its node's clock (0 s): known to be short, though it gives
            # nothing to learn speeds or the typical work from (without this, no such task
            # ever took a pipelining window place)
            self.instant.add(name)

    def _set_speed(self, node: str, hint: float, v: float) -> None:
        """Learn ``v`` as ``node``'s speed, keeping the learned speeds in the scale of the
        declared ones: the speeds and the works are only known relative to each other,
        and every speed sample is measured against works learned from those speeds, so
        their common scale drifts (a random walk; noisy short tasks move it by 2x within
        thousands of tasks). When the learned speeds' geometric mean over their declared
        ones has drifted by more than 2x, every speed and work is scaled back, which leaves
        each estimate as it was (:meth:`_rescale`)."""
        old = self.speed.get(node)
        h = hint if hint > MIN_SPEED else 1.0
        if old is None:
            self._hints[node] = h
        else:
            self._log_drift -= math.log(old / self._hints[node])
        self.speed[node] = v
        self._log_drift += math.log(v / self._hints[node])
        drift = self._log_drift / len(self._hints)
        if abs(drift) > _LOG2:
            self._rescale(math.exp(-drift))

    def _rescale(self, c: float) -> None:
        """Multiply every learned speed and work by ``c`` (no estimate changes)."""
        for n in self.speed:
            self.speed[n] *= c
        for n in self.guess:
            self.guess[n] *= c
        for name in self.work:
            self.work[name] *= c
        for key, (per_avg, v) in self.by_node.items():
            self.by_node[key] = (per_avg, v * c)
        self._log_work += self._n_work * math.log(c)
        self._log_drift += len(self._hints) * math.log(c)

    def known(self, name: str) -> bool:
        return name in self.work or name in self.instant

    def estimate(self, name: str, node: NodeCaps, cost: float | None = None) -> float:
        """Expected runtime of ``name`` (``cost`` units) on ``node``: the work seen for the
        pair, else for the name, else the typical work of names, over the node's speed."""
        v = self.speed_of(node.name, node.speed)
        pair = self.by_node.get((name, node.name))
        if pair is not None:
            # as seen for the pair, scaled if the node's speed changed since (learned
            # from other names)
            est = pair[0] * pair[1] / v
        else:
            w = self.work.get(name)
            if w is None:
                if name in self.instant:
                    w = self.MIN_WORK_S
                else:
                    w = self.UNKNOWN_WORK if self.typical is None else self.typical
            est = w / v
        if cost is not None and cost > 0:
            est *= cost
        return est


def _toward(v: float, sample: float, alpha: float) -> float:
    """Move ``v`` toward ``sample`` by ``alpha`` in log space (a runtime twice too long
    weighs as one twice too short); one wild sample moves it by at most 100x ** alpha.
    The result stays finite and positive (within 1e-12..1e12)."""
    sample = min(max(sample, v / 100), v * 100)
    out = math.exp(math.log(v) + alpha * (math.log(sample) - math.log(v)))
    return min(max(out, 1e-12), 1e12)


def why_waiting(
    nodes: Collection[NodeCaps],
    name: str,
    priority: int,
    requires: Requires = (),
    tags: frozenset[str] = NO_TAGS,
) -> str | None:
    """Why a task could not run on any of ``nodes`` even if all were idle, or None."""
    offering = [n for n in nodes if name in n.tasks]
    if not offering:
        return "no node is online" if not nodes else f"no online node offers task {name!r}"
    if tags:
        tagged = [n for n in offering if tags <= n.tags]
        if not tagged:
            return f"no online node offering {name!r} has tags {', '.join(sorted(tags))}"
        offering = tagged
    for res, amount in requires:
        enough = [n for n in offering if n.resources.get(res, 0.0) >= amount - 1e-9]
        if not enough:
            most = max(n.resources.get(res, 0.0) for n in offering)
            return (
                f"no online node offering {name!r} has {res}={amount:g} (the most: {res}={most:g})"
            )
        offering = enough
    if not any(g.accepts(priority) and g.workers > 0 for n in offering for g in n.groups):
        bands = sorted({f"{g.min_p}..{g.max_p}" for n in offering for g in n.groups})
        return (
            f"no online node offering {name!r} has a slot for priority {priority} "
            f"(bands: {', '.join(bands)})"
        )
    return None
