"""The balancer's outbox: which task states wait (``STATE_HOLD_S``) and which go out with
the next tick. (End to end, with a broker: ``test_e2e.py``'s hold tests.)"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import Any

from lbmqtt.balancer import MemoryJournal, TaskRecord
from lbmqtt.balancer.journal import JournalWriter
from lbmqtt.balancer.outbox import EVENTS_BYTES_MAX, STATE_HOLD_S, Outbox
from lbmqtt.protocol import Status, Topics

from .conftest import task_record

TOPICS = Topics("t")


def flush(box: Outbox, tasks: dict[str, TaskRecord]) -> list[tuple[str, str]]:
    """(task id, status) of every state the next tick's flush would publish."""
    sent: list[tuple[str, str]] = []

    def publish(topic: str, payload: bytes, **kw: Any) -> None:
        assert topic == TOPICS.events("u")
        sent.extend((s["id"], s["status"]) for s in json.loads(payload)["states"])

    def state_dict(r: TaskRecord) -> dict[str, Any]:
        return {"id": r.id, "status": r.status.value}

    box.flush_states(publish, TOPICS, tasks, state_dict)
    return sent


def test_an_acknowledgement_is_never_held_and_a_later_state_replaces_a_held_one() -> None:
    box = Outbox(Counter())
    a, b = task_record("a"), task_record("b")
    tasks = {"a": a, "b": b}
    box.emit(a)
    assert flush(box, tasks) == [("a", "queued")]  # a is acknowledged (announced)
    a.status = b.status = Status.ASSIGNED
    box.emit(a, hold=True)  # on the way: waits for a's next state
    box.emit(b, hold=True)  # b's first state is its acknowledgement: goes now
    assert box.release_held(box.held_due - 0.01) is False
    assert flush(box, tasks) == [("b", "assigned")]
    a.status = Status.DONE
    box.emit(a)  # the result takes the held state's place
    assert box.held == {} and box.held_due == 0.0
    assert flush(box, tasks) == [("a", "done")]


def test_held_states_go_out_once_due() -> None:
    box = Outbox(Counter())
    a = task_record("a")
    box.emit(a)
    flush(box, {"a": a})
    a.status = Status.RUNNING
    start = time.monotonic()
    box.emit(a, hold=True)
    assert start + STATE_HOLD_S <= box.held_due <= time.monotonic() + STATE_HOLD_S
    assert box.release_held(box.held_due - 0.01) is False
    assert flush(box, {"a": a}) == []
    assert box.release_held(box.held_due) is True
    assert flush(box, {"a": a}) == [("a", "running")]
    assert box.held == {} and box.held_due == 0.0


def test_an_acknowledgement_waiting_for_its_journal_write_is_not_held_when_placed() -> None:
    box = Outbox(Counter())
    box.journaling = True
    a = task_record("a")
    box.emit(a)  # queued, not written yet (a burst is written over several ticks)
    assert flush(box, {"a": a}) == []  # waits in unwritten: not announced
    a.status = Status.ASSIGNED
    box.emit(a, hold=True)  # placed a tick later: still its acknowledgement
    assert box.held == {}
    box.written([a])
    box.durable.clear()
    assert flush(box, {"a": a}) == [("a", "assigned")]


def test_a_state_sent_once_written_is_not_sent_again_when_the_held_ones_go() -> None:
    box = Outbox(Counter())
    box.journaling = True
    a = task_record("a")
    a.announced = True
    box.emit(a)  # e.g. queued again after its node was lost: waits for its write
    assert flush(box, {"a": a}) == []
    a.status = Status.ASSIGNED
    box.emit(a, hold=True)  # placed again before the write: held
    box.written([a])
    box.durable.clear()
    assert flush(box, {"a": a}) == [("a", "assigned")]
    assert box.release_held(math.inf) is True
    assert flush(box, {"a": a}) == []


def test_states_beyond_the_events_bound_go_in_several_messages_in_order() -> None:
    # (a query about a thousand large results answers them in one tick)
    box = Outbox(Counter())
    recs = [task_record(f"r{i}") for i in range(10)]
    tasks = {r.id: r for r in recs}
    for r in recs:
        r.status = Status.DONE
        box.emit(r)
    big = "x" * (EVENTS_BYTES_MAX // 4)
    payloads: list[bytes] = []

    def publish(topic: str, payload: bytes, **kw: Any) -> None:
        payloads.append(payload)

    def state_dict(r: TaskRecord) -> dict[str, Any]:
        return {"id": r.id, "status": r.status.value, "result": big}

    box.flush_states(publish, TOPICS, tasks, state_dict)
    assert len(payloads) > 1
    assert all(len(p) <= EVENTS_BYTES_MAX for p in payloads)
    sent = [s["id"] for p in payloads for s in json.loads(p)["states"]]
    assert sent == [r.id for r in recs]


# --------------------------------------------- a collected result's time, to the journal


class _ThreeArgumentStore(MemoryJournal):
    """A store written to the three-argument commit of earlier releases."""

    def commit(self, new: Any, changed: Any = (), gone: Any = ()) -> int:  # type: ignore[override]
        return super().commit(new, changed, gone)


class _FailingStore(MemoryJournal):
    fail = False

    def commit(self, *args: Any, **kw: Any) -> int:
        if self.fail:
            raise OSError("disk full")
        return super().commit(*args, **kw)


def _journaled(box: Outbox, writer: JournalWriter, *recs: TaskRecord) -> None:
    """``recs`` finished and written (their states announced)."""
    for r in recs:
        r.status = Status.DONE
        r.result = [r.id] * 100  # (a result a collection must not write again)
        box.emit(r)
    assert writer.commit()
    box.states.clear()


def _collect(box: Outbox, rec: TaskRecord, when: float) -> None:
    rec.collected_at = when
    box.collect(rec)


def test_a_collection_goes_to_the_journal_as_its_time_alone_with_the_tick_s_whole_commit() -> None:
    box, store = Outbox(Counter()), MemoryJournal()
    writer = JournalWriter(box, Counter())
    writer.open(store)
    a, b, c = task_record("a"), task_record("b"), task_record("c")
    a.seq, b.seq, c.seq = 1, 2, 3
    _journaled(box, writer, a, b)
    entries = dict(store.entries)
    _collect(box, a, 7.0)
    assert box.collected == [(1, 7.0)] and not box.durable  # (not the whole entry again)
    # the commit a tick makes before its sets (placed and ended tasks) leaves it for later
    box.emit(c)
    assert writer.commit(unqueued=True) and box.collected == [(1, 7.0)]
    assert store.entries[1] is entries[1]
    # the tick's whole commit writes it: the time, the result not again
    assert writer.commit() and box.collected == [] and store.entries[1].collected_at == 7.0
    assert store.entries[1].result == entries[1].result
    # a record whose write is pending carries its time in the entry: no pair
    b.attempt += 1
    box.emit(b)
    _collect(box, b, 8.0)
    assert box.collected == []
    assert writer.commit() and store.entries[2].collected_at == 8.0
    # a record never written is written whole, with its time
    d = task_record("d")
    d.seq, d.status = 4, Status.DONE
    _collect(box, d, 9.0)
    assert "d" in box.durable and box.collected == []
    assert writer.commit() and store.entries[4].collected_at == 9.0
    # collected, then expired in the same tick: deleted, the pair passed over
    _collect(box, c, 10.0)
    box.forget(c)
    assert writer.commit() and 3 not in store.entries


def test_a_failed_write_keeps_the_collections_for_the_next_one() -> None:
    box, store = Outbox(Counter()), _FailingStore()
    writer = JournalWriter(box, Counter())
    writer.open(store)
    a = task_record("a")
    _journaled(box, writer, a)
    _collect(box, a, 7.0)
    store.fail = True
    assert not writer.commit() and box.collected == [(1, 7.0)]
    store.fail = False
    assert writer.commit() and box.collected == [] and store.entries[1].collected_at == 7.0


def test_a_store_with_the_older_three_argument_commit_gets_a_collection_as_a_change() -> None:
    box, store = Outbox(Counter()), _ThreeArgumentStore()
    counters: Counter[str] = Counter()
    writer = JournalWriter(box, counters)
    writer.open(store)
    a = task_record("a")
    _journaled(box, writer, a)
    _collect(box, a, 7.0)
    assert box.collected == [] and "a" in box.durable
    assert writer.commit() and not counters["journal_errors"]
    assert store.entries[1].collected_at == 7.0
