"""A node's pipelining window: sized to cover a refill (the dispatch round trip and the
balancer's own part of it, measured), bounded per slot and per node. (End to end, with a
broker: ``test_e2e.py``'s pipelining test.)"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from lbmqtt.balancer import Balancer
from lbmqtt.balancer.outbox import Outbox
from lbmqtt.balancer.records import MAX_REFILL_SAMPLE_S, NodeInfo, refilled
from lbmqtt.balancer.stats import Tally
from lbmqtt.balancer.tasks import (
    SET_BYTES_MAX,
    WINDOW_CLUSTER_MAX,
    WINDOW_TASKS_MAX,
    TaskTable,
    assignment_json,
)
from lbmqtt.config import Settings
from lbmqtt.protocol import GroupInfo, NodeReport, NodeStatus, Result, Started, Status, Topics
from lbmqtt.scheduler import Group, NodeCaps, Scheduler

from .conftest import make_settings, task_record


def table(**overrides: Any) -> tuple[TaskTable, Scheduler]:
    settings = Settings().with_overrides(**overrides) if overrides else Settings()
    scheduler = Scheduler()
    outbox = Outbox(Counter())
    return TaskTable(settings, scheduler, outbox, Tally(), {}), scheduler


def status(workers: int) -> NodeStatus:
    return NodeStatus(
        node="n1",
        instance="i1",
        online=True,
        tasks=["NOOP"],
        groups=[GroupInfo(index=0, workers=workers, min_p=0, max_p=100)],
    )


def node(slots: int, *, runtime_s: float, rtt_s: float, refill_s: float | None) -> NodeInfo:
    return NodeInfo(
        name="n1", workers={0: slots}, runtime_s=runtime_s, rtt_s=rtt_s, refill_s=refill_s
    )


def test_the_window_covers_the_balancers_part_of_a_refill_not_only_the_round_trip() -> None:
    t, scheduler = table()
    # 1 ms tasks, a 4.5 ms round trip: 5 per slot
    info = node(4, runtime_s=0.001, rtt_s=0.0045, refill_s=None)
    t.size_window(info)
    assert info.window == 5 and scheduler.window("n1") == 5
    # the balancer takes 20.3 ms more to answer a report with new tasks: 25 per slot
    info.refill_s = 0.0203
    t.size_window(info)
    assert info.window == 25 and scheduler.window("n1") == 25
    assert t.round_wanted  # (the larger window is filled at once)
    # no-op tasks count as 0.1 ms (the node's own cost): 45 per slot for the round trip
    t.size_window(node(4, runtime_s=0.00002, rtt_s=0.0045, refill_s=None))
    assert scheduler.window("n1") == 45


def test_the_window_is_bounded_per_slot_over_the_nodes_slots_and_by_its_sets_size() -> None:
    t, _ = table()
    # no-op tasks and a 30 ms refill would ask for 300 a slot
    info = node(2, runtime_s=0.00002, rtt_s=0.0021, refill_s=0.0279)
    t.size_window(info)
    assert info.window == Settings().pipeline_window_max  # per slot: PIPELINE_WINDOW_MAX
    big = node(16, runtime_s=0.00002, rtt_s=0.0021, refill_s=0.0279)
    t.size_window(big)
    assert big.window == WINDOW_TASKS_MAX // 16  # over the node: WINDOW_TASKS_MAX
    info.task_bytes = 16384  # (tasks with 16 KiB of arguments: 64 fill SET_BYTES_MAX)
    t.size_window(info)
    assert info.window == SET_BYTES_MAX // 16384 // 2
    info.task_bytes = SET_BYTES_MAX  # (even a set over it holds one a slot)
    t.size_window(info)
    assert info.window == 1
    t2, _ = table(pipeline_window_max=0)
    t2.size_window(info)
    assert info.window == 0  # 0: no pipelining at all


def test_the_windows_of_many_nodes_share_a_bound() -> None:
    # (200 nodes of 2 slots, fed by one balancer: 128 a slot would hold 51,200 tasks in
    # windows, each set hundreds of tasks long; a 4-slot node alone keeps its 128)
    t, scheduler = table()
    for i in range(200):
        scheduler.set_node(NodeCaps(f"s{i}", (Group(0, 2, 0, 10),), frozenset({"NOOP"})))
    assert scheduler.slots == 400
    info = node(2, runtime_s=0.00002, rtt_s=0.0021, refill_s=0.0279)
    t.size_window(info)
    assert info.window == WINDOW_CLUSTER_MAX * 2 // 400 // 2
    for i in range(199):
        scheduler.remove_node(f"s{i}")
    assert scheduler.slots == 2
    t.size_window(info)
    assert info.window == Settings().pipeline_window_max


def test_a_node_back_with_other_slots_gets_its_window_sized_again() -> None:
    b = Balancer(make_settings(1883, "t/w"))
    info = b.nodes["n1"] = NodeInfo(
        name="n1", instance="i1", runtime_s=0.00002, rtt_s=0.0021, refill_s=0.0279
    )
    b.fleet.node_up(info, status(2))
    assert info.window == 128
    b.fleet.node_up(info, status(32))  # (restarted with more workers)
    assert info.window == WINDOW_TASKS_MAX // 32 and b.scheduler.window("n1") == 16


def test_only_the_first_report_with_results_since_a_set_starts_a_refill() -> None:
    b = Balancer(make_settings(1883, "t/w"))
    info = b.nodes["n1"] = NodeInfo(name="n1", instance="i1", online=True)

    def report(started: list[str], results: list[str]) -> None:
        rep = NodeReport(
            node="n1",
            instance="i1",
            started=[Started(id=t, attempt=1, time=1.0) for t in started],
            results=[Result(id=t, attempt=1, status="done") for t in results],
        )
        b.fleet.on_reports("n1", rep.model_dump_json().encode())

    report(["x"], [])
    assert info.freed_at == 0.0  # (started only: nothing freed)
    before = time.monotonic()
    report([], ["x"])
    first = info.freed_at
    assert first >= before
    report([], ["y"])
    assert info.freed_at == first  # (the refill is timed from the first)


def test_a_refill_is_measured_from_the_report_to_the_set_that_gives_new_tasks() -> None:
    box = Outbox(Counter())
    info = NodeInfo(name="n1", online=True)
    rec = task_record("a")
    rec.status, rec.node, rec.group = Status.ASSIGNED, "n1", 0
    rec.assignment_json = assignment_json(rec)
    tasks = {"a": rec}
    sent: list[str] = []

    def publish(topic: str, payload: bytes, **kw: Any) -> None:
        sent.append(topic)

    def flush() -> None:
        box.dirty_nodes.add("n1")
        box.flush_sets(publish, Topics("t"), {"n1": info}, tasks, "inst")

    # a set that gives no new task (only takes finished ones off) measures nothing
    info.freed_at = 1.0
    flush()
    assert info.refill_s is None and info.freed_at == 0.0
    # a report with results came in; the set that gives the node a new task measures it
    info.assigned["a"] = None  # (placed: rec.assigned_at is 0 until its set goes out)
    info.freed_at = time.monotonic() - 0.010
    flush()
    assert info.refill_s is not None and 0.010 <= info.refill_s < MAX_REFILL_SAMPLE_S
    assert info.freed_at == 0.0 and rec.assigned_at > 0.0 and len(sent) == 2
    # the same task sent again (the set republished) is no refill
    first = info.refill_s
    info.freed_at = time.monotonic() - 0.200
    flush()
    assert info.refill_s == first


def test_a_stalled_refill_is_not_averaged_in() -> None:
    info = NodeInfo(name="n1")
    refilled(info, 0.004)
    refilled(info, MAX_REFILL_SAMPLE_S + 1.0)  # (a long outage)
    refilled(info, 0.3)  # (a short one: over 50 ms and over 4x the average)
    assert info.refill_s == 0.004
    refilled(info, 0.014)  # (a refill that grows: averaged in)
    assert info.refill_s is not None and abs(info.refill_s - 0.006) < 1e-9
    refilled(info, 0.045)  # (under 50 ms: always averaged in)
    assert abs(info.refill_s - 0.0138) < 1e-9
