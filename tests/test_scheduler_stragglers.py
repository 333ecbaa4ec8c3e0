"""Unequal machines in the pure scheduler: speed learned across task names, the ``cost``
hint, take-back of pipelined tasks not started, and speculative copies (no I/O).

The same mechanisms through real MQTT are in tests/test_stragglers.py where they exist;
the figures they buy are bench/scheduling.py --scenario's."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbmqtt.scheduler import Copy, Group, NodeCaps, Placement, QueuedTask, Scheduler

_ids = itertools.count()


def task(name: str = "a", *, cost: float | None = None, speculate: bool = True) -> QueuedTask:
    n = next(_ids)
    return QueuedTask(f"t{n}", "alice", name, 0, n, cost=cost, speculate=speculate)


NAMES = ("a", "b", "s", "zzz")


def node(name: str, slots: int = 1, speed: float = 1.0, tasks: tuple[str, ...] = NAMES) -> NodeCaps:
    return NodeCaps(name, (Group(0, slots, 0, 10),), frozenset(tasks), speed)


def fast_and_slow() -> Scheduler:
    """Two nodes declaring the same speed; "slow" is 8x slower, learned from task "a"."""
    s = Scheduler()
    s.set_node(node("fast"))
    s.set_node(node("slow"))
    for _ in range(4):
        s.observe("a", "fast", 1.0)
        s.observe("a", "slow", 8.0)
    return s


# ----------------------------------------------------------------------- speed learning


def test_a_node_slow_at_one_name_is_expected_slow_at_a_name_never_seen() -> None:
    s = fast_and_slow()
    assert s.speed("slow") < s.speed("fast") / 4
    never = s.expected_runtime("zzz", s.nodes["slow"]) / s.expected_runtime("zzz", s.nodes["fast"])
    assert never > 4
    # Given both idle, When a task of a new name comes, Then it goes to the fast node
    s.enqueue(t := task("b"))
    assert s.schedule() == [Placement(t, "fast", 0)]


def test_a_slow_machine_is_known_even_when_every_task_has_its_own_name() -> None:
    s = Scheduler()
    s.set_node(node("fast"))
    s.set_node(node("slow"))
    for i in range(8):  # every name once, on one node only: no same-name comparison
        s.observe(f"f{i}", "fast", 1.0)
        s.observe(f"s{i}", "slow", 4.0)
    assert s.speed("slow") < s.speed("fast") / 2


def test_a_name_seen_on_several_nodes_outweighs_the_typical_guess() -> None:
    s = fast_and_slow()
    before = s.speed("fast")
    s.observe("huge", "fast", 500.0)  # a first-seen name 500x the typical work
    assert s.speed("fast") == pytest.approx(before)  # not taken for a slowdown


def test_a_node_that_slows_down_is_known_for_it_within_a_few_tasks() -> None:
    s = Scheduler()
    for n in ("n1", "n2"):
        s.set_node(node(n))
    for _ in range(5):
        s.observe("a", "n1", 1.0)
        s.observe("a", "n2", 1.0)
    # When n2 becomes 16x slower (throttled, another user's load)
    for _ in range(3):
        s.observe("a", "n2", 16.0)
        s.observe("a", "n1", 1.0)
    # Then after three of its tasks, another name is expected at least 8x slower there
    ratio = s.expected_runtime("b", s.nodes["n2"]) / s.expected_runtime("b", s.nodes["n1"])
    assert ratio > 8
    assert s.expected_runtime("a", s.nodes["n2"]) > 8 * s.expected_runtime("a", s.nodes["n1"])


def test_the_declared_speed_is_a_hint_until_tasks_say_otherwise() -> None:
    s = Scheduler()
    s.set_node(node("claims_fast", speed=4.0))
    s.set_node(node("plain", speed=1.0))
    assert s.speed("claims_fast") == 4.0
    for _ in range(4):
        s.observe("a", "plain", 1.0)
        s.observe("a", "claims_fast", 1.0)  # as fast as plain, not 4x
    assert s.speed("claims_fast") == pytest.approx(s.speed("plain"), rel=0.25)


def test_cost_scales_the_estimate_and_the_work_learned_per_unit() -> None:
    s = Scheduler()
    s.set_node(node("n1"))
    s.observe("a", "n1", 10.0, cost=5.0)  # 2 s per unit
    assert s.expected_runtime("a", s.nodes["n1"], 3.0) == pytest.approx(6.0)
    assert s.expected_runtime("a", s.nodes["n1"]) == pytest.approx(2.0)


def test_a_big_task_by_cost_waits_in_the_tail_for_the_fast_slot() -> None:
    s = Scheduler()
    s.set_node(node("fast", speed=4.0))
    s.set_node(node("slow", speed=1.0))
    s.observe("a", "fast", 0.25)  # 1 unit: 0.25 s on fast, 1 s on slow
    s.enqueue(small := task("a", cost=1.0))
    s.enqueue(big := task("a", cost=20.0))
    first = s.schedule(now=0.0)
    assert first == [Placement(small, "fast", 0)]
    # the big one: 5 s on fast after 0.25 s, against 20 s on slow: it waits
    assert s.is_queued(big.id)


# ------------------------------------------------------------------- speculative copies


def straggler() -> tuple[Scheduler, QueuedTask]:
    """A task of known name running 3x longer than expected on "slow"; "fast" idle."""
    s = fast_and_slow()
    s.enqueue(t := task("a"))
    s.enqueue(hold := task("a"))
    s.schedule()  # t on fast, hold on slow
    s.release(t.id)  # fast frees; hold keeps running on slow
    s.started(hold.id, 0.0)
    return s, hold


def test_a_task_running_long_on_a_slow_node_gets_a_copy_on_an_idle_fast_one() -> None:
    s, t = straggler()
    s.progress(t.id, 0.1, 2.0)  # 10 % in 2 s: 18 s left here, 1 s on fast
    assert s.speculate(2.0) == [Copy(t.id, "fast", 0)]
    assert s.copy_of(t.id) == ("fast", 0) and s.copies == 1
    assert s.busy("fast", 0) == 1
    assert s.speculate(2.5) == []  # one copy per task; never a copy of a copy


def test_without_progress_the_time_left_is_the_expected_runtime_less_the_elapsed() -> None:
    s, t = straggler()
    left = s.expected_runtime("a", s.nodes["slow"]) - 7.7
    assert s.speculate(7.7) == [] and left < 1.5  # a copy (1 s) would not gain enough
    assert s.speculate(1.0) == [Copy(t.id, "fast", 0)]  # 7 s left, 1 s on fast


def test_without_progress_an_overdue_task_counts_as_long_again_as_it_ran() -> None:
    s = Scheduler()
    for n in ("n1", "n2"):
        s.set_node(node(n))
        s.observe("a", n, 1.0)
    s.enqueue(t := task("a"))
    s.schedule()
    s.started(t.id, 0.0)
    assert s.speculate(0.9) == []  # on time
    assert s.speculate(3.0) == [Copy(t.id, "n2", 0)]  # 3 s for a 1 s task: stuck?


def test_no_copy_while_a_queued_task_could_use_the_idle_slot() -> None:
    s, t = straggler()
    s.progress(t.id, 0.1, 2.0)
    s.enqueue(q := task("b"))
    s.set_node(node("slow", tasks=("a",)))  # only fast can run "b"
    assert s.speculate(2.0) == []
    assert [p.task.id for p in s.schedule(now=2.0)] == [q.id]


def test_a_task_that_opted_out_is_never_copied() -> None:
    s = fast_and_slow()
    s.enqueue(first := task("a"))
    s.enqueue(t := task("a", speculate=False))
    s.schedule()
    s.release(first.id)
    s.started(t.id, 0.0)
    s.progress(t.id, 0.01, 5.0)
    assert s.speculate(5.0) == []


def test_copies_are_capped_to_a_share_of_the_slots() -> None:
    s = Scheduler(speculative_share=0.25)
    s.set_node(node("fast", slots=4))
    s.set_node(node("slow", slots=4))
    for _ in range(4):
        s.observe("a", "fast", 1.0)
        s.observe("a", "slow", 8.0)
    tasks = [task("a") for _ in range(8)]
    for t in tasks:
        s.enqueue(t)
    placed = s.schedule()
    for p in placed:
        if p.node == "fast":
            s.release(p.task.id)
        else:
            s.started(p.task.id, 0.0)
            s.progress(p.task.id, 0.05, 2.0)
    copies = s.speculate(2.0)
    assert len(copies) == 2  # a quarter of 8 slots, though 4 fast slots are idle
    assert {c.node for c in copies} == {"fast"}


def test_the_end_of_a_task_frees_both_attempts_and_a_failed_copy_frees_its_own() -> None:
    s, t = straggler()
    s.progress(t.id, 0.1, 2.0)
    assert s.speculate(2.0) == [Copy(t.id, "fast", 0)]
    assert s.release_copy(t.id)  # the copy failed: the original runs on
    assert s.busy("fast", 0) == 0 and s.where(t.id) == ("slow", 0)
    s.progress(t.id, 0.15, 3.0)
    assert len(s.speculate(3.0)) == 1
    assert s.release(t.id)  # the task ended (either attempt): both slots free
    assert (s.busy("fast", 0), s.busy("slow", 0), s.copies) == (0, 0, 0)


def test_when_the_original_s_node_dies_the_copy_carries_on_and_nothing_is_lost() -> None:
    s, t = straggler()
    s.progress(t.id, 0.1, 2.0)
    s.speculate(2.0)
    assert s.remove_node("slow") == []
    assert s.where(t.id) == ("fast", 0) and s.copy_of(t.id) is None
    assert s.running_for("alice") == 1


def test_when_the_copy_s_node_dies_the_original_carries_on() -> None:
    s, t = straggler()
    s.progress(t.id, 0.1, 2.0)
    s.speculate(2.0)
    assert s.remove_node("fast") == []
    assert s.where(t.id) == ("slow", 0) and s.copies == 0


def test_a_new_name_on_the_slow_node_is_copied_by_its_progress_rate() -> None:
    s = fast_and_slow()
    s.enqueue(first := task("a"))
    s.enqueue(t := task("zzz"))  # never seen
    s.schedule()
    s.release(first.id)
    s.started(t.id, 0.0)
    s.progress(t.id, 0.05, 4.0)  # 80 s in all here: about 10 s on fast
    [c] = s.speculate(4.0)
    assert c.node == "fast"


def equal_pair_running_two_each() -> tuple[Scheduler, list[QueuedTask]]:
    """n1 and n2 alike (task "a": 4 s); n1 runs two tasks, n2 is idle (half the slots
    may run copies)."""
    s = Scheduler(speculative_share=0.5)
    for n in ("n1", "n2"):
        s.set_node(node(n, slots=2))
        s.observe("a", n, 4.0)
    ts = [task("a"), task("a")]
    for t in ts:
        s.enqueue(t)
    s.set_node(node("n2", slots=2, tasks=()))
    s.schedule()
    s.set_node(node("n2", slots=2))
    for t in ts:
        s.started(t.id, 0.0)
        s.progress(t.id, 0.25, 1.0)  # on time
    return s, ts


def test_a_big_task_is_not_copied_to_a_machine_no_faster() -> None:
    s, ts = equal_pair_running_two_each()
    s.progress(ts[0].id, 0.3, 3.0)  # ts[0] is just big: 10 % a second, throughout
    s.progress(ts[1].id, 0.75, 3.0)
    s.progress(ts[0].id, 0.5, 5.0)
    assert s.speculate(6.0) == []  # 5 s left here; 10 s for a copy on n2


def test_the_tasks_of_a_node_that_slowed_down_midway_are_copied_to_one_as_fast_as_it_was() -> None:
    s, ts = equal_pair_running_two_each()
    for t in ts:  # from 1 s on, n1 goes 16x slower
        s.progress(t.id, 0.25 + 0.25 / 16, 2.0)
        s.progress(t.id, 0.25 + 0.5 / 16, 3.0)
    copies = s.speculate(3.0)
    assert sorted(c.task_id for c in copies) == sorted(t.id for t in ts)
    assert {c.node for c in copies} == {"n2"}


# --------------------------------------------------------------------------- take-back


def windowed(n: int = 4) -> tuple[Scheduler, list[QueuedTask]]:
    """Node "a" runs one task of a short name and holds ``n - 1`` more in its window;
    "b" is idle."""
    s = Scheduler(window_long_s=0.5)
    s.set_node(node("a", slots=1))
    s.set_node(node("b", slots=1))
    for _ in range(3):
        s.observe("s", "a", 0.1)
        s.observe("s", "b", 0.1)
    s.set_window("a", 3)
    tasks = [task("s") for _ in range(n)]
    for t in tasks:
        s.enqueue(t)
    s.set_node(node("b", slots=1, tasks=()))  # b offers nothing for now
    placed = s.schedule(now=0.0)
    assert [p.node for p in placed] == ["a"] * n  # one running, the others in the window
    s.set_node(node("b", slots=1))
    s.started(tasks[0].id, 0.0)
    return s, tasks


def test_an_unstarted_pipelined_task_is_taken_back_for_an_idle_slot_elsewhere() -> None:
    s, tasks = windowed()
    for _ in range(3):  # a slows down 20x
        s.observe("s", "a", 2.0)
    back = s.take_back(now=0.5)
    assert back and tasks[0].id not in back  # the running one stays
    assert s.take_back(now=0.5) == []  # asked once
    got = s.given_back(back[0])
    assert got is not None and s.is_queued(got.id)
    assert s.schedule(now=0.5) == [Placement(got, "b", 0)]


def test_nothing_is_taken_back_that_would_not_finish_clearly_sooner() -> None:
    s, _ = windowed(2)
    # the held one starts in 0.05 s and ends at 0.15 s; on b at 0.1 s: not worth a move
    assert s.take_back(now=0.05) == []


def test_a_task_asked_back_that_had_started_stays() -> None:
    s, _ = windowed()
    for _ in range(3):
        s.observe("s", "a", 2.0)
    back = s.take_back(now=0.5)
    s.started(back[0], 0.6)
    s.keep(back[0])
    assert s.where(back[0]) == ("a", 0) and not s.is_queued(back[0])


# ------------------------------------------------------------------ slot accounting


_OP = st.one_of(
    st.tuples(st.just("enqueue"), st.sampled_from("ab"), st.booleans()),
    st.tuples(st.just("schedule")),
    st.tuples(st.just("start"), st.integers(0, 50), st.floats(0.01, 1.0)),
    st.tuples(st.just("speculate")),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("release_copy"), st.integers(0, 50)),
    st.tuples(st.just("take_back")),
    st.tuples(st.just("remove_node"), st.sampled_from(("n1", "n2", "n3"))),
    st.tuples(st.just("observe"), st.sampled_from("ab"), st.sampled_from(("n1", "n2", "n3"))),
)


@settings(max_examples=120, deadline=None)
@given(st.lists(_OP, max_size=60))
def test_slots_held_are_always_the_placed_tasks_and_their_copies(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    s = Scheduler(window_long_s=0.5)
    speeds = {"n1": 1.0, "n2": 0.25, "n3": 2.0}
    for n, v in speeds.items():
        s.set_node(NodeCaps(n, (Group(0, 2, 0, 10),), frozenset("ab"), v))
        s.set_window(n, 1)
    now = 0.0
    ids: list[str] = []
    for op in ops:
        now += 0.5
        kind = op[0]
        if kind == "enqueue":
            t = task(op[1], speculate=op[2])
            ids.append(t.id)
            s.enqueue(t)
        elif kind == "schedule":
            s.schedule(now)
        elif kind == "start" and ids:
            tid = ids[op[1] % len(ids)]
            s.started(tid, now)
            s.progress(tid, op[2], now)
        elif kind == "speculate":
            for c in s.speculate(now):
                assert s.where(c.task_id) is not None
                assert s.where(c.task_id) != (c.node, c.group)
        elif kind == "release" and ids:
            s.release(ids[op[1] % len(ids)])
        elif kind == "release_copy" and ids:
            s.release_copy(ids[op[1] % len(ids)])
        elif kind == "take_back":
            for tid in s.take_back(now):
                assert s.given_back(tid) is not None
        elif kind == "remove_node":
            s.remove_node(op[1])
            s.set_node(NodeCaps(op[1], (Group(0, 2, 0, 10),), frozenset("ab"), speeds[op[1]]))
        elif kind == "observe":
            s.observe(op[1], op[2], 1.0 / speeds[op[2]])
        # Then: every slot held is a placed task or a copy; copies stay within the cap
        held: Counter[tuple[str, int]] = Counter()
        for tid in ids:
            if (w := s.where(tid)) is not None:
                held[w] += 1
                assert not s.is_queued(tid)
            if (c := s.copy_of(tid)) is not None:
                held[c] += 1
                assert s.where(tid) is not None and c[0] != s.where(tid)[0]  # type: ignore[index]
        for n in speeds:
            assert s.busy(n, 0) == held[(n, 0)]
        assert s.copies <= max(1, 0.25 * 6)


# ------------------------------------------------------------------------ the tail rule


def test_in_the_tail_a_new_name_waits_for_a_fast_node_busy_with_short_and_held_tasks() -> None:
    # Given fast runs short tasks with more held in its window, and slow (8x) is idle
    s = Scheduler(window_long_s=0.5)
    s.set_node(node("fast", slots=1))
    s.set_node(node("slow", slots=1))
    for _ in range(4):
        s.observe("s", "fast", 0.1)
        s.observe("s", "slow", 0.8)
    s.set_window("fast", 3)
    shorts = [task("s") for _ in range(3)]
    for t in shorts:
        s.enqueue(t)
    s.set_node(node("slow", slots=1, tasks=()))
    s.schedule(now=0.0)  # one runs on fast, two held there
    s.set_node(node("slow", slots=1))
    s.started(shorts[0].id, 0.0)
    # When a task of a name never seen comes last, at 0.15 s (the running short overdue)
    s.enqueue(new := task("zzz"))
    # Then it waits for fast (free in ~0.35 s) rather than run 8x slower on slow
    assert s.schedule(now=0.15) == []
    assert s.is_queued(new.id) and s.holding
