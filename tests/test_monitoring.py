"""What operators look at: the balancer's stats on the dashboard's Bokeh document, the history a
restarted dashboard gets, ``lbmqtt status --json``/``--watch``, progress bars and the Prometheus
endpoint. A real broker, balancer, node and worker processes; no browser (see
test_browser.py)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bokeh.document import Document
from prometheus_client.parser import text_string_to_metric_families

from lbmqtt.client import Client, SubmitRefused
from lbmqtt.config import Settings
from lbmqtt.dashboard import ALL_TASKS, DashboardState, dashboard_transport, make_document
from lbmqtt.mqtt import MqttTransport
from lbmqtt.progress import ProgressBar
from lbmqtt.protocol import (
    BalancerHistory,
    BalancerStats,
    DashboardStatus,
    GroupInfo,
    NodeReport,
    NodeStatus,
    Result,
    Started,
    Status,
    TaskState,
    Topics,
)

from .conftest import TEST_TASKS, System, run_cli, wait_until


def _block(tmp: Path, i: int, progress: int | None = None, **extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "gate": str(tmp / "gate"),
        "started": str(tmp / f"started-{i}"),
        "limit_s": 30,
        **extra,
    }
    if progress is not None:
        args["progress"] = progress
    return args


def _start(system: System, *, metrics: bool = False) -> System:
    settings = system.settings.with_overrides(
        node_tasks=[TEST_TASKS], metrics_port=0 if metrics else None
    )
    system.start_balancer(settings)
    system.start_node("n1", settings)
    return system


def _stats_where(system: System, cond: Any, what: str, timeout: float = 15.0) -> BalancerStats:
    """The balancer's published stats once ``cond(stats)`` holds."""
    b = system.balancer
    assert b is not None
    return wait_until(
        lambda: (s := system.lt.call(lambda: b.tally.last_stats)) is not None and cond(s) and s,
        timeout,
        what,
    )


def test_the_document_shows_bands_users_nodes_times_and_tasks(
    system: System, tmp_path: Path
) -> None:
    _start(system)
    with Client(system.settings, user="alice") as alice, Client(system.settings, user="bob") as bob:
        # two of alice's run (the 0..9 group has 2 slots) and report progress; the urgent
        # band's one slot takes bob's priority-50 task; the rest queue in both bands
        running = [alice.submit("BLOCK", _block(tmp_path, i, progress=40)) for i in range(2)]
        urgent = bob.submit("BLOCK", _block(tmp_path, 9, progress=70), priority=50)
        for i in range(2):
            wait_until(lambda i=i: (tmp_path / f"started-{i}").exists(), 20, f"task {i} to start")
        wait_until((tmp_path / "started-9").exists, 20, "the urgent task to start")
        queued = [bob.submit("BLOCK", _block(tmp_path, 10 + i)) for i in range(3)]
        queued.append(alice.submit("BLOCK", _block(tmp_path, 20), priority=20))
        stats = _stats_where(
            system,
            lambda s: (
                s.queued == 4
                and all(t.progress in (40, 70) for t in s.tasks if t.status == "running")
                and sum(t.status == "running" for t in s.tasks) == 3
            ),
            "4 queued, 3 running at 40/70%",
        )

        assert stats.bands == ["0-9", "10-1000"]
        assert stats.queued_by_band == {"0-9": 3, "10-1000": 1}
        state = DashboardState()
        state.set_connected(True)
        state.add_stats(stats)
        page = make_document(Document(), state)
        q = page.queue.data
        assert (q["b0"], q["b1"], q["b2"]) == ([3], [1], [0])
        assert [i.label.value for i in page.band_items if i.visible] == [
            "priority 0-9",
            "priority 10-1000",
        ]
        users = dict(
            zip(
                page.users.data["user"],
                zip(page.users.data["running"], page.users.data["queued"], strict=True),
                strict=True,
            )
        )
        assert users == {"alice": (2, 1), "bob": (1, 3)}
        assert list(page.user_range.factors) == ["alice", "bob"]
        assert page.nodes.data["name"] == ["n1"] and page.nodes.data["busy"] == [3]
        assert page.nodes.data["free"] == [0] and page.nodes.data["online"] == ["yes"]
        tasks = page.tasks.data
        rows = {
            tid: (st, p, node)
            for tid, st, p, node in zip(
                tasks["id"], tasks["status"], tasks["progress"], tasks["node"], strict=True
            )
        }
        assert {rows[t] for t in running} == {("running", 40, "n1")}
        assert rows[urgent] == ("running", 70, "n1")
        assert not set(queued) & set(rows)  # queued tasks are in the chart, not the table

        # selecting a task name redraws the queue chart for that name only
        page._on_select("value", ALL_TASKS, "BLOCK")
        assert page.queue.data["b0"] == [3]
        page._on_select("value", "BLOCK", "NO-SUCH-TASK")
        assert page.queue.data["b0"] == [0] and page.queue.data["b1"] == [0]

        (tmp_path / "gate").touch()
        for tid in [*running, urgent, *queued]:
            assert (
                alice.wait_state(tid, 30)
                if tid in (*running, queued[-1])
                else bob.wait_state(tid, 30)
            )
        done = _stats_where(system, lambda s: s.done_total == 7 and s.queued == 0, "7 done")
        state.add_stats(done)
        asyncio.run(page.update())
        assert page.queue.data["b0"][-1] == 0
        finished = [r for r in done.tasks if r.status == "done"]
        assert len(finished) == 7 and all(r.run_s is not None for r in finished)
        times = page.times.data
        i = times["name"].index("BLOCK")
        assert times["done"][i] == 7
        assert float(times["run_p99"][i]) >= float(times["run_p50"][i]) > 0
        assert float(times["wait_p99"][i]) >= float(times["wait_p50"][i]) >= 0


def test_a_run_time_is_the_nodes_measure_when_started_rides_with_the_result(system: System) -> None:
    """A node sends a short task's "started" in the same report as its result (lbmqtt's
    own node does, to save a message): the task ran for the runtime the node measured,
    not for the no time between the two on the balancer's clock."""
    s = system.settings
    b = system.start_balancer(s)
    topics = Topics(s.topic_prefix)
    name, instance = "handmade", "hm0123456789"
    sets: list[bytes] = []
    node = MqttTransport(
        host="127.0.0.1",
        port=s.broker_port,
        client_id=f"{name}-node",
        on_message=lambda topic, payload, retained: sets.append(payload),
        subscriptions=[(topics.assign(name), 1)],
    )
    system.lt.run(node.start(wait=True, timeout_s=10))
    status = NodeStatus(
        node=name,
        instance=instance,
        online=True,
        host="here",
        pid=1,
        groups=[GroupInfo(index=0, workers=1, min_p=-1000, max_p=1000)],
        tasks=["ECHO"],
        cores=1,
        heartbeat_s=1.0,
        speed=1.0,
    )
    try:
        system.lt.call(
            lambda: node.publish(topics.node_status(name), status.encode(), qos=1, retain=True)
        )
        with Client(s, user="alice") as alice:
            tid = alice.submit("ECHO", [1])
            wait_until(lambda: any(tid.encode() in p for p in sets), 10, "the assignment")
            time.sleep(0.25)  # the task runs (a shorter run could not have taken 0.25 s)
            report = NodeReport(
                node=name,
                instance=instance,
                started=[Started(id=tid, attempt=1, time=time.time())],
                results=[Result(id=tid, attempt=1, status="done", result=[1], runtime_s=0.25)],
            )
            system.lt.call(lambda: node.publish(topics.reports(name), report.encode(), qos=1))
            st = alice.wait_state(tid, 10)
            assert st.status == Status.DONE and st.result == [1]
            assert st.run_s == pytest.approx(0.25, abs=0.005)
            assert st.wait_s is not None and st.wait_s >= 0
            names = system.lt.call(b.stats).names
            assert [n.run_p50_s for n in names if n.name == "ECHO"] == [
                pytest.approx(0.25, abs=0.005)
            ]
    finally:
        system.lt.call(lambda: node.publish(topics.node_status(name), b"", qos=1, retain=True))
        system.lt.run(node.close())


def test_a_restarted_dashboard_starts_with_the_balancers_history(system: System) -> None:
    _start(system)
    b = system.balancer
    assert b is not None
    wait_until(lambda: system.lt.call(lambda: len(b.tally.history)) >= 5, 20, "5 samples kept")
    state = DashboardState()
    transport = dashboard_transport(system.settings, state, "http://127.0.0.1:1/")
    system.lt.run(transport.start(wait=True, timeout_s=10))
    try:
        # the retained stats arrive first; the history (sent in answer to the dashboard's
        # online announcement) then fills in everything older
        wait_until(lambda: len(state.samples()) >= 5, 10, "the history to arrive")
        samples = state.samples()
        times = [s.time for s in samples]
        assert times == sorted(times) and len(set(times)) == len(times)
        assert [s.seq for s in samples] == list(range(1, len(samples) + 1))
        snap = state.snapshot(since=samples[-1].seq, epoch=0)
        assert snap.epoch >= 1 and len(snap.samples) == len(samples)  # pages redraw all
        # (the balancer samples from its start: one taken before n1's status came has 0)
        assert samples[-1].slots == 3 and {s.slots for s in samples} <= {0, 3}
    finally:
        system.lt.run(transport.close())


def test_metrics_endpoint_parses_and_counts(system: System, tmp_path: Path) -> None:
    _start(system, metrics=True)
    b = system.balancer
    assert b is not None and b.metrics_url.startswith("http://127.0.0.1:")
    with Client(system.settings, user="carol") as c, Client(system.settings, user="dan") as d:
        assert len(c.map("ECHO", list(range(5)))) == 5
        with pytest.raises(SubmitRefused, match="already used"):
            d.submit("ECHO", None, task_id=c.submit("ECHO", None, task_id="carol-1"))
        c.wait("carol-1", 20)
        gate = tmp_path / "never"
        blocked = c.submit("BLOCK", {"gate": str(gate), "limit_s": 60}, task_id="carol-2")
        wait_until(lambda: c.get(blocked).status == Status.RUNNING, 20, "the task to run")
        assert c.cancel(blocked)
    _stats_where(
        system,
        lambda s: s.done_total == 6 and s.cancelled_total == 1,
        "6 done and 1 cancelled in the stats",
    )

    def scrape() -> dict[str, Any]:
        with urllib.request.urlopen(b.metrics_url, timeout=5) as r:
            text = r.read().decode()
        return {
            s.name + "|" + json.dumps(s.labels, sort_keys=True): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    m = scrape()
    assert m["lbmqtt_done_total|{}"] == 6
    assert m["lbmqtt_slots|{}"] == 3
    assert m['lbmqtt_node_online|{"node": "n1"}'] == 1
    assert m['lbmqtt_task_run_seconds_count|{"name": "ECHO"}'] == 6
    assert m['lbmqtt_task_wait_seconds_bucket|{"le": "+Inf", "name": "ECHO"}'] == 6
    assert m['lbmqtt_task_finished_total|{"name": "ECHO", "outcome": "done"}'] == 6
    assert m['lbmqtt_task_finished_total|{"name": "BLOCK", "outcome": "cancelled"}'] == 1
    assert m["lbmqtt_refused_total|{}"] == 1
    # (copies: counted, none here: one node; tests/test_stragglers.py makes some)
    assert m["lbmqtt_copies_started_total|{}"] == 0 == m["lbmqtt_copies_won_total|{}"]
    assert m['lbmqtt_refused_by_code_total|{"code": "duplicate_id"}'] == 1
    stats = system.stats()
    assert any("refused" in w and "already used" in w for w in stats.warnings), stats.warnings


def test_status_json_matches_the_balancer_and_watch_refreshes(
    system: System, tmp_path: Path
) -> None:
    _start(system)
    b = system.balancer
    assert b is not None
    with Client(system.settings, user="dave") as c:
        tid = c.submit("BLOCK", _block(tmp_path, 0, progress=25))
        wait_until((tmp_path / "started-0").exists, 20, "the task to start")
        _stats_where(system, lambda s: any(t.progress == 25 for t in s.tasks), "progress 25")
        s = system.settings
        common = ["--broker-port", str(s.broker_port), "--prefix", s.topic_prefix]
        r = run_cli("status", "--json", *common)
        assert r.returncode == 0, r.stderr
        shown = BalancerStats.model_validate_json(r.stdout)
        live = system.stats()
        assert (
            (shown.instance, shown.running, shown.slots, shown.busy)
            == (b.instance, live.running, live.slots, live.busy)
            == (b.instance, 1, 3, 1)
        )
        assert [n.name for n in shown.nodes] == ["n1"]
        assert [(t.id, t.status, t.progress) for t in shown.tasks] == [(tid, "running", 25)]

        r = run_cli("status", *common)
        assert r.returncode == 0, r.stderr
        assert "n1" in r.stdout and "BLOCK" in r.stdout and "25%" in r.stdout

        r = run_cli("status", "--watch", "0.2", "--count", "3", "--json", *common)
        assert r.returncode == 0, r.stderr
        lines = [BalancerStats.model_validate_json(line) for line in r.stdout.splitlines()]
        assert len(lines) == 3
        assert lines[0].time < lines[1].time < lines[2].time
        (tmp_path / "gate").touch()
        c.wait(tid, 30)


def test_submit_wait_draws_a_progress_bar(system: System) -> None:
    _start(system)
    s = system.settings
    r = run_cli(
        "submit",
        "BLOCK",
        json.dumps({"progress": 60}),
        "--wait",
        "--progress",
        "--broker-port",
        str(s.broker_port),
        "--prefix",
        s.topic_prefix,
        "--user",
        "erin",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["opened"] is True
    bars = [line for line in r.stderr.splitlines() if line.startswith("BLOCK [")]
    assert bars, r.stderr
    assert bars[-1].startswith("BLOCK [" + "#" * 30 + "] 100%") or "done" in bars[-1]
    assert "done" in bars[-1]


def test_map_reports_progress(system: System) -> None:
    _start(system)
    seen: list[tuple[int, int]] = []
    with Client(system.settings, user="fay") as c:
        c.map("ECHO", list(range(12)), progress=lambda done, total: seen.append((done, total)))
        states: list[TaskState] = []
        tid = c.submit("ECHO", 1)
        final = c.wait_state(tid, 20, on_state=states.append)
    assert seen == [(i, 12) for i in range(13)]
    assert final.status == Status.DONE and states[-1].status == Status.DONE


def test_wait_state_on_a_task_already_finished_reports_its_final_state(system: System) -> None:
    # `lbmqtt submit --wait --progress` draws nothing if a quick task finished before the wait
    # began and on_state was never called (seen in CI)
    _start(system)
    with Client(system.settings, user="gil") as c:
        tid = c.submit("ECHO", 5)
        wait_until(lambda: c.get(tid).status.final, 20, "the task to finish")
        states: list[TaskState] = []
        final = c.wait_state(tid, 20, on_state=states.append)
    assert final.status == Status.DONE
    assert [(st.id, st.status) for st in states] == [(tid, Status.DONE)]


def test_another_client_waits_on_a_task_that_has_finished(system: System) -> None:
    # a client that never saw the task asks the balancer; the answer is final, and is what
    # wait/wait_state return (it raised KeyError: the answer was filed as finished)
    _start(system)
    with Client(system.settings, user="hal") as first:
        tid = first.submit("ECHO", 7)
        assert first.wait(tid, 20)["args"] == 7
    with Client(system.settings, user="hal") as second:
        states: list[TaskState] = []
        final = second.wait_state(tid, 20, on_state=states.append)
        assert final.status == Status.DONE and final.result["args"] == 7
        assert [st.status for st in states] == [Status.DONE]
    with Client(system.settings, user="hal") as third:
        assert third.wait(tid, 20)["args"] == 7


def test_progress_bar_rendering() -> None:
    out = io.StringIO()
    bar = ProgressBar("SLEEP", stream=out, width=10, min_interval_s=0)
    bar.update(0, "queued")
    bar.update(45, "running on n1")
    bar.update(45, "running on n1")  # unchanged: not drawn again
    bar.update(100, "done", final=True)
    bar.close()
    assert out.getvalue().splitlines() == [
        "SLEEP [..........]   0%  queued",
        "SLEEP [####......]  45%  running on n1",
        "SLEEP [##########] 100%  done",
    ]


def test_metrics_are_off_unless_asked_for() -> None:
    assert Settings().metrics_port is None


def test_a_flood_of_dashboard_announcements_gets_one_history_a_second(
    system: System, raw: Callable[..., Any]
) -> None:
    _start(system)
    topics = Topics(system.settings.topic_prefix)
    watcher = raw()
    watcher.subscribe(topics.balancer_history)
    spammer = raw()
    t0 = time.monotonic()
    for _ in range(200):  # anyone may publish here: each would cost the balancer ~100 kB
        spammer.publish(
            topics.dashboard_status, DashboardStatus(online=True, url="http://x/").encode()
        )
    spammer.publish(topics.dashboard_status, b"\xff not json")
    wait_until(
        lambda: len(watcher.payloads(topics.balancer_history)) >= 2,
        10,
        "the first history and the one that answers the rest of the flood",
    )
    sent = len(watcher.payloads(topics.balancer_history))
    assert sent <= math.ceil(time.monotonic() - t0) + 1
    history = BalancerHistory.model_validate_json(watcher.payloads(topics.balancer_history)[0])
    assert system.balancer is not None and history.instance == system.balancer.instance
    with Client(system.settings, user="gil") as c:  # and the balancer still serves
        assert c.wait(c.submit("ECHO", 7), 20)["args"] == 7


def test_waiting_with_a_progress_callback_does_not_query_in_a_loop(
    system: System, raw: Callable[..., Any], tmp_path: Path
) -> None:
    """Each answer to a query is a state event; a wait that asked again on every event
    would flood the balancer (it did, ~660 queries/s, with a progress bar drawn)."""
    _start(system)
    topics = Topics(system.settings.topic_prefix)
    spy = raw()
    spy.subscribe(topics.query("hal"))
    states: list[TaskState] = []
    gate = tmp_path / "gate"

    def on_state(st: TaskState) -> None:
        states.append(st)
        if st.progress == 40 and not gate.exists():
            # keep the task running a second more while we wait on it
            threading.Timer(1.0, gate.touch).start()

    with Client(system.settings, user="hal") as c:
        tid = c.submit("BLOCK", _block(tmp_path, 0, progress=40))
        final = c.wait_state(tid, 30, on_state=on_state)
    assert final.status == Status.DONE
    assert any(s.progress == 40 and s.status == Status.RUNNING for s in states)
    assert len(spy.payloads(topics.query("hal"))) <= 1
    assert len(states) <= 6  # queued/assigned, running, progress, done: not hundreds


def test_task_time_histograms_expose_cumulative_buckets_sum_and_count() -> None:
    from prometheus_client import generate_latest

    from lbmqtt.metrics import Metrics

    m = Metrics(lambda: None)
    for wait, run in ((0.0005, 2.0), (0.001, 3.0), (0.003, 4000.0), (float("nan"), 1.0)):
        m.observe("ECHO", wait, run)
    m.observe("HASH", 0.2, 0.2)
    got = {
        (s.name, s.labels.get("name"), s.labels.get("le")): s.value
        for f in text_string_to_metric_families(generate_latest(m.registry).decode())
        for s in f.samples
    }
    wait = "lbmqtt_task_wait_seconds"
    # a bound counts the values up to and including it ("le"); NaN is not counted
    assert got[(f"{wait}_bucket", "ECHO", "0.001")] == 2
    assert got[(f"{wait}_bucket", "ECHO", "0.0025")] == 2
    assert got[(f"{wait}_bucket", "ECHO", "0.005")] == 3
    assert got[(f"{wait}_bucket", "ECHO", "+Inf")] == 3
    assert got[(f"{wait}_count", "ECHO", None)] == 3
    assert got[(f"{wait}_sum", "ECHO", None)] == pytest.approx(0.0045)
    run = "lbmqtt_task_run_seconds"
    assert got[(f"{run}_bucket", "ECHO", "2.5")] == 2  # (1.0 and 2.0)
    assert got[(f"{run}_bucket", "ECHO", "3600.0")] == 3
    assert got[(f"{run}_count", "ECHO", None)] == 4
    assert got[(f"{run}_bucket", "HASH", "0.25")] == 1
