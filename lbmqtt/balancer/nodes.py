"""The balancer's view of the nodes: status, heartbeats, reports, liveness.

A node announces itself with a retained status, proves it is alive with heartbeats (which
also list what it holds: :meth:`Fleet.reconcile` compares that with what it was given) and
sends what its workers did in reports. A node that goes offline or silent loses its tasks
to the queue. At start-up the retained assignment sets an earlier balancer left are
adopted (:meth:`Fleet.adopt`). Silence is judged against probes the balancer sends itself
through the broker (:meth:`Fleet.probe`): a flood ahead of the heartbeats is not silence.

Handlers act on the node and task tables, the scheduler and the outbox; none publishes.
"""

from __future__ import annotations

import logging
import math
import time

from ..config import Settings
from ..errors import DecodeError
from ..protocol import (
    AssignmentSet,
    ErrorInfo,
    Heartbeat,
    NodeReport,
    NodeStatus,
    Result,
    Status,
    Topics,
    decode,
    encode_json,
    is_valid_name,
)
from ..protocol.assign import encode_probe, parse_probe
from ..scheduler import NO_TAGS, Group, NodeCaps, Scheduler, requires_of
from .journal import JournalWriter
from .outbox import Outbox
from .records import PLACED, CopyAttempt, NodeInfo, TaskRecord, copy_on, node_info
from .stats import RECENTLY_LOST_S, Tally
from .tasks import EWMA_ALPHA, TaskTable, assignment_json

log = logging.getLogger(__name__)

HEALTH_CHECK_S = 0.5
PROBE_PATIENCE_S = 30.0  # a flood longer than this may still make nodes look silent
PROBES_KEPT = 64  # probes on their way at most (one per HEALTH_CHECK_S)
ASSIGN_GRACE_S = 3.0
MAX_RTT_SAMPLE_S = 0.5  # a longer "round trip" was a wait (a restart, a busy node)


class Fleet:
    """The handlers of the nodes' messages, and the liveness of the nodes.

    Args:
        settings: NODE_TIMEOUT_S, PIPELINE_LONG_S.
        nodes: the node table (shared with the task table).
        table: the tasks.
        scheduler: the nodes' capabilities and slots.
        outbox: node sets and task states to send.
        tally: counts.
        journal: its error state (no reconciling while sets cannot go out).
        instance: this balancer's instance (its probes, its own retained sets).
        topics: the topic names (for messages).
    """

    def __init__(
        self,
        settings: Settings,
        nodes: dict[str, NodeInfo],
        *,
        table: TaskTable,
        scheduler: Scheduler,
        outbox: Outbox,
        tally: Tally,
        journal: JournalWriter,
        instance: str,
        topics: Topics,
    ):
        self.settings = settings
        self.nodes = nodes
        self.table = table
        self.scheduler = scheduler
        self.outbox = outbox
        self.tally = tally
        self.journal = journal
        self.instance = instance
        self.topics = topics
        # Heartbeats are judged up to the send time of the newest probe that came back
        # (see probe): seq -> monotonic send time of the probes still on their way
        self.probes: dict[int, float] = {}
        self.probe_seq = 0
        self.heard_until = 0.0
        self.probe_warned = False
        self.connected_at = 0.0
        self.grace_until = 0.0

    def on_status(self, name: str, payload: bytes) -> None:
        """A node's retained status: online (maybe draining, or restarted) or offline."""
        if not payload:
            return  # a cleared retained status
        st = decode(NodeStatus, payload)
        if st.node != name:
            raise DecodeError(
                f"status of node {st.node!r} published on node {name!r}'s topic", payload
            )
        info = node_info(self.nodes, name)
        if not st.online:
            if info.online and st.instance == info.instance:
                self.node_lost(info, "went offline")
            return
        if info.online and info.instance != st.instance:
            self.node_lost(info, "restarted")
        self.node_up(info, st)
        if st.draining:
            self.take_back(info, st)

    def adopt(self, name: str, payload: bytes) -> None:
        """Take over the tasks an earlier balancer placed on a node (its retained set).

        Without this a restarted balancer would publish an empty set and every node would
        kill its running tasks. Queued tasks of the earlier balancer are not recoverable
        this way (that is the journal's job); placed ones are.
        """
        aset = decode(AssignmentSet, payload)
        if aset.balancer == self.instance or aset.node != name:
            return
        info = node_info(self.nodes, name)
        now = time.monotonic()
        adopted = 0
        for a in aset.tasks:
            if a.id in self.table.tasks or not is_valid_name(a.user):
                continue
            self.table.seq += 1
            rec = TaskRecord(
                id=a.id,
                user=a.user,
                name=a.name,
                args_json=encode_json(a.args),
                priority=a.priority,
                seq=self.table.seq,
                submitted_at=time.time(),
                timeout_s=a.timeout_s,
                status=Status.ASSIGNED,
                attempt=a.attempt,
                node=name,
                group=a.group,
                assigned_at=now,
                requires=requires_of(a.requires),
                tags=frozenset(a.tags) if a.tags else NO_TAGS,
                cost=a.cost,
                speculate=a.speculate,
                prefetched=True,
            )
            rec.assignment_json = assignment_json(rec)
            self.table.tasks[a.id] = rec
            self.tally.running_by_name[a.name] += 1
            info.assigned[a.id] = None
            self.scheduler.adopt(a.id, a.user, name, a.group, rec.requires)
            self.outbox.write(rec)
            adopted += 1
        if adopted:
            self.tally.counters["adopted"] += adopted
            log.info(
                "adopted %d task(s) that balancer %s had placed on node %s",
                adopted,
                aset.balancer,
                name,
            )

    def node_up(self, info: NodeInfo, st: NodeStatus) -> None:
        """The node is online with ``st``: the scheduler gets its slots and capabilities."""
        if not info.online:
            log.info(
                "node %s online: %d slots, speed %g, tasks %s",
                info.name,
                sum(g.workers for g in st.groups),
                st.speed,
                ", ".join(st.tasks),
            )
        info.online = True
        info.instance = st.instance
        info.status = st
        info.workers = {g.index: g.workers for g in st.groups}
        info.last_seen = time.monotonic()
        info.offline_since = None
        self.scheduler.set_node(
            NodeCaps(
                # a draining node offers nothing new: it only finishes what it runs
                name=info.name,
                tasks=frozenset() if st.draining else frozenset(st.tasks),
                speed=st.speed,
                groups=tuple(Group(g.index, g.workers, g.min_p, g.max_p) for g in st.groups),
                resources=dict(st.resources),
                tags=frozenset(st.tags),
                cores=st.cores,
            )
        )
        self.table.size_window(info)  # (its slots may have changed: the window is per slot)
        self.table.why_cache.clear()
        if not info.fresh:
            # (a node first seen in the retained burst at start-up gets its set a moment
            # later, once the sets an earlier balancer left have been read: _health_loop)
            self.outbox.dirty_nodes.add(info.name)
        self.table.round_wanted = True

    def take_back(self, info: NodeInfo, st: NodeStatus) -> None:
        """A draining node keeps its running tasks; those it lists as ``pending`` (held, and
        never to be started) go back to the head of their queues (in submit order). Only
        the node knows which these are: our ASSIGNED may be stale (a lost "started")."""
        n = 0
        for ref in st.pending:
            rec = self.table.tasks.get(ref.id)
            if (
                rec is None
                or ref.id not in info.assigned
                or rec.attempt != ref.attempt
                or rec.status not in PLACED
            ):
                continue
            self.table.unplace(rec)
            # it never ran, and its node will not run it now: the attempt does not count
            # (and its number may be given again)
            rec.attempt -= 1
            rec.top_attempt = rec.attempt
            self.table.requeue(rec)
            n += 1
        if n:
            self.tally.counters["taken_back"] += n
            log.info(
                "node %s is draining: %d task(s) it had not started go back to the queue",
                info.name,
                n,
            )

    def on_heartbeat(self, name: str, payload: bytes) -> None:
        """A heartbeat: the node is alive; its load, and what it holds (reconciled)."""
        hb = decode(Heartbeat, payload)
        info = self.nodes.get(name)
        if info is None or info.status is None or info.instance != hb.instance:
            return
        if not info.online:
            # declared dead while it was only slow (or a false "offline"): it is back. Its
            # tasks were requeued and its set emptied; from now on it gets work again.
            log.warning("node %s is alive after all: back online", name)
            self.node_up(info, info.status)
        info.last_seen = time.monotonic()
        info.load = hb.load
        if hb.load:
            self.scheduler.set_load(name, hb.load[0])
        self.reconcile(info, hb)

    def reconcile(self, info: NodeInfo, hb: Heartbeat) -> None:
        """Compare what the node says it holds with what it was given."""
        if self.journal.error:
            return  # sets are not going out: a missing task proves nothing now
        now = time.monotonic()
        running = {(r.id, r.attempt) for r in hb.running}
        held = running | {(r.id, r.attempt) for r in hb.held}
        grace = ASSIGN_GRACE_S + 2 * (info.status.heartbeat_s if info.status else 1.0)
        for tid in list(info.assigned):
            rec = self.table.tasks[tid]
            c = copy_on(rec, info.name)
            if c is not None:
                self._reconcile_copy(info, rec, c, running=running, held=held, grace=grace, now=now)
                continue
            key = (tid, rec.attempt)
            if key in running and rec.status == Status.ASSIGNED:
                self.table.set_status(rec, Status.RUNNING)  # its "started" report was lost
                rec.started_at = rec.started_at or time.time()
                self.scheduler.started(tid, now)
                self.outbox.emit(rec)
            if key in held:
                rec.missing_since = None
                continue
            if not rec.assigned_at or now - rec.assigned_at < grace:
                continue  # the set may still be on its way (or not even sent)
            if rec.missing_since is None:
                rec.missing_since = now
                self.outbox.dirty_nodes.add(info.name)  # send the set again
            elif now - rec.missing_since > grace:
                log.warning(
                    "node %s never took task %s (attempt %d): reassigning it",
                    info.name,
                    tid,
                    rec.attempt,
                )
                self.table.unplace(rec)
                self.table.retry_or_fail(
                    rec,
                    ErrorInfo(
                        type="AssignmentLost", message=f"node {info.name} did not take the task"
                    ),
                    time.time(),
                )

    def _reconcile_copy(
        self,
        info: NodeInfo,
        rec: TaskRecord,
        c: CopyAttempt,
        *,
        running: set[tuple[str, int]],
        held: set[tuple[str, int]],
        grace: float,
        now: float,
    ) -> None:
        """A speculative copy the node should hold: confirmed, sent again, or dropped (a
        copy the node never took is not worth a retry: the original runs on)."""
        key = (rec.id, c.attempt)
        if key in running and not c.started:
            c.started = True
            c.started_at = time.time()
        if key in held:
            c.missing_since = None
            return
        if not c.assigned_at or now - c.assigned_at < grace:
            return
        if c.missing_since is None:
            c.missing_since = now
            self.outbox.dirty_nodes.add(info.name)
        elif now - c.missing_since > grace:
            log.warning("node %s never took the copy of task %s: dropped", info.name, rec.id)
            self.table.drop_copy(rec, ended="lost")

    def node_lost(self, info: NodeInfo, reason: str) -> None:
        """The node is gone (offline, silent, restarted): its tasks go back or fail."""
        log.warning(
            "node %s %s: %d of its tasks go back to the queue",
            info.name,
            reason,
            len(info.assigned),
        )
        info.online = False
        info.offline_since = time.monotonic()
        info.offline_reason = reason
        self.scheduler.remove_node(info.name)
        self.table.why_cache.clear()
        now = time.time()
        for tid in list(info.assigned):
            rec = self.table.tasks.get(tid)
            if rec is None:
                continue
            c = rec.copy
            if c is not None:
                # (the scheduler has already dropped the attempt it placed here: remove_node)
                if c.node == info.name:  # its copy was here: the original runs on
                    rec.copy = None
                    self.tally.counters["copies_wasted"] += 1
                    self.tally.attempt_ended(rec, c.node, c.started_at, "lost", copy=True)
                else:  # the original was here: its copy carries on, nothing is lost
                    self.table.promote_copy(rec, "lost")
                    self.tally.counters["copies_promoted"] += 1
                    log.info("task %s carries on as its copy on node %s", tid, rec.node)
                continue
            self.table.unplace(rec, release=False)
            if rec.status == Status.ASSIGNED and rec.prefetched:
                # held in its window, never reported started: it was most likely waiting,
                # so this attempt does not count against TASK_MAX_ATTEMPTS. (Its number
                # stays used: a node that is only cut off may still run it, and two runs
                # must never share an attempt number.)
                rec.waived += 1
            self.table.retry_or_fail(
                rec,
                ErrorInfo(
                    type="NodeLost", message=f"node {info.name} {reason} while it held the task"
                ),
                now,
            )
        info.assigned.clear()
        self.outbox.dirty_nodes.add(info.name)
        self.table.round_wanted = True

    def on_reports(self, name: str, payload: bytes) -> None:
        """A node's report: tasks started, their progress, their results."""
        rep = decode(NodeReport, payload)
        info = self.nodes.get(name)
        if info is None or rep.node != name or (info.instance and info.instance != rep.instance):
            return  # (an earlier run of the node: what it had is accounted for already)
        if info.online and info.instance == rep.instance:
            info.last_seen = time.monotonic()
        now = time.time()
        mono = time.monotonic()
        if rep.results and not info.freed_at:
            info.freed_at = mono  # (the refill it asks for: see Outbox.flush_sets)
        for s in rep.started:
            rec = self.current(info, s.id, s.attempt)
            if rec is None:
                c = self.copy_here(info, s.id, s.attempt)
                if c is not None and not c.started:
                    c.started = True
                    c.started_at = now
                continue
            if rec.status == Status.ASSIGNED:
                self.table.set_status(rec, Status.RUNNING)
                rec.started_at = now
                self.scheduler.started(rec.id, mono)
                self._rtt_sample(info, rec, mono)
                self.outbox.emit(rec, hold=True)
        for p in rep.progress:
            rec = self.current(info, p.id, p.attempt)
            if rec is not None and rec.status in PLACED and p.progress != rec.progress:
                rec.progress = p.progress
                self.scheduler.progress(rec.id, p.progress / 100, mono)
                self.outbox.emit(rec, durable=False, hold=True)
        timed: set[str] = set()  # (nodes whose short-task runtime moved: sized once, below)
        for r in rep.results:
            rec = self.current(info, r.id, r.attempt)
            if rec is None and (c := self.copy_here(info, r.id, r.attempt)) is not None:
                rec = self.table.tasks[r.id]
                if not c.started:  # (the node left its notice out: its result says it ran)
                    c.started = True
                    began = _began(rec, r, now)
                    c.started_at = now if began is None else began
                if r.status != "done":
                    # a copy that failed or was lost: the original runs on (if the task
                    # itself fails, the original says so)
                    self.table.drop_copy(rec, ended="lost" if r.status == "lost" else "failed")
                    continue
                self.table.promote_copy(rec, "withdrawn")  # the first result: the copy's
                self.tally.counters["copies_won"] += 1
            if rec is None:
                # stale or already recorded: the node drops it once it sees a set without it
                self.outbox.dirty_nodes.add(name)
                continue
            if rec.started_at is None and rec.status == Status.ASSIGNED:
                # (a short task's notice is left out of the report with its result)
                self._rtt_sample(info, rec, mono)
            if (moved := self.apply_result(rec, r, now)) is not None:
                timed.add(moved)
        for n in timed:
            if (timed_info := self.nodes.get(n)) is not None:
                self.table.size_window(timed_info)  # (once a report, not once a result)

    @staticmethod
    def _rtt_sample(info: NodeInfo, rec: TaskRecord, mono: float) -> None:
        """The dispatch round trip, from a task placed on an idle slot (not held in the
        node's window) to word that it started: an EWMA sample (TaskTable.size_window)."""
        sample = mono - rec.assigned_at
        if not rec.prefetched and rec.assigned_at and sample < MAX_RTT_SAMPLE_S:
            info.rtt_s = (
                sample if info.rtt_s is None else (info.rtt_s + EWMA_ALPHA * (sample - info.rtt_s))
            )

    def copy_here(self, info: NodeInfo, task_id: str, attempt: int) -> CopyAttempt | None:
        """The speculative copy if this attempt is the copy placed on this node, else None."""
        rec = self.table.tasks.get(task_id)
        if rec is None or rec.status not in PLACED or task_id not in info.assigned:
            return None
        c = rec.copy
        if c is None or c.node != info.name or c.attempt != attempt:
            return None
        return c

    def current(self, info: NodeInfo, task_id: str, attempt: int) -> TaskRecord | None:
        """The task record if this attempt is the one placed on this node, else None."""
        rec = self.table.tasks.get(task_id)
        if (
            rec is None
            or rec.status not in PLACED
            or rec.node != info.name
            or rec.attempt != attempt
            or task_id not in info.assigned
        ):
            return None
        return rec

    def apply_result(self, rec: TaskRecord, r: Result, now: float) -> str | None:
        """A task's result from its node: done, failed, or lost (then retried). Returns the
        node whose short-task runtime it moved (its window is then sized again), if any."""
        if rec.started_at is None:
            rec.started_at = now
        if r.status == "lost" and rec.copy is not None:
            # the original's worker was lost: its copy carries on, no retry
            self.scheduler.promote_copy(rec.id)
            self.table.promote_copy(rec, "lost")
            self.tally.counters["copies_promoted"] += 1
            return None
        moved = None
        if r.status != "lost" and (began := _began(rec, r, now)) is not None:
            # a short task's start is told by its result (the node leaves its "started"
            # out of that report): the run began runtime_s ago by the node's measure, not now
            rec.started_at = max(rec.submitted_at, min(rec.started_at, began))
        self.table.unplace(rec)
        if r.status == "done":
            rec.result = r.result
            if rec.node is not None:
                self.scheduler.observe(rec.name, rec.node, r.runtime_s, rec.cost)
                info = self.nodes.get(rec.node)
                rt = max(0.0, r.runtime_s)
                if info is not None and rt < self.settings.pipeline_long_s:
                    # (long tasks never take a window place: they do not size it either)
                    info.runtime_s = (
                        rt
                        if info.runtime_s is None
                        else (info.runtime_s + EWMA_ALPHA * (rt - info.runtime_s))
                    )
                    moved = info.name
            rec.progress = 100
            self.table.finalize(rec, Status.DONE, now)
        elif r.status == "lost":
            self.table.retry_or_fail(
                rec, r.error or ErrorInfo(type="WorkerLost", message="worker process lost"), now
            )
        else:  # failed, timeout, cancelled on the node
            rec.error = r.error or ErrorInfo(type="Failed", message=f"task {r.status}")
            self.table.finalize(rec, Status.FAILED, now)
        return moved

    def probe(self) -> bytes:
        """A message to ourselves, through the broker, behind everything sent to us so far.

        A node is silent when its heartbeats stop *arriving*, not when we have not read
        them yet: a flood on any topic (a client's burst, a fuzzer) can put seconds of
        messages ahead of the heartbeats in the broker's queue to us and in our own. So a
        heartbeat deadline counts up to the send time of the newest probe that has come
        back (``heard_until``): what a node sent before it has been read by then.

        Returns the probe's payload, for ``balancer/probe``."""
        self.probe_seq += 1
        self.probes[self.probe_seq] = time.monotonic()
        if len(self.probes) > PROBES_KEPT:  # lost ones (QoS 0, a reconnect)
            del self.probes[min(self.probes)]
        return encode_probe(self.instance, self.probe_seq)

    def deadline(self, info: NodeInfo) -> float:
        """How long a node may stay silent before it is lost."""
        hb_s = info.status.heartbeat_s if info.status else 1.0
        return max(self.settings.node_timeout_s, 3 * hb_s)

    def wants_probe(self, now: float) -> bool:
        """Whether to send a probe now: only while a node's heartbeats are late (silent for
        over half its deadline), for only then must its silence be told from a backlog of
        ours. Probes go every HEALTH_CHECK_S from then on, so by the deadline the newest
        one back is recent. With every node heard in time none is sent: a balancer at rest
        and its broker wake less (each probe crosses the broker twice)."""
        return any(
            (info.online or info.assigned) and now - info.last_seen > self.deadline(info) / 2
            for info in self.nodes.values()
        )

    def on_probe(self, payload: bytes) -> None:
        """One of our probes came back: heartbeats sent before it are all read."""
        probe = parse_probe(payload)
        if probe is None or probe[0] != self.instance:
            return  # another balancer's (it is about to step down: Balancer._check_alone)
        n = probe[1]
        sent = self.probes.get(n)
        if sent is None:
            return
        self.heard_until = max(self.heard_until, sent)
        self.probe_warned = False
        for k in [k for k in self.probes if k <= n]:
            del self.probes[k]  # (earlier ones were lost or overtaken)

    def connected(self, now: float) -> None:
        """The balancer (re)connected at ``now`` (monotonic): nodes could not reach it
        while it was away, so give them time to speak again."""
        self.connected_at = now
        self.grace_until = now + self.settings.node_timeout_s
        self.heard_until = max(self.heard_until, now)  # (probes: from now)

    def check_health(self, now: float) -> None:
        """Heartbeat deadlines; publish the sets of nodes first seen at start-up (call it
        only while connected)."""
        if now - self.connected_at > HEALTH_CHECK_S:  # the retained burst is in
            for info in self.nodes.values():
                if info.fresh:
                    info.fresh = False
                    self.outbox.dirty_nodes.add(info.name)
        if now < self.grace_until:
            return  # after we were cut off, silence proves nothing about the nodes yet
        # heartbeats count up to the newest probe back (probe), but not forever: if
        # no probe comes back at all (a broker's ACL that refuses balancer/probe), silence
        # is judged PROBE_PATIENCE_S late rather than never
        horizon = max(min(now, self.heard_until), now - PROBE_PATIENCE_S)
        for info in list(self.nodes.values()):
            if (
                not info.online
                and not info.assigned
                and info.offline_since is not None
                and now - info.offline_since > RECENTLY_LOST_S
            ):
                del self.nodes[info.name]  # long gone: out of the stats and warnings
                continue
            deadline = self.deadline(info)
            if horizon - info.last_seen <= deadline:
                continue
            if horizon > self.heard_until and not self.probe_warned:
                self.probe_warned = True
                log.warning(
                    "no probe of ours came back on %s for %g s: node silence is judged "
                    "%g s late (may this balancer subscribe to it?)",
                    self.topics.balancer_probe,
                    PROBE_PATIENCE_S,
                    PROBE_PATIENCE_S,
                )
            if info.online:
                self.node_lost(info, f"went silent (no heartbeat for {deadline:g} s)")
            elif info.assigned:  # adopted from an earlier balancer, never came back
                self.node_lost(info, "did not come back")


def _began(rec: TaskRecord, r: Result, now: float) -> float | None:
    """When the attempt that ``r`` ends began, by the runtime the node measured (not before
    the task's submit), or None if ``r`` carries no runtime."""
    rt = r.runtime_s
    if not math.isfinite(rt) or rt <= 0:
        return None
    return max(rec.submitted_at, now - rt)
