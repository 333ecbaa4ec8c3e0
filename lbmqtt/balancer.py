"""The balancer: MQTT in -> scheduler -> MQTT out.

It owns every task's record and the view of the nodes; the decisions come from
:mod:`lbmqtt.scheduler`. Work is done in *ticks*: every inbound message only updates
state and asks for a tick; the tick (run once per event-loop iteration, after all the
messages already read) places tasks on free slots, publishes one assignment set per node
whose set changed and one batch of task states per user. So a burst of submits or
results costs a few outbound messages, not a few per task.

Identity comes from the topic: the user of ``users/{u}/submit`` owns the tasks; cancel,
ack and query only touch that user's tasks. Nothing a client sends can stop the balancer:
every inbound message is validated, a bad one is counted, logged at a bounded rate, and
answered on the sender's ``errors`` topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import json
import logging
import math
import os
import signal
import socket
import sqlite3
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .config import Settings, coerce_settings
from .discovery import resolve as resolve_broker
from .errors import ConfigError, DecodeError, ErrorCode
from .health import online_status
from .journal import Journal, JournalRow, default_path
from .metrics import Metrics
from .mqtt import MqttTransport, Will, client_id, connection_options
from .protocol import (
    AssignmentSet,
    BalancerHistory,
    BalancerStats,
    BalancerStatus,
    BrokerStatus,
    DashboardStatus,
    ErrorInfo,
    ErrorItem,
    Errors,
    Heartbeat,
    HistorySample,
    IdList,
    NameSummary,
    NodeReport,
    NodeStatus,
    NodeSummary,
    Result,
    Status,
    TaskRow,
    TaskSpec,
    TaskState,
    Topics,
    UserSummary,
    band_label,
    band_order,
    decode,
    decode_submit,
    encode_json,
    encode_model_json,
    is_valid_name,
    task_state_dict,
)
from .ratelog import LogLimiter
from .scheduler import NO_TAGS, Group, NodeCaps, QueuedTask, Requires, Scheduler, requires_of

_QueueKey = tuple[str, int, Requires, frozenset[str]]

log = logging.getLogger(__name__)

PLACED = frozenset({Status.ASSIGNED, Status.RUNNING})
HEALTH_CHECK_S = 0.5
PROBE_PATIENCE_S = 30.0  # a flood longer than this may still make nodes look silent
PROBES_KEPT = 64  # probes on their way at most (one per HEALTH_CHECK_S)
TIMES_KEPT = 1000  # per task name, for the mean and percentiles of wait and run times
HISTORY_KEPT = 720  # stats samples a new dashboard is sent: 6 minutes at 2 Hz
RECENT_KEPT = 50  # finished tasks in the stats' task table
RUNNING_ROWS = 100  # running tasks in the stats' task table
REFUSALS_WARN_S = 60.0  # refusals within this long are a warning
ASSIGN_GRACE_S = 3.0
EXPIRY_CHECK_S = 1.0
BAD_LOG_INTERVAL_S = 10.0
UNKNOWN_EACH = 20
"""Unknown ids in one cancel or query answered one by one; beyond, with one error."""
RECENTLY_LOST_S = 300.0
EWMA_ALPHA = 0.2
DEFAULT_RTT_S = 0.005  # dispatch round trip assumed before one is measured
MAX_RTT_SAMPLE_S = 0.5  # a longer "round trip" was a wait (a restart, a busy node)
GC_THRESHOLDS = (50_000, 20, 100)
"""For the balancer's process (:func:`tune_gc`): CPython's default (700, 10, 10)."""


def tune_gc() -> None:
    """Collect cyclic garbage rarely: what the balancer keeps is a large, long-lived heap
    of task records (1M queued tasks: ~600 MB) with next to no cycles, and the default
    thresholds traverse all of it again and again. With them, 300,000 tasks accepted spent
    1.5 s in the collector (1.3 s in full collections), a fifth of the time; with these,
    0.15 s and no full collection (``bench/run.py scale``, NOTES.md). Called by
    ``lbmqtt balancer``, not by :class:`Balancer`: a program that embeds one keeps its own
    collector settings."""
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass(slots=True)
class TaskRecord:
    """Everything the balancer keeps about one task."""

    id: str
    user: str
    name: str
    args_json: bytes
    priority: int
    seq: int
    submitted_at: float
    notify: str = "retained"
    timeout_s: float | None = None
    ref: str | None = None
    status: Status = Status.QUEUED
    attempt: int = 0
    node: str | None = None
    group: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    progress: int = 0
    result: Any = None
    error: ErrorInfo | None = None
    collected_at: float | None = None
    assignment_json: bytes = b""
    assigned_at: float = 0.0
    """When its node's set carrying this attempt was first published (0: not yet)."""
    missing_since: float | None = None
    requires: Requires = ()
    tags: frozenset[str] = NO_TAGS
    prefetched: bool = False
    """Placed in its node's pipelining window (no idle slot was waiting for it)."""
    waived: int = 0
    """Attempts that do not count against TASK_MAX_ATTEMPTS (lost before they started)."""
    journaled: bool = False
    """Its row is in the journal (a change then updates only the columns that change)."""

    @property
    def queue_key(self) -> _QueueKey:
        return (self.name, self.priority, self.requires, self.tags)

    def same_submit(self, spec: TaskSpec, args_json: bytes) -> bool:
        """True if ``spec`` is a resend of this task's submit (idempotent)."""
        return (
            spec.name == self.name
            and spec.priority == self.priority
            and args_json == self.args_json
            and spec.timeout_s == self.timeout_s
            and requires_of(spec.requires) == self.requires
            and (frozenset(spec.tags) if spec.tags else NO_TAGS) == self.tags
        )


@dataclass(slots=True)
class NodeInfo:
    """The balancer's view of one node."""

    name: str
    instance: str = ""
    online: bool = False
    status: NodeStatus | None = None
    last_seen: float = 0.0
    load: list[float] = field(default_factory=list)
    assigned: dict[str, None] = field(default_factory=dict)
    seq: int = 0
    offline_since: float | None = None
    offline_reason: str = ""
    fresh: bool = True
    """Seen for the first time: its set is (re)published by the next health check."""
    workers: dict[int, int] = field(default_factory=dict)
    runtime_s: float | None = None
    """Moving average of its short tasks' runtimes (sizes its pipelining window)."""
    rtt_s: float | None = None
    """Moving average of the dispatch round trip: set published -> "started" received,
    for tasks that went to an idle slot."""
    window: int = 0


class Balancer:
    """The balancer as an async context manager (``lbmqtt balancer`` runs one).

    Args:
        parameters: settings, a parameters.json path, or None.
    """

    def __init__(self, parameters: Settings | str | os.PathLike[str] | None = None):
        self.settings = coerce_settings(parameters)
        self.topics = Topics(self.settings.topic_prefix)
        self.instance = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.scheduler = Scheduler(
            max_running_per_user=self.settings.lb_running_maxperuser,
            window_long_s=self.settings.pipeline_long_s,
        )
        self.tasks: dict[str, TaskRecord] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.ready = asyncio.Event()
        """Set once connected and subscribed."""
        self._transport: MqttTransport | None = None
        self._seq = 0
        self._tick_soon = False
        self._round_wanted = False
        self._dirty_nodes: set[str] = set()
        self._states: dict[str, dict[str, TaskRecord]] = {}
        self._errors: dict[str, list[ErrorItem]] = {}
        self._expiry: list[tuple[float, str]] = []
        self._why_cache: dict[_QueueKey, str | None] = {}
        self._bad_log = LogLimiter(log, BAD_LOG_INTERVAL_S)  # (bounded: names are not)
        self._health_grace_until = 0.0
        # Heartbeats are judged up to the send time of the newest probe that came back
        # (see _send_probe): seq -> monotonic send time of the probes still on their way
        self._probes: dict[int, float] = {}
        self._probe_seq = 0
        self._heard_until = 0.0
        self._probe_warned = False
        self._connected_at = 0.0
        self._connects = 0
        self._bg: list[asyncio.Task[None]] = []
        self.queued_by = Counter[_QueueKey]()  # (name, priority, requires, tags) -> queued
        self._times: dict[str, deque[tuple[float, float]]] = {}  # name -> (wait, run)
        self.running_by_name = Counter[str]()
        self.done_by_name = Counter[str]()
        self.failed_by_name = Counter[str]()
        self.cancelled_by_name = Counter[str]()
        self.counters = Counter[str]()
        self._refused_by_code = Counter[str]()
        self._broker_refused: dict[str, int] = {}  # (the embedded broker's, as last heard)
        self._buckets: dict[str, list[float]] = {}  # user -> [tokens, at] (SUBMIT_RATE)
        self.journal: Journal | None = None
        self._journal_dirty: dict[str, TaskRecord] = {}
        self._journal_gone: set[int] = set()  # seqs of expired tasks
        self._journal_error = ""
        self._history: deque[HistorySample] = deque(maxlen=HISTORY_KEPT)
        self._recent: deque[str] = deque(maxlen=RECENT_KEPT)  # ids of finished tasks
        self._last_refusal: tuple[float, str] | None = None  # (time, why)
        self._last_stats: BalancerStats | None = None
        self._history_sent_at = -1e9
        self._history_timer: asyncio.TimerHandle | None = None
        self.metrics: Metrics | None = None
        self.metrics_url = ""
        """Where the Prometheus endpoint listens ("" when METRICS_PORT is null)."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, subscribe and start the housekeeping tasks.

        Raises:
            ConfigError: another balancer is online on the same broker and prefix (two
                would overwrite each other's assignment sets).
        """
        configured = self.settings
        self.settings = await resolve_broker(self.settings)
        s, t = self.settings, self.topics
        await self._check_alone()
        # named by the configured address ("auto" stays "auto"): a new address from DHCP
        # must not mean a new, empty journal
        self._open_journal(configured)
        offline = BalancerStatus(online=False, instance=self.instance).encode()
        self._transport = MqttTransport(
            **connection_options(s),
            client_id=client_id("balancer"),
            on_message=self._on_message,
            # the retained sets an earlier balancer left come first: see _adopt
            subscriptions=[
                (t.all_assign, 1),
                (t.all_submits, 1),
                (t.all_cancels, 1),
                (t.all_acks, 1),
                (t.all_queries, 1),
                (t.all_node_status, 1),
                (t.all_reports, 1),
                (t.all_heartbeats, 0),
                (t.dashboard_status, 0),
                (t.broker_status, 0),
                (t.balancer_probe, 0),
            ],
            on_connect=self._on_connect,
            will=Will(t.balancer_status, offline),
        )
        self._start_metrics()
        await self._transport.start()
        self._bg = [
            asyncio.create_task(self._health_loop(), name="balancer-health"),
            asyncio.create_task(self._stats_loop(), name="balancer-stats"),
            asyncio.create_task(self._expiry_loop(), name="balancer-expiry"),
            asyncio.create_task(self._ready_watch(), name="balancer-ready"),
        ]

    def _start_metrics(self) -> None:
        s = self.settings
        if s.metrics_port is None:
            return
        self.metrics = Metrics(lambda: self._last_stats)
        try:
            port = self.metrics.serve(s.metrics_ip, s.metrics_port)
        except OSError as exc:  # the balancer matters more than its metrics: go on without
            log.error(
                "no metrics endpoint: cannot listen on %s:%s (%s); set METRICS_PORT "
                "to a free port, 0 for any, or null for none",
                s.metrics_ip,
                s.metrics_port,
                exc.strerror or exc,
            )
            self.metrics = None
            return
        host = f"[{s.metrics_ip}]" if ":" in s.metrics_ip else s.metrics_ip
        self.metrics_url = f"http://{host}:{port}/metrics"
        log.info("metrics: %s", self.metrics_url)

    def _open_journal(self, configured: Settings | None = None) -> None:
        s = configured or self.settings
        where = s.journal_path.strip()
        if where.lower() in ("none", ""):
            log.warning("JOURNAL_PATH is none: queued tasks do not survive a balancer restart")
            return
        path = (
            default_path(s.broker_host, s.broker_port, s.topic_prefix)
            if where.lower() == "auto"
            else Path(where).expanduser()
        )
        try:
            self.journal = Journal(path, sync=s.journal_sync)
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            raise ConfigError(f"cannot open the journal {path}: {exc} (JOURNAL_PATH)") from exc
        t0 = time.perf_counter()
        n = self._recover(self.journal.load())
        if n:
            log.info(
                "journal %s: resumed %d task(s) in %.2f s (%d queued, %d placed)",
                path,
                n,
                time.perf_counter() - t0,
                self.scheduler.queued,
                sum(self.running_by_name.values()),
            )
        else:
            log.info("journal %s", path)

    def _recover(self, rows: Iterable[JournalRow]) -> int:
        """Rebuild the task records a killed or stopped balancer journaled.

        Queued tasks go back in their queues in their old order; placed ones are placed
        again on their nodes (the heartbeats then confirm them, or the node is found dead
        or the task missing, and it is requeued); finished ones answer queries until they
        expire.
        """
        now_mono = time.monotonic()
        n = 0
        for row in rows:
            status = Status(row.status)
            rec = TaskRecord(
                id=row.id,
                user=sys.intern(row.user),
                name=sys.intern(row.name),
                args_json=bytes(row.args),
                priority=row.priority,
                seq=row.seq,
                submitted_at=row.submitted_at,
                notify=row.notify,
                timeout_s=row.timeout_s,
                ref=row.ref,
                attempt=row.attempt,
                waived=row.waived,
                started_at=row.started_at,
                finished_at=row.finished_at,
                collected_at=row.collected_at,
                requires=requires_of(row.requires_dict() or None),
                tags=frozenset(row.tags_list()) or NO_TAGS,
                journaled=True,
            )
            self._seq = max(self._seq, row.seq)
            self.tasks[rec.id] = rec
            n += 1
            if status == Status.QUEUED:
                self._enqueue(rec)
            elif status in PLACED and row.node is not None and row.grp is not None:
                rec.node, rec.group = sys.intern(row.node), row.grp
                self._set_status(rec, status)
                rec.assignment_json = self._assignment_json(rec)
                rec.assigned_at = now_mono
                rec.prefetched = True  # (its "started" says nothing about the round trip)
                self._node_info(rec.node).assigned[rec.id] = None
                self.scheduler.adopt(rec.id, rec.user, rec.node, rec.group, rec.requires)
            elif status.final:
                rec.status = status
                rec.node = row.node
                if row.result is not None:
                    rec.result = json.loads(row.result)
                if row.error is not None:
                    rec.error = ErrorInfo.model_validate_json(row.error)
                rec.progress = 100 if status == Status.DONE else 0
                heapq.heappush(self._expiry, (self._expires_at(rec), rec.id))
            else:  # placed without a node: cannot happen; run it again rather than lose it
                self._enqueue(rec)
        self.counters["recovered"] += n
        return n

    @staticmethod
    def _journal_row(rec: TaskRecord) -> tuple[Any, ...]:
        return (
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
            json.dumps(dict(rec.requires)) if rec.requires else None,
            json.dumps(sorted(rec.tags)) if rec.tags else None,
            *Balancer._journal_change(rec)[:-1],
        )

    @staticmethod
    def _journal_change(rec: TaskRecord) -> tuple[Any, ...]:
        """The columns of a task's row that change after its submit (journal.CHANGING),
        then its seq."""
        final = rec.status.final
        return (
            rec.status.value,
            rec.attempt,
            rec.node if rec.status in PLACED or final else None,
            rec.group if rec.status in PLACED else None,
            rec.started_at,
            rec.finished_at,
            encode_json(rec.result) if final and rec.result is not None else None,
            rec.error.model_dump_json().encode() if final and rec.error else None,
            rec.collected_at,
            rec.waived,
            rec.seq,
        )

    def _commit_journal(self) -> bool:
        """Write the records changed since the last commit (one transaction). False if the
        journal failed: nothing of this tick may then be acknowledged."""
        j = self.journal
        if j is None or not (self._journal_dirty or self._journal_gone):
            return True
        dirty = self._journal_dirty.values()
        try:
            try:
                j.commit(
                    [self._journal_row(r) for r in dirty if not r.journaled],
                    self._journal_gone,
                    changes=[self._journal_change(r) for r in dirty if r.journaled],
                )
            except LookupError as exc:  # (a row gone from under us: write them whole)
                log.warning("journal %s: %s; writing whole rows", j.path, exc)
                j.commit([self._journal_row(r) for r in dirty], self._journal_gone)
        except Exception as exc:  # sqlite3.Error mostly; never let it escape the tick
            self.counters["journal_errors"] += 1
            if self._journal_error != str(exc):
                log.error(
                    "journal %s: write failed (%s); nothing is acknowledged until it works again",
                    j.path,
                    exc,
                )
            self._journal_error = str(exc)
            return False
        for r in dirty:
            r.journaled = True
        if self._journal_error:
            log.info("journal %s: writing again", j.path)
            self._journal_error = ""
            self._kick()  # the placements held back during the outage
        self._journal_dirty.clear()
        self._journal_gone.clear()
        return True

    async def _check_alone(self) -> None:
        s = self.settings
        other = await online_status(
            s,
            self.topics.balancer_status,
            BalancerStatus,
            what=f"no other balancer is online on {s.topic_prefix}/",
        )
        if other is not None and other.instance != self.instance:
            raise ConfigError(
                f"another balancer is online on {s.broker_host}:{s.broker_port} with topics "
                f"under {s.topic_prefix}/ (host {other.host or '?'}, pid {other.pid or '?'}): "
                f"stop it first, or give this one another TOPIC_PREFIX"
            )

    async def stop(self) -> None:
        """Publish offline status, stop housekeeping, disconnect."""
        t = self._transport
        if self._history_timer is not None:
            self._history_timer.cancel()
        for task in self._bg:
            task.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        if t is not None:
            if t.connected:
                self._tick()
                await t.publish_confirmed(
                    self.topics.balancer_status,
                    BalancerStatus(online=False, instance=self.instance).encode(),
                    retain=True,
                    timeout_s=2.0,
                )
            await t.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.journal is not None:
            self._commit_journal()
            self.journal.close()
            self.journal = None
        c = self.counters
        log.info(
            "balancer stopped: %d submitted, %d done, %d failed, %d cancelled, %d still queued",
            c["submitted"],
            c["done"],
            c["failed"],
            c["cancelled"],
            self.scheduler.queued,
        )

    async def __aenter__(self) -> Balancer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(
        self,
        stop: asyncio.Event | None = None,
        *,
        on_ready: Callable[[Balancer], None] | None = None,
    ) -> None:
        """Run until ``stop`` is set or SIGINT/SIGTERM arrives."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            if on_ready is not None:
                ready = asyncio.ensure_future(self.ready.wait())
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                stopped.cancel()
                if self.ready.is_set():
                    on_ready(self)
            await stop.wait()
        finally:
            await self.stop()

    async def _ready_watch(self) -> None:
        assert self._transport is not None
        await self._transport.wait_ready(float("inf"))
        self.ready.set()

    def _on_connect(self) -> None:
        assert self._transport is not None
        status = BalancerStatus(
            online=True,
            instance=self.instance,
            version=__version__,
            started_at=self.started_at,
            pid=os.getpid(),
            host=socket.gethostname(),
        )
        self._transport.publish(self.topics.balancer_status, status.encode(), qos=1, retain=True)
        # the broker may have restarted and lost the retained sets: publish them again
        self._dirty_nodes.update(n for n, info in self.nodes.items() if info.online)
        # ... and the retained task states and results MQTT clients read: those too
        if self._connects or self.counters["recovered"]:
            for rec in self.tasks.values():
                if rec.notify == "retained":
                    self._emit(rec, durable=False)
        self._connects += 1
        # and nodes could not reach us while we were away: give them time to speak again
        self._connected_at = time.monotonic()
        self._health_grace_until = self._connected_at + self.settings.node_timeout_s
        self._heard_until = max(self._heard_until, self._connected_at)  # (probes: from now)
        self._kick()

    # ------------------------------------------------------------------ inbound

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = self.topics.parse(topic)
        if parsed is None:
            if topic == self.topics.balancer_probe:
                self._on_probe(payload)
            elif topic == self.topics.dashboard_status and payload:
                self._on_dashboard(payload)
            elif topic == self.topics.broker_status and payload:
                try:
                    self._broker_refused = dict(decode(BrokerStatus, payload).refused)
                except DecodeError as exc:
                    self._bad_message("broker", "-", "status", exc)
            return
        kind, name, rest = parsed
        name = sys.intern(name)  # one string per user/node, not one per message and task
        if retained and not (kind == "node" and rest in ("status", "assign")):
            return  # a retained command would run again at every reconnect: never obey one
        if kind == "node" and rest == "assign":
            if retained and payload:
                self._guard(kind, name, rest, lambda: self._adopt(name, payload))
            return
        if len(payload) > self.settings.max_payload_bytes:
            self._refused(
                f"{kind} {name}", f"{len(payload)} bytes on {rest}: too large", ErrorCode.TOO_LARGE
            )
            self._bad_message(
                kind,
                name,
                rest,
                DecodeError(
                    f"{len(payload)} bytes is more than MAX_PAYLOAD_BYTES "
                    f"({self.settings.max_payload_bytes})",
                    payload[:200],
                    ErrorCode.TOO_LARGE,
                ),
            )
            self._kick()
            return
        self._guard(kind, name, rest, lambda: self._dispatch(kind, name, rest, payload))

    def _guard(self, kind: str, name: str, rest: str, fn: Callable[[], None]) -> None:
        """Run a handler; whatever it raises is counted and answered, never propagated."""
        try:
            fn()
        except DecodeError as exc:
            self._bad_message(kind, name, rest, exc)
        except Exception as exc:
            self.counters["internal_errors"] += 1
            log.exception("failed to handle a message on %s/%s", name, rest)
            if kind == "user":
                self._error(
                    name,
                    ErrorCode.INTERNAL,
                    f"the balancer failed to handle this message: {exc}",
                    topic=rest,
                )
        self._kick()

    def _dispatch(self, kind: str, name: str, rest: str, payload: bytes) -> None:
        if kind == "user":
            if rest == "submit":
                self._on_submit(name, payload)
            elif rest == "cancel":
                self._on_cancel(name, payload)
            elif rest == "ack":
                self._on_ack(name, payload)
            elif rest == "query":
                self._on_query(name, payload)
        elif rest == "status":
            self._on_node_status(name, payload)
        elif rest == "heartbeat":
            self._on_heartbeat(name, payload)
        elif rest == "reports":
            self._on_reports(name, payload)

    def _on_dashboard(self, payload: bytes) -> None:
        """A dashboard came online: send it the recent history, so that its charts do not
        start empty."""
        try:
            online = decode(DashboardStatus, payload).online
        except DecodeError as exc:
            self._bad_message("dashboard", "-", "status", exc)
            return
        if not online or self._history_timer is not None:
            return
        # at most one a second, announcements in between answered together: anyone may
        # publish on dashboard/status, and each history is 100-500 kB (a flood of
        # announcements must not become a flood of histories)
        delay = max(0.0, self._history_sent_at + 1.0 - time.monotonic())
        self._history_timer = asyncio.get_running_loop().call_later(delay, self._send_history)

    def _send_history(self) -> None:
        self._history_timer = None
        t = self._transport
        if t is None or not t.connected:
            return
        self._history_sent_at = time.monotonic()
        history = BalancerHistory(instance=self.instance, samples=list(self._history))
        t.publish(self.topics.balancer_history, history.encode(), qos=1)

    def _bad_message(self, kind: str, name: str, rest: str, exc: DecodeError) -> None:
        self.counters["bad_messages"] += 1
        sender = f"{kind} {name}"
        self._bad_log.warning(
            sender, "bad message from %s on %s: %s (raw %r)", sender, rest, exc, exc.raw[:120]
        )
        if kind == "user":
            self._error(
                name,
                exc.code,
                f"bad message on {rest}: {exc}",
                task_id=exc.task_id,
                ref=exc.ref,
                topic=rest,
            )

    def _refused(self, who: str, why: str, code: str = ErrorCode.INVALID) -> None:
        """Count a refused submission (or message) and remember it for the warning."""
        self.counters["refused"] += 1
        self._refused_by_code[str(code)] += 1
        self._last_refusal = (time.time(), f"{who}: {why}"[:300])

    def _error(
        self,
        user: str,
        code: str,
        message: str,
        *,
        task_id: str | None = None,
        ref: str | None = None,
        topic: str | None = None,
    ) -> None:
        self._errors.setdefault(user, []).append(
            ErrorItem(code=code, message=message, id=task_id, ref=ref, topic=topic)
        )

    def _on_submit(self, user: str, payload: bytes) -> None:
        now = time.time()
        items = decode_submit(payload)
        if len(items) > self.settings.max_batch:
            self._refused(
                user, f"a batch of {len(items)} tasks: more than MAX_BATCH", ErrorCode.TOO_LARGE
            )
            raise DecodeError(
                f"a batch of {len(items)} tasks is more than MAX_BATCH ({self.settings.max_batch})",
                payload[:200],
                ErrorCode.TOO_LARGE,
            )
        for item in items:
            if isinstance(item, DecodeError):
                self._bad_message("user", user, "submit", item)
                self._refused(user, f"invalid task: {item}", item.code)
                continue
            if not self._take_token(user, now):
                rate = self.settings.submit_rate
                self._refused(user, f"faster than SUBMIT_RATE ({rate:g}/s)", ErrorCode.RATE_LIMITED)
                self._error(
                    user,
                    ErrorCode.RATE_LIMITED,
                    f"user {user!r} submits faster than {rate:g} tasks/s "
                    f"(SUBMIT_RATE); task {item.name!r} refused: send it again "
                    f"later",
                    task_id=item.id,
                    ref=item.ref,
                )
                continue
            self._accept(user, item, now)

    def _take_token(self, user: str, now: float) -> bool:
        """The user's token bucket (SUBMIT_RATE per second, SUBMIT_BURST deep)."""
        rate = self.settings.submit_rate
        if not rate:
            return True
        burst = float(self.settings.submit_burst or self.settings.max_batch)
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) > 100_000:  # (names are bounded by the ACL with logins)
                self._buckets.clear()
            bucket = self._buckets[user] = [burst, now]
        bucket[0] = min(burst, bucket[0] + max(0.0, now - bucket[1]) * rate)
        bucket[1] = now
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True

    def _accept(self, user: str, spec: TaskSpec, now: float) -> None:
        args_json = encode_json(spec.args)
        task_id = spec.id or uuid.uuid4().hex
        old = self.tasks.get(task_id)
        if old is not None:
            if old.user == user and old.same_submit(spec, args_json):
                self._emit(old, durable=False)  # a resend: acknowledge again, run once
                return
            self._refused(
                user, f"task id {task_id!r} is already used by another task", ErrorCode.DUPLICATE_ID
            )
            self._error(
                user,
                ErrorCode.DUPLICATE_ID,
                f"task id {task_id!r} is already used by another task",
                task_id=task_id,
                ref=spec.ref,
            )
            return
        cap = self.settings.lb_queing_maxperuser
        if cap and self.scheduler.queued_for(user) >= cap:
            self._refused(
                user, f"queue cap of {cap} (LB_QUEING_MAXPERUSER)", ErrorCode.QUOTA_EXCEEDED
            )
            self._error(
                user,
                ErrorCode.QUOTA_EXCEEDED,
                f"user {user!r} already has {cap} queued tasks "
                f"(LB_QUEING_MAXPERUSER); task {spec.name!r} refused",
                task_id=task_id,
                ref=spec.ref,
            )
            return
        self._seq += 1
        rec = TaskRecord(
            id=task_id,
            user=user,
            name=sys.intern(spec.name),
            args_json=args_json,
            priority=spec.priority,
            seq=self._seq,
            submitted_at=now,
            notify=spec.notify,
            timeout_s=spec.timeout_s,
            ref=spec.ref,
            requires=requires_of(spec.requires),
            tags=frozenset(spec.tags) if spec.tags else NO_TAGS,
        )
        self.tasks[task_id] = rec
        self.counters["submitted"] += 1
        self._enqueue(rec)
        self._emit(rec)

    def _unknown(self, user: str, ids: list[str], topic: str, message: str) -> None:
        """Answer unknown ids: one error each, or, beyond UNKNOWN_EACH of them in one
        message, one error for them all (an answer must not be bigger than the question)."""
        if len(ids) <= UNKNOWN_EACH:
            for tid in ids:
                self._error(
                    user,
                    ErrorCode.UNKNOWN_TASK,
                    message.format(f"task {tid!r}"),
                    task_id=tid,
                    topic=topic,
                )
            return
        shown = ", ".join(repr(t) for t in ids[:5])
        self._error(
            user,
            ErrorCode.UNKNOWN_TASK,
            message.format(f"tasks {shown}, ... ({len(ids)} in all)"),
            topic=topic,
        )

    def _on_cancel(self, user: str, payload: bytes) -> None:
        ids = decode(IdList, payload).all_ids()
        unknown = []
        for tid in ids:
            rec = self.tasks.get(tid)
            if rec is None or rec.user != user:
                unknown.append(tid)
                continue
            if rec.status.final:
                self._emit(rec, durable=False)  # too late: tell the current state
                continue
            if rec.status == Status.QUEUED:
                self.scheduler.remove(rec.id)
                self._left_queue(rec)
            else:
                self._unplace(rec)
            rec.error = ErrorInfo(type="Cancelled", message="cancelled by its user")
            self._finalize(rec, Status.CANCELLED, time.time())
        self._unknown(user, unknown, "cancel", "no {} to cancel")  # (str.format)

    def _on_ack(self, user: str, payload: bytes) -> None:
        now = time.time()
        for tid in decode(IdList, payload).all_ids():
            rec = self.tasks.get(tid)
            if rec is None or rec.user != user or not rec.status.final:
                continue
            if rec.collected_at is None:
                rec.collected_at = now
                if self.journal is not None:
                    self._journal_dirty[rec.id] = rec
                heapq.heappush(self._expiry, (self._expires_at(rec), rec.id))

    def _on_query(self, user: str, payload: bytes) -> None:
        unknown = []
        for tid in decode(IdList, payload).all_ids():
            rec = self.tasks.get(tid)
            if rec is None or rec.user != user:
                unknown.append(tid)
            else:
                self._emit(rec, durable=False)
        self._unknown(user, unknown, "query", f"no {{}} (never submitted by {user!r}, or expired)")

    # -- nodes ------------------------------------------------------------------------

    def _on_node_status(self, name: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        st = decode(NodeStatus, payload)
        if st.node != name:
            raise DecodeError(
                f"status of node {st.node!r} published on node {name!r}'s topic", payload
            )
        info = self._node_info(name)
        if not st.online:
            if info.online and st.instance == info.instance:
                self._node_lost(info, "went offline")
            return
        if info.online and info.instance != st.instance:
            self._node_lost(info, "restarted")
        self._node_up(info, st)
        if st.draining:
            self._take_back(info, st)

    def _adopt(self, name: str, payload: bytes) -> None:
        """Take over the tasks an earlier balancer placed on a node (its retained set).

        Without this a restarted balancer would publish an empty set and every node would
        kill its running tasks. Queued tasks of the earlier balancer are not recoverable
        this way (that is the journal's job); placed ones are.
        """
        aset = decode(AssignmentSet, payload)
        if aset.balancer == self.instance or aset.node != name:
            return
        info = self._node_info(name)
        now = time.monotonic()
        adopted = 0
        for a in aset.tasks:
            if a.id in self.tasks or not is_valid_name(a.user):
                continue
            self._seq += 1
            rec = TaskRecord(
                id=a.id,
                user=a.user,
                name=a.name,
                args_json=encode_json(a.args),
                priority=a.priority,
                seq=self._seq,
                submitted_at=time.time(),
                timeout_s=a.timeout_s,
                status=Status.ASSIGNED,
                attempt=a.attempt,
                node=name,
                group=a.group,
                assigned_at=now,
                requires=requires_of(a.requires),
                tags=frozenset(a.tags) if a.tags else NO_TAGS,
                prefetched=True,
            )
            rec.assignment_json = self._assignment_json(rec)
            self.tasks[a.id] = rec
            self.running_by_name[a.name] += 1
            info.assigned[a.id] = None
            self.scheduler.adopt(a.id, a.user, name, a.group, rec.requires)
            if self.journal is not None:
                self._journal_dirty[a.id] = rec
            adopted += 1
        if adopted:
            self.counters["adopted"] += adopted
            log.info(
                "adopted %d task(s) that balancer %s had placed on node %s",
                adopted,
                aset.balancer,
                name,
            )

    def _node_info(self, name: str) -> NodeInfo:
        info = self.nodes.get(name)
        if info is None:
            info = self.nodes[name] = NodeInfo(name=name, last_seen=time.monotonic())
        return info

    def _node_up(self, info: NodeInfo, st: NodeStatus) -> None:
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
        if info.window:
            self.scheduler.set_window(info.name, info.window)
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
        self._why_cache.clear()
        if not info.fresh:
            # (a node first seen in the retained burst at start-up gets its set a moment
            # later, once the sets an earlier balancer left have been read: _health_loop)
            self._dirty_nodes.add(info.name)
        self._round_wanted = True

    def _take_back(self, info: NodeInfo, st: NodeStatus) -> None:
        """A draining node keeps its running tasks; those it lists as ``pending`` (held, and
        never to be started) go back to the head of their queues (in submit order). Only
        the node knows which these are: our ASSIGNED may be stale (a lost "started")."""
        n = 0
        for ref in st.pending:
            rec = self.tasks.get(ref.id)
            if (
                rec is None
                or ref.id not in info.assigned
                or rec.attempt != ref.attempt
                or rec.status not in PLACED
            ):
                continue
            self._unplace(rec)
            # it never ran, and its node will not run it now: the attempt does not count
            rec.attempt -= 1
            self._requeue(rec)
            n += 1
        if n:
            self.counters["taken_back"] += n
            log.info(
                "node %s is draining: %d task(s) it had not started go back to the queue",
                info.name,
                n,
            )

    def _on_heartbeat(self, name: str, payload: bytes) -> None:
        hb = decode(Heartbeat, payload)
        info = self.nodes.get(name)
        if info is None or info.status is None or info.instance != hb.instance:
            return
        if not info.online:
            # declared dead while it was only slow (or a false "offline"): it is back. Its
            # tasks were requeued and its set emptied; from now on it gets work again.
            log.warning("node %s is alive after all: back online", name)
            self._node_up(info, info.status)
        info.last_seen = time.monotonic()
        info.load = hb.load
        if hb.load:
            self.scheduler.set_load(name, hb.load[0])
        self._reconcile(info, hb)

    def _reconcile(self, info: NodeInfo, hb: Heartbeat) -> None:
        """Compare what the node says it holds with what it was given."""
        if self._journal_error:
            return  # sets are not going out: a missing task proves nothing now
        now = time.monotonic()
        running = {(r.id, r.attempt) for r in hb.running}
        held = running | {(r.id, r.attempt) for r in hb.held}
        grace = ASSIGN_GRACE_S + 2 * (info.status.heartbeat_s if info.status else 1.0)
        for tid in list(info.assigned):
            rec = self.tasks[tid]
            key = (tid, rec.attempt)
            if key in running and rec.status == Status.ASSIGNED:
                self._set_status(rec, Status.RUNNING)  # its "started" report was lost
                rec.started_at = rec.started_at or time.time()
                self._emit(rec)
            if key in held:
                rec.missing_since = None
                continue
            if not rec.assigned_at or now - rec.assigned_at < grace:
                continue  # the set may still be on its way (or not even sent)
            if rec.missing_since is None:
                rec.missing_since = now
                self._dirty_nodes.add(info.name)  # send the set again
            elif now - rec.missing_since > grace:
                log.warning(
                    "node %s never took task %s (attempt %d): reassigning it",
                    info.name,
                    tid,
                    rec.attempt,
                )
                self._unplace(rec)
                self._retry_or_fail(
                    rec,
                    ErrorInfo(
                        type="AssignmentLost", message=f"node {info.name} did not take the task"
                    ),
                    time.time(),
                )

    def _node_lost(self, info: NodeInfo, reason: str) -> None:
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
        self._why_cache.clear()
        now = time.time()
        for tid in list(info.assigned):
            rec = self.tasks.get(tid)
            if rec is None:
                continue
            self._unplace(rec, release=False)
            if rec.status == Status.ASSIGNED and rec.prefetched:
                # held in its window, never reported started: it was most likely waiting,
                # so this attempt does not count against TASK_MAX_ATTEMPTS. (Its number
                # stays used: a node that is only cut off may still run it, and two runs
                # must never share an attempt number.)
                rec.waived += 1
            self._retry_or_fail(
                rec,
                ErrorInfo(
                    type="NodeLost", message=f"node {info.name} {reason} while it held the task"
                ),
                now,
            )
        info.assigned.clear()
        self._dirty_nodes.add(info.name)
        self._round_wanted = True

    def _on_reports(self, name: str, payload: bytes) -> None:
        rep = decode(NodeReport, payload)
        info = self.nodes.get(name)
        if info is None or rep.node != name or (info.instance and info.instance != rep.instance):
            return  # (an earlier run of the node: what it had is accounted for already)
        if info.online and info.instance == rep.instance:
            info.last_seen = time.monotonic()
        now = time.time()
        mono = time.monotonic()
        for s in rep.started:
            rec = self._current(info, s.id, s.attempt)
            if rec is not None and rec.status == Status.ASSIGNED:
                self._set_status(rec, Status.RUNNING)
                rec.started_at = now
                sample = mono - rec.assigned_at
                if not rec.prefetched and rec.assigned_at and sample < MAX_RTT_SAMPLE_S:
                    info.rtt_s = (
                        sample
                        if info.rtt_s is None
                        else (info.rtt_s + EWMA_ALPHA * (sample - info.rtt_s))
                    )
                self._emit(rec)
        for p in rep.progress:
            rec = self._current(info, p.id, p.attempt)
            if rec is not None and rec.status in PLACED and p.progress != rec.progress:
                rec.progress = p.progress
                self._emit(rec, durable=False)
        for r in rep.results:
            rec = self._current(info, r.id, r.attempt)
            if rec is None:
                # stale or already recorded: the node drops it once it sees a set without it
                self._dirty_nodes.add(name)
                continue
            self._apply_result(rec, r, now)

    def _current(self, info: NodeInfo, task_id: str, attempt: int) -> TaskRecord | None:
        """The task record if this attempt is the one placed on this node, else None."""
        rec = self.tasks.get(task_id)
        if (
            rec is None
            or rec.status not in PLACED
            or rec.node != info.name
            or rec.attempt != attempt
            or task_id not in info.assigned
        ):
            return None
        return rec

    def _apply_result(self, rec: TaskRecord, r: Result, now: float) -> None:
        if rec.started_at is None:
            rec.started_at = now
        rt = r.runtime_s
        if r.status != "lost" and math.isfinite(rt) and rt > 0:
            # a short task's "started" rides in the same report as its result (the node
            # coalesces them): the run began runtime_s ago by the node's measure, not now
            rec.started_at = max(rec.submitted_at, min(rec.started_at, now - rt))
        self._unplace(rec)
        if r.status == "done":
            rec.result = r.result
            if rec.node is not None:
                self.scheduler.observe(rec.name, rec.node, r.runtime_s)
                info = self.nodes.get(rec.node)
                rt = max(0.0, r.runtime_s)
                if info is not None and rt < self.settings.pipeline_long_s:
                    # (long tasks never take a window place: they do not size it either)
                    info.runtime_s = (
                        rt
                        if info.runtime_s is None
                        else (info.runtime_s + EWMA_ALPHA * (rt - info.runtime_s))
                    )
                    self._size_window(info)
            rec.progress = 100
            self._finalize(rec, Status.DONE, now)
        elif r.status == "lost":
            self._retry_or_fail(
                rec, r.error or ErrorInfo(type="WorkerLost", message="worker process lost"), now
            )
        else:  # failed, timeout, cancelled on the node
            rec.error = r.error or ErrorInfo(type="Failed", message=f"task {r.status}")
            self._finalize(rec, Status.FAILED, now)

    # ------------------------------------------------------------------ transitions

    def _set_status(self, rec: TaskRecord, new: Status) -> None:
        old = rec.status
        if old == new:
            return
        if old in PLACED and new not in PLACED:
            self.running_by_name[rec.name] -= 1
        if new in PLACED and old not in PLACED:
            self.running_by_name[rec.name] += 1
        rec.status = new

    def _enqueue(self, rec: TaskRecord) -> None:
        self._set_status(rec, Status.QUEUED)
        rec.node = None
        rec.group = None
        self.scheduler.enqueue(
            QueuedTask(rec.id, rec.user, rec.name, rec.priority, rec.seq, rec.requires, rec.tags)
        )
        self.queued_by[rec.queue_key] += 1
        self._round_wanted = True

    def _left_queue(self, rec: TaskRecord) -> None:
        key = rec.queue_key
        self.queued_by[key] -= 1
        if self.queued_by[key] <= 0:
            del self.queued_by[key]

    def _unplace(self, rec: TaskRecord, *, release: bool = True) -> None:
        """Take a placed task off its node (its slot frees; its node's set changes)."""
        if release:
            self.scheduler.release(rec.id)
        info = self.nodes.get(rec.node) if rec.node is not None else None
        if info is not None and rec.id in info.assigned:
            del info.assigned[rec.id]
            self._dirty_nodes.add(info.name)
        self._round_wanted = True

    def _retry_or_fail(self, rec: TaskRecord, error: ErrorInfo, now: float) -> None:
        if rec.attempt - rec.waived < self.settings.task_max_attempts:
            log.info(
                "task %s lost on attempt %d (%s): queued again", rec.id, rec.attempt, error.message
            )
            self.counters["retried"] += 1
            self._requeue(rec)
        else:
            rec.error = ErrorInfo(
                type=error.type,
                message=f"{error.message} (attempt {rec.attempt - rec.waived} of "
                f"{self.settings.task_max_attempts}: giving up)",
                traceback=error.traceback,
            )
            self._finalize(rec, Status.FAILED, now)

    def _requeue(self, rec: TaskRecord) -> None:
        """Back to the head of its queue (it keeps its seq), as if never started."""
        rec.progress = 0
        rec.started_at = None
        self._enqueue(rec)
        self._emit(rec)

    def _finalize(self, rec: TaskRecord, status: Status, now: float) -> None:
        self._set_status(rec, status)
        rec.finished_at = now
        rec.assignment_json = b""
        if status == Status.DONE:
            self.counters["done"] += 1
            self.done_by_name[rec.name] += 1
        elif status == Status.FAILED:
            self.counters["failed"] += 1
            self.failed_by_name[rec.name] += 1
        else:
            self.counters["cancelled"] += 1
            self.cancelled_by_name[rec.name] += 1
        self._recent.append(rec.id)
        if rec.started_at is not None and status in (Status.DONE, Status.FAILED):
            times = self._times.get(rec.name)
            if times is None:
                times = self._times[rec.name] = deque(maxlen=TIMES_KEPT)
            wait, run = max(0.0, rec.started_at - rec.submitted_at), max(0.0, now - rec.started_at)
            times.append((wait, run))
            if self.metrics is not None:
                self.metrics.observe(rec.name, wait, run)
        heapq.heappush(self._expiry, (self._expires_at(rec), rec.id))
        self._emit(rec)

    def _expires_at(self, rec: TaskRecord) -> float:
        finished = rec.finished_at or time.time()
        t = finished + self.settings.result_ttl_s
        if rec.collected_at is not None:
            t = min(t, rec.collected_at + self.settings.result_collected_ttl_s)
        return t

    # ------------------------------------------------------------------ ticks

    def _kick(self) -> None:
        if not self._tick_soon:
            self._tick_soon = True
            asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self._tick_soon = False
        if self._round_wanted and not self._journal_error:
            # (while the journal fails, no placement: its set could not go out, and the
            # node would be blamed for not taking it)
            self._round_wanted = False
            self._round()
        if not self._commit_journal():
            return  # states and sets wait until what they announce is on disk
        t = self._transport
        if t is None or not t.connected:
            return  # states and sets go out after the reconnect (sets are rebuilt whole)
        for name in self._dirty_nodes:
            self._publish_set(name)
        self._dirty_nodes.clear()
        self._flush_states()

    def _size_window(self, info: NodeInfo) -> None:
        """A node's pipelining window per slot: enough queued tasks to cover the dispatch
        round trip at its recent short-task runtime (``runtime_s`` averages only tasks under
        PIPELINE_LONG_S; long tasks never take a window place: Scheduler._window_ok)."""
        s = self.settings
        rt = info.runtime_s
        if not s.pipeline_window_max or rt is None:
            window = 0
        else:
            rtt = info.rtt_s if info.rtt_s is not None else DEFAULT_RTT_S
            window = min(s.pipeline_window_max, max(1, math.ceil(rtt / max(rt, 1e-4))))
        if window != info.window:
            info.window = window
            self.scheduler.set_window(info.name, window)
            self._round_wanted = True

    def _round(self) -> None:
        for p in self.scheduler.schedule(time.monotonic()):
            rec = self.tasks[p.task.id]
            info = self.nodes[p.node]
            rec.prefetched = self.scheduler.busy(p.node, p.group) > info.workers.get(p.group, 0)
            if rec.prefetched:
                self.counters["prefetched"] += 1
            self._left_queue(rec)
            self._set_status(rec, Status.ASSIGNED)
            rec.attempt += 1
            rec.node = p.node
            rec.group = p.group
            rec.progress = 0
            rec.assignment_json = self._assignment_json(rec)
            rec.assigned_at = 0.0  # set when its node's set goes out
            rec.missing_since = None
            info.assigned[rec.id] = None
            self._dirty_nodes.add(p.node)
            self._emit(rec)

    def _assignment_json(self, rec: TaskRecord) -> bytes:
        # Built once per attempt from the stored args bytes: the set of a busy node is
        # republished often, its tasks' arguments are never re-encoded.
        fields: dict[str, Any] = {
            "id": rec.id,
            "attempt": rec.attempt,
            "user": rec.user,
            "name": rec.name,
            "priority": rec.priority,
            "group": rec.group,
            "timeout_s": rec.timeout_s,
        }
        if rec.requires:  # kept in the set so that a successor balancer can reserve them
            fields["requires"] = dict(rec.requires)
        if rec.tags:
            fields["tags"] = sorted(rec.tags)
        head = encode_json(fields)
        return head[:-1] + b',"args":' + rec.args_json + b"}"

    def _publish_set(self, name: str) -> None:
        info = self.nodes.get(name)
        if info is None or self._transport is None:
            return
        info.seq += 1
        if info.assigned:
            now = time.monotonic()
            parts = []
            for tid in info.assigned:
                rec = self.tasks[tid]
                if not rec.assigned_at:
                    rec.assigned_at = now
                parts.append(rec.assignment_json)
            head = encode_json({"v": 1, "node": name, "balancer": self.instance, "seq": info.seq})
            payload = head[:-1] + b',"tasks":[' + b",".join(parts) + b"]}"
        else:
            payload = b""  # an empty retained payload clears the set
        self._transport.publish(self.topics.assign(name), payload, qos=1, retain=True)

    def _emit(self, rec: TaskRecord, *, durable: bool = True) -> None:
        """Publish the task's state with the next tick; ``durable``: journal it first."""
        self._states.setdefault(rec.user, {})[rec.id] = rec
        if durable and self.journal is not None:
            self._journal_dirty[rec.id] = rec

    def _waiting(self, rec: TaskRecord) -> str | None:
        """Why a queued task is not running yet (cached per queue until the next round)."""
        if rec.status != Status.QUEUED:
            return None
        key = rec.queue_key
        if key not in self._why_cache:
            self._why_cache[key] = self.scheduler.why_waiting(*key)
        return self._why_cache[key]

    def state_of(self, rec: TaskRecord) -> TaskState:
        """The wire state of a task record (with the current waiting reason if queued)."""
        return TaskState.model_validate(self.state_dict(rec))

    def state_dict(self, rec: TaskRecord) -> dict[str, Any]:
        """:meth:`state_of` as the plain dict that encodes to the same JSON (the hot path:
        what the events carry)."""
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
                self._waiting(rec),
                rec.ref,
            )
        )

    def _flush_states(self) -> None:
        t = self._transport
        assert t is not None
        for user, recs in self._states.items():
            states = [self.state_dict(r) for r in recs.values()]
            t.publish(
                self.topics.events(user), encode_model_json({"v": 1, "states": states}), qos=1
            )
            for st, rec in zip(states, recs.values(), strict=True):
                if rec.notify == "retained" and rec.id in self.tasks:
                    data = encode_model_json(st)
                    t.publish(self.topics.task(user, rec.id), data, qos=1, retain=True)
                    if rec.status.final:
                        t.publish(self.topics.result(user, rec.id), data, qos=1, retain=True)
        self._states.clear()
        for user, errs in self._errors.items():
            t.publish(self.topics.errors(user), Errors(errors=errs).encode(), qos=1)
        self._errors.clear()

    # ------------------------------------------------------------------ housekeeping

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_CHECK_S)
            self._send_probe()
            self.check_health(time.monotonic())
            if self.scheduler.holding:
                self._round_wanted = True  # a task waits for a faster slot: look again
            self._kick()

    def _send_probe(self) -> None:
        """A message to ourselves, through the broker, behind everything sent to us so far.

        A node is silent when its heartbeats stop *arriving*, not when we have not read
        them yet: a flood on any topic (a client's burst, a fuzzer) can put seconds of
        messages ahead of the heartbeats in the broker's queue to us and in our own. So a
        heartbeat deadline counts up to the send time of the newest probe that has come
        back (``_heard_until``): what a node sent before it has been read by then."""
        t = self._transport
        if t is None or not t.connected:
            return
        self._probe_seq += 1
        self._probes[self._probe_seq] = time.monotonic()
        if len(self._probes) > PROBES_KEPT:  # lost ones (QoS 0, a reconnect)
            del self._probes[min(self._probes)]
        t.publish(self.topics.balancer_probe, f"{self.instance} {self._probe_seq}".encode(), qos=0)

    def _on_probe(self, payload: bytes) -> None:
        instance, _, seq = payload.decode("ascii", "replace").partition(" ")
        if instance != self.instance or not (seq.isascii() and seq.isdigit() and len(seq) < 20):
            return  # another balancer's (it is about to step down: _check_alone)
        n = int(seq)
        sent = self._probes.get(n)
        if sent is None:
            return
        self._heard_until = max(self._heard_until, sent)
        self._probe_warned = False
        for k in [k for k in self._probes if k <= n]:
            del self._probes[k]  # (earlier ones were lost or overtaken)

    def check_health(self, now: float) -> None:
        """Heartbeat deadlines; publish the sets of nodes first seen at start-up."""
        t = self._transport
        if t is None or not t.connected:
            return
        if now - self._connected_at > HEALTH_CHECK_S:  # the retained burst is in
            for info in self.nodes.values():
                if info.fresh:
                    info.fresh = False
                    self._dirty_nodes.add(info.name)
        if now < self._health_grace_until:
            return  # after we were cut off, silence proves nothing about the nodes yet
        # heartbeats count up to the newest probe back (_send_probe), but not forever: if
        # no probe comes back at all (a broker's ACL that refuses balancer/probe), silence
        # is judged PROBE_PATIENCE_S late rather than never
        horizon = max(min(now, self._heard_until), now - PROBE_PATIENCE_S)
        if now - self._heard_until > PROBE_PATIENCE_S and not self._probe_warned:
            self._probe_warned = True
            log.warning(
                "no probe of ours came back on %s for %g s: node silence is judged "
                "%g s late (may this balancer subscribe to it?)",
                self.topics.balancer_probe,
                PROBE_PATIENCE_S,
                PROBE_PATIENCE_S,
            )
        for info in list(self.nodes.values()):
            if (
                not info.online
                and not info.assigned
                and info.offline_since is not None
                and now - info.offline_since > RECENTLY_LOST_S
            ):
                del self.nodes[info.name]  # long gone: out of the stats and warnings
                continue
            hb_s = info.status.heartbeat_s if info.status else 1.0
            deadline = max(self.settings.node_timeout_s, 3 * hb_s)
            if horizon - info.last_seen <= deadline:
                continue
            if info.online:
                self._node_lost(info, f"went silent (no heartbeat for {deadline:g} s)")
            elif info.assigned:  # adopted from an earlier balancer, never came back
                self._node_lost(info, "did not come back")

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_S)
            self.expire(time.time())

    def expire(self, now: float) -> int:
        """Forget finished tasks past their retention; clear their retained states."""
        n = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, tid = heapq.heappop(self._expiry)
            rec = self.tasks.get(tid)
            if rec is None or not rec.status.final or self._expires_at(rec) > now:
                continue
            del self.tasks[tid]
            if self.journal is not None:
                self._journal_dirty.pop(tid, None)
                self._journal_gone.add(rec.seq)
            n += 1
            if rec.notify == "retained" and self._transport is not None:
                for topic in (self.topics.task(rec.user, tid), self.topics.result(rec.user, tid)):
                    self._transport.publish(topic, b"", qos=1, retain=True)
        return n

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval_s)
            t = self._transport
            stats = self.stats()
            self._last_stats = stats
            self._history.append(HistorySample.of(stats))
            if t is not None and t.connected:
                t.publish(self.topics.balancer_stats, stats.encode(), qos=0, retain=True)

    def stats(self) -> BalancerStats:
        """A snapshot of queues, nodes, users and warnings."""
        now_mono = time.monotonic()
        now = time.time()
        nodes: list[NodeSummary] = []
        slots = busy = 0
        for info in sorted(self.nodes.values(), key=lambda i: i.name):
            st = info.status
            n_slots = sum(g.workers for g in st.groups) if st else 0
            n_busy = len(info.assigned)
            if info.online:
                slots += n_slots
                busy += n_busy
            nodes.append(
                NodeSummary(
                    name=info.name,
                    online=info.online,
                    host=st.host if st else "",
                    slots=n_slots,
                    busy=n_busy,
                    speed=st.speed if st else 1.0,
                    tasks=st.tasks if st else [],
                    groups=st.groups if st else [],
                    last_seen=now - (now_mono - info.last_seen) if info.last_seen else 0.0,
                    load=info.load,
                    resources=st.resources if st else {},
                    reserved=dict(self.scheduler.reserved(info.name)),
                    tags=st.tags if st else [],
                )
            )
        users = self.scheduler.users()
        user_rows = [
            UserSummary(
                user=u, queued=self.scheduler.queued_for(u), running=self.scheduler.running_for(u)
            )
            for u in sorted(users)
        ]
        queued_by_name = Counter[str]()
        by_prio = Counter[str]()
        band_of = _bands(nodes)
        by_band = Counter[str]()
        name_bands: dict[str, Counter[str]] = {}
        for (name, prio, _, _), n in self.queued_by.items():
            if n <= 0:
                continue
            queued_by_name[name] += n
            by_prio[str(prio)] += n
            band = band_of(prio)
            by_band[band] += n
            name_bands.setdefault(name, Counter())[band] += n
        names = sorted(
            set(queued_by_name)
            | set(self.running_by_name)
            | set(self.done_by_name)
            | set(self.failed_by_name)
            | set(self.cancelled_by_name)
        )
        warnings: list[str] = []
        online = [i for i in self.nodes.values() if i.online]
        if not online:
            warnings.append(
                "no node is online: tasks wait until one joins (`lbmqtt node --tasks MODULE`)"
            )
        name_rows = []
        for name in names:
            why = {
                k: self.scheduler.why_waiting(*k)
                for k, c in self.queued_by.items()
                if k[0] == name and c > 0
            }
            waiting = "; ".join(sorted({r for r in why.values() if r})) or None
            if waiting and online:  # (count only the tasks that have a reason to wait)
                stuck = sum(self.queued_by[k] for k, r in why.items() if r)
                warnings.append(f"{stuck} queued {name!r} task(s) wait: {waiting}")
            times = self._times.get(name, ())
            waits = sorted(w for w, _ in times)
            runs = sorted(r for _, r in times)
            name_rows.append(
                NameSummary(
                    name=name,
                    queued=queued_by_name[name],
                    running=self.running_by_name[name],
                    done=self.done_by_name[name],
                    failed=self.failed_by_name[name],
                    cancelled=self.cancelled_by_name[name],
                    waiting=waiting,
                    count=len(runs),
                    wait_mean_s=sum(waits) / len(waits) if waits else None,
                    wait_p95_s=_pct(waits, 0.95),
                    run_mean_s=sum(runs) / len(runs) if runs else None,
                    run_p95_s=_pct(runs, 0.95),
                    wait_p50_s=_pct(waits, 0.5),
                    wait_p99_s=_pct(waits, 0.99),
                    run_p50_s=_pct(runs, 0.5),
                    run_p99_s=_pct(runs, 0.99),
                    queued_by_band=dict(name_bands.get(name, {})),
                )
            )
        for info in self.nodes.values():
            if (
                not info.online
                and info.offline_since is not None
                and now_mono - info.offline_since < RECENTLY_LOST_S
            ):
                warnings.append(
                    f"node {info.name} {info.offline_reason} "
                    f"{now_mono - info.offline_since:.0f} s ago"
                )
        c = self.counters
        # refusals since the newest sample older than the window (or since the start)
        full = len(self._history) == self._history.maxlen
        refused_before = self._history[0].refused if full else 0
        for h in reversed(self._history):
            if now - h.time > REFUSALS_WARN_S:
                refused_before = h.refused
                break
        if c["refused"] > refused_before and self._last_refusal is not None:
            warnings.append(
                f"{c['refused'] - refused_before} submission(s) refused in the "
                f"last {REFUSALS_WARN_S:.0f} s; last: {self._last_refusal[1]}"
            )
        return BalancerStats(
            time=now,
            instance=self.instance,
            started_at=self.started_at,
            queued=self.scheduler.queued,
            running=sum(self.running_by_name.values()),
            submitted_total=c["submitted"],
            done_total=c["done"],
            failed_total=c["failed"],
            cancelled_total=c["cancelled"],
            refused_total=c["refused"],
            refused_by_code=dict(self._refused_by_code),
            broker_refused=self._broker_refused,
            bad_messages_total=c["bad_messages"],
            slots=slots,
            busy=busy,
            nodes=nodes,
            users=user_rows,
            names=name_rows,
            queued_by_priority=dict(by_prio),
            bands=sorted(set(by_band) | {band_label(*g) for g in band_of.groups}, key=band_order),
            queued_by_band=dict(by_band),
            tasks=self._task_rows(now),
            warnings=warnings,
        )

    def _task_rows(self, now: float) -> list[TaskRow]:
        """The placed tasks (up to RUNNING_ROWS), then the most recently finished."""
        rows: list[TaskRow] = []
        for info in self.nodes.values():
            for tid in info.assigned:
                if len(rows) >= RUNNING_ROWS:
                    break
                rec = self.tasks.get(tid)
                if rec is not None:
                    rows.append(_task_row(rec, now))
        rows.sort(key=lambda r: r.submitted_at)
        for tid in reversed(self._recent):
            rec = self.tasks.get(tid)
            if rec is not None and rec.status.final:
                rows.append(_task_row(rec, now))
        return rows


def _task_row(rec: TaskRecord, now: float) -> TaskRow:
    start, end = rec.started_at, rec.finished_at or now
    return TaskRow(
        id=rec.id,
        user=rec.user,
        name=rec.name,
        status=rec.status.value,
        priority=rec.priority,
        node=rec.node,
        progress=rec.progress,
        submitted_at=rec.submitted_at,
        wait_s=max(0.0, (start if start is not None else end) - rec.submitted_at),
        run_s=None if start is None else max(0.0, end - start),
    )


class _Bands:
    """Priority -> band label, the bands being the priority ranges of worker groups."""

    def __init__(self, groups: list[tuple[int, int]]):
        self.groups = sorted(set(groups))

    def __call__(self, priority: int) -> str:
        for lo, hi in self.groups:
            if lo <= priority <= hi:
                return band_label(lo, hi)
        return "none"


def _bands(nodes: list[NodeSummary]) -> _Bands:
    return _Bands([(g.min_p, g.max_p) for n in nodes if n.online for g in n.groups])


def _pct(sorted_values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of already sorted values."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]
