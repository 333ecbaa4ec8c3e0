"""The balancer's journal: every accepted task and every change of its state, kept.

The balancer writes in *group commits*: the records that changed during one tick are
committed together, and only then are the tick's states (the acknowledgements clients wait
for) and assignment sets published. So a task whose ``queued`` state a client has seen
survives the balancer being killed.

Where the records go is a :class:`JournalStore`: :class:`.sqlite.SqliteJournal` on disk
(the default; the only module that knows SQL) or :class:`MemoryJournal` (tests: it
survives a :class:`~lbmqtt.balancer.Balancer` but not its process). A store sees
:class:`JournalEntry` values, never the balancer's records; this module maps one to the
other, both ways (:func:`entry_of`, :func:`record_of`), and recovery rebuilds the task
table from them (:func:`recover`).

Progress percentages are not journaled (they change often and are superseded); everything
needed to run, reconcile and answer for a task is.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from ..protocol import ErrorInfo, Status, encode_json
from ..scheduler import NO_TAGS, requires_of
from .outbox import Outbox
from .records import PLACED, TaskRecord
from .tasks import TaskTable

log = logging.getLogger(__name__)


class JournalEntry(NamedTuple):
    """One task as a journal holds it (JSON fields encoded, status as its value)."""

    id: str
    user: str
    name: str
    args: bytes
    priority: int
    seq: int
    submitted_at: float
    notify: str
    timeout_s: float | None
    ref: str | None
    requires: str | None
    tags: str | None
    cost: float | None
    speculate: int
    """1: a speculative copy may run; 0: never."""
    status: str
    attempt: int
    node: str | None
    grp: int | None
    started_at: float | None
    finished_at: float | None
    result: bytes | None
    error: bytes | None
    collected_at: float | None
    waived: int = 0

    def requires_dict(self) -> dict[str, float]:
        return dict(json.loads(self.requires)) if self.requires else {}

    def tags_list(self) -> list[str]:
        return list(json.loads(self.tags)) if self.tags else []


CHANGING = (
    "status",
    "attempt",
    "node",
    "grp",
    "started_at",
    "finished_at",
    "result",
    "error",
    "collected_at",
    "waived",
)
"""The fields of an entry that change after its submit (the others never change)."""


class JournalStore(Protocol):
    """Where the journal's entries are kept."""

    path: str
    """Where it is (for messages): a file path, or ``":memory:"``."""

    def load(self) -> Iterable[JournalEntry]:
        """Every entry, in submit (``seq``) order."""
        ...

    def commit(
        self,
        new: Sequence[JournalEntry],
        changed: Sequence[JournalEntry] = (),
        gone: Iterable[int] = (),
        collected: Sequence[tuple[int, float]] = (),
    ) -> int:
        """In one transaction: delete the entries of the ``gone`` seqs, write the ``new``
        entries whole (replacing any of the same seq), update the :data:`CHANGING`
        fields of the ``changed`` ones (written before), then set ``collected_at`` of the
        ``collected`` ``(seq, time)`` pairs (a result collected: only its time is written,
        not the whole changed entry; a seq not in the journal is passed over). Returns the
        number of entries written.

        Raises:
            LookupError: a changed entry was never written (then nothing is).
            Exception: the store failed (nothing of the group is written).
        """
        ...

    def close(self) -> None: ...


def refuse_unwritten(
    new: Sequence[JournalEntry],
    changed: Sequence[JournalEntry],
    gone: Collection[int],
    written: Callable[[int], bool],
) -> None:
    """Raise LookupError if a ``changed`` entry is neither among the ``new`` ones nor
    ``written`` before (by seq), or is deleted by ``gone``: the check of a store's
    :meth:`JournalStore.commit` that keeps its entries where it can look them up."""
    added = {e.seq for e in new}
    missing = sum(
        1 for e in changed if e.seq not in added and (e.seq in gone or not written(e.seq))
    )
    if missing:
        raise LookupError(f"{missing} of {len(changed)} changed tasks have no row in the journal")


class MemoryJournal:
    """A :class:`JournalStore` in a dict: for tests of the balancer's logic (share one
    between two balancers to test a restart)."""

    path = ":memory:"

    def __init__(self) -> None:
        self.entries: dict[int, JournalEntry] = {}
        self.commits = 0
        self.closed = False

    def load(self) -> list[JournalEntry]:
        return [self.entries[seq] for seq in sorted(self.entries)]

    def commit(
        self,
        new: Sequence[JournalEntry],
        changed: Sequence[JournalEntry] = (),
        gone: Iterable[int] = (),
        collected: Sequence[tuple[int, float]] = (),
    ) -> int:
        gone = set(gone)
        refuse_unwritten(new, changed, gone, self.entries.__contains__)
        for seq in gone:
            self.entries.pop(seq, None)
        for e in new:
            self.entries[e.seq] = e
        for e in changed:
            self.entries[e.seq] = self.entries[e.seq]._replace(
                **{f: getattr(e, f) for f in CHANGING}
            )
        for seq, when in collected:
            if (entry := self.entries.get(seq)) is not None:
                self.entries[seq] = entry._replace(collected_at=when)
        self.commits += 1
        return len(new) + len(changed)

    def close(self) -> None:
        self.closed = True


def default_path(host: str, port: int, prefix: str, suffix: str = ".log") -> Path:
    """Where the journal of a balancer for this broker and prefix lives by default:
    ``$XDG_STATE_HOME/lbmqtt/`` (``~/.local/state/lbmqtt/``), one file per broker and prefix
    (``suffix``: ``.log``, or ``.sqlite3`` for an SQLite journal).
    """
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{host}_{port}_{prefix}")
    return Path(base) / "lbmqtt" / f"journal-{stem}{suffix}"


# ---------------------------------------------------------------------- the mapping


def entry_of(rec: TaskRecord) -> JournalEntry:
    """The journal entry of a task record as it is now."""
    return _entry(
        rec,
        json.dumps(dict(rec.requires)) if rec.requires else None,
        json.dumps(sorted(rec.tags)) if rec.tags else None,
    )


def change_of(rec: TaskRecord) -> JournalEntry:
    """The entry of a record already journaled, for a change: only its :data:`CHANGING`
    fields and its seq count (``requires`` and ``tags``, which never change, are left out:
    encoding them cost more than the rest of the entry)."""
    return _entry(rec, None, None)


def _entry(rec: TaskRecord, requires: str | None, tags: str | None) -> JournalEntry:
    status = rec.status
    final = status.final
    placed = status in PLACED
    # (tuple.__new__: the same entry as JournalEntry(...) without its Python-level
    # __new__, which costs as much again on the group commit's path)
    return _new_entry(
        JournalEntry,
        (
            rec.id,
            rec.user,
            rec.name,
            rec.args_json,
            rec.priority,
            rec.seq,
            rec.submitted_at,
            rec.notify,
            rec.timeout_s,
            rec.ref,
            requires,
            tags,
            rec.cost,
            1 if rec.speculate else 0,
            status.value,
            rec.attempt,
            rec.node if placed or final else None,
            rec.group if placed else None,
            rec.started_at,
            rec.finished_at,
            encode_json(rec.result) if final and rec.result is not None else None,
            rec.error.model_dump_json().encode() if final and rec.error else None,
            rec.collected_at,
            rec.waived,
        ),
    )


_new_entry = tuple.__new__


def record_of(e: JournalEntry) -> TaskRecord:
    """The task record of a journal entry (``journaled``; its node and group only if it
    is placed or finished, as they were written)."""
    status = Status(e.status)
    final = status.final
    return TaskRecord(
        id=e.id,
        user=sys.intern(e.user),
        name=sys.intern(e.name),
        args_json=bytes(e.args),
        priority=e.priority,
        seq=e.seq,
        submitted_at=e.submitted_at,
        notify=e.notify,
        timeout_s=e.timeout_s,
        ref=e.ref,
        status=status,
        attempt=e.attempt,
        waived=e.waived,
        node=e.node,
        group=e.grp if status in PLACED else None,
        started_at=e.started_at,
        finished_at=e.finished_at,
        result=json.loads(e.result) if final and e.result is not None else None,
        error=ErrorInfo.model_validate_json(e.error) if final and e.error is not None else None,
        collected_at=e.collected_at,
        requires=requires_of(e.requires_dict() or None),
        tags=frozenset(e.tags_list()) or NO_TAGS,
        cost=e.cost,
        speculate=bool(e.speculate),
        journaled=True,
    )


def recover(entries: Iterable[JournalEntry], table: TaskTable) -> int:
    """Rebuild the task records a killed or stopped balancer journaled; returns how many.

    Queued tasks go back in their queues in their old order; placed ones are placed
    again on their nodes (the heartbeats then confirm them, or the node is found dead
    or the task missing, and it is requeued); finished ones answer queries until they
    expire.
    """
    now_mono = time.monotonic()
    n = 0
    for e in entries:
        rec = record_of(e)
        table.restore(rec, rec.node, now_mono)
        n += 1
    table.tally.counters["recovered"] += n
    return n


# ---------------------------------------------------------------------- the writer


def _takes_collected(store: JournalStore) -> bool:
    """Whether ``store.commit`` takes ``collected`` (the stores of earlier releases did
    not: a collection was a changed entry)."""
    try:
        params = inspect.signature(store.commit).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "collected" or p.kind is p.VAR_KEYWORD for p in params)


class JournalWriter:
    """Writes the outbox's journal changes to a store, one group commit per tick.

    Args:
        outbox: holds the records to write (``durable``) and the seqs to delete.
        counters: the balancer's (``journal_errors`` is counted here).
    """

    def __init__(self, outbox: Outbox, counters: Counter[str]):
        self.outbox = outbox
        self.counters = counters
        self.store: JournalStore | None = None
        self.error = ""
        """The last write's failure ("" while writes work)."""

    def open(self, store: JournalStore | None) -> None:
        """Write to ``store`` from now on (None: no journal)."""
        self.store = store
        self.outbox.journaling = store is not None
        # a store written to the three-argument commit of earlier releases gets a
        # collection as the task's changed entry, as it did then
        self.outbox.collect_alone = store is not None and _takes_collected(store)

    def commit(self, *, unqueued: bool = False, limit: int | None = None) -> bool:
        """Write the records changed since the last commit (one transaction). False if the
        journal failed: nothing of this tick may then be acknowledged.

        ``unqueued``: only the records of tasks not queued (placed, or ended, since the
        last commit): what the tick's new assignment sets announce
        (:meth:`~lbmqtt.balancer.Balancer._tick`). ``limit``: at most this many records
        (the oldest changes first). The others stay in ``outbox.durable`` for the next
        call: a burst of submits is written after its first tasks have gone to the nodes,
        and in parts, between which the balancer reads the nodes' reports (2,000 new rows
        take ~26 ms to write)."""
        j, outbox = self.store, self.outbox
        if j is None or not (outbox.durable or outbox.gone or outbox.collected):
            return True
        durable = outbox.durable
        if unqueued:  # (among the records changed since the last such call: not a burst)
            dirty: Collection[TaskRecord] = [
                r
                for r in outbox.touched.values()
                if r.status is not Status.QUEUED and r.id in durable
            ]
            gone: Collection[int] = ()
            collected: list[tuple[int, float]] = []
        elif limit is not None and len(durable) > limit:
            dirty, gone = list(itertools.islice(durable.values(), limit)), outbox.gone
            collected = outbox.collected
        else:
            dirty, gone, collected = durable.values(), outbox.gone, outbox.collected
        if not dirty and not gone and not collected:
            if unqueued:
                outbox.touched.clear()
            return True
        more = {"collected": collected} if collected else {}  # (see open())
        try:
            try:
                j.commit(
                    [entry_of(r) for r in dirty if not r.journaled],
                    [change_of(r) for r in dirty if r.journaled],
                    gone,
                    **more,
                )
            except LookupError as exc:  # (a row gone from under us: write them whole)
                log.warning("journal %s: %s; writing whole rows", j.path, exc)
                j.commit([entry_of(r) for r in dirty], (), gone, **more)
        except Exception as exc:  # the store's errors mostly; never let it escape the tick
            self.counters["journal_errors"] += 1
            if self.error != str(exc):
                log.error(
                    "journal %s: write failed (%s); nothing is acknowledged until it works again",
                    j.path,
                    exc,
                )
            self.error = str(exc)
            return False
        for r in dirty:
            r.journaled = True
        if self.error:
            log.info("journal %s: writing again", j.path)
            self.error = ""
        outbox.written(dirty)  # (before the clear: dirty may be a view of durable)
        if len(dirty) == len(durable):
            durable.clear()
        else:
            for r in dirty:
                del durable[r.id]
        if gone:
            outbox.gone.clear()
        if collected:
            collected.clear()  # (outbox.collected)
        if unqueued or not durable:
            outbox.touched.clear()
        return True

    def close(self) -> None:
        """Write what is left and close the store."""
        if self.store is not None:
            self.commit()  # (no limit: all of it)
            self.store.close()
            self.open(None)
