"""The balancer's journal: what a new balancer resumes, what expiry removes, and that
nothing is acknowledged before it is on disk. (SIGKILL of a real balancer process is in
tests/test_faults.py.)"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import termios
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from lbmqtt import Client
from lbmqtt.balancer import (
    CHANGING,
    Balancer,
    JournalEntry,
    LogJournal,
    MemoryJournal,
    SqliteJournal,
    default_path,
)
from lbmqtt.balancer import core as balancer_core
from lbmqtt.balancer.core import JOURNAL_LAG, JOURNAL_PART
from lbmqtt.balancer.journal import entry_of, record_of, recover
from lbmqtt.balancer.outbox import Outbox
from lbmqtt.balancer.records import TaskRecord
from lbmqtt.config import load_settings
from lbmqtt.protocol import Status, TaskSpec, Topics

from .conftest import TEST_TASKS, System, wait_until
from .journal_rows import change, row

JOHN = {"firstName": "John", "lastName": "Doe"}


def test_journal_round_trips_rows_in_submit_order_and_deletes(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    j = SqliteJournal(path)
    j.commit([row("b", 2), row("a", 1), row("c", 3)])
    j.commit([row("b", 2, "done")], gone=[3])
    j.close()
    again = SqliteJournal(path)
    rows = list(again.load())
    assert [(r.id, r.status, r.args) for r in rows] == [
        ("a", "queued", b"[1]"),
        ("b", "done", b"[1]"),
    ]
    assert again.count() == 2
    again.close()


def test_a_change_rewrites_only_the_changing_columns_and_needs_its_row(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    j = SqliteJournal(path)
    j.commit([row("a", 1), row("b", 2)])
    # status, attempt, node, grp, started, finished, result, error, collected, waived; seq
    assert j.commit([], [change("done", 1, "n1", None, 5.0, 6.0, b"[2]", None, 7.0, 0, 2)]) == 1
    with pytest.raises(LookupError, match="1 of 2 changed tasks have no row"):
        j.commit(
            [row("c", 3)],
            [
                change("running", 1, "n1", 0, 5.0, None, None, None, None, 0, 1),
                change("done", 1, None, None, None, None, None, None, None, 0, 9),
            ],
        )
    j.close()
    rows = {r.id: r for r in SqliteJournal(path).load()}
    assert set(rows) == {"a", "b"}  # the failed group wrote nothing, not even "c"
    assert rows["a"].status == "queued"
    b = rows["b"]
    assert (b.status, b.attempt, b.node, b.started_at, b.finished_at, b.result, b.collected_at) == (
        "done",
        1,
        "n1",
        5.0,
        6.0,
        b"[2]",
        7.0,
    )
    assert (b.user, b.name, b.args, b.seq, b.notify) == ("u", "ECHO", b"[1]", 2, "events")


def test_an_id_deleted_and_written_in_one_group_stays_written(tmp_path: Path) -> None:
    # an expired task's id submitted again before the next group commit
    j = SqliteJournal(tmp_path / "j.sqlite3")
    j.commit([row("x", 1, "done")])
    j.commit([row("x", 2)], gone=[1])
    assert [(r.id, r.status) for r in j.load()] == [("x", "queued")]
    j.close()


def test_journal_of_another_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    SqliteJournal(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(RuntimeError, match="schema 99"):
        SqliteJournal(path)


SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL, user TEXT NOT NULL, name TEXT NOT NULL, args BLOB NOT NULL,
    priority INTEGER NOT NULL, submitted_at REAL NOT NULL,
    notify TEXT NOT NULL, timeout_s REAL, ref TEXT, requires TEXT, tags TEXT,
    status TEXT NOT NULL, attempt INTEGER NOT NULL, node TEXT, grp INTEGER,
    started_at REAL, finished_at REAL, result BLOB, error BLOB, collected_at REAL,
    waived INTEGER NOT NULL DEFAULT 0
);
INSERT INTO meta VALUES ('schema', '2');
INSERT INTO tasks (seq, id, user, name, args, priority, submitted_at, notify, status,
                   attempt) VALUES (1, 'old', 'u', 'ECHO', '[1]', 0, 1.0, 'events', 'queued', 0);
"""


def test_a_journal_of_schema_2_is_brought_to_3_and_its_tasks_may_be_copied(
    tmp_path: Path,
) -> None:
    # Given a journal written before cost and speculate existed
    path = tmp_path / "j.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_2)
    # When this lbmqtt opens it, Then its task is there, without a cost, copies allowed
    j = SqliteJournal(path)
    [e] = list(j.load())
    assert (e.id, e.cost, e.speculate) == ("old", None, 1)
    j.commit([row("new", 2)])
    j.close()
    j = SqliteJournal(path)
    assert [r.id for r in j.load()] == ["old", "new"]
    j.close()


def test_cost_and_the_speculate_opt_out_survive_the_journal() -> None:
    spec = TaskSpec(name="ECHO", args=[1], cost=20.0, speculate=False)
    j = SqliteJournal(":memory:")
    rec = TaskRecord(
        id="t",
        user="u",
        name="ECHO",
        args_json=b"[1]",
        priority=0,
        seq=1,
        submitted_at=1.0,
        cost=spec.cost,
        speculate=spec.speculate is not False,
    )
    j.commit([entry_of(rec)])
    [back] = [record_of(e) for e in j.load()]
    assert (back.cost, back.speculate) == (20.0, False)
    j.close()


def test_default_journal_path_is_per_broker_and_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    a = default_path("127.0.0.1", 1883, "lbmqtt/v1")
    assert a.parent == tmp_path / "lbmqtt" and "/" not in a.name
    assert a != default_path("127.0.0.1", 1884, "lbmqtt/v1")
    assert a != default_path("127.0.0.1", 1883, "other")


def test_a_journal_keeps_its_format_and_a_new_one_is_a_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from lbmqtt.balancer.sqlite import open_journal

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    settings = load_settings(None, env={}, overrides={"BROKER_PORT": 1883})
    # a new journal is a log (JOURNAL_FORMAT's default) ...
    j = open_journal(settings)
    assert isinstance(j, LogJournal) and j.path.endswith(".log")
    j.close()
    # ... and one of an older lbmqtt, in SQLite, goes on being used (its tasks with it)
    Path(j.path).unlink()
    old = SqliteJournal(default_path("127.0.0.1", 1883, "lbmqtt/v1", ".sqlite3"))
    old.commit([row("queued-before", 1)])
    old.close()
    j = open_journal(settings)
    assert isinstance(j, SqliteJournal) and [e.id for e in j.load()] == ["queued-before"]
    j.close()
    # an explicit path is read in the format its file has, whatever its name
    explicit = tmp_path / "journal"
    lj = LogJournal(explicit)
    lj.commit([row("in-a-log", 1)])
    lj.close()
    over = {"BROKER_PORT": 1883, "JOURNAL_PATH": str(explicit), "JOURNAL_FORMAT": "sqlite"}
    j = open_journal(load_settings(None, env={}, overrides=over))
    assert isinstance(j, LogJournal) and [e.id for e in j.load()] == ["in-a-log"]
    j.close()


def test_a_new_balancer_resumes_queued_placed_and_finished_tasks(
    system: System, client: Client, tmp_path: Path
) -> None:
    first = system.start_balancer()
    system.start_node("n1", tasks=[TEST_TASKS])
    gate, started = tmp_path / "gate", tmp_path / "started"
    done = client.submit("ECHO", [1, 2])
    assert client.wait(done, timeout=20)["args"] == [1, 2]
    running = client.submit("BLOCK", {"gate": str(gate), "started": str(started), "value": 3})
    wait_until(started.exists, 20, "the BLOCK task to start")
    queued = client.submit("HELLO", JOHN)  # n1 has no HELLO: it stays queued
    # When the balancer is replaced (stop() here; a SIGKILL in test_faults.py)
    system.lt.run(first.stop())
    second = system.start_balancer()
    # Then it knows all three, in the state they had
    recs = {tid: system.record(tid) for tid in (done, running, queued)}
    assert recs[done].status == Status.DONE and recs[done].result["args"] == [1, 2]
    assert recs[running].status in (Status.ASSIGNED, Status.RUNNING)
    assert recs[running].node == "n1"
    assert recs[queued].status == Status.QUEUED
    assert system.lt.call(lambda: second.counters["recovered"]) >= 3
    assert system.lt.call(lambda: second.counters["adopted"]) == 0  # the journal knew them
    # the running one was not restarted, and finishes
    gate.touch()
    assert client.wait(running, timeout=20)["attempt"] == 1
    # the queued one runs once a node offers HELLO
    system.start_node("n2")
    assert client.wait(queued, timeout=20) == "Hello John Doe !"
    assert client.get(done).result["args"] == [1, 2]

    # the rows on disk are the rows it would write whole: the changes made after the
    # restart (to rows it recovered) wrote every column that changed
    def on_disk_as_in_memory() -> bool:
        j = second.journal
        assert j is not None
        if second.outbox.durable or any(
            second.tasks[tid].collected_at is None for tid in (done, running, queued)
        ):
            return False  # (the acks of the results, and the next tick's commit)
        rows = {r.id: r for r in j.load()}
        return all(
            tuple(getattr(rows[tid], c) for c in CHANGING)
            == tuple(getattr(entry_of(second.tasks[tid]), c) for c in CHANGING)
            for tid in (done, running, queued)
        )

    system.until(lambda _: on_disk_as_in_memory(), 10, "the journal to agree")


def test_a_restarted_balancer_sends_again_the_results_not_collected_not_the_collected_ones(
    system: System, settings: Any, raw: Any
) -> None:
    first = system.start_balancer()
    system.start_node("n1", tasks=[TEST_TASKS])
    t = Topics(settings.topic_prefix)
    watcher, alice = raw(), raw()
    watcher.subscribe(f"{settings.topic_prefix}/users/alice/#")
    # Given two results of alice's, on their retained topics (notify: retained, the default)
    ids = ("collected", "uncollected")
    for tid in ids:
        alice.publish(t.submit("alice"), json.dumps({"id": tid, "name": "ECHO", "args": [tid]}))
    wait_until(
        lambda: all(watcher.payloads(t.result("alice", tid)) for tid in ids), 20, "both results"
    )
    # and she acknowledges one of them (she has it)
    alice.publish(t.ack("alice"), json.dumps({"v": 1, "ids": ["collected"]}))
    system.until(lambda b: b.tasks["collected"].collected_at, 10, "the ack")
    # When the balancer restarts on the same journal
    system.lt.run(first.stop())
    system.start_balancer()
    # Then the result she has not collected is sent again (it may never have gone out)
    wait_until(
        lambda: len(watcher.payloads(t.result("alice", "uncollected"))) == 2,
        10,
        "the uncollected result sent again",
    )

    # and the collected one is not (they went out in the same tick: one events message)
    def done_states(tid: str) -> int:
        return sum(
            1
            for p in watcher.payloads(t.events("alice"))
            for st in json.loads(p)["states"]
            if st["id"] == tid and st["status"] == "done"
        )

    assert done_states("uncollected") == 2
    assert done_states("collected") == 1
    assert len(watcher.payloads(t.result("alice", "collected"))) == 1


def _statuses_on_disk(path: str) -> dict[str, str]:
    """Task id -> status, as the journal file at ``path`` holds them (either format; read
    only, while the balancer has it open)."""
    import lbmqtt.balancer.logstore as logstore

    if Path(path).read_bytes()[:15] == b"SQLite format 3":
        with sqlite3.connect(path) as db:
            return dict(db.execute("SELECT id, status FROM tasks").fetchall())
    rows = logstore._replay(path, None)[0].values()
    fields = JournalEntry._fields
    return {str(r[fields.index("id")]): str(r[fields.index("status")]) for r in rows}


@pytest.mark.parametrize("journal", ["sqlite", "log"])
def test_expired_tasks_leave_the_journal(system: System, client: Client, journal: str) -> None:
    b = system.start_balancer(system.settings.model_copy(update={"journal_format": journal}))
    system.start_node("n1", tasks=[TEST_TASKS])
    tid = client.submit("ECHO", 5)
    assert client.wait(tid, timeout=20)["args"] == 5
    assert b.journal is not None and type(b.journal).__name__.lower().startswith(journal)
    path = b.journal.path
    assert _statuses_on_disk(path) == {tid: "done"}
    system.lt.call(lambda: b.expire(b.tasks[tid].finished_at + 1e9))  # type: ignore[operator]
    system.until(lambda b: not b.outbox.gone, 5, "the next commit")
    assert _statuses_on_disk(path) == {}


@pytest.mark.parametrize("journal", ["sqlite", "log"])
def test_nothing_is_acknowledged_or_placed_while_the_journal_cannot_write(
    system: System, raw: Any, journal: str
) -> None:
    b = system.start_balancer(system.settings.model_copy(update={"journal_format": journal}))
    system.start_node("n1")
    assert b.journal is not None
    path = b.journal.path
    topics = Topics(system.settings.topic_prefix)
    rc = raw()
    rc.subscribe(topics.events("carol"))
    # Given a journal that fails every write
    if journal == "sqlite":
        assert isinstance(b.journal, SqliteJournal)
        system.lt.call(b.journal._db.close)
    else:
        assert isinstance(b.journal, LogJournal)
        system.lt.call(lambda: os.close(b.journal._fd))  # type: ignore[union-attr]
    rc.publish(
        topics.submit("carol"),
        json.dumps({"v": 1, "id": "j-1", "name": "HELLO", "args": JOHN, "notify": "events"}),
    )
    system.until(lambda b: b.counters["journal_errors"] >= 3, 10, "failed group commits")
    # Then the submit is not acknowledged (the state goes out in the tick that commits),
    # and not placed either: its node could not be told, and would be blamed for it
    assert rc.payloads(topics.events("carol")) == []
    rec = system.record("j-1")  # (placed in memory in the first failing tick at most)
    assert rec.status in (Status.QUEUED, Status.ASSIGNED) and rec.attempt <= 1
    assert not rec.assigned_at  # no set carrying it went out

    # When the journal works again, the held acknowledgement goes out
    def repair() -> None:
        b.journal = SqliteJournal(path) if journal == "sqlite" else LogJournal(path)
        b._kick()

    system.lt.call(repair)
    got = wait_until(lambda: rc.payloads(topics.events("carol")), 10, "the acknowledgement")
    assert json.loads(got[0])["states"][0]["id"] == "j-1"
    assert _statuses_on_disk(path)["j-1"] in ("queued", "assigned", "running", "done")

    def finished() -> bool:
        states = rc.states(topics.events("carol"))
        return any(s["status"] == "done" and s["attempt"] == 1 for s in states)

    wait_until(finished, 20, "the task to run once the journal works again")


class WatchedJournal(MemoryJournal):
    """A memory journal that keeps each task's last written status, by id, and how many
    records its balancer left unwritten after each commit (``outbox``: set it)."""

    def __init__(self) -> None:
        super().__init__()
        self.status: dict[str, str] = {}
        self.sizes: list[int] = []
        self.queued: list[int] = []  # (of each commit's rows, those of queued tasks)
        self.left: list[int] = []
        self.outbox: Outbox | None = None

    def commit(
        self,
        new: Sequence[JournalEntry],
        changed: Sequence[JournalEntry] = (),
        gone: Iterable[int] = (),
        collected: Sequence[tuple[int, float]] = (),
    ) -> int:
        n = super().commit(new, changed, gone, collected)
        for e in (*new, *changed):
            self.status[e.id] = e.status
        self.sizes.append(len(new) + len(changed))
        self.queued.append(sum(1 for e in (*new, *changed) if e.status == "queued"))
        if self.outbox is not None:
            self.left.append(len(self.outbox.durable) - n)
        return n


def test_a_burst_goes_to_the_node_first_and_nothing_is_announced_before_it_is_written(
    system: System, client: Client
) -> None:
    mem = WatchedJournal()
    b = system.start_balancer(journal=mem)
    system.start_node("n1", tasks=[TEST_TASKS])
    t = b._transport
    assert t is not None
    sent: list[tuple[str, list[str]]] = []
    unwritten: list[str] = []
    queued_before_first_set: list[int] = []
    publish = t.publish

    def watched(topic: str, payload: bytes, **kw: Any) -> Any:
        # (on the loop thread, in the tick: what the journal holds at this moment)
        if "/assign" in topic and payload:
            ids = [a["id"] for a in json.loads(payload)["tasks"]]
            if not queued_before_first_set:
                queued_before_first_set.append(list(mem.status.values()).count("queued"))
            sent.append(("assign", ids))
            unwritten.extend(i for i in ids if mem.status.get(i) not in ("assigned", "running"))
        elif "/events" in topic:
            states = json.loads(payload)["states"]
            sent.append(("events", [st["id"] for st in states]))
            unwritten.extend(st["id"] for st in states if mem.status.get(st["id"]) is None)
        return publish(topic, payload, **kw)

    system.lt.call(lambda: setattr(t, "publish", watched))
    # When a burst of more tasks than a tick writes at once is submitted in one message
    # (under the user's queue cap: 1,000)
    burst = [{"name": "ECHO", "args": [i]} for i in range(950)]
    ids = client.submit_many(burst, batch_size=950)
    for tid in ids:
        client.wait_state(tid, timeout=60)
    # Then every task ran, and nothing was announced (acknowledged, or sent in a set) before
    # the journal held it so
    assert all(system.record(tid).status == Status.DONE for tid in ids)
    assert unwritten == []
    # ... the first set went to the node before the burst's queued tasks were written,
    # and those were written in parts (JOURNAL_PART), each acknowledged in its turn (the
    # commits before a set, of the tasks it places and the results it acknowledges, are
    # not parted: a node's window holds up to 512 tasks)
    assert queued_before_first_set == [0]
    assert max(n for n, q in zip(mem.sizes, mem.queued, strict=True) if q) == JOURNAL_PART
    acked = [i for kind, got in sent if kind == "events" for i in got]
    assert set(ids) <= set(acked)


def _waiting_together(
    system: System, b: Balancer, rc: Any, messages: list[tuple[str, bytes]]
) -> None:
    """Publish ``messages`` (topic, payload) while the balancer's loop is held, and let it
    go once all of them wait in its socket (read then in one go, in that order)."""
    t = b._transport
    assert t is not None and t._fd is not None
    fd = t._fd
    gate = threading.Event()
    system.lt.loop.call_soon_threadsafe(gate.wait, 30)
    try:
        for topic, payload in messages:
            rc.publish(topic, payload)

        def waiting() -> int:
            return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), "little")

        total = sum(len(p) for _, p in messages)
        wait_until(lambda: waiting() >= total, 10, "the messages in the balancer's socket")
    finally:
        gate.set()


def _burst(n: int) -> bytes:
    return json.dumps({"v": 1, "tasks": [{"name": "NOOP"}] * n}).encode()


def test_submits_arriving_faster_than_a_part_is_written_leave_a_bounded_lag(
    system: System, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a tick handling every user message waiting, as it does when they come faster than
    # USER_SLICE_S lets it: here, all at once)
    monkeypatch.setattr(balancer_core, "USER_SLICE_S", 60.0)
    mem = WatchedJournal()
    b = system.start_balancer(journal=mem)
    mem.outbox = b.outbox
    topics = Topics(system.settings.topic_prefix)
    rc = raw()
    users = [f"u{i}" for i in range(4)]
    for u in users:
        rc.subscribe(topics.events(u))
    # Given 4 x 900 submits waiting together in the balancer's socket (its loop held;
    # small: 4 of them fit in the socket's receive buffer)
    _waiting_together(system, b, rc, [(topics.submit(u), _burst(900)) for u in users])
    # When it reads them in one go, then: it never leaves more than JOURNAL_LAG records
    # unwritten, writes the rest in parts, and acknowledges every task once written

    def acked() -> int:
        return sum(
            len(json.loads(p)["states"]) for u in users for p in rc.payloads(topics.events(u))
        )

    wait_until(lambda: acked() >= 3_600, 20, "every task acknowledged")
    assert max(mem.left) == JOURNAL_LAG  # (3,600 read at once: 1,600 written at once)
    assert mem.sizes[0] == 3_600 - JOURNAL_LAG and JOURNAL_PART in mem.sizes
    assert len(mem.status) == 3_600 and system.lt.call(lambda: not b.outbox.unwritten)
    assert acked() == 3_600  # (each state once: none waited twice)


def test_a_node_message_read_behind_a_burst_of_submits_is_handled_before_the_burst_ends(
    system: System, raw: Any
) -> None:
    b = system.start_balancer()
    topics = Topics(system.settings.topic_prefix)
    handled: list[str] = []
    on_submit, on_status = b.users.on_submit, b.fleet.on_status

    def submit(name: str, payload: bytes) -> None:
        handled.append(f"submit {name}")
        on_submit(name, payload)

    def status(name: str, payload: bytes) -> None:
        handled.append(f"status {name}")
        on_status(name, payload)

    system.lt.call(lambda: b._routes.update(submit=submit, node_status=status))
    rc = raw()
    users = [f"u{i}" for i in range(4)]
    # Given 4 x 900 submits, then a node's status, waiting together in the balancer's
    # socket (its loop held): the broker delivers them in that order
    node = json.dumps({"v": 1, "node": "n9", "instance": "i9", "online": True}).encode()
    _waiting_together(
        system,
        b,
        rc,
        [*((topics.submit(u), _burst(900)) for u in users), (topics.node_status("n9"), node)],
    )
    # When it reads them: then the node's status is handled before the last submit (a
    # tick handles users' messages for USER_SLICE_S, the loop reads and handles what came
    # behind them in between; before, a node's report waited for a whole burst to be
    # accepted while its node idled), and the users' messages keep their order
    wait_until(lambda: len(handled) == 5, 20, "all five handled")
    assert handled.index("status n9") < 4, handled
    assert [h for h in handled if h.startswith("submit")] == [f"submit {u}" for u in users]
    system.until(lambda b: b.counters["submitted"] == 3_600, 20, "every task accepted")
    assert system.lt.call(lambda: "n9" in b.nodes)


# ------------------------------------------------------------- a shared memory journal


def test_a_balancer_resumes_from_a_memory_journal_what_another_wrote() -> None:
    # Given a balancer (not connected: its logic alone) that accepted tasks of two users,
    # one of which was then cancelled, all on a memory journal
    settings = load_settings(None, env={}, overrides={"JOURNAL_PATH": "none"})
    mem = MemoryJournal()
    first = Balancer(settings, journal=mem)
    now = 1.0e9
    for i, user in enumerate(["alice", "bob", "alice"]):
        spec = TaskSpec(id=f"t{i}", name="ECHO", args=[i], priority=i, notify="events")
        first.users.accept(user, spec, now)
    first.users.on_cancel("bob", json.dumps({"v": 1, "ids": ["t1"]}).encode())
    assert first.journal_writer.commit()
    # When another balancer recovers from it
    second = Balancer(settings, journal=mem)
    assert recover(mem.load(), second.table) == 3
    # Then it has the same tasks in the same states, queued ones in their queues
    for tid in ("t0", "t1", "t2"):
        assert entry_of(second.tasks[tid]) == entry_of(first.tasks[tid])
    assert second.tasks["t1"].status == Status.CANCELLED
    assert second.scheduler.queued == first.scheduler.queued == 2
    assert second.counters["recovered"] == 3
    assert second.table.seq == 3  # (new submits continue the order)


def test_a_restarted_balancer_resumes_its_tasks_from_a_shared_memory_journal(
    system: System, client: Client
) -> None:
    mem = MemoryJournal()
    first = system.start_balancer(journal=mem)
    system.start_node("n1", tasks=[TEST_TASKS])
    done = client.submit("ECHO", [1, 2])
    assert client.wait(done, timeout=20)["args"] == [1, 2]
    queued = client.submit("HELLO", JOHN)  # n1 has no HELLO: it stays queued
    # When the balancer is replaced by another on the same (memory) journal
    system.lt.run(first.stop())
    second = system.start_balancer(journal=mem)
    # Then the new one knows both, in the state they had, and runs the queued one
    assert system.record(done).status == Status.DONE
    assert system.record(done).result["args"] == [1, 2]
    assert system.record(queued).status == Status.QUEUED
    assert system.lt.call(lambda: second.counters["recovered"]) >= 2
    system.start_node("n2")
    assert client.wait(queued, timeout=20) == "Hello John Doe !"
