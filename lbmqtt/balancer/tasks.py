"""The task table and every transition of a task: queued, placed, retried, finished.

:class:`TaskTable` owns the records (by id), the order in which finished ones expire and
the flag that asks the tick for a placement round. Its transitions act on the table, the
scheduler's queues and slots, the nodes' assigned sets, the counts (:class:`.stats.Tally`)
and the outbox; they never publish nor write: what they change goes out with the tick.
"""

from __future__ import annotations

import heapq
import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..protocol import ErrorInfo, Status, TaskState, task_state_dict
from ..protocol.assign import encode_assignment
from ..scheduler import Copy, Scheduler
from .outbox import Outbox
from .records import PLACED, CopyAttempt, NodeInfo, QueueKey, TaskRecord, node_info
from .stats import Tally

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger(__name__)

EWMA_ALPHA = 0.2
DEFAULT_RTT_S = 0.005  # dispatch round trip assumed before one is measured
MIN_RUNTIME_S = 1e-4  # a shorter runtime sizes a window as this one (the node's own cost)
WINDOW_TASKS_MAX = 512
"""Most tasks a node's pipelining windows hold together (see TaskTable.size_window)."""
WINDOW_CLUSTER_MAX = 8_192
"""Most tasks all nodes' windows hold together, shared by slots. A balancer feeds some
10,000 tasks a second, whatever the number of nodes: more held in windows only makes the
sets larger and the table bigger (bench/run.py scale, 200 simulated nodes of 2 slots:
128 a slot held ~51,000 tasks in windows, dispatched at a median 6,675 tasks/s against
8,183 with the window before, and took 625-664 MB against 608-626; 20 a slot: 7,251
and 7,528, 605-612 MB). A 4-slot node alone keeps its 128 a slot."""
SET_BYTES_MAX = 1 << 20
"""A node's windows hold no more tasks than fill its assignment set to this size, at its
tasks' mean size (at least one a slot)."""


def window_per_slot(
    covers_s: float, runtime_s: float, slots: int, most: int, max_per_slot: int
) -> int:
    """Tasks a slot holds to run through ``covers_s`` at ``runtime_s`` each (MIN_RUNTIME_S
    at least), at most ``max_per_slot`` and ``most`` over the ``slots``, one at least."""
    return min(
        max_per_slot,
        max(1, most // slots),
        max(1, math.ceil(covers_s / max(runtime_s, MIN_RUNTIME_S))),
    )


def assignment_json(
    rec: TaskRecord, *, attempt: int | None = None, group: int | None = None
) -> bytes:
    """The task's current attempt (or the given one: a copy) as its node's set carries
    it. Built once per attempt from the stored args bytes: the set of a busy node is
    republished often, its tasks' arguments are never re-encoded."""
    return encode_assignment(
        task_id=rec.id,
        attempt=rec.attempt if attempt is None else attempt,
        user=rec.user,
        name=rec.name,
        priority=rec.priority,
        group=rec.group if group is None else group,
        timeout_s=rec.timeout_s,
        requires=rec.requires,
        tags=rec.tags,
        cost=rec.cost,
        speculate=rec.speculate,
        args_json=rec.args_json,
    )


class TaskTable:
    """Every task the balancer knows, and the transitions between their states.

    Args:
        settings: the balancer's settings (attempts, retention, pipelining).
        scheduler: the queues and slots.
        outbox: where changed states and node sets go.
        tally: the counts the transitions keep.
        nodes: the balancer's node table (shared: placed tasks are in their node's set).
    """

    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        outbox: Outbox,
        tally: Tally,
        nodes: dict[str, NodeInfo],
    ):
        self.settings = settings
        self.scheduler = scheduler
        self.outbox = outbox
        self.tally = tally
        self.nodes = nodes
        self.tasks: dict[str, TaskRecord] = {}
        self.seq = 0
        """The newest submit sequence number given."""
        self.round_wanted = False
        """The next tick runs a placement round."""
        self.straggle_wanted = False
        """The next tick looks for stragglers (:meth:`straggle`; every health check)."""
        self.expiry: list[tuple[float, str]] = []
        """(when, id) of finished tasks, to forget them."""
        self._next_queued_scan = 0.0
        """When :meth:`expire_queued` looks at the queues again (wall clock)."""
        self.why_cache: dict[QueueKey, str | None] = {}
        self.metrics: Metrics | None = None

    # ------------------------------------------------------------------ transitions

    def set_status(self, rec: TaskRecord, new: Status) -> None:
        """Change the status, keeping the running counts."""
        old = rec.status
        if old == new:
            return
        if old in PLACED and new not in PLACED:
            self.tally.running_by_name[rec.name] -= 1
        if new in PLACED and old not in PLACED:
            self.tally.running_by_name[rec.name] += 1
        rec.status = new

    def enqueue(self, rec: TaskRecord) -> None:
        """Into its queue (in its seq's place); a round is wanted."""
        self.set_status(rec, Status.QUEUED)
        rec.node = None
        rec.group = None
        self.scheduler.enqueue(rec)  # (the record itself: scheduler.Queued)
        self.tally.queued_by[rec.queue_key] += 1
        self.round_wanted = True

    def left_queue(self, rec: TaskRecord) -> None:
        """It left its queue (placed or cancelled): the queued counts follow."""
        queued_by = self.tally.queued_by
        key = rec.queue_key
        queued_by[key] -= 1
        if queued_by[key] <= 0:
            del queued_by[key]

    def unplace(self, rec: TaskRecord, *, release: bool = True) -> None:
        """Take a placed task off its node (its slot frees; its node's set changes), and
        its speculative copy off the copy's node (killed there: wasted)."""
        if release:
            self.scheduler.release(rec.id)
        if rec.copy is not None:
            self.drop_copy(rec, release=False)
        info = self.nodes.get(rec.node) if rec.node is not None else None
        if info is not None and rec.id in info.assigned:
            del info.assigned[rec.id]
            self.outbox.dirty_nodes.add(info.name)
        self.round_wanted = True

    # ------------------------------------------------------------------ copies

    def start_copy(self, rec: TaskRecord, c: Copy) -> None:
        """The scheduler placed a speculative copy of ``rec`` (running): a second attempt,
        with its own number, in the set of the copy's node."""
        rec.top_attempt = max(rec.top_attempt, rec.attempt) + 1
        # (the copy's number never counts against TASK_MAX_ATTEMPTS: if it wins, the task's
        # attempt becomes it; if not, the next placement skips it)
        rec.waived += 1
        rec.copy = CopyAttempt(
            node=c.node,
            group=c.group,
            attempt=rec.top_attempt,
            assignment_json=assignment_json(rec, attempt=rec.top_attempt, group=c.group),
        )
        node_info(self.nodes, c.node).assigned[rec.id] = None
        self.outbox.dirty_nodes.add(c.node)
        self.tally.counters["copies_started"] += 1
        log.info(
            "task %s runs long on node %s: a speculative copy (attempt %d) starts on %s",
            rec.id,
            rec.node,
            rec.top_attempt,
            c.node,
        )

    def drop_copy(self, rec: TaskRecord, *, release: bool = True, ended: str = "withdrawn") -> None:
        """The copy of ``rec`` ends without giving the result: ``withdrawn`` (the original
        finished, the task was cancelled or goes back to the queue), or it ``failed`` or
        was ``lost``. Off its node's set (its node kills it), its slot freed (``release``:
        in the scheduler too)."""
        c = rec.copy
        if c is None:
            return
        rec.copy = None
        self.tally.attempt_ended(rec, c.node, c.started_at, ended, copy=True)
        if release:
            self.scheduler.release_copy(rec.id)
        info = self.nodes.get(c.node)
        if info is not None and rec.id in info.assigned:
            del info.assigned[rec.id]
            self.outbox.dirty_nodes.add(c.node)
        self.tally.counters["copies_wasted"] += 1
        self.round_wanted = True

    def promote_copy(self, rec: TaskRecord, original: str) -> None:
        """The copy of ``rec`` carries on as the task's attempt: its result wins (the
        ``original`` attempt ended ``withdrawn``), or the original's node or worker was
        ``lost``. The original is withdrawn from its node."""
        c = rec.copy
        assert c is not None
        self.tally.attempt_ended(rec, rec.node, rec.started_at, original, copy=rec.by_copy)
        rec.started_at = c.started_at or rec.started_at
        rec.by_copy = True
        old = self.nodes.get(rec.node) if rec.node is not None else None
        if old is not None and rec.id in old.assigned and rec.node != c.node:
            del old.assigned[rec.id]
            self.outbox.dirty_nodes.add(old.name)
        rec.copy = None
        rec.node = c.node
        rec.group = c.group
        rec.attempt = c.attempt
        rec.assignment_json = c.assignment_json
        rec.assigned_at = c.assigned_at
        rec.missing_since = c.missing_since
        rec.prefetched = False
        if c.started and rec.status == Status.ASSIGNED:
            self.set_status(rec, Status.RUNNING)
        self.outbox.emit(rec)  # its node and attempt changed
        self.round_wanted = True

    def straggle(self) -> None:
        """Speculative copies and take-backs the scheduler decides on slots left idle."""
        scheduler = self.scheduler
        now = time.monotonic()
        for tid in scheduler.take_back(now):
            rec = self.tasks.get(tid)
            if (
                rec is None
                or rec.status != Status.ASSIGNED
                or rec.copy is not None
                or not rec.speculate
            ):
                scheduler.keep(tid)  # (started meanwhile, as far as we know)
                continue
            # withdrawn from its node's set before it started (if it started meanwhile, its
            # node kills it: an attempt lost like a worker's; the number is not reused)
            self.unplace(rec)
            rec.top_attempt = max(rec.top_attempt, rec.attempt)
            rec.waived += 1
            self.tally.counters["taken_back"] += 1
            log.info("task %s waits on node %s: taken back for an idle slot", tid, rec.node)
            self.requeue(rec)
        if not self.settings.speculate:
            return
        for c in scheduler.speculate(now):
            rec = self.tasks.get(c.task_id)
            if rec is None or rec.status not in PLACED or rec.copy is not None:
                scheduler.release_copy(c.task_id)  # (cannot happen: the scheduler knows)
                continue
            self.start_copy(rec, c)

    def retry_or_fail(self, rec: TaskRecord, error: ErrorInfo, now: float) -> None:
        """Its attempt was lost: queued again, or failed after TASK_MAX_ATTEMPTS."""
        self.tally.attempt_ended(rec, rec.node, rec.started_at, "lost", copy=rec.by_copy)
        max_attempts = self.settings.task_max_attempts
        if rec.attempt - rec.waived < max_attempts:
            log.info(
                "task %s lost on attempt %d (%s): queued again", rec.id, rec.attempt, error.message
            )
            self.tally.counters["retried"] += 1
            self.requeue(rec)
        else:
            rec.error = ErrorInfo(
                type=error.type,
                message=f"{error.message} (attempt {rec.attempt - rec.waived} of "
                f"{max_attempts}: giving up)",
                traceback=error.traceback,
            )
            self.finalize(rec, Status.FAILED, now)

    def requeue(self, rec: TaskRecord) -> None:
        """Back to the head of its queue (it keeps its seq), as if never started."""
        rec.progress = 0
        rec.started_at = None
        self.enqueue(rec)
        self.outbox.emit(rec)

    def finalize(self, rec: TaskRecord, status: Status, now: float) -> None:
        """Done, failed or cancelled: counted, timed, and kept until it expires."""
        self.set_status(rec, status)
        rec.finished_at = now
        rec.assignment_json = b""
        tally = self.tally
        if status == Status.DONE:
            tally.counters["done"] += 1
            tally.done_by_name[rec.name] += 1
        elif status == Status.FAILED:
            tally.counters["failed"] += 1
            tally.failed_by_name[rec.name] += 1
        elif status == Status.EXPIRED:
            tally.counters["expired"] += 1
        else:
            tally.counters["cancelled"] += 1
            tally.cancelled_by_name[rec.name] += 1
        tally.recent.append(rec.id)
        tally.attempt_ended(rec, rec.node, rec.started_at, status.value, copy=rec.by_copy)
        if rec.started_at is not None and status in (Status.DONE, Status.FAILED):
            wait, run = max(0.0, rec.started_at - rec.submitted_at), max(0.0, now - rec.started_at)
            tally.finished(rec.name, wait, run)
            if self.metrics is not None:
                self.metrics.observe(rec.name, wait, run)
        heapq.heappush(self.expiry, (self.expires_at(rec), rec.id))
        self.outbox.emit(rec)

    def expires_at(self, rec: TaskRecord) -> float:
        """When a finished task is forgotten (RESULT_TTL_S, sooner once collected)."""
        finished = rec.finished_at or time.time()
        t = finished + self.settings.result_ttl_s
        if rec.collected_at is not None:
            t = min(t, rec.collected_at + self.settings.result_collected_ttl_s)
        return t

    def collected(self, rec: TaskRecord, now: float) -> None:
        """Its user has its result: it expires sooner (RESULT_COLLECTED_TTL_S)."""
        if rec.collected_at is None:
            rec.collected_at = now
            self.outbox.collect(rec)
            heapq.heappush(self.expiry, (self.expires_at(rec), rec.id))

    def expire_queued(self, now: float) -> None:
        """Tasks queued since QUEUED_TTL_S expire (as pyLoadBalancer's did after 48 h): out
        of their queue, status ``expired``, kept as finished ones are. (Only the oldest
        tasks of each queue are looked at: Scheduler.take_oldest_while.)"""
        ttl = self.settings.queued_ttl_s
        if not ttl or not self.scheduler.queued or now < self._next_queued_scan:
            return
        # (a scan looks at every queue's head: at most every thousandth of the TTL, so
        # that a million queues of one task each cost nothing most seconds; a task then
        # expires at most that late: ~3 min after 48 h)
        self._next_queued_scan = now + ttl / 1000
        tasks = self.tasks
        cutoff = now - ttl
        for task in self.scheduler.take_oldest_while(lambda t: tasks[t.id].submitted_at <= cutoff):
            rec = tasks[task.id]
            self.left_queue(rec)
            rec.error = ErrorInfo(
                type="Expired",
                message=f"queued for more than QUEUED_TTL_S ({ttl:g} s) without being run",
            )
            self.finalize(rec, Status.EXPIRED, now)

    def expire(self, now: float) -> list[TaskRecord]:
        """Expire queued tasks past QUEUED_TTL_S; forget finished tasks past their
        retention and return those."""
        self.expire_queued(now)
        gone = []
        while self.expiry and self.expiry[0][0] <= now:
            _, tid = heapq.heappop(self.expiry)
            rec = self.tasks.get(tid)
            if rec is None or not rec.status.final or self.expires_at(rec) > now:
                continue
            del self.tasks[tid]
            self.outbox.forget(rec)
            gone.append(rec)
        return gone

    # ------------------------------------------------------------------ placement

    def place(self) -> None:
        """One placement round: the scheduler's placements become assigned tasks."""
        scheduler, outbox = self.scheduler, self.outbox
        for p in scheduler.schedule(time.monotonic()):
            rec = self.tasks[p.task.id]
            info = self.nodes[p.node]
            rec.prefetched = scheduler.busy(p.node, p.group) > info.workers.get(p.group, 0)
            if rec.prefetched:
                self.tally.counters["prefetched"] += 1
            self.left_queue(rec)
            self.set_status(rec, Status.ASSIGNED)
            rec.attempt = rec.top_attempt = max(rec.attempt, rec.top_attempt) + 1
            rec.by_copy = False
            rec.node = p.node
            rec.group = p.group
            rec.progress = 0
            rec.assignment_json = assignment_json(rec)
            rec.assigned_at = 0.0  # set when its node's set goes out
            rec.missing_since = None
            info.assigned[rec.id] = None
            outbox.dirty_nodes.add(p.node)
            outbox.emit(rec, hold=True)

    def size_window(self, info: NodeInfo) -> None:
        """A node's pipelining window per slot: enough queued tasks to keep its slots busy
        through a refill at its recent short-task runtime (``runtime_s`` averages only
        tasks under PIPELINE_LONG_S; long tasks never take a window place:
        Scheduler._window_ok).

        A refill is the dispatch round trip (``rtt_s``) plus the balancer's own part of it,
        measured (``refill_s``: a report with results in, the set with new tasks out). The
        window once covered the round trip alone: the node then ran through its window
        while the balancer worked on the report before it, and the two took turns
        (measured: 1.27x the throughput with the refill counted, README).

        Bounds: PIPELINE_WINDOW_MAX per slot; WINDOW_TASKS_MAX over all the node's slots
        (the node's one daemon hands every task over and decodes the whole set at each
        change, however many slots it has), the node's whole set within SET_BYTES_MAX at
        its tasks' mean size (the set carries every held task's arguments), and its share
        (by slots) of WINDOW_CLUSTER_MAX; at least one per slot. The scheduler is also
        told the time the window covers: beyond one per slot, a task takes a window place
        only if a window of such tasks runs in about that time (Scheduler.set_window)."""
        s = self.settings
        rt = info.runtime_s
        if not s.pipeline_window_max or rt is None:
            window, covers = 0, None
        else:
            rtt = info.rtt_s if info.rtt_s is not None else DEFAULT_RTT_S
            covers = rtt + (info.refill_s or 0.0)
            slots = sum(info.workers.values()) or 1
            most = min(
                WINDOW_TASKS_MAX,
                SET_BYTES_MAX // max(1, info.task_bytes),
                WINDOW_CLUSTER_MAX * slots // max(slots, self.scheduler.slots),
            )
            window = window_per_slot(covers, rt, slots, most, s.pipeline_window_max)
        self.scheduler.set_window(info.name, window, covers)
        if window != info.window:
            info.window = window
            self.round_wanted = True

    def restore(self, rec: TaskRecord, node: str | None, now_mono: float) -> None:
        """Put a task a journal or an earlier balancer knew back in the table: queued
        ones in their queues (in their old order), placed ones on their node (``node``;
        the heartbeats then confirm them), finished ones until they expire."""
        self.tasks[rec.id] = rec
        self.seq = max(self.seq, rec.seq)
        status = rec.status
        if status == Status.QUEUED:
            self.enqueue(rec)
        elif status in PLACED and node is not None and rec.group is not None:
            rec.status = Status.QUEUED  # (so that set_status counts it as running)
            rec.node = sys.intern(node)
            self.set_status(rec, status)
            rec.assignment_json = assignment_json(rec)
            rec.assigned_at = now_mono
            rec.prefetched = True  # (its "started" says nothing about the round trip)
            node_info(self.nodes, rec.node).assigned[rec.id] = None
            self.scheduler.adopt(rec.id, rec.user, rec.node, rec.group, rec.requires)
        elif status.final:
            rec.progress = 100 if status == Status.DONE else 0
            heapq.heappush(self.expiry, (self.expires_at(rec), rec.id))
        else:  # placed without a node: cannot happen; run it again rather than lose it
            rec.status = Status.QUEUED
            self.enqueue(rec)

    # ------------------------------------------------------------------ states

    def waiting(self, rec: TaskRecord) -> str | None:
        """Why a queued task is not running yet (cached per queue until the next round)."""
        if rec.status != Status.QUEUED:
            return None
        key = rec.queue_key
        if key not in self.why_cache:
            self.why_cache[key] = self.scheduler.why_waiting(*key)
        return self.why_cache[key]

    def state_dict(self, rec: TaskRecord) -> dict[str, Any]:
        """The wire state of a task as the plain dict that encodes to the same JSON as
        :class:`TaskState` (the hot path: what the events carry)."""
        return task_state_dict(
            (
                rec.id,
                rec.user,
                rec.name,
                rec.status,
                rec.priority,
                rec.progress,
                rec.attempt,
                rec.node,
                rec.submitted_at,
                rec.started_at,
                rec.finished_at,
                rec.result,
                rec.error,
                self.waiting(rec),
                rec.ref,
            )
        )

    def state_of(self, rec: TaskRecord) -> TaskState:
        """The wire state of a task record (with the current waiting reason if queued)."""
        return TaskState.model_validate(self.state_dict(rec))
