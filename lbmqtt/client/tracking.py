"""What the client knows of its tasks: the last state of each, the futures waiting for
the next or the final one, and final states kept a while after they reached the caller."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import ErrorCode, error_from_code
from ..protocol import ErrorItem, TaskState

__all__ = ["ASKED_FOR_S", "ASK_AHEAD", "COLLECTED_CACHE", "DROPPED_IDS_MAX", "TaskBook", "Tracked"]

COLLECTED_CACHE = 10_000
"""Final states kept: of those handed to the caller, and of those nobody waited for yet."""
DROPPED_IDS_MAX = 200_000
"""Ids kept of final states dropped unread from the cache above (~100 bytes each; older
ones are asked about one by one)."""
ASK_AHEAD = 1_000
"""A wait for a task whose final state was dropped asks the balancer about this many of
the dropped ones at once, oldest first: a caller that waits for 60,000 tasks one by one
after submitting them all (more than the cache holds) then pays one round trip a thousand
tasks, not one a task (``bench/run.py throughput --broker mosquitto --tasks 60000``: 2,531
against 11,596 tasks/s, medians of 8 runs)."""
ASKED_FOR_S = 10.0
"""How long the ids asked about ahead wait for their answers (a wait for one of them sends
nothing meanwhile); then they are forgotten: a later wait asks about its own alone."""


@dataclass
class Tracked:
    """One task the client follows: its last state and who waits for what."""

    state: TaskState | None = None
    next: list[asyncio.Future[TaskState]] = field(default_factory=list)
    final: asyncio.Future[TaskState] | None = None


class TaskBook:
    """The client's tasks by id; fed by the events and errors the balancer sends."""

    def __init__(self) -> None:
        self.tracked: dict[str, Tracked] = {}
        # final states already handed to the caller (and acknowledged to the balancer) ...
        self.collected: collections.OrderedDict[str, TaskState] = collections.OrderedDict()
        # ... and final states that arrived while nobody waited for them
        self.finished: collections.OrderedDict[str, TaskState] = collections.OrderedDict()
        # ... and the ids of those dropped from it unread, oldest first, and of those asked
        # about again (with when to give up on the answer)
        self.dropped: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.asked: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.loop: asyncio.AbstractEventLoop | None = None
        """The client's loop (set when it starts): the futures belong to it."""

    def known_final(self, task_id: str) -> TaskState | None:
        """The final state of a task that is no longer followed, if kept."""
        return self.collected.get(task_id) or self.finished.get(task_id)

    def watch_next(self, task_id: str) -> asyncio.Future[TaskState]:
        """A future for the next state (or error) the balancer sends about ``task_id``."""
        assert self.loop is not None
        fut: asyncio.Future[TaskState] = self.loop.create_future()
        self.tracked.setdefault(task_id, Tracked()).next.append(fut)
        return fut

    def final_future(self, task_id: str) -> asyncio.Future[TaskState]:
        """The future of the final state of ``task_id`` (done already if it is known)."""
        assert self.loop is not None
        tr = self.tracked.setdefault(task_id, Tracked())
        if tr.final is None:
            tr.final = self.loop.create_future()
            if tr.state is not None and tr.state.status.final:
                tr.final.set_result(tr.state)
        return tr.final

    def forget(self, task_id: str) -> None:
        """Stop following ``task_id`` if nobody waits for it."""
        tr = self.tracked.get(task_id)
        if tr is not None and not tr.next and (tr.final is None or tr.final.done()):
            del self.tracked[task_id]

    def collected_now(self, state: TaskState) -> None:
        """A final state reached the caller: remember it a while, follow it no more."""
        self.tracked.pop(state.id, None)
        self.finished.pop(state.id, None)
        self.undrop(state.id)
        _remember(self.collected, state)

    def ask_ahead(self, task_id: str) -> list[str] | None:
        """What to ask the balancer about ``task_id``: None if it was asked about already
        and its answer is on the way (``asked``); else the other ids to ask about with it,
        in a message of their own: if its final state was dropped unread, the oldest others
        dropped too (ASK_AHEAD in all, with it), whose answers are kept in :attr:`finished`
        as they come. Those go from ``dropped`` to ``asked``, so that waits at the same
        time do not ask about them again."""
        asked, dropped = self.asked, self.dropped
        now = time.monotonic()
        while asked and next(iter(asked.values())) <= now:
            asked.popitem(last=False)  # (no answer: a later wait asks about its own alone)
        if task_id in asked:
            return None
        if task_id not in dropped:
            return []
        del dropped[task_id]
        more: list[str] = []
        until = now + ASKED_FOR_S
        asked[task_id] = until
        while dropped and len(more) < ASK_AHEAD - 1:
            tid = dropped.popitem(last=False)[0]
            asked[tid] = until
            more.append(tid)
        return more

    def undrop(self, task_id: str) -> bool:
        """Forget that ``task_id``'s final state was dropped (or asked about); whether it
        was."""
        was = task_id in self.dropped
        if was:
            del self.dropped[task_id]
        return self.asked.pop(task_id, None) is not None or was

    def unfinished(self) -> list[str]:
        """The tasks the balancer has told us about whose final state has not come yet
        (whether or not anybody waits for it now). Not those it has not acknowledged yet:
        their submit (or query) is resent until it answers, and a query that overtook a
        resent submit would be answered ``unknown_task``."""
        return [
            tid
            for tid, tr in self.tracked.items()
            if tr.state is not None and not tr.state.status.final
        ]

    def drop_watch(self, task_id: str, fut: asyncio.Future[TaskState] | None) -> None:
        """A :meth:`watch_next` future its caller no longer waits for: cancelled and
        unlisted if pending (an error for it later would be raised in nobody), its error
        marked seen if it has one."""
        if fut is None:
            return
        if not fut.done():
            fut.cancel()
            tr = self.tracked.get(task_id)
            if tr is not None:
                tr.next = [f for f in tr.next if f is not fut]
        elif not fut.cancelled():
            fut.exception()

    def on_states(self, states: Iterable[TaskState]) -> None:
        """States from the balancer's events: resolve who waits for them."""
        for st in states:
            tr = self.tracked.get(st.id)
            if tr is None:
                if st.status.final and self.undrop(st.id):
                    self._keep_finished(st)  # (asked about again: see ask_ahead)
                continue  # (else another client's task of the same user)
            tr.state = st
            for fut in tr.next:
                if not fut.done():
                    fut.set_result(st)
            tr.next.clear()
            if st.status.final:
                if tr.final is not None and not tr.final.done():
                    tr.final.set_result(st)
                elif tr.final is None and not tr.next:
                    # nobody waits for it now: keep it (bounded) for a later get/wait
                    self.tracked.pop(st.id, None)
                    self._keep_finished(st)

    def _keep_finished(self, st: TaskState) -> None:
        """Keep a final state nobody waits for yet; the oldest beyond COLLECTED_CACHE is
        dropped, its id kept (a later wait for it asks the balancer: see ask_ahead)."""
        self.undrop(st.id)
        dropped = _remember(self.finished, st)
        dids = self.dropped
        for tid in dropped:
            dids[tid] = None
        while len(dids) > DROPPED_IDS_MAX:
            dids.popitem(last=False)

    def on_error(self, e: ErrorItem) -> bool:
        """A refusal from the balancer: raise it in who waits for the task's next state.
        False if it is about no task followed here."""
        tr = self.tracked.get(e.id) if e.id else None
        if tr is None:
            if e.id:
                return self.undrop(e.id)  # (asked about ahead, gone since: see ask_ahead)
            # (the one answer about many unknown ids: of those asked about ahead, if any)
            return bool(self.asked) and e.topic == "query" and e.code == ErrorCode.UNKNOWN_TASK
        for fut in tr.next:
            if not fut.done():
                fut.set_exception(error_from_code(e.code, e.message, e.id))
        tr.next.clear()
        return True


def _remember(cache: collections.OrderedDict[str, TaskState], state: TaskState) -> list[str]:
    """Keep ``state`` in ``cache`` (newest last); the ids of those it drops."""
    cache[state.id] = state
    cache.move_to_end(state.id)
    dropped = []
    while len(cache) > COLLECTED_CACHE:
        dropped.append(cache.popitem(last=False)[0])
    return dropped
