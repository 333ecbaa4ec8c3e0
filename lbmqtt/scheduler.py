"""Scheduling policy: queues, priority bands, fairness between users, placement.

Pure: plain data in, decisions out; no clocks, no I/O, no MQTT. The balancer feeds it
tasks and node capabilities and applies the placements it returns.

Rules:

* **Bands** (pyLoadBalancer's): a slot of a group ``{minP, maxP}`` runs a task of priority
  ``p`` only if ``minP <= p <= maxP``, which keeps slots free for urgent work.
* **Names**: a task only goes to a node that implements its name. A task no online node
  can run stays queued and :meth:`Scheduler.why_waiting` says why; it never holds a slot.
* **Fairness**: when a slot frees, among users with a task that slot may run, the user
  with the fewest running tasks goes first (ties: the oldest waiting head task); within a
  user, higher priority first, then oldest (FIFO).
* **Placement**: faster nodes are filled first (``speed``), then the emptier ones.

Cost: choosing a task for a slot looks at each user's best task per task name the slot's
node implements, found by bisection over the distinct priorities and a heap per
priority: it does not grow with the number of queued tasks.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class QueuedTask:
    """What the scheduler needs to know about a queued task."""

    id: str
    user: str
    name: str
    priority: int
    seq: int
    """Submission order; a requeued task keeps its seq, so it returns to the head."""


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

    @property
    def slots(self) -> int:
        return sum(g.workers for g in self.groups)


@dataclass(frozen=True, slots=True)
class Placement:
    """Decision: run ``task`` on ``node`` in a slot of group ``group``."""

    task: QueuedTask
    node: str
    group: int


class _PriorityQueue:
    """Queued tasks of one (user, name): a FIFO heap per priority, priorities kept sorted."""

    __slots__ = ("counts", "heaps", "prios", "pushes")

    def __init__(self) -> None:
        self.prios: list[int] = []
        # (seq, push order, task): a removed task's entry stays until it reaches the top,
        # and is recognised as stale because the task object queued under its id differs
        self.heaps: dict[int, list[tuple[int, int, QueuedTask]]] = {}
        self.counts: dict[int, int] = {}
        self.pushes = 0

    def push(self, task: QueuedTask) -> None:
        p = task.priority
        heap = self.heaps.get(p)
        if heap is None:
            heap = self.heaps[p] = []
            self.counts[p] = 0
            bisect.insort(self.prios, p)
        self.pushes += 1
        heapq.heappush(heap, (task.seq, self.pushes, task))
        self.counts[p] += 1

    def discard(self, priority: int) -> None:
        """One task of ``priority`` left (lazily: its heap entry is skipped later)."""
        self.counts[priority] -= 1
        if self.counts[priority] == 0:
            del self.counts[priority]
            del self.heaps[priority]
            self.prios.remove(priority)

    def best_in_band(self, min_p: int, max_p: int,
                     alive: dict[str, QueuedTask]) -> QueuedTask | None:
        """Highest-priority, then oldest, live task with ``min_p <= priority <= max_p``."""
        i = bisect.bisect_right(self.prios, max_p) - 1
        if i < 0 or self.prios[i] < min_p:
            return None
        heap = self.heaps[self.prios[i]]
        while heap:
            task = heap[0][2]
            if alive.get(task.id) is task:
                return task
            heapq.heappop(heap)  # stale entry of a removed (or removed and re-queued) task
        return None  # pragma: no cover - counts keep non-empty heaps only

    def __bool__(self) -> bool:
        return bool(self.prios)


@dataclass
class _Running:
    node: str
    group: int
    user: str


@dataclass
class Scheduler:
    """Queues and slot accounting; see the module docstring for the rules."""

    _alive: dict[str, QueuedTask] = field(default_factory=dict)
    _queues: dict[str, dict[str, _PriorityQueue]] = field(default_factory=dict)
    _nodes: dict[str, NodeCaps] = field(default_factory=dict)
    _busy: Counter[tuple[str, int]] = field(default_factory=Counter)
    _running: dict[str, _Running] = field(default_factory=dict)
    _running_by_user: Counter[str] = field(default_factory=Counter)
    _queued_by_user: Counter[str] = field(default_factory=Counter)

    # ---------------------------------------------------------------- queue

    def enqueue(self, task: QueuedTask) -> None:
        """Queue a task (a requeued task keeps its seq and so goes back to the head)."""
        if task.id in self._alive or task.id in self._running:
            raise ValueError(f"task {task.id!r} is already queued or running")
        self._alive[task.id] = task
        self._queues.setdefault(task.user, {}).setdefault(task.name, _PriorityQueue()).push(task)
        self._queued_by_user[task.user] += 1

    def remove(self, task_id: str) -> QueuedTask | None:
        """Take a queued task out (cancel). Returns it, or None if it was not queued."""
        task = self._alive.pop(task_id, None)
        if task is None:
            return None
        self._forget_queued(task)
        return task

    def _forget_queued(self, task: QueuedTask) -> None:
        by_name = self._queues[task.user]
        pq = by_name[task.name]
        pq.discard(task.priority)
        if not pq:
            del by_name[task.name]
            if not by_name:
                del self._queues[task.user]
        self._queued_by_user[task.user] -= 1
        if self._queued_by_user[task.user] <= 0:
            del self._queued_by_user[task.user]

    def is_queued(self, task_id: str) -> bool:
        return task_id in self._alive

    @property
    def queued(self) -> int:
        """Number of queued tasks."""
        return len(self._alive)

    def queued_for(self, user: str) -> int:
        """Number of queued tasks of ``user``."""
        return self._queued_by_user.get(user, 0)

    def running_for(self, user: str) -> int:
        """Number of placed (assigned or running) tasks of ``user``."""
        return self._running_by_user.get(user, 0)

    def users(self) -> set[str]:
        """Users with queued or placed tasks."""
        return set(self._queued_by_user) | set(self._running_by_user)

    def queued_tasks(self) -> Iterable[QueuedTask]:
        """Every queued task (no particular order)."""
        return self._alive.values()

    # ---------------------------------------------------------------- nodes

    def set_node(self, caps: NodeCaps) -> None:
        """Add or update an online node."""
        self._nodes[caps.name] = caps

    def remove_node(self, name: str) -> list[str]:
        """A node went offline. Returns the ids of the tasks placed on it (now unplaced)."""
        self._nodes.pop(name, None)
        lost = [tid for tid, r in self._running.items() if r.node == name]
        for tid in lost:
            self.release(tid)
        return lost

    @property
    def nodes(self) -> dict[str, NodeCaps]:
        return self._nodes

    def busy(self, node: str, group: int) -> int:
        return self._busy.get((node, group), 0)

    def release(self, task_id: str) -> bool:
        """A placed task finished, was cancelled or lost: free its slot."""
        r = self._running.pop(task_id, None)
        if r is None:
            return False
        key = (r.node, r.group)
        self._busy[key] -= 1
        if self._busy[key] <= 0:
            del self._busy[key]
        self._running_by_user[r.user] -= 1
        if self._running_by_user[r.user] <= 0:
            del self._running_by_user[r.user]
        return True

    def adopt(self, task_id: str, user: str, node: str, group: int) -> None:
        """Record a task already running on a node (e.g. reported after a restart)."""
        if task_id in self._running:
            return
        self._running[task_id] = _Running(node, group, user)
        self._busy[(node, group)] += 1
        self._running_by_user[user] += 1

    # ---------------------------------------------------------------- decide

    def schedule(self) -> list[Placement]:
        """Fill every free slot it can. Returns the placements, already accounted."""
        out: list[Placement] = []
        if not self._alive:
            return out
        nodes = sorted(self._nodes.values(),
                       key=lambda n: (-n.speed, self._load(n), n.name))
        for node in nodes:
            for group in node.groups:
                while self._busy.get((node.name, group.index), 0) < group.workers:
                    task = self._pick(node, group)
                    if task is None:
                        break
                    self._place(task, node.name, group.index)
                    out.append(Placement(task, node.name, group.index))
                if not self._alive:
                    return out
        return out

    def _load(self, node: NodeCaps) -> float:
        slots = node.slots
        busy = sum(self._busy.get((node.name, g.index), 0) for g in node.groups)
        return busy / slots if slots else 1.0

    def _place(self, task: QueuedTask, node: str, group: int) -> None:
        del self._alive[task.id]
        self._forget_queued(task)
        self._running[task.id] = _Running(node, group, task.user)
        self._busy[(node, group)] += 1
        self._running_by_user[task.user] += 1

    def _pick(self, node: NodeCaps, group: Group) -> QueuedTask | None:
        best: QueuedTask | None = None
        best_key: tuple[int, int, int] | None = None
        for user, by_name in self._queues.items():
            head: QueuedTask | None = None
            for name, pq in by_name.items():
                if name not in node.tasks:
                    continue
                t = pq.best_in_band(group.min_p, group.max_p, self._alive)
                if t is None:
                    continue
                if head is None or (-t.priority, t.seq) < (-head.priority, head.seq):
                    head = t
            if head is None:
                continue
            key = (self._running_by_user.get(user, 0), head.seq, -head.priority)
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    # ---------------------------------------------------------------- explain

    def why_waiting(self, name: str, priority: int) -> str | None:
        """Why a task of ``name`` and ``priority`` cannot run on any online node, or None."""
        if not self._nodes:
            return "no node is online"
        offering = [n for n in self._nodes.values() if name in n.tasks]
        if not offering:
            return f"no online node offers task {name!r}"
        if not any(g.accepts(priority) and g.workers > 0 for n in offering for g in n.groups):
            bands = sorted({f"{g.min_p}..{g.max_p}" for n in offering for g in n.groups})
            return (f"no online node offering {name!r} has a slot for priority {priority} "
                    f"(bands: {', '.join(bands)})")
        return None
