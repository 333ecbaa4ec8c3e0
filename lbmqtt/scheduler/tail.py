"""The tail of a batch: a queued task may wait for a busy slot that frees soon rather
than start on a free one that would finish it clearly later (:meth:`Scheduler.schedule`,
once no more tasks are queued than the cluster has slots)."""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from . import stragglers
from .model import Queued

if TYPE_CHECKING:
    from .core import Scheduler

HOLD_MARGIN = 0.8
"""Wait for a busy slot only if it would finish the task in under 80 % of the time."""


def better_soon(
    s: Scheduler, task: Queued, node: str, now: float, claimed: set[tuple[str, int]]
) -> bool:
    """Whether a busy slot frees soon enough to finish ``task`` clearly earlier than
    starting it on ``node`` now (and claim that slot for it)."""
    # (a name never seen is expected to take UNKNOWN_WORK: on unequal machines a fast
    # slot that frees soon still beats a much slower one, whatever the work)
    nodes = s.nodes
    here = s.expected_runtime(task.name, nodes[node], task.cost)
    best: tuple[float, tuple[str, int]] | None = None
    for (n, gi), end in slot_frees(s, now, claimed).items():
        caps = nodes.get(n)
        if caps is None or n == node:
            continue
        group = next((g for g in caps.groups if g.index == gi), None)
        if group is None or not group.accepts(task.priority):
            continue
        if not s.fits(caps, task.name, task.shape):
            continue
        finish = max(end, now) - now + s.expected_runtime(task.name, caps, task.cost)
        if best is None or finish < best[0]:
            best = (finish, (n, gi))
    if best is not None and best[0] < HOLD_MARGIN * here:
        claimed.add(best[1])
        return True
    return False


def slot_frees(
    s: Scheduler, now: float, claimed: set[tuple[str, int]]
) -> dict[tuple[str, int], float]:
    """When the next slot of each busy group (not ``claimed``) is expected to be free
    for one more task: its started tasks' time left (:func:`.stragglers.time_left`),
    an unstarted one's expected end, then the tasks held in its window run first. A
    task placed but not started and overdue is not waited on (its estimate was wrong)."""
    lefts: dict[tuple[str, int], list[float]] = {}
    behind: dict[tuple[str, int], list[float]] = {}
    nodes = s.nodes
    for r in s._running.values():
        key = (r.node, r.group)
        if key in claimed:
            continue
        if r.started_at is not None and r.task is not None:
            lefts.setdefault(key, []).append(stragglers.time_left(s, r, now))
        elif r.windowed and r.task is not None and (caps := nodes.get(r.node)):
            behind.setdefault(key, []).append(s.expected_runtime(r.task.name, caps, r.task.cost))
        elif r.expected_end is not None and r.expected_end >= now:
            lefts.setdefault(key, []).append(r.expected_end - now)
    ends: dict[tuple[str, int], float] = {}
    for key, slots in lefts.items():
        heapq.heapify(slots)
        for runtime in behind.get(key, ()):  # the window drains onto the slots
            heapq.heapreplace(slots, slots[0] + runtime)
        ends[key] = now + slots[0]
    return ends
