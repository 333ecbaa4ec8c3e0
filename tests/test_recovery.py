"""Recovery paths: false deaths, lost assignments, balancer restarts, stray processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from lbmqtt import Balancer, Client, Node, UnknownTask
from lbmqtt.balancer import PROBE_PATIENCE_S
from lbmqtt.errors import ConfigError
from lbmqtt.protocol import Assignment, Status, Topics

from .conftest import DEMO_TASKS, TEST_TASKS, System, make_settings, process_alive, wait_until

JOHN = {"firstName": "John", "lastName": "Doe"}


def test_a_node_wrongly_declared_offline_comes_back_with_its_next_heartbeat(
    running: System, raw: Any, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    node = running.nodes[0]
    # Given a forged "offline" for n1 (a stale will, a buggy script...)
    raw().publish(
        Topics(running.settings.topic_prefix).node_status("n1"),
        json.dumps({"v": 1, "node": "n1", "instance": node.instance, "online": False}),
    )
    # (the log, not the state: a heartbeat read with it in one tick undoes it before any
    # check after a tick could see it)
    wait_until(lambda: "node n1 went offline" in caplog.text, 10, "n1 marked offline")
    # Then its heartbeats prove it alive, and it gets work again
    running.until(lambda b: b.stats().nodes[0].online, 10, "n1 back online")
    assert client.wait(client.submit("HELLO", JOHN), timeout=20) == "Hello John Doe !"


def _silence_n1_and_deafen_the_balancer(running: System) -> float:
    """n1's heartbeats stop, on a connection that stays up (a frozen host: no will), and
    the balancer's probes to itself stop coming back; returns the send time of the last
    probe that did."""
    b, node = running.balancer, running.nodes[0]
    assert b is not None
    running.lt.call(node.loops.tasks["node-heartbeat"].cancel)
    running.lt.call(lambda: b._transport.unsubscribe(b.topics.balancer_probe))
    return float(running.lt.call(lambda: b.fleet.heard_until))


def test_a_node_is_silent_when_its_heartbeats_stop_arriving_not_while_they_wait_unread(
    running: System,
) -> None:
    b = running.balancer
    assert b is not None

    def online() -> bool:
        return bool(running.lt.call(lambda: b.nodes["n1"].online))

    # Given n1 falls silent while the balancer's probes stop coming back: whatever it has
    # not read yet (a flood ahead of the heartbeats, say) may hold n1's heartbeats
    heard = _silence_n1_and_deafen_the_balancer(running)
    # Then, for as long as that lasts (up to PROBE_PATIENCE_S), n1 is not declared silent
    running.lt.call(lambda: b.check_health(heard + PROBE_PATIENCE_S - 1))
    assert online()
    # And once its probes come back again, n1's silence counts: it is declared lost
    running.lt.run(b._transport.subscribe(b.topics.balancer_probe, 0))
    running.until(lambda b: not b.nodes["n1"].online, 15, "n1 declared silent")


def test_probes_go_only_while_a_node_is_late(running: System) -> None:
    b = running.balancer
    assert b is not None
    running.until(lambda b: b.nodes["n1"].online, 10, "n1 online")

    def health_step(silent_s: float) -> tuple[int, float]:
        """One health check with n1 last heard ``silent_s`` ago: (probes sent, send time)."""

        def step() -> tuple[int, float]:
            now = time.monotonic()
            b.nodes["n1"].last_seen = now - silent_s
            seq = b.fleet.probe_seq
            b._health_step()
            return b.fleet.probe_seq - seq, now

        return running.lt.call(step)  # type: ignore[no-any-return]

    deadline = running.lt.call(lambda: b.fleet.deadline(b.nodes["n1"]))
    # Given n1 heard in time, a health check sends no probe (at rest nothing crosses the
    # broker but heartbeats and stats)
    assert health_step(0.1)[0] == 0
    assert health_step(deadline / 2 - 0.5)[0] == 0
    # When n1 has been silent for over half its deadline, a probe goes, and comes back
    sent, at = health_step(deadline / 2 + 0.5)
    assert sent == 1
    running.until(lambda b: b.fleet.heard_until >= at, 10, "the probe back")


def test_silence_is_judged_late_not_never_when_the_probes_never_come_back(
    running: System, caplog: pytest.LogCaptureFixture
) -> None:
    b = running.balancer
    assert b is not None
    # a broker whose ACL refuses the balancer its probe topic: no probe ever comes back
    heard = _silence_n1_and_deafen_the_balancer(running)
    running.lt.call(lambda: b.check_health(heard + PROBE_PATIENCE_S + 10))
    assert not running.lt.call(lambda: b.nodes["n1"].online)
    assert "no probe of ours came back" in caplog.text


def test_cancel_kills_the_processes_a_task_started(
    system: System, client: Client, tmp_path: Path
) -> None:
    system.start_balancer()
    system.start_node("n1", tasks=[TEST_TASKS])
    pidfile = tmp_path / "child.pid"
    tid = client.submit("SPAWN", {"pidfile": str(pidfile), "gate": str(tmp_path / "never")})
    wait_until(pidfile.exists, 20, "the task's child process")
    child = int(pidfile.read_text())
    assert process_alive(child)
    assert client.cancel(tid) is True
    wait_until(lambda: not process_alive(child), 10, "the task's child to be killed too")


def test_a_restarted_balancer_adopts_the_tasks_nodes_are_running(
    system: System, client: Client, tmp_path: Path
) -> None:
    # Without a journal (or with a lost one) the retained assignment sets still tell a new
    # balancer what runs where.
    system.settings = system.settings.model_copy(update={"journal_path": "none"})
    first = system.start_balancer()
    system.start_node("n1", tasks=[DEMO_TASKS, TEST_TASKS])
    gate, started = tmp_path / "gate", tmp_path / "started"
    tid = client.submit(
        "BLOCK", {"gate": str(gate), "started": str(started), "value": 7}, cost=3, speculate=False
    )
    wait_until(started.exists, 20, "the task to start")
    # When the balancer is replaced while the task runs
    system.lt.run(first.stop())
    second = system.start_balancer()
    assert second.instance != first.instance
    system.until(lambda b: tid in b.tasks, 10, "the new balancer to adopt the task")
    # (with its size hint and its opt-out of copies, kept in the node's set)
    assert (system.record(tid).cost, system.record(tid).speculate) == (3.0, False)
    # Then the task is not killed, and its result reaches the waiting client
    gate.touch()
    result = client.wait(tid, timeout=20)
    assert result == {"pid": result["pid"], "opened": True, "attempt": 1, "value": 7}
    assert system.lt.call(lambda: second.counters["adopted"]) == 1
    assert client.wait(client.submit("HELLO", JOHN), timeout=20) == "Hello John Doe !"


def test_a_second_balancer_on_the_same_prefix_is_refused(running: System) -> None:
    with pytest.raises(ConfigError, match="another balancer is online"):
        running.lt.run(Balancer(running.settings).start())


def test_a_second_node_with_the_same_name_is_refused(running: System) -> None:
    async def start_twin() -> None:
        twin = Node(running.settings, name="n1")
        try:
            await twin.start()
        finally:
            await twin.stop()

    with pytest.raises(ConfigError, match="a node named 'n1' is already online"):
        running.lt.run(start_twin())


def test_a_retained_submit_is_never_obeyed(system: System, raw: Any, settings: Any) -> None:
    p = settings.topic_prefix
    stray = raw()
    # Given a submit published with the retain flag before the balancer starts
    stray.publish(
        f"{p}/users/alice/submit",
        json.dumps({"id": "sticky", "name": "HELLO", "args": JOHN}),
        retain=True,
    )
    try:
        system.start_balancer()
        system.start_node("n1")
        with Client(settings, user="alice") as c:
            assert c.wait(c.submit("HELLO", JOHN), timeout=20) == "Hello John Doe !"
            with pytest.raises(UnknownTask):
                c.get("sticky")  # it would run again at every balancer restart
    finally:
        stray.publish(f"{p}/users/alice/submit", b"", retain=True)


def test_too_large_messages_are_refused_with_a_code(
    system: System, broker: Any, prefix: str, raw: Any
) -> None:
    s = make_settings(broker.port, prefix, MAX_PAYLOAD_BYTES=2048, MAX_BATCH=3)
    system.start_balancer(s)
    c = raw()
    c.subscribe(f"{prefix}/users/bob/errors")
    c.publish(f"{prefix}/users/bob/submit", json.dumps({"name": "HELLO", "args": "x" * 3000}))
    c.publish(f"{prefix}/users/bob/submit", json.dumps({"tasks": [{"name": "HELLO"}] * 4}))

    def errors() -> list[dict[str, Any]]:  # one message may carry both (same tick)
        return [
            e for m in c.payloads(f"{prefix}/users/bob/errors") for e in json.loads(m)["errors"]
        ]

    wait_until(lambda: len(errors()) >= 2, 10, "two errors")
    got = errors()
    assert [e["code"] for e in got] == ["too_large", "too_large"]
    assert "MAX_PAYLOAD_BYTES" in got[0]["message"] and "MAX_BATCH" in got[1]["message"]


def test_an_assignment_the_node_missed_is_sent_again(running: System, client: Client) -> None:
    node = running.nodes[0]
    original = node._apply_set
    dropped: list[str] = []

    def lossy(tasks: list[Assignment]) -> None:  # fault injection: lose one set's news
        keep = [a for a in tasks if a.name != "HELLO" or dropped]
        dropped.extend(a.id for a in tasks if a.name == "HELLO" and not dropped)
        original(keep)

    b = running.balancer
    assert b is not None
    running.until(
        lambda b: not b.nodes["n1"].fresh, 10, "the start-up republication of n1's set to be over"
    )
    running.lt.call(lambda: setattr(node, "_apply_set", lossy))
    tid = client.submit("HELLO", JOHN)
    # the balancer sees, from heartbeats, that the node does not hold it; sends the set again
    assert client.wait(tid, timeout=30) == "Hello John Doe !"
    assert dropped == [tid]
    assert client.get(tid).attempt == 1  # sent again, not reassigned


def test_wait_on_a_task_that_expired_raises_unknown_task(running: System) -> None:
    async def scenario() -> None:
        from lbmqtt import AsyncClient

        async with AsyncClient(running.settings, user="alice") as c:
            with pytest.raises(UnknownTask):
                await c.wait("gone-long-ago", timeout=30)

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def _scripted_balancer(
    port: int, prefix: str, on_message: Callable[[str, bytes, bool], None]
) -> AsyncIterator[Any]:
    """A stand-in for the balancer: a plain MQTT client on the real broker that reads
    alice's submits and queries, and answers them as ``on_message`` scripts it."""
    from lbmqtt.mqtt import MqttTransport

    topics = Topics(prefix)
    fake = MqttTransport(
        host="127.0.0.1",
        port=port,
        client_id=f"scripted-balancer-{prefix.replace('/', '-')}",
        on_message=on_message,
        subscriptions=[(topics.submit("alice"), 1), (topics.query("alice"), 1)],
    )
    await fake.start(wait=True)
    try:
        yield fake
    finally:
        await fake.close()


def test_after_a_reconnect_the_client_asks_about_its_unfinished_tasks_until_answered(
    broker: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a broker restart the balancer reconnects too, and may not be back (or not
    # subscribed) when the client's first query arrives; the final states it sent while the
    # client was away are lost, whether or not somebody waited for them then. The client
    # must ask again about every task it has not seen finish, not leave each to a later
    # wait's REQUERY_S (10 s, one wait after another: a stream of 100 tasks took a minute
    # more). The balancer here is scripted on the real broker: it acknowledges the submits
    # and leaves the first query after the reconnect unanswered.
    import lbmqtt.client.core as client_core
    from lbmqtt import AsyncClient
    from lbmqtt.protocol import Events, TaskState

    monkeypatch.setattr(client_core, "REQUERY_S", 600.0)  # only the reconnect may ask
    settings = make_settings(broker.port, prefix, CLIENT_ACK_TIMEOUT_S=20)
    topics = Topics(prefix)
    queries: list[list[str]] = []

    async def scenario() -> None:
        def states(ids: list[str], status: Status) -> bytes:
            sts = [TaskState(id=i, user="alice", name="ECHO", status=status) for i in ids]
            return Events(states=sts).model_dump_json().encode()

        def on_message(topic: str, payload: bytes, retained: bool) -> None:
            data = json.loads(payload)
            if topic == topics.submit("alice"):
                ids = [t["id"] for t in data.get("tasks", [data])]
                fake.publish(topics.events("alice"), states(ids, Status.QUEUED), qos=1)
            elif topic == topics.query("alice"):
                queries.append(sorted(data["ids"]))
                if len(queries) >= 2:
                    fake.publish(topics.events("alice"), states(data["ids"], Status.DONE), qos=1)

        async with (
            _scripted_balancer(broker.port, prefix, on_message) as fake,
            AsyncClient(settings, user="alice") as c,
        ):
            waited = await c.submit("ECHO", 1, task_id="waited-for")
            later = await c.submit("ECHO", 2, task_id="waited-for-later")
            waiter = asyncio.ensure_future(c.wait_state(waited, timeout=30))
            await asyncio.sleep(0)  # (the waiter is registered)
            assert not queries
            c._t().drop_connection()
            # the first query after the reconnect goes unanswered; a second one comes
            deadline = time.monotonic() + 15
            while len(queries) < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            assert len(queries) >= 2, f"asked only {queries} after the reconnect"
            assert queries[:2] == [sorted([waited, later])] * 2
            got = await asyncio.wait_for(waiter, 10)
            assert got.status is Status.DONE
            got = await asyncio.wait_for(c.wait_state(later, timeout=30), 10)
            assert got.status is Status.DONE

    asyncio.run(scenario())


def test_after_a_reconnect_a_task_the_balancer_no_longer_knows_is_forgotten(
    broker: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A balancer without a journal lost the task while the client was away: the answer
    # to the client's query is unknown_task. The client stops following it (a later get
    # says so) and leaves no watch behind whose error nobody would see.
    import lbmqtt.client.core as client_core
    from lbmqtt import AsyncClient
    from lbmqtt.protocol import ErrorItem, Errors, Events, TaskState

    monkeypatch.setattr(client_core, "REQUERY_S", 600.0)
    settings = make_settings(broker.port, prefix, CLIENT_ACK_TIMEOUT_S=20)
    topics = Topics(prefix)
    queries: list[list[str]] = []

    async def scenario() -> None:
        def on_message(topic: str, payload: bytes, retained: bool) -> None:
            data = json.loads(payload)
            if topic == topics.submit("alice"):
                sts = [
                    TaskState(id=t["id"], user="alice", name="ECHO", status=Status.QUEUED)
                    for t in data.get("tasks", [data])
                ]
                fake.publish(topics.events("alice"), Events(states=sts).encode(), qos=1)
            elif topic == topics.query("alice"):
                queries.append(data["ids"])
                errs = [ErrorItem(code="unknown_task", message="no", id=i) for i in data["ids"]]
                fake.publish(topics.errors("alice"), Errors(errors=errs).encode(), qos=1)

        async with (
            _scripted_balancer(broker.port, prefix, on_message) as fake,
            AsyncClient(settings, user="alice") as c,
        ):
            tid = await c.submit("ECHO", 1, task_id="lost-by-the-balancer")
            assert c._book.tracked[tid].state is not None
            c._t().drop_connection()
            deadline = time.monotonic() + 15
            while tid in c._book.tracked and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            assert queries and queries[0] == [tid]
            assert tid not in c._book.tracked, "still followed after unknown_task"
            with pytest.raises(UnknownTask):
                await c.get(tid)

    asyncio.run(scenario())


def _block_on_n1(
    system: System, client: Client, tmp_path: Path, value: int
) -> tuple[Balancer, Node, Path, str]:
    """A balancer, node n1, and a BLOCK task running there until ``gate`` is touched."""
    b = system.start_balancer()
    node = system.start_node("n1", tasks=[TEST_TASKS])
    gate, started = tmp_path / "gate", tmp_path / "started"
    tid = client.submit("BLOCK", {"gate": str(gate), "started": str(started), "value": value})
    wait_until(started.exists, 20, "the BLOCK task to start")
    return b, node, gate, tid


def test_a_draining_node_finishes_what_runs_and_gives_back_what_it_has_not_started(
    system: System, client: Client, tmp_path: Path
) -> None:
    b, node, gate, running = _block_on_n1(system, client, tmp_path, 1)
    # Given a task assigned to n1 that it has not started (its worker start is held back)
    system.lt.call(lambda: setattr(node.supervisor, "dispatch", lambda: None))
    waiting = client.submit("ECHO", "later")
    system.until(lambda b: b.tasks[waiting].status == Status.ASSIGNED, 10, "the assignment")
    # When n1 drains
    drained = asyncio.run_coroutine_threadsafe(node.drain(grace_s=30), system.lt.loop)
    # Then the task it had not started goes back, without using up an attempt
    system.until(lambda b: b.tasks[waiting].status == Status.QUEUED, 10, "the take-back")
    assert system.record(waiting).attempt == 0
    assert system.lt.call(lambda: b.counters["taken_back"]) == 1
    # and the running one finishes on n1 before the drain ends
    assert not drained.done()
    gate.touch()
    assert client.wait(running, timeout=20)["value"] == 1
    assert drained.result(20) is True
    # the given-back task runs elsewhere, as its first attempt
    system.start_node("n2", tasks=[TEST_TASKS])
    state = client.wait_state(waiting, timeout=20)
    assert (state.node, state.attempt, state.result["args"]) == ("n2", 1, "later")


def test_a_draining_node_keeps_a_running_task_the_balancer_thinks_is_only_assigned(
    system: System, client: Client, tmp_path: Path
) -> None:
    b, node, gate, tid = _block_on_n1(system, client, tmp_path, 5)
    system.until(lambda b: b.tasks[tid].status == Status.RUNNING, 10, "the started report")

    # Given a balancer whose view is stale (its "started" report was lost)
    def forget_start() -> None:
        b.tasks[tid].status = Status.ASSIGNED

    system.lt.call(forget_start)
    drained = asyncio.run_coroutine_threadsafe(node.drain(grace_s=30), system.lt.loop)
    system.until(lambda b: b.nodes["n1"].status.draining, 10, "the draining status")
    # Then the running task is not taken back: it finishes where it runs, first attempt
    assert system.lt.call(lambda: b.counters["taken_back"]) == 0
    gate.touch()
    assert client.wait(tid, timeout=20) == {
        "pid": node_pid_of(client, tid),
        "opened": True,
        "attempt": 1,
        "value": 5,
    }
    assert drained.result(20) is True


def node_pid_of(client: Client, tid: str) -> int:
    return int(client.get(tid).result["pid"])


def test_a_node_starts_the_most_urgent_task_of_its_window_first(
    system: System, tmp_path: Path
) -> None:
    from lbmqtt.config import WorkerGroup

    node = system.start_node(
        "n1", tasks=[TEST_TASKS], groups=[WorkerGroup(nWorkers=1, minP=0, maxP=1000)]
    )
    started: list[str] = []
    original = node.supervisor._hand_over

    def recording(w: Any, tasks: list[Any], **kw: Any) -> None:
        started.extend(lt.a.id for lt in tasks)
        original(w, tasks, **kw)

    gate = tmp_path / "gate"

    def give(tasks: list[Assignment]) -> None:
        node.supervisor._hand_over = recording  # type: ignore[method-assign]
        node._apply_set(tasks)

    def a(tid: str, priority: int, args: Any) -> Assignment:
        return Assignment(
            id=tid,
            attempt=1,
            user="u",
            name="BLOCK" if tid == "busy" else "ECHO",
            args=args,
            priority=priority,
            group=0,
        )

    # Given the one slot busy, and a window holding ordinary tasks and, last, an urgent one
    busy = a("busy", 0, {"gate": str(gate)})
    system.lt.call(lambda: give([busy]))
    wait_until(lambda: started, 10, "the blocking task to start")
    window = [busy, a("low1", 0, 1), a("low2", 0, 2), a("urgent", 50, 3), a("low3", 0, 4)]
    system.lt.call(lambda: give(window))
    assert started == ["busy"]
    gate.touch()
    # Then the urgent one goes next, and the others keep their order
    wait_until(lambda: len(started) == 5, 20, "every task to start")
    assert started == ["busy", "urgent", "low1", "low2", "low3"]


@pytest.mark.parametrize(("runtime_s", "first"), [(1e-5, [10, 10, 10]), (5e-4, [4, 4, 4])])
def test_a_node_shares_short_tasks_among_its_idle_workers_by_their_runtime(
    system: System, runtime_s: float, first: list[int]
) -> None:
    """A window of 30 short tasks and 3 idle workers: each gets an even share in one write,
    at most HANDOFF_WORK_S of their runtime (2 ms: 4 tasks of 0.5 ms)."""
    from lbmqtt.config import WorkerGroup

    node = system.start_node(
        "n1", tasks=[TEST_TASKS], groups=[WorkerGroup(nWorkers=3, minP=0, maxP=1000)]
    )
    sup = node.supervisor
    wait_until(lambda: all(w.state == "idle" for w in sup.workers), 20, "3 idle workers")
    handed: list[int] = []
    original = sup._hand_over

    def recording(w: Any, tasks: list[Any], **kw: Any) -> None:
        handed.append(len(tasks))
        original(w, tasks, **kw)

    def give() -> list[int]:
        sup._hand_over = recording  # type: ignore[method-assign]
        sup._ran("ECHO", runtime_s)  # (what the node has measured of ECHO)
        node._apply_set(
            [
                Assignment(id=f"t{i}", attempt=1, user="u", name="ECHO", args=i, group=0)
                for i in range(30)
            ]
        )
        return list(handed)  # (what the set's own dispatch handed over, in the loop)

    assert system.lt.call(give) == first
    wait_until(lambda: sum(handed) == 30, 20, "every task handed over")


def test_no_short_task_is_handed_over_behind_one_not_known_to_be_short(
    system: System, tmp_path: Path
) -> None:
    """A task of unknown runtime goes to a worker alone: short ones could wait behind it
    for as long as it runs (up to 63 of them since hand-offs grew)."""
    from lbmqtt.config import WorkerGroup

    node = system.start_node(
        "n1", tasks=[TEST_TASKS], groups=[WorkerGroup(nWorkers=2, minP=0, maxP=1000)]
    )
    sup = node.supervisor
    wait_until(lambda: all(w.state == "idle" for w in sup.workers), 20, "2 idle workers")

    def give() -> list[list[str]]:
        sup._ran("ECHO", 1e-5)
        block = Assignment(
            id="block", attempt=1, user="u", name="BLOCK", args={"gate": str(tmp_path / "g")}
        )
        echoes = [
            Assignment(id=f"e{i}", attempt=1, user="u", name="ECHO", args=i, group=0)
            for i in range(40)
        ]
        node._apply_set([block, *echoes])
        return [[lt.a.id for lt in w.queue] for w in sup.workers]

    queues = system.lt.call(give)
    assert queues[0] == ["block"]  # alone ...
    assert len(queues[1]) == 21 and queues[1][0] == "e0"  # ... the other its share (41 / 2)
    (tmp_path / "g").touch()
    wait_until(
        lambda: all(
            lt.state == "finished" for lt in system.lt.call(lambda: list(node._local.values()))
        ),
        20,
        "every task to end",
    )


def test_a_task_handed_over_behind_one_that_times_out_still_runs(
    system: System, tmp_path: Path
) -> None:
    """A worker holding short tasks behind one that passes its timeout is killed: the
    tasks behind it go back and run on its successor (the next one was once left
    "running" on the dead worker for good)."""
    from lbmqtt.config import WorkerGroup

    node = system.start_node(
        "n1", tasks=[TEST_TASKS], groups=[WorkerGroup(nWorkers=1, minP=0, maxP=1000)]
    )
    sup = node.supervisor
    wait_until(lambda: all(w.state == "idle" for w in sup.workers), 20, "an idle worker")
    gate = tmp_path / "gate"  # (never opens)

    def give() -> list[int]:
        sup._ran("BLOCK", 1e-4)  # both known to be short: handed over together
        sup._ran("ECHO", 1e-4)
        slow = Assignment(
            id="slow",
            attempt=1,
            user="u",
            name="BLOCK",
            args={"gate": str(gate), "limit_s": 30},
            group=0,
            timeout_s=0.5,
        )
        echoes = [
            Assignment(id=f"e{i}", attempt=1, user="u", name="ECHO", args=i, group=0)
            for i in range(4)
        ]
        node._apply_set([slow, *echoes])
        return [len(w.queue) for w in sup.workers]

    assert system.lt.call(give) == [5]  # (one hand-off: the slow one and 4 behind it)

    def states() -> dict[str, str]:
        return {tid: lt.state for tid, lt in node._local.items()}

    wait_until(lambda: set(system.lt.call(states).values()) == {"finished"}, 20, "all ended")
    results = system.lt.call(lambda: {t: lt.result for t, lt in node._local.items()})
    assert results["slow"] is not None and results["slow"].status == "timeout"
    assert all(results[f"e{i}"] is not None and results[f"e{i}"].status == "done" for i in range(4))


def _block(tid: str, gate: Path, limit_s: float = 30) -> Assignment:
    """A BLOCK task: until ``gate`` exists, at most ``limit_s``."""
    args = {"gate": str(gate), "limit_s": limit_s}
    return Assignment(id=tid, attempt=1, user="u", name="BLOCK", args=args, priority=0, group=0)


def _node_knowing_a_brief_block(
    system: System, tmp_path: Path, workers: int
) -> tuple[Node, Assignment]:
    """A node of ``workers`` slots that ran one BLOCK of ~20 ms (a gate that never opens):
    brief there, not short. Returns it and that task's assignment (still in its set)."""
    from lbmqtt.config import WorkerGroup
    from lbmqtt.node.supervisor import HANDOFF_NEXT_S, HANDOFF_SHORT_S

    node = system.start_node(
        "n1", tasks=[TEST_TASKS], groups=[WorkerGroup(nWorkers=workers, minP=0, maxP=1000)]
    )
    learn = _block("learn", tmp_path / "never", 0.02)
    system.lt.call(lambda: node._apply_set([learn]))
    runtimes = node.supervisor._runtimes
    wait_until(lambda: "BLOCK" in runtimes, 10, "the first BLOCK to end")
    assert HANDOFF_SHORT_S <= runtimes["BLOCK"] < HANDOFF_NEXT_S
    return node, learn


def test_a_brief_task_waits_in_its_worker_behind_a_brief_one_and_starts_when_it_ends(
    system: System, tmp_path: Path
) -> None:
    # Given BLOCK known to take ~20 ms here (brief, not short), one slot
    node, learn = _node_knowing_a_brief_block(system, tmp_path, 1)
    sup = node.supervisor
    # When two are assigned to the node's one slot
    g1, g2 = tmp_path / "g1", tmp_path / "g2"
    system.lt.call(lambda: node._apply_set([learn, _block("b1", g1), _block("b2", g2)]))
    w = sup.workers[0]

    def queue() -> list[str]:
        return system.lt.call(lambda: [lt.a.id for lt in w.queue])

    # Then the second waits in the worker behind the first, not yet reported started
    wait_until(lambda: queue() == ["b1", "b2"], 10, "b2 handed over behind b1")
    assert system.lt.call(lambda: (sup.held["b1"].start_reported, sup.held["b2"].start_reported))
    assert system.lt.call(lambda: not sup.held["b2"].start_reported)
    # ... and starts (and is reported so) as the first ends, with no hand-off in between
    g1.touch()
    wait_until(lambda: queue() == ["b2"], 10, "b1 to end")
    assert system.lt.call(lambda: sup.held["b2"].start_reported)
    g2.touch()
    wait_until(lambda: queue() == [], 10, "b2 to end")
    assert system.lt.call(lambda: sup.held["b2"].result.status) == "done"


def test_an_idle_worker_gets_a_brief_task_before_a_busy_one_queues_it(
    system: System, tmp_path: Path
) -> None:
    node, learn = _node_knowing_a_brief_block(system, tmp_path, 2)
    sup = node.supervisor
    g = tmp_path / "gate"
    system.lt.call(lambda: node._apply_set([learn, _block("b1", g), _block("b2", g)]))

    def queues() -> list[list[str]]:
        return system.lt.call(lambda: sorted([lt.a.id for lt in w.queue] for w in sup.workers))

    # (each on a worker of its own, both running: neither waits behind the other)
    wait_until(lambda: queues() == [["b1"], ["b2"]], 10, "b1 and b2 on a worker each")
    g.touch()
    wait_until(lambda: queues() == [[], []], 10, "both to end")
