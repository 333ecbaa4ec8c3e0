"""The scheduler's plain data: tasks, node capabilities, placements, observed runtimes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# (what lbmqtt.scheduler re-exports; SlotKey is the scheduler's own)
__all__ = [
    "NO_TAGS",
    "Group",
    "NodeCaps",
    "Placement",
    "QueuedTask",
    "Requires",
    "Runtimes",
    "Shape",
    "requires_of",
]

Requires = tuple[tuple[str, float], ...]
Shape = tuple[Requires, frozenset[str]]
SlotKey = tuple[float, float, float, str, int]
"""(expected finish, -speed, load, node, group): how a free place ranks for a task."""
NO_TAGS: frozenset[str] = frozenset()


def requires_of(mapping: Mapping[str, float] | None) -> Requires:
    """Canonical form of a task's counted-resource requirements."""
    return tuple(sorted((k, float(v)) for k, v in (mapping or {}).items() if v))


@dataclass(frozen=True, slots=True)
class QueuedTask:
    """What the scheduler needs to know about a queued task."""

    id: str
    user: str
    name: str
    priority: int
    seq: int
    """Submission order; a requeued task keeps its seq, so it returns to the head."""
    requires: Requires = ()
    tags: frozenset[str] = NO_TAGS

    @property
    def shape(self) -> Shape:
        return (self.requires, self.tags)

    def __lt__(self, other: QueuedTask) -> bool:
        # heap order within one priority: FIFO by seq (the task itself is the heap entry,
        # no (seq, n, task) tuple: a million queued tasks cost ~100 bytes less each)
        return (self.seq, self.id) < (other.seq, other.id)


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

    task: QueuedTask
    node: str
    group: int


class Runtimes:
    """Moving averages of observed runtimes, per (task name, node) and per task name.

    The per-name figure is normalised by the node's speed (seconds x speed), so a runtime
    seen on a fast node predicts a slower one on a slow node.
    """

    ALPHA = 0.3

    def __init__(self) -> None:
        self.by_node: dict[tuple[str, str], float] = {}
        self.work: dict[str, float] = {}

    def observe(self, name: str, node: str, speed: float, runtime_s: float) -> None:
        runtime_s = max(0.0, runtime_s)
        key = (name, node)
        old = self.by_node.get(key)
        self.by_node[key] = runtime_s if old is None else old + self.ALPHA * (runtime_s - old)
        w = runtime_s * max(speed, 1e-6)
        oldw = self.work.get(name)
        self.work[name] = w if oldw is None else oldw + self.ALPHA * (w - oldw)

    def estimate(self, name: str, node: NodeCaps) -> float:
        """Expected runtime of ``name`` on ``node`` (1 / speed when nothing is known)."""
        seen = self.by_node.get((name, node.name))
        if seen is not None:
            return seen
        w = self.work.get(name)
        return (w if w is not None else 1.0) / max(node.speed, 1e-6)
