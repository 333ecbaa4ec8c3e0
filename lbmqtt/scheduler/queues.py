"""The scheduler's bookkeeping: the queued tasks (:class:`Backlog`: per user, per task name
and shape, by priority), what is placed where (:class:`Placed`), and the nodes' pipelining
windows (:class:`Windows`)."""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .model import Queued, Requires, Shape


class Lane:
    """The queued tasks of one priority in a :class:`PriorityQueue`, oldest first.

    Tasks mostly arrive in queue order (by seq): those go to the end of a deque (O(1) in
    and out). One that does not (a task queued again keeps its seq, so it goes back to the
    head) goes to a small heap beside it. The head is the older of their two heads. (One
    heap for all cost ~16 comparisons in Python per task taken out of a long queue: a
    tenth of the balancer's placement time.)
    """

    __slots__ = ("early", "run")

    def __init__(self) -> None:
        self.run: deque[Queued] = deque()
        self.early: list[Queued] = []

    def push(self, task: Queued) -> None:
        run = self.run
        if not run or run[-1] < task:
            run.append(task)
        else:
            heapq.heappush(self.early, task)

    def head(self, alive: dict[str, Queued]) -> Queued | None:
        """The oldest live task, dropping the stale entries ahead of it (see
        :func:`_live_head`)."""
        run = self.run
        while run:
            task = run[0]
            if alive.get(task.id) is task:
                break
            run.popleft()
        first = _live_head(self.early, alive) if self.early else None
        if run and (first is None or run[0] < first):
            return run[0]
        return first

    def pop_head(self, task: Queued) -> None:
        """Take out ``task``, the head :meth:`head` just returned."""
        if self.early and self.early[0] is task:
            heapq.heappop(self.early)
        else:
            self.run.popleft()


class PriorityQueue:
    """Queued tasks of one (user, name, shape): a FIFO :class:`Lane` per priority, sorted
    priorities."""

    __slots__ = ("counts", "lanes", "prios")

    def __init__(self) -> None:
        self.prios: list[int] = []
        # a removed task's entry stays until it reaches the head, and is recognised as
        # stale because the task object queued under its id is another one (or none); a
        # task queued again as the same object (the balancer's records) has two entries
        # until one is taken: both live, the same task (pop_oldest_while takes it once)
        self.lanes: dict[int, Lane] = {}
        self.counts: dict[int, int] = {}

    def push(self, task: Queued) -> None:
        p = task.priority
        lane = self.lanes.get(p)
        if lane is None:
            lane = self.lanes[p] = Lane()
            self.counts[p] = 0
            bisect.insort(self.prios, p)
        lane.push(task)
        self.counts[p] += 1

    def discard(self, priority: int) -> None:
        """One task of ``priority`` left (lazily: its entry is skipped later)."""
        self.counts[priority] -= 1
        if self.counts[priority] == 0:
            del self.counts[priority]
            del self.lanes[priority]
            self.prios.remove(priority)

    def best_in_band(self, min_p: int, max_p: int, alive: dict[str, Queued]) -> Queued | None:
        """Highest-priority, then oldest, live task with ``min_p <= priority <= max_p``."""
        i = bisect.bisect_right(self.prios, max_p) - 1
        if i < 0 or self.prios[i] < min_p:
            return None
        # (never None: counts keep non-empty lanes only)
        return self.lanes[self.prios[i]].head(alive)

    def pop_oldest_while(
        self, pred: Callable[[Queued], bool], alive: dict[str, Queued]
    ) -> list[Queued]:
        """Pop each priority's oldest live tasks while ``pred`` holds for them (the caller
        then forgets them as queued: Scheduler.take_oldest_while)."""
        popped: dict[str, Queued] = {}  # (by id: an entry twice in a lane, taken once)
        for lane in self.lanes.values():
            while (task := lane.head(alive)) is not None and pred(task):
                lane.pop_head(task)
                popped[task.id] = task
        return list(popped.values())

    def __bool__(self) -> bool:
        return bool(self.prios)


class Backlog:
    """The queued tasks: the live one of each id (``alive``), and per user a
    :class:`PriorityQueue` per (task name, shape), with the number queued per user."""

    __slots__ = ("alive", "by_user", "counts")

    def __init__(self) -> None:
        self.alive: dict[str, Queued] = {}
        self.by_user: dict[str, dict[tuple[str, Shape], PriorityQueue]] = {}
        self.counts: Counter[str] = Counter()

    def push(self, task: Queued) -> None:
        """Queue a task (a requeued task keeps its seq and so goes back to the head)."""
        self.alive[task.id] = task
        by_key = self.by_user.setdefault(task.user, {})
        by_key.setdefault((task.name, task.shape), PriorityQueue()).push(task)
        self.counts[task.user] += 1

    def pop(self, task_id: str) -> Queued | None:
        """Take a queued task out; None if it is not queued."""
        task = self.alive.pop(task_id, None)
        if task is not None:
            self._forget(task)
        return task

    def take(self, task: Queued) -> None:
        """``task`` (live, as a queue's best) leaves the backlog: it is placed."""
        del self.alive[task.id]
        self._forget(task)

    def _forget(self, task: Queued) -> None:
        by_key = self.by_user[task.user]
        key = (task.name, task.shape)
        pq = by_key[key]
        pq.discard(task.priority)
        if not pq:
            del by_key[key]
            if not by_key:
                del self.by_user[task.user]
        self.counts[task.user] -= 1
        if self.counts[task.user] <= 0:
            del self.counts[task.user]

    def take_oldest_while(self, pred: Callable[[Queued], bool]) -> list[Queued]:
        """Take out and return, from the head of every queue, the tasks for which ``pred``
        holds, stopping at each queue's first task for which it does not. A head is its
        queue's oldest task by seq (kept on requeue): expiry by age needs no entry per
        queued task (a heap of deadlines cost ~100 bytes a task)."""
        taken = [
            task
            for by_key in self.by_user.values()
            for pq in by_key.values()
            for task in pq.pop_oldest_while(pred, self.alive)
        ]
        for task in taken:
            self.pop(task.id)
        return taken

    def queues(self) -> Iterable[tuple[str, Shape, PriorityQueue]]:
        """Every queue: (task name, shape, its queue), of all users."""
        for by_key in self.by_user.values():
            for (name, shape), pq in by_key.items():
                yield name, shape, pq

    def __len__(self) -> int:
        return len(self.alive)


def _live_head(heap: list[Queued], alive: dict[str, Queued]) -> Queued | None:
    """The heap's oldest live task, dropping the stale entries on top (a removed task's,
    or a removed and re-queued one's: the task queued under its id is another object)."""
    while heap:
        task = heap[0]
        if alive.get(task.id) is task:
            return task
        heapq.heappop(heap)
    return None


@dataclass
class Placed:
    node: str
    group: int
    user: str
    requires: Requires = ()
    expected_end: float | None = None
    long: bool = True
    """Not known to be short (it blocks its group's pipelining window while placed)."""
    task: Queued | None = None
    """The task (None for one adopted after a restart: never taken back nor copied)."""
    windowed: bool = False
    """Placed in a pipelining window (beyond the group's idle slots)."""
    started_at: float | None = None
    progress: float | None = None
    """Fraction done last reported (0..1)."""
    progress_at: float | None = None
    best_rate: float = 0.0
    """The fastest average progress rate (fraction per second since the start) reported."""
    slowed: bool = False
    """Its latest progress came much slower than its best rate (its node slowed down)."""
    revoking: bool = False
    """Asked back from its node (:meth:`Scheduler.take_back`), not yet given back."""


WINDOW_SLACK = 2.0
"""A window place beyond the first of each slot takes only a task whose runtime, times the
window per slot, is at most this many times the time the window covers."""


class Windows:
    """The nodes' pipelining windows: tasks per slot a node may hold beyond its running
    ones, and the time each window is sized to cover (:meth:`Scheduler.set_window`)."""

    __slots__ = ("covers", "per_slot")

    def __init__(self) -> None:
        self.per_slot: dict[str, int] = {}
        self.covers: dict[str, float] = {}

    def set(self, node: str, per_slot: int, covers_s: float | None) -> None:
        if per_slot > 0:
            self.per_slot[node] = per_slot
            if covers_s is not None:
                self.covers[node] = covers_s
                return
        else:
            self.per_slot.pop(node, None)
        self.covers.pop(node, None)

    def admits(self, node: str, runtime: float) -> bool:
        """Whether a task of ``runtime`` may take a window place beyond the first of each
        slot: a window of such tasks runs in at most WINDOW_SLACK times what it covers (a
        window sized by no-op tasks does not take 128 half-second tasks a slot)."""
        covers = self.covers.get(node)
        return covers is None or runtime * self.per_slot.get(node, 0) <= WINDOW_SLACK * covers
