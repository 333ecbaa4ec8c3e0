"""Stragglers: taking back pipelined tasks not started, and speculative copies (LATE).

Both act only on slots left idle after :meth:`Scheduler.schedule`, which no queued task
could take (queued work always goes first), and both compare expected finishing times:

* **Take-back.** A task pipelined to a node (in its window, not started) waits there for
  the node's running tasks. If an idle slot elsewhere would finish it in under
  ``HOLD_MARGIN`` of the time it is expected to take where it is (its wait included), and
  at least ``take_back_min_gain_s`` sooner, it is asked back (no more of them than there
  are idle slots, counting those asked before and not yet given back); once its node
  gives it up it is queued again at the head, and the next :meth:`Scheduler.schedule`
  places it on that idle slot. Not for a task that opted out (``speculate=False``): its
  node might have started it as it is asked back.
* **Speculative copies.** A running task's time left where it is: from its progress
  ``p``, ``t x (1 - p) / p`` (its rate up to its last report, ``t`` after its start, as
  LATE) less the time since that report; without progress, the expected runtime there
  less the elapsed time; either way, once overdue, as long again as it is overdue. A copy
  goes to the idle slot that would finish it first if that is under ``COPY_MARGIN`` of
  the time left and at least ``speculate_min_gain_s`` sooner, longest time left first.
  Bounded: at most ``speculative_share`` of all slots (at least one) run copies, one copy
  per task, never a copy of a copy, never a task that opted out (``speculate=False``) or
  that the scheduler adopted without knowing it, never on the original's node.

The copy's expected runtime: with progress, the task's total here at its best rate so
far, scaled by the speeds (a big task is big everywhere); if every task on its node now
progresses at a fraction of its earlier rate, the node itself slowed down and the name's
expected runtime there counts too, if smaller. Without progress, the name's expected
runtime there (``cost`` included), or for a name never seen, its expected runtime here,
scaled.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .model import Copy, Group, NodeCaps
from .queues import Placed

if TYPE_CHECKING:
    from .core import Scheduler

HOLD_MARGIN = 0.8
COPY_MARGIN = 0.7
LAGGING = 0.25
"""A task whose progress comes slower than this share of its best rate has slowed down."""


def _idle_slots(s: Scheduler) -> list[tuple[NodeCaps, Group, int]]:
    """(node, group, idle slots) that no queued task could take."""
    out = []
    for caps in s._nodes.values():
        for g in caps.groups:
            idle = g.workers - s._busy.get((caps.name, g.index), 0)
            if idle > 0 and not _queued_fits(s, caps, g):
                out.append((caps, g, idle))
    return out


def _best_elsewhere(
    s: Scheduler,
    r: Placed,
    idle: list[tuple[NodeCaps, Group, int]],
    free: dict[tuple[str, int], int],
    *,
    runtime: Callable[[NodeCaps], float],
    below: float,
    at_most: float,
) -> tuple[str, int] | None:
    """The idle slot, on another node than ``r``'s, that can run its task and would run it
    soonest: in ``runtime(caps)`` under ``below`` and at most ``at_most`` (the margin and the
    least gain asked of a copy or a take-back); ties by node name and group."""
    task = r.task
    assert task is not None
    best: tuple[float, str, int] | None = None
    for caps, g, _ in idle:
        if caps.name == r.node or not free[(caps.name, g.index)]:
            continue
        if not g.accepts(task.priority) or not s.fits(caps, task.name, task.shape):
            continue
        there = runtime(caps)
        if (
            there < below
            and there <= at_most
            and (best is None or (there, caps.name, g.index) < best)
        ):
            best = (there, caps.name, g.index)
    return None if best is None else (best[1], best[2])


def _queued_fits(s: Scheduler, caps: NodeCaps, g: Group) -> bool:
    alive = s._backlog.alive
    return any(
        s.fits(caps, name, shape) and pq.best_in_band(g.min_p, g.max_p, alive)
        for name, shape, pq in s._backlog.queues()
    )


def time_left(s: Scheduler, r: Placed, now: float) -> float:
    """Expected seconds until the attempt ``r`` (started) ends where it runs."""
    assert r.task is not None and r.started_at is not None
    elapsed = max(0.0, now - r.started_at)
    p, at = r.progress, r.progress_at
    if p and at is not None and at > r.started_at:
        # its rate up to its last report; past the end that rate foretold, as long again
        # as it is overdue
        left = (at - r.started_at) * (1 - p) / p - (now - at)
        return left if left >= 0 else -left
    caps = s._nodes.get(r.node)
    if caps is None:
        return 0.0
    expected = s.expected_runtime(r.task.name, caps, r.task.cost)
    return expected - elapsed if elapsed < expected else elapsed


def note_progress(r: Placed, fraction: float, now: float) -> None:
    """Record a progress report of the attempt ``r`` (started)."""
    assert r.started_at is not None
    if r.progress is not None and r.progress_at is not None and now > r.progress_at:
        recent = (fraction - r.progress) / (now - r.progress_at)
        r.slowed = recent < LAGGING * r.best_rate
    if now > r.started_at:
        r.best_rate = max(r.best_rate, fraction / (now - r.started_at))
    r.progress, r.progress_at = fraction, now


def slowed_nodes(s: Scheduler) -> set[str]:
    """Nodes where every task that reported progress twice now goes at a fraction of its
    earlier pace: the node itself slowed down (throttled, loaded). (A task that is just
    big goes at one pace throughout.)"""
    seen: dict[str, bool] = {}
    for r in s._running.values():
        if r.progress_at is not None and r.best_rate > 0 and r.progress_at != r.started_at:
            seen[r.node] = seen.get(r.node, True) and r.slowed
    return {n for n, slow in seen.items() if slow}


def _runtime_there(s: Scheduler, r: Placed, caps: NodeCaps, slowed: set[str]) -> float:
    """Expected runtime of a fresh copy of ``r``'s task on ``caps``: from its best
    progress rate where it runs, scaled by the speeds (a big task is big everywhere), or
    the name's expected runtime there if smaller and the node has slowed down; without
    progress, the name's expected runtime there (a name never seen: here, scaled)."""
    task = r.task
    assert task is not None
    here = s._nodes.get(r.node)
    if here is None:  # (cannot happen: placed tasks are on online nodes)
        return s.expected_runtime(task.name, caps, task.cost)
    ratio = s.speed(r.node) / s.speed(caps.name)
    known = s.runtimes.known(task.name)
    by_name = (
        s.expected_runtime(task.name, caps, task.cost)
        if known
        else s.expected_runtime(task.name, here, task.cost) * ratio
    )
    if r.best_rate > 0:
        by_rate = ratio / r.best_rate
        return min(by_rate, by_name) if known and r.node in slowed else by_rate
    return by_name


def speculate(s: Scheduler, now: float) -> list[Copy]:
    slots = s.slots
    room = max(1, math.ceil(s.speculative_share * slots)) - len(s._copies)
    if room <= 0 or not s._running:
        return []
    idle = _idle_slots(s)
    if not idle:
        return []
    candidates = []
    for tid, r in s._running.items():
        if (
            r.task is None
            or not r.task.speculate
            or r.started_at is None
            or tid in s._copies
            or r.node not in s._nodes
        ):
            continue
        left = time_left(s, r, now)
        if left > s.speculate_min_gain_s:
            candidates.append((left, tid, r))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    slowed = slowed_nodes(s)
    out: list[Copy] = []
    free = {(caps.name, g.index): n for caps, g, n in idle}
    for left, tid, r in candidates:
        best = _best_elsewhere(
            s,
            r,
            idle,
            free,
            runtime=functools.partial(_runtime_there, s, r, slowed=slowed),
            below=COPY_MARGIN * left,
            at_most=left - s.speculate_min_gain_s,
        )
        if best is None:
            continue
        free[best] -= 1
        out.append(s._place_copy(tid, *best))
        if len(out) >= room:
            break
    return out


def take_back(s: Scheduler, now: float) -> list[str]:
    waiting = [
        (tid, r)
        for tid, r in s._running.items()
        if r.windowed
        and r.started_at is None
        and not r.revoking
        and r.task is not None
        and r.task.speculate
    ]
    if not waiting:
        return []
    idle = _idle_slots(s)
    if not idle:
        return []
    free = {(caps.name, g.index): n for caps, g, n in idle}
    # tasks asked back and not yet given back will take idle slots too
    room = sum(free.values()) - sum(1 for r in s._running.values() if r.revoking)
    if room <= 0:
        return []
    # when each busy group frees its next slot (its started tasks' time left)
    frees: dict[tuple[str, int], list[float]] = {}
    for r in s._running.values():
        if r.started_at is not None and r.task is not None:
            frees.setdefault((r.node, r.group), []).append(time_left(s, r, now))
    ahead: dict[tuple[str, int], int] = {}
    out = []
    for tid, r in waiting:  # in placement order: the node starts them in this order
        task = r.task
        assert task is not None
        key = (r.node, r.group)
        n_ahead = ahead.get(key, 0)
        ahead[key] = n_ahead + 1
        here_caps = s._nodes.get(r.node)
        if here_caps is None:
            continue
        run_here = s.expected_runtime(task.name, here_caps, task.cost)
        ends = sorted(frees.get(key, [0.0]))
        workers = max(1, len(ends))
        wait = ends[min(n_ahead, len(ends) - 1)] + (n_ahead // workers) * run_here
        here = wait + run_here
        best = _best_elsewhere(
            s,
            r,
            idle,
            free,
            runtime=functools.partial(s.expected_runtime, task.name, cost=task.cost),
            below=HOLD_MARGIN * here,
            at_most=here - s.take_back_min_gain_s,
        )
        if best is None:
            continue
        free[best] -= 1
        r.revoking = True
        out.append(tid)
        room -= 1
        if room <= 0:
            break
    return out
