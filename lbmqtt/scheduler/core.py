"""The scheduler: queues and slot accounting (the rules are in the package docstring)."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from . import stragglers
from .model import (
    NO_TAGS,
    Copy,
    Group,
    NodeCaps,
    Placement,
    Queued,
    Requires,
    Runtimes,
    Shape,
    SlotKey,
    why_waiting,
)
from .queues import Backlog, Placed, Windows
from .tail import better_soon

MAX_ESTIMATE_S = 1e30
"""The longest runtime an estimate gives (never NaN or infinite)."""


@dataclass
class Scheduler:
    """Queues and slot accounting; see the module docstring for the rules.

    Args:
        max_running_per_user: a user with this many placed tasks waits (0: no cap).
    """

    max_running_per_user: int = 0
    window_long_s: float = 0.5
    """Only tasks expected to run less than this take a place in a pipelining window."""
    runtimes: Runtimes = field(default_factory=Runtimes)
    holding: bool = False
    """The last :meth:`schedule` kept a task waiting for a faster slot: call it again soon."""
    _backlog: Backlog = field(default_factory=Backlog)
    _nodes: dict[str, NodeCaps] = field(default_factory=dict)
    _load: dict[str, float] = field(default_factory=dict)
    _busy: Counter[tuple[str, int]] = field(default_factory=Counter)
    _reserved: dict[str, dict[str, float]] = field(default_factory=dict)
    slots: int = 0
    """Slots of all online nodes together."""
    _windows: Windows = field(default_factory=Windows)
    _long_busy: Counter[tuple[str, int]] = field(default_factory=Counter)
    _rt_cache: dict[tuple[str, str], float] | None = None
    """Expected runtimes by (task name, node), while :meth:`schedule` runs."""
    _slot_heaps: dict[tuple[str, Shape, int], list[SlotKey]] | None = None
    """Free places by placement key, per (task name, shape, priority), while
    :meth:`schedule` runs (see :meth:`_best_slot`)."""
    _running: dict[str, Placed] = field(default_factory=dict)
    _copies: dict[str, Placed] = field(default_factory=dict)
    """Speculative copies in flight, by task id (at most one per task)."""
    speculative_share: float = 0.25
    """At most this share of all slots (at least one) runs speculative copies."""
    speculate_min_gain_s: float = 0.5
    """A copy must be expected to end at least this much sooner than the original."""
    take_back_min_gain_s: float = 0.1
    """A pipelined task is taken back only to end at least this much sooner elsewhere."""
    _running_by_user: Counter[str] = field(default_factory=Counter)

    # ---------------------------------------------------------------- queue

    def enqueue(self, task: Queued) -> None:
        """Queue a task (a requeued task keeps its seq and so goes back to the head)."""
        if task.id in self._backlog.alive or task.id in self._running:
            raise ValueError(f"task {task.id!r} is already queued or running")
        self._backlog.push(task)

    def remove(self, task_id: str) -> Queued | None:
        """Take a queued task out (cancel). Returns it, or None if it was not queued."""
        return self._backlog.pop(task_id)

    def take_oldest_while(self, pred: Callable[[Queued], bool]) -> list[Queued]:
        """Take out and return the queues' oldest tasks while ``pred`` holds for them
        (:meth:`.queues.Backlog.take_oldest_while`: expiry)."""
        return self._backlog.take_oldest_while(pred)

    def is_queued(self, task_id: str) -> bool:
        return task_id in self._backlog.alive

    @property
    def queued(self) -> int:
        """Number of queued tasks."""
        return len(self._backlog)

    def queued_for(self, user: str) -> int:
        """Number of queued tasks of ``user``."""
        return self._backlog.counts.get(user, 0)

    def running_for(self, user: str) -> int:
        """Number of placed (assigned or running) tasks of ``user``."""
        return self._running_by_user.get(user, 0)

    def users(self) -> set[str]:
        """Users with queued or placed tasks."""
        return set(self._backlog.counts) | set(self._running_by_user)

    def queued_tasks(self) -> Iterable[Queued]:
        """Every queued task (no particular order)."""
        return self._backlog.alive.values()

    # ---------------------------------------------------------------- nodes

    def set_node(self, caps: NodeCaps) -> None:
        """Add or update an online node."""
        old = self._nodes.get(caps.name)
        self.slots += caps.slots - (old.slots if old is not None else 0)
        self._nodes[caps.name] = caps

    def set_window(self, node: str, per_slot: int, covers_s: float | None = None) -> None:
        """Let ``node`` hold up to ``per_slot`` tasks per slot beyond its running ones; given
        ``covers_s``, the time the window is sized to cover (:meth:`Windows.admits`)."""
        self._windows.set(node, per_slot, covers_s)

    def window(self, node: str) -> int:
        return self._windows.per_slot.get(node, 0)

    def _window_ok(self, name: str, caps: NodeCaps, g: Group) -> bool:
        """Whether a task of ``name`` may take a free place of group ``g`` on ``caps``: an
        idle slot always; a window place if short there (beyond one a slot: Windows.admits).
        Its answer changes with the fill at ``workers`` and ``2 * workers`` only."""
        key = (caps.name, g.index)
        busy = self._busy.get(key, 0)
        if busy < g.workers:
            return True
        # not behind a long (or unknown) task: the place would wait for it to end
        if self._long_busy.get(key):
            return False
        runtime = self._short_runtime(name, caps)
        return runtime is not None and (
            busy < 2 * g.workers or self._windows.admits(caps.name, runtime)
        )

    def _short_runtime(self, name: str, caps: NodeCaps) -> float | None:
        """The expected runtime of ``name`` on ``caps`` if it is known and short there
        (under ``window_long_s``: it may take a window place), else None."""
        if not self.runtimes.known(name):
            return None
        runtime = self.expected_runtime(name, caps)
        return runtime if runtime < self.window_long_s else None

    def capacity(self, node: str, group: Group) -> int:
        """Tasks a group may hold: its slots, plus the node's window for each."""
        return group.workers * (1 + self._windows.per_slot.get(node, 0))

    def set_load(self, node: str, load: float) -> None:
        """The node's 1-minute load average (placement avoids overloaded nodes)."""
        self._load[node] = load

    def remove_node(self, name: str) -> list[str]:
        """A node went offline. Returns the ids of the tasks placed on it (now unplaced).

        A task with a speculative copy on another node is not lost: the copy becomes the
        task's placement (:meth:`where` tells). Copies on the node are dropped.
        """
        old = self._nodes.pop(name, None)
        if old is not None:
            self.slots -= old.slots
        self._load.pop(name, None)
        self._windows.set(name, 0, None)
        for tid in [tid for tid, c in self._copies.items() if c.node == name]:
            self.release_copy(tid)
        lost = []
        for tid in [tid for tid, r in self._running.items() if r.node == name]:
            if tid in self._copies:
                self._promote(tid)
            else:
                lost.append(tid)
                self.release(tid)
        return lost

    @property
    def nodes(self) -> dict[str, NodeCaps]:
        return self._nodes

    def busy(self, node: str, group: int) -> int:
        return self._busy.get((node, group), 0)

    def reserved(self, node: str) -> Mapping[str, float]:
        """Counted resources reserved on ``node`` by its placed tasks."""
        return self._reserved.get(node, {})

    def release(self, task_id: str) -> bool:
        """A placed task finished, was cancelled or lost: free its slot and resources (and
        those of its speculative copy, if one runs)."""
        r = self._running.pop(task_id, None)
        if r is None:
            return False
        self.release_copy(task_id)
        self._free(r)
        self._running_by_user[r.user] -= 1
        if self._running_by_user[r.user] <= 0:
            del self._running_by_user[r.user]
        return True

    def release_copy(self, task_id: str) -> bool:
        """The speculative copy of ``task_id`` ended, failed or was lost: free its slot (the
        original runs on)."""
        c = self._copies.pop(task_id, None)
        if c is None:
            return False
        self._free(c)
        return True

    def promote_copy(self, task_id: str) -> bool:
        """The original attempt of ``task_id`` is gone (its worker was lost): its copy
        becomes the placement. Returns False if it has no copy."""
        if task_id not in self._copies or task_id not in self._running:
            return False
        self._promote(task_id)
        return True

    def _promote(self, task_id: str) -> None:
        """The original attempt of ``task_id`` is gone: its copy becomes the placement."""
        r = self._running[task_id]
        c = self._copies.pop(task_id)
        self._running[task_id] = c
        self._free(r)

    def where(self, task_id: str) -> tuple[str, int] | None:
        """(node, group) where ``task_id`` is placed (its original attempt), or None."""
        r = self._running.get(task_id)
        return None if r is None else (r.node, r.group)

    def copy_of(self, task_id: str) -> tuple[str, int] | None:
        """(node, group) of the speculative copy of ``task_id``, or None."""
        c = self._copies.get(task_id)
        return None if c is None else (c.node, c.group)

    @property
    def copies(self) -> int:
        """Speculative copies in flight."""
        return len(self._copies)

    def _free(self, r: Placed) -> None:
        """Give back the slot and resources an attempt held."""
        key = (r.node, r.group)
        self._busy[key] -= 1
        if self._busy[key] <= 0:
            del self._busy[key]
        if r.long:
            self._long_busy[key] -= 1
            if self._long_busy[key] <= 0:
                del self._long_busy[key]
        if r.requires:
            # summed again from what is still placed there: no float drift, no leftovers
            reserved: dict[str, float] = {}
            for other in (*self._running.values(), *self._copies.values()):
                if other.node == r.node:
                    for res, amount in other.requires:
                        reserved[res] = reserved.get(res, 0.0) + amount
            if reserved:
                self._reserved[r.node] = reserved
            else:
                self._reserved.pop(r.node, None)

    def adopt(
        self, task_id: str, user: str, node: str, group: int, requires: Requires = ()
    ) -> None:
        """Record a task already running on a node (e.g. reported after a restart)."""
        if task_id in self._running:
            return
        self._mark_placed(task_id, user, node, group, requires)

    def _mark_placed(
        self,
        task_id: str,
        user: str,
        node: str,
        group: int,
        requires: Requires,
        *,
        long: bool = True,
        task: Queued | None = None,
        windowed: bool = False,
    ) -> None:
        self._running[task_id] = Placed(
            node, group, user, requires, long=long, task=task, windowed=windowed
        )
        self._running_by_user[user] += 1
        self._hold(node, group, requires, long)

    def _hold(self, node: str, group: int, requires: Requires, long: bool) -> None:
        self._busy[(node, group)] += 1
        if long:
            self._long_busy[(node, group)] += 1
        if requires:
            reserved = self._reserved.setdefault(node, {})
            for res, amount in requires:
                reserved[res] = reserved.get(res, 0.0) + amount

    def observe(self, name: str, node: str, runtime_s: float, cost: float | None = None) -> None:
        """A task of ``name`` (``cost`` units) ran ``runtime_s`` seconds on ``node``: feeds
        the name's work and the node's speed."""
        caps = self._nodes.get(node)
        self.runtimes.observe(name, node, caps.speed if caps else 1.0, runtime_s, cost)

    def learned_speeds(self) -> dict[str, float]:
        """The online nodes whose speed was learned from tasks, relative to the fastest of
        them (1.0)."""
        rt = self.runtimes
        learned = {n: self.speed(n) for n in self._nodes if n in rt.speed or n in rt.guess}
        top = max(learned.values(), default=0.0)
        return {n: v / top for n, v in learned.items()} if top > 0 else {}

    def speed(self, node: str) -> float:
        """The node's learned relative speed (its declared one before any task ended)."""
        caps = self._nodes.get(node)
        return self.runtimes.speed_of(node, caps.speed if caps else 1.0)

    # ------------------------------------------------------- attempts in flight

    def started(self, task_id: str, now: float) -> None:
        """The node started ``task_id``'s original attempt at ``now`` (it can no longer
        be taken back; its elapsed time counts from here)."""
        r = self._running.get(task_id)
        if r is not None and r.started_at is None:
            r.started_at = now
            r.revoking = False

    def progress(self, task_id: str, fraction: float, now: float) -> None:
        """``task_id``'s original attempt reports ``fraction`` (0..1) done at ``now``."""
        r = self._running.get(task_id)
        if r is not None:
            if r.started_at is None:
                self.started(task_id, now)
            stragglers.note_progress(r, min(1.0, max(0.0, fraction)), now)

    def take_back(self, now: float) -> list[str]:
        """Tasks pipelined to a node and not started there that an idle slot elsewhere
        would finish clearly sooner (see :mod:`.stragglers`). They stay placed, marked as
        asked back, until the caller reports :meth:`given_back` (the node gave it up:
        it is queued again, at the head) or :meth:`keep` (it had started meanwhile)."""
        return stragglers.take_back(self, now)

    def given_back(self, task_id: str) -> Queued | None:
        """A task asked back was given up by its node: unplace it and queue it again (it
        keeps its seq, so it goes back to the head). Returns the task, or None."""
        r = self._running.get(task_id)
        if r is None or r.task is None:
            return None
        self.release(task_id)
        self.enqueue(r.task)
        return r.task

    def keep(self, task_id: str) -> None:
        """A task asked back had started on its node: it stays there."""
        r = self._running.get(task_id)
        if r is not None:
            r.revoking = False

    def speculate(self, now: float) -> list[Copy]:
        """Speculative copies to start now (see :mod:`.stragglers`), already accounted:
        each holds its slot until :meth:`release` (the task ended: both attempts) or
        :meth:`release_copy` (the copy alone ended or failed)."""
        return stragglers.speculate(self, now)

    def _place_copy(self, task_id: str, node: str, group: int) -> Copy:
        r = self._running[task_id]
        long = r.task is None or self._short_runtime(r.task.name, self._nodes[node]) is None
        self._copies[task_id] = Placed(node, group, r.user, r.requires, long=long, task=r.task)
        self._hold(node, group, r.requires, long)
        return Copy(task_id, node, group)

    # ---------------------------------------------------------------- decide

    def schedule(self, now: float | None = None) -> list[Placement]:
        """Fill the free slots. Returns the placements, already accounted.

        Args:
            now: the current time (any clock, seconds). With it, placements record when
                they are expected to end, and in the tail (no more queued tasks than the
                cluster has slots) a task is not started on a slot if a busy slot that frees
                soon would finish it clearly sooner: it waits for that slot. Without it,
                every free slot that can run a queued task gets one.
        """
        out: list[Placement] = []
        if not self._backlog:
            return out
        self._rt_cache = {}  # runtimes and loads do not change within one call
        self._slot_heaps = {}
        try:
            return self._schedule(out, now)
        finally:
            self._rt_cache = None
            self._slot_heaps = None

    def _schedule(self, out: list[Placement], now: float | None) -> list[Placement]:
        free: dict[tuple[str, int], Group] = {}
        for caps in self._nodes.values():
            for g in caps.groups:
                if self._busy.get((caps.name, g.index), 0) < self.capacity(caps.name, g):
                    free[(caps.name, g.index)] = g
        held: set[tuple[str, str, Shape]] = set()
        self.holding = False
        claimed: set[tuple[str, int]] = set()
        slots = self.slots
        # what the free places offer each (name, shape), kept from one placement to the
        # next while no placement can have changed it (:meth:`_bands_still_hold`)
        fit_cache: dict[tuple[str, str, Shape], bool] = {}
        bands_cache: dict[tuple[str, Shape], list[tuple[int, int]]] = {}
        while free and self._backlog:
            choice = self._next(free, held, fit_cache, bands_cache)
            if choice is None:
                break
            task, (node, gi) = choice
            tail = len(self._backlog) <= slots  # the queue can no longer fill the cluster
            if tail and now is not None and better_soon(self, task, node, now, claimed):
                held.add((task.user, task.name, task.shape))
                self.holding = True  # call again soon: estimates go stale
                continue
            self._backlog.take(task)
            group = free[(node, gi)]
            windowed = self._busy.get((node, gi), 0) >= group.workers
            self._mark_placed(
                task.id,
                task.user,
                node,
                gi,
                task.requires,
                long=self._short_runtime(task.name, self._nodes[node]) is None,
                task=task,
                windowed=windowed,
            )
            if now is not None:
                self._running[task.id].expected_end = now + self.expected_runtime(
                    task.name, self._nodes[node], task.cost
                )
            busy = self._busy[(node, gi)]
            if busy >= self.capacity(node, group):
                del free[(node, gi)]
                bands_cache.clear()
            elif not self._bands_still_hold(busy, group, task.requires):
                bands_cache.clear()
            if task.requires:
                fit_cache.clear()  # (resources reserved on the node)
            out.append(Placement(task, node, gi))
        return out

    def _bands_still_hold(self, busy: int, group: Group, requires: Requires) -> bool:
        """Whether the open bands of every (name, shape) (:meth:`_open_bands`) are the same
        after a placement that left its place free with ``busy`` tasks: its place's
        :meth:`_window_ok` cannot have changed (the place had an idle slot left, or it was
        in its window already: a task placed there is short, so no long one joined it; and
        it did not just fill the first window place of each slot), and no resources were
        reserved."""
        return not requires and busy != group.workers and busy != 2 * group.workers

    def fits(self, caps: NodeCaps, name: str, shape: Shape) -> bool:
        """Whether ``caps`` could run a task of ``name`` and ``shape`` now (slots aside)."""
        requires, tags = shape
        if name not in caps.tasks or not tags <= caps.tags:
            return False
        if requires:
            reserved = self._reserved.get(caps.name)
            for res, amount in requires:
                used = reserved.get(res, 0.0) if reserved else 0.0
                if caps.resources.get(res, 0.0) - used < amount - 1e-9:
                    return False
        return True

    def _next(
        self,
        free: dict[tuple[str, int], Group],
        held: set[tuple[str, str, Shape]],
        fit_cache: dict[tuple[str, str, Shape], bool],
        bands_cache: dict[tuple[str, Shape], list[tuple[int, int]]],
    ) -> tuple[Queued, tuple[str, int]] | None:
        cap = self.max_running_per_user
        order = sorted(self._backlog.by_user, key=lambda u: self._running_by_user.get(u, 0))
        best: Queued | None = None
        best_key: tuple[int, int] | None = None
        for user in order:
            running = self._running_by_user.get(user, 0)
            if best_key is not None and running > best_key[0]:
                break  # every user from here has more placed tasks than the best one
            if cap and running >= cap:
                continue
            head = self._user_head(user, free, fit_cache, held, bands_cache)
            if head is None:
                continue
            key = (running, head.seq)
            if best_key is None or key < best_key:
                best, best_key = head, key
        if best is None:
            return None
        return best, self._best_slot(best, free)

    def _user_head(
        self,
        user: str,
        free: dict[tuple[str, int], Group],
        fit_cache: dict[tuple[str, str, Shape], bool],
        held: set[tuple[str, str, Shape]],
        bands_cache: dict[tuple[str, Shape], list[tuple[int, int]]],
    ) -> Queued | None:
        head: Queued | None = None
        for (name, shape), pq in self._backlog.by_user[user].items():
            if held and (user, name, shape) in held:
                continue
            bands = bands_cache.get((name, shape))
            if bands is None:  # the same for every user (and kept while placements allow)
                bands = bands_cache[(name, shape)] = self._open_bands(name, shape, free, fit_cache)
            for lo, hi in bands:
                t = pq.best_in_band(lo, hi, self._backlog.alive)
                if t is not None and (
                    head is None or (-t.priority, t.seq) < (-head.priority, head.seq)
                ):
                    head = t
        return head

    def _open_bands(
        self,
        name: str,
        shape: Shape,
        free: dict[tuple[str, int], Group],
        fit_cache: dict[tuple[str, str, Shape], bool],
    ) -> list[tuple[int, int]]:
        """The priority bands of the free places a task of ``name`` and ``shape`` may take
        (its node offers the task and fits it; an idle slot, or a window place if short)."""
        bands: set[tuple[int, int]] = set()
        for (node, _), g in free.items():
            band = (g.min_p, g.max_p)
            if band in bands:
                continue  # (many nodes, few bands: most places add nothing new)
            fkey = (node, name, shape)
            ok = fit_cache.get(fkey)
            if ok is None:
                ok = fit_cache[fkey] = self.fits(self._nodes[node], name, shape)
            if ok and self._window_ok(name, self._nodes[node], g):
                bands.add(band)
        return sorted(bands)

    def expected_runtime(self, name: str, caps: NodeCaps, cost: float | None = None) -> float:
        """Runtime of ``name`` (``cost`` units, one if None) expected on ``caps`` now: the
        work observed, over the node's learned speed, and load-aware."""
        cache = self._rt_cache
        est = None if cache is None else cache.get((name, caps.name))
        if est is None:
            est = self.runtimes.estimate(name, caps)
            load = self._load.get(caps.name, 0.0)
            if caps.cores and load > caps.cores:
                est *= load / caps.cores
            if not est < MAX_ESTIMATE_S:  # (NaN too: the placement's heaps compare keys)
                est = MAX_ESTIMATE_S
            if cache is not None:
                cache[(name, caps.name)] = est
        if cost is not None and cost > 0:
            return est * cost
        return est

    def _best_slot(self, task: Queued, free: dict[tuple[str, int], Group]) -> tuple[str, int]:
        """The free place for ``task`` with the smallest :meth:`_slot_key`.

        Within one :meth:`schedule` call the places are kept in a heap per (name, shape,
        priority), checked lazily: placing only adds work, so a place's key only grows and
        a place that stopped taking such a task never takes it again. The top of the heap,
        still valid and with its key unchanged, is then the minimum of a full scan - at
        O(log n) per placement instead of O(free places) (many nodes: the scan was the
        balancer's main cost). The one free place, when there is one, is the answer:
        :meth:`_user_head` returns only tasks a free place can run (its band, fit and
        window), and looking again cost a quarter of placing a task.
        """
        if len(free) == 1:  # (one node with one group, or all others full: no choice)
            return next(iter(free))
        heaps = self._slot_heaps
        if heaps is None:
            return self._scan_best_slot(task, free)
        hk = (task.name, task.shape, task.priority)
        h = heaps.get(hk)
        if h is None:
            h = heaps[hk] = [
                self._slot_key(task, node, gi, g)
                for (node, gi), g in free.items()
                if self._slot_ok(task, node, g)
            ]
            heapq.heapify(h)
        while h:
            key = h[0]
            node, gi = key[3], key[4]
            g = free.get((node, gi))
            if g is None or not self._slot_ok(task, node, g):
                heapq.heappop(h)
                continue
            current = self._slot_key(task, node, gi, g)
            if current != key:
                heapq.heapreplace(h, current)
                if h[0] is not current:
                    continue
                # (still on top with its key up to date: every other entry's key is at most
                # its place's current key, so no place is better)
            return node, gi
        raise AssertionError("_user_head only returns tasks some free slot can run")

    def _scan_best_slot(self, task: Queued, free: dict[tuple[str, int], Group]) -> tuple[str, int]:
        keys = [
            self._slot_key(task, node, gi, g)
            for (node, gi), g in free.items()
            if self._slot_ok(task, node, g)
        ]
        assert keys  # _user_head only returns tasks some free slot can run
        best = min(keys)
        return best[3], best[4]

    def _slot_ok(self, task: Queued, node: str, g: Group) -> bool:
        caps = self._nodes[node]
        return (
            g.accepts(task.priority)
            and self.fits(caps, task.name, task.shape)
            and self._window_ok(task.name, caps, g)
        )

    def _slot_key(self, task: Queued, node: str, gi: int, g: Group) -> SlotKey:
        """Smaller is better: expected finish (runtime, and the tasks ahead of it in a
        window), then the faster node, then the less loaded, then by name."""
        caps = self._nodes[node]
        busy = self._busy
        here = busy.get((node, gi), 0)
        if len(caps.groups) == 1:  # (the common case, without a sum over the groups)
            slots, placed = g.workers, here
        else:
            slots = caps.slots
            placed = sum(busy.get((node, x.index), 0) for x in caps.groups)
        load = placed / slots if slots else 1.0
        # in a window, the tasks ahead of it run first (on the group's slots)
        ahead = max(0, here + 1 - g.workers)
        runtime = self.expected_runtime(task.name, caps, task.cost)
        speed = self.runtimes.speed_of(node, caps.speed)
        return (runtime * (1 + ahead / max(1, g.workers)), -speed, load, node, gi)

    # ---------------------------------------------------------------- explain

    def why_waiting(
        self, name: str, priority: int, requires: Requires = (), tags: frozenset[str] = NO_TAGS
    ) -> str | None:
        """Why a task could not run on any online node even if all were idle, or None."""
        return why_waiting(self._nodes.values(), name, priority, requires, tags)
