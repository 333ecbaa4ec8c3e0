"""What the balancer has to send and to write, gathered between two ticks.

Handlers never publish: they put a task whose state changed (:meth:`Outbox.emit`), an error
for a user (:meth:`Outbox.error`) or a node whose assignment set changed
(``dirty_nodes``) here, and the tick (:mod:`.core`) writes the journal, then sends one
batch per user and one set per node. The outbox encodes, it never publishes: the tick hands
it the transport's ``publish``. So every piece of the balancer depends on the outbox and
the outbox on none of them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import DecodeError
from ..protocol import ErrorItem, Errors, Topics, encode_model_json
from ..protocol.assign import encode_assignment_set
from ..protocol.topics import TASK_QOS
from ..ratelog import LogLimiter
from .records import CopyAttempt, NodeInfo, TaskRecord, copy_on, refilled

log = logging.getLogger(__name__)

BAD_LOG_INTERVAL_S = 10.0
STATE_HOLD_S = 0.02
"""Longest an announced task's assigned or running state (or progress) waits for its next
state, which replaces it: a short task's result carries them, two states in the user's
events instead of three or four. (The node holds a short task's started notice as long:
STARTED_HOLD_S.)
Measured with ``bench/run.py throughput``: the assigned states alone were ~12 % of the
balancer's CPU per no-op task and ~17 % of the client's."""
EVENTS_BYTES_MAX = 1 << 20
"""An events message over this size, of more than one state, goes as several (a query of
a thousand large results must not make one message beyond the broker's packet limit)."""

Publish = Callable[..., Any]
"""The transport's ``publish(topic, payload, qos=..., retain=...)``."""


class Outbox:
    """Task states, errors, node sets and journal writes waiting for the next tick.

    Args:
        counters: the balancer's counters (``bad_messages`` is counted here).
    """

    def __init__(self, counters: Counter[str]):
        self.counters = counters
        self.states: dict[str, dict[str, TaskRecord]] = {}
        """user -> task id -> record whose state goes out with the next tick."""
        self.errors: dict[str, list[ErrorItem]] = {}
        self.dirty_nodes: set[str] = set()
        """Nodes whose assignment set goes out with the next tick."""
        self.journaling = False
        """A journal is open: durable changes are written before they are announced."""
        self.durable: dict[str, TaskRecord] = {}
        """Records to write to the journal (with the next tick; a burst over several)."""
        self.touched: dict[str, TaskRecord] = {}
        """Records put in ``durable`` since the last write of the placed ones (those a tick
        writes before its sets go out are among them: not the whole of a burst)."""
        self.unwritten: dict[str, dict[str, TaskRecord]] = {}
        """user -> task id -> record whose state waits for its journal write."""
        self.gone: set[int] = set()
        """Seqs of expired tasks to delete from the journal."""
        self.collected: list[tuple[int, float]] = []
        """(seq, collected_at) of journaled tasks whose results were collected since the
        last write (:meth:`collect`)."""
        self.collect_alone = True
        """The journal takes a collection's time alone (set by the journal's writer)."""
        self.held: dict[str, dict[str, TaskRecord]] = {}
        """user -> task id -> record whose assigned or running state waits (STATE_HOLD_S)
        for the next one."""
        self.held_due = 0.0
        """When the held states go out (time.monotonic(); 0: none held)."""
        self._bad_log = LogLimiter(log, BAD_LOG_INTERVAL_S)  # (bounded: names are not)

    def emit(self, rec: TaskRecord, *, durable: bool = True, hold: bool = False) -> None:
        """Publish the task's state with the next tick; ``durable``: journal it first;
        ``hold``: a state on the way (assigned, running, progress) that may wait up to
        STATE_HOLD_S for the next one, if the task was announced (its submit acknowledged)
        and no state of it goes out with this tick anyway."""
        user = rec.user
        pending = self.states.get(user)
        if hold and rec.announced and (pending is None or rec.id not in pending):
            held = self.held.get(user)
            if held is None:
                held = self.held[user] = {}
                if not self.held_due:
                    self.held_due = time.monotonic() + STATE_HOLD_S
            held[rec.id] = rec
        else:
            if pending is None:
                pending = self.states[user] = {}
            pending[rec.id] = rec
            if self.held:
                self._unhold(rec)
        if durable and self.journaling:
            self.durable[rec.id] = self.touched[rec.id] = rec

    def _unhold(self, rec: TaskRecord) -> None:
        held = self.held.get(rec.user)
        if held is not None and held.pop(rec.id, None) is not None and not held:
            del self.held[rec.user]
            if not self.held:
                self.held_due = 0.0

    def release_held(self, now: float) -> bool:
        """The held states join the next :meth:`flush_states` if they are due at ``now``
        (also those held less long: they all go in one message). False if some stay
        held (then ``held_due`` says until when)."""
        if not self.held:
            return True
        if now < self.held_due - 0.0005:  # (a timer may fire a hair early)
            return False
        states = self.states
        for user, held in self.held.items():
            pending = states.get(user)
            if pending is None:
                states[user] = held
            else:
                pending.update(held)
        self.held = {}
        self.held_due = 0.0
        return True

    def write(self, rec: TaskRecord) -> None:
        """Journal the record with the next tick (a change no one is told about)."""
        if self.journaling:
            self.durable[rec.id] = self.touched[rec.id] = rec

    def collect(self, rec: TaskRecord) -> None:
        """Journal the time the task's result was collected with the next tick: that time
        alone (its seq and ``collected_at``), not the whole changed entry with its result
        encoded again. A client acknowledges every result it gets, so this is a journal
        write per task: as whole entries, the balancer's CPU per no-op task was 47 µs,
        this way 42.5 (``bench/run.py throughput``, same-run ABBA). A record whose write
        is pending carries the time in its entry."""
        if not self.journaling or rec.id in self.durable:
            return
        if not rec.journaled or not self.collect_alone:  # (the whole entry, with the time)
            self.write(rec)
            return
        assert rec.collected_at is not None
        self.collected.append((rec.seq, rec.collected_at))

    def written(self, recs: Iterable[TaskRecord]) -> None:
        """``recs`` are in the journal now: the states that waited for it go out with the
        next :meth:`flush_states`."""
        if not self.unwritten:
            return
        held = self.held
        for r in recs:
            if self._unwait(r) is not None:
                self.states.setdefault(r.user, {})[r.id] = r
                if held:
                    self._unhold(r)  # (its current state goes out now)

    def forget(self, rec: TaskRecord) -> None:
        """The task expired: delete its journal row with the next tick."""
        if self.journaling:
            self.durable.pop(rec.id, None)
            self.touched.pop(rec.id, None)
            self._unwait(rec)
            self.gone.add(rec.seq)
        if self.held:
            self._unhold(rec)

    def _unwait(self, rec: TaskRecord) -> TaskRecord | None:
        """Take ``rec``'s state out of ``unwritten`` (None: it was not there)."""
        waiting = self.unwritten.get(rec.user)
        if waiting is None:
            return None
        got = waiting.pop(rec.id, None)
        if not waiting:
            del self.unwritten[rec.user]
        return got

    def error(
        self,
        user: str,
        code: str,
        message: str,
        *,
        task_id: str | None = None,
        ref: str | None = None,
        topic: str | None = None,
    ) -> None:
        """Answer ``user`` on its ``errors`` topic with the next tick."""
        self.errors.setdefault(user, []).append(
            ErrorItem(code=code, message=message, id=task_id, ref=ref, topic=topic)
        )

    def bad_message(self, kind: str, name: str, rest: str, exc: DecodeError) -> None:
        """Count, log (at a bounded rate) and answer (if a user sent it) a bad message."""
        self.counters["bad_messages"] += 1
        sender = f"{kind} {name}"
        self._bad_log.warning(
            sender, "bad message from %s on %s: %s (raw %r)", sender, rest, exc, exc.raw[:120]
        )
        if kind == "user":
            self.error(
                name,
                exc.code,
                f"bad message on {rest}: {exc}",
                task_id=exc.task_id,
                ref=exc.ref,
                topic=rest,
            )

    def flush_sets(
        self,
        publish: Publish,
        topics: Topics,
        nodes: dict[str, NodeInfo],
        tasks: dict[str, TaskRecord],
        instance: str,
        *,
        giving: bool = False,
    ) -> None:
        """Publish the assignment set of every node whose set changed; ``giving``: only
        the sets that hand their node a task it has not been sent yet (the others wait for
        the next call).

        The tick sends those first, the states next, the rest last: a set that only takes
        finished tasks off (the node's results acknowledged) would otherwise go before the
        states that carry those results to their users, and the broker handles one
        connection's messages in order (one message more on a lone task's path).
        """
        dirty = self.dirty_nodes
        if giving:
            names = [n for n in dirty if self._gives(nodes.get(n), tasks)]
            dirty.difference_update(names)
        else:
            names = list(dirty)
            dirty.clear()
        for name in names:
            info = nodes.get(name)
            if info is None:
                continue
            info.seq += 1
            parts = []
            now = time.monotonic()
            gives = False
            for tid in info.assigned:
                rec = tasks[tid]
                held: TaskRecord | CopyAttempt = copy_on(rec, name) or rec
                if not held.assigned_at:
                    held.assigned_at = now
                    gives = True
                parts.append(held.assignment_json)
            if info.freed_at:
                if gives:
                    refilled(info, now - info.freed_at)
                info.freed_at = 0.0
            if parts:
                size = sum(map(len, parts)) // len(parts)
                b = info.task_bytes
                info.task_bytes = size if not b else b + (size - b) // 5
            payload = encode_assignment_set(name, instance, info.seq, parts)
            publish(topics.assign(name), payload, qos=TASK_QOS, retain=True)

    @staticmethod
    def _gives(info: NodeInfo | None, tasks: dict[str, TaskRecord]) -> bool:
        """``info``'s set holds a task (or copy) not sent to it yet (looked for from the
        newest: what was placed last was sent last)."""
        if info is None:
            return False
        name = info.name
        for tid in reversed(info.assigned):
            rec = tasks[tid]
            if not (copy_on(rec, name) or rec).assigned_at:
                return True
        return False

    def flush_states(
        self,
        publish: Publish,
        topics: Topics,
        tasks: dict[str, TaskRecord],
        state_dict: Callable[[TaskRecord], dict[str, Any]],
    ) -> None:
        """Publish one batch of states per user (and the retained states), then the
        errors. The state of a record not yet journaled (``durable``: a burst is written
        over several ticks) waits in ``unwritten`` until :meth:`written`."""
        durable = self.durable
        for user, pending in self.states.items():
            recs = pending
            if durable:
                later = [r for r in pending.values() if r.id in durable]
                if later:
                    self.unwritten.setdefault(user, {}).update((r.id, r) for r in later)
                    recs = {tid: r for tid, r in pending.items() if tid not in durable}
                    if not recs:
                        continue
            states = []
            for r in recs.values():
                states.append(state_dict(r))
                r.announced = True
            for events in _events_payloads(states):
                publish(topics.events(user), events, qos=TASK_QOS)
            for st, rec in zip(states, recs.values(), strict=True):
                if rec.notify == "retained" and rec.id in tasks:
                    data = encode_model_json(st)
                    publish(topics.task(user, rec.id), data, qos=TASK_QOS, retain=True)
                    if rec.status.final:
                        publish(topics.result(user, rec.id), data, qos=TASK_QOS, retain=True)
        self.states.clear()
        for user, errs in self.errors.items():
            publish(topics.errors(user), Errors(errors=errs).encode(), qos=TASK_QOS)
        self.errors.clear()


def _events_payloads(states: list[dict[str, Any]]) -> Iterator[bytes]:
    """``states`` as one events message, or, beyond EVENTS_BYTES_MAX, as several (in
    order; one state alone is one message whatever its size)."""
    events = encode_model_json({"v": 1, "states": states})
    if len(events) <= EVENTS_BYTES_MAX or len(states) == 1:
        yield events
        return
    half = len(states) // 2
    yield from _events_payloads(states[:half])
    yield from _events_payloads(states[half:])
