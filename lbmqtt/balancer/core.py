"""The balancer: MQTT in -> scheduler -> MQTT out.

It owns every task's record and the view of the nodes; the decisions come from
:mod:`lbmqtt.scheduler`. Work is done in *ticks*: every inbound message only updates
state and asks for a tick; the tick (run once per event-loop iteration, after all the
messages already read) places tasks on free slots, writes the journal, then publishes one
assignment set per node whose set changed and one batch of task states per user. So a
burst of submits or results costs a few outbound messages, not a few per task.

This module holds the lifecycle, the transport, the routing of inbound messages to the
handlers (:mod:`.users`, :mod:`.nodes`), the tick and the background loops; the state and
its transitions live in the sibling modules. Nothing a client sends can stop the balancer:
every inbound message is validated, a bad one is counted, logged at a bounded rate, and
answered on the sender's ``errors`` topic.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import socket
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from .. import __version__, service
from ..config import Settings, coerce_settings
from ..discovery import resolve as resolve_broker
from ..errors import ConfigError, DecodeError, ErrorCode
from ..health import online_status
from ..metrics import Metrics
from ..mqtt import MqttTransport, Will, client_id, connection_options
from ..protocol import (
    BalancerHistory,
    BalancerStats,
    BalancerStatus,
    BrokerStatus,
    DashboardStatus,
    TaskState,
    Topics,
    decode,
)
from ..protocol.topics import SPECS
from ..scheduler import Scheduler
from .journal import JournalStore, JournalWriter, recover
from .nodes import HEALTH_CHECK_S, Fleet
from .outbox import Outbox
from .ownstatus import StatusGuard
from .records import NodeInfo, TaskRecord
from .sqlite import open_journal
from .stats import Tally, snapshot, start_metrics
from .tasks import TaskTable
from .users import Users

log = logging.getLogger(__name__)

EXPIRY_CHECK_S = 1.0
JOURNAL_PART = 500
"""A tick writes at most this many changed records; the rest (a burst of submits) and their
states go with the next ticks, between which the loop reads what waits, the nodes' reports
among it. 500 new rows take ~6 ms to write (13 us a row), their states ~3 ms to send."""
JOURNAL_LAG = 2_000
"""The most records a tick leaves for later (~26 ms of writing): what the balancer has
accepted but not yet acknowledged stays bounded however fast submits arrive."""
USER_SLICE_S = 0.005
"""A tick handles the users' messages waiting in its inbox for about this long, then the
loop reads what else has come (a node's report), and the next tick goes on. A user's
messages are handled in the order they came, but a burst of submits (40,000 tasks take
~1 s to accept) no longer holds back the nodes' reports that the broker sent behind it,
while their node, its window run dry, idles."""
USER_INBOX_BYTES = 16 << 20
"""Above this many bytes of users' messages waiting, a message is handled at once (after
all those before it): what a flood of submits holds in memory stays bounded."""
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


class Balancer:
    """The balancer as an async context manager (``lbmqtt balancer`` runs one).

    Args:
        parameters: settings, a parameters.json path, or None.
        journal: a journal store to use instead of the one JOURNAL_PATH names (e.g. a
            :class:`~lbmqtt.balancer.journal.MemoryJournal`); it is closed by :meth:`stop`.
    """

    def __init__(
        self,
        parameters: Settings | str | os.PathLike[str] | None = None,
        *,
        journal: JournalStore | None = None,
    ):
        self.settings = coerce_settings(parameters)
        self.topics = Topics(self.settings.topic_prefix)
        self.instance = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.scheduler = Scheduler(
            max_running_per_user=self.settings.lb_running_maxperuser,
            window_long_s=self.settings.pipeline_long_s,
        )
        self.nodes: dict[str, NodeInfo] = {}
        self.tally = Tally()
        self.outbox = Outbox(self.tally.counters)
        self.table = TaskTable(self.settings, self.scheduler, self.outbox, self.tally, self.nodes)
        self.journal_writer = JournalWriter(self.outbox, self.tally.counters)
        self._given_journal = journal
        self.fleet = Fleet(
            self.settings,
            self.nodes,
            table=self.table,
            scheduler=self.scheduler,
            outbox=self.outbox,
            tally=self.tally,
            journal=self.journal_writer,
            instance=self.instance,
            topics=self.topics,
        )
        self.users = Users(self.settings, self.table, self.scheduler, self.outbox, self.tally)
        if journal is not None:
            self.journal = journal  # (recovered from at start)
        self.ready = asyncio.Event()
        """Set once connected and subscribed."""
        self.loops = service.Loops("balancer")
        self._transport: MqttTransport | None = None
        self._tick_soon = False
        self._tick_timer: asyncio.TimerHandle | None = None
        self._tick_timer_at = 0.0
        self._inbox: deque[tuple[str, str, Callable[[str, bytes], None], bytes]] = deque()
        """Users' messages read and not handled yet (:data:`USER_SLICE_S`): (name, topic
        rest, handler, payload), in the order they came."""
        self._inbox_bytes = 0
        self.changes = service.Changes("balancer")
        """Notified by every tick (:meth:`until`)."""
        self._connects = 0
        self._history_sent_at = -1e9
        self._history_timer: asyncio.TimerHandle | None = None
        self.status_guard = StatusGuard(
            topic=self.topics.balancer_status,
            instance=self.instance,
            status=BalancerStatus(
                online=True,
                instance=self.instance,
                version=__version__,
                started_at=self.started_at,
                pid=os.getpid(),
                host=socket.gethostname(),
            ).encode(),
            counters=self.tally.counters,
            transport=lambda: self._transport,
            closing=lambda: self.loops.closing,
        )
        """Its status, retained on its status topic while it runs, and put back there."""
        self.metrics: Metrics | None = None
        self.metrics_url = ""
        """Where the Prometheus endpoint listens ("" when METRICS_PORT is null)."""
        self._routes: dict[str, Callable[[str, bytes], None]] = {
            "submit": self.users.on_submit,
            "cancel": self.users.on_cancel,
            "ack": self.users.on_ack,
            "query": self.users.on_query,
            "node_status": self.fleet.on_status,
            "heartbeat": self.fleet.on_heartbeat,
            "reports": self.fleet.on_reports,
        }
        """Route key -> handler(name, payload), for the commands and node messages."""

    # ------------------------------------------------------------------ the state

    @property
    def tasks(self) -> dict[str, TaskRecord]:
        """Every task the balancer knows, by id."""
        return self.table.tasks

    @property
    def counters(self) -> Counter[str]:
        return self.tally.counters

    @property
    def journal(self) -> JournalStore | None:
        """The journal store (None: JOURNAL_PATH is none, or not started)."""
        return self.journal_writer.store

    @journal.setter
    def journal(self, store: JournalStore | None) -> None:
        self.journal_writer.open(store)

    def stats(self) -> BalancerStats:
        """A snapshot of queues, nodes, users and warnings."""
        return snapshot(
            self.tally,
            instance=self.instance,
            started_at=self.started_at,
            tasks=self.table.tasks,
            nodes=self.nodes,
            scheduler=self.scheduler,
        )

    def state_of(self, rec: TaskRecord) -> TaskState:
        """The wire state of a task record (with the current waiting reason if queued)."""
        return self.table.state_of(rec)

    def state_dict(self, rec: TaskRecord) -> dict[str, Any]:
        """:meth:`state_of` as the plain dict that encodes to the same JSON (the hot path:
        what the events carry)."""
        return self.table.state_dict(rec)

    def check_health(self, now: float) -> None:
        """Heartbeat deadlines; publish the sets of nodes first seen at start-up."""
        t = self._transport
        if t is None or not t.connected:
            return
        self.fleet.check_health(now)

    def expire(self, now: float) -> int:
        """Forget finished tasks past their retention; clear their retained states."""
        gone = self.table.expire(now)
        if self._transport is not None:
            for rec in gone:
                if rec.notify == "retained":
                    for topic in (
                        self.topics.task(rec.user, rec.id),
                        self.topics.result(rec.user, rec.id),
                    ):
                        self._transport.publish(topic, b"", qos=1, retain=True)
        return len(gone)

    # ------------------------------------------------------------------ waiting (tests)

    async def until(
        self, predicate: Callable[[Balancer], object], timeout_s: float, what: str = ""
    ) -> None:
        """Return once ``predicate(self)`` is true: checked now, then after every tick.

        Raises:
            TimeoutError: it was not true within ``timeout_s`` (says what was awaited).
        """
        name = what or str(getattr(predicate, "__name__", repr(predicate)))
        await self.changes.until(lambda: predicate(self), timeout_s, name)

    async def join(self, timeout_s: float = 30.0) -> None:
        """Return once no task is queued or placed (every task finished).

        Raises:
            TimeoutError: tasks were still queued or placed after ``timeout_s``.
        """
        await self.until(
            lambda b: b.scheduler.queued == 0 and not any(i.assigned for i in b.nodes.values()),
            timeout_s,
            "idle (no task queued or placed)",
        )

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
            # the retained sets an earlier balancer left come first: see Fleet.adopt
            subscriptions=t.inbound("balancer"),
            on_connect=self._on_connect,
            will=Will(t.balancer_status, offline),
        )
        self._start_metrics()
        await self._transport.start()
        await self.loops.start(
            {
                "balancer-health": self._health_loop,
                "balancer-stats": self._stats_loop,
                "balancer-ready": self._ready_watch,
                "balancer-transport": self._transport.watch,
            },
            once={"balancer-ready"},
        )

    def _start_metrics(self) -> None:
        self.metrics, self.metrics_url = start_metrics(self.settings, lambda: self.tally.last_stats)
        self.table.metrics = self.metrics

    def _open_journal(self, configured: Settings) -> None:
        given = self._given_journal
        store = given if given is not None else open_journal(configured)
        if store is None:
            log.warning("JOURNAL_PATH is none: queued tasks do not survive a balancer restart")
            return
        self.journal = store
        t0 = time.perf_counter()
        n = recover(store.load(), self.table)
        if n:
            log.info(
                "journal %s: resumed %d task(s) in %.2f s (%d queued, %d placed)",
                store.path,
                n,
                time.perf_counter() - t0,
                self.scheduler.queued,
                sum(self.tally.running_by_name.values()),
            )
        else:
            log.info("journal %s (%s)", store.path, type(store).__name__)

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
        """Publish offline status, stop housekeeping, disconnect.

        Raises:
            LoopFailed: a background loop had died (once everything else is stopped).
        """
        t = self._transport
        self.loops.closing = True
        self.status_guard.cancel()
        if self._history_timer is not None:
            self._history_timer.cancel()
        if self._tick_timer is not None:
            self._tick_timer.cancel()
            self._tick_timer = None
        await self.loops.stop()
        self._handle_users(None)  # (what was read is handled: its states go out below)
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
        self.journal_writer.close()
        c = self.counters
        log.info(
            "balancer stopped: %d submitted, %d done, %d failed, %d cancelled, %d still queued",
            c["submitted"],
            c["done"],
            c["failed"],
            c["cancelled"],
            self.scheduler.queued,
        )
        self.loops.raise_if_failed()

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
        """Run until ``stop`` is set or SIGINT/SIGTERM arrives.

        Raises:
            LoopFailed: a background loop died (the balancer stopped).
        """
        await service.run(self, stop, on_ready=on_ready)

    async def _ready_watch(self) -> None:
        assert self._transport is not None
        await self._transport.wait_ready(float("inf"))
        self.ready.set()

    def _on_connect(self) -> None:
        self.status_guard.publish()
        # the broker may have restarted and lost the retained sets: publish them again
        self.outbox.dirty_nodes.update(n for n, info in self.nodes.items() if info.online)
        # ... and the retained task states and results MQTT clients read: those too (they
        # may also never have gone out, if the last balancer died between its journal
        # commit and its publishes), except the results their users have acknowledged:
        # those users have them, and would get them again
        if self._connects or self.counters["recovered"]:
            for rec in self.table.tasks.values():
                if rec.notify == "retained" and rec.collected_at is None:
                    self.outbox.emit(rec, durable=False)
        self._connects += 1
        # and nodes could not reach us while we were away: give them time to speak again
        self.fleet.connected(time.monotonic())
        self._kick()

    # ------------------------------------------------------------------ inbound

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        route = self.topics.route(topic)
        if route is None:
            return
        key = route.key
        if not route.name:
            if key == "balancer_probe":
                self.fleet.on_probe(payload)
            elif key == "balancer_status":
                self.status_guard.on_message(payload)
            elif key == "dashboard_status" and payload:
                self._on_dashboard(payload)
            elif key == "broker_status" and payload:
                try:
                    self.tally.broker_refused = dict(decode(BrokerStatus, payload).refused)
                except DecodeError as exc:
                    self.outbox.bad_message("broker", "-", "status", exc)
            return
        spec = SPECS[key]
        kind = spec.named  # "user" or "node"
        name, rest = sys.intern(route.name), route.rest  # one string per user/node
        if retained and not spec.retained:
            return  # a retained command would run again at every reconnect: never obey one
        if key == "assign":
            if retained and payload:
                self._guard(kind, name, rest, self.fleet.adopt, payload)
                self._kick()
            return
        if len(payload) > self.settings.max_payload_bytes:
            self.tally.refused(
                f"{kind} {name}", f"{len(payload)} bytes on {rest}: too large", ErrorCode.TOO_LARGE
            )
            self.outbox.bad_message(
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
        handler = self._routes.get(key)
        if handler is None:
            self._kick()
            return
        if kind == "user":
            self._inbox.append((name, rest, handler, payload))
            self._inbox_bytes += len(payload)
            if self._inbox_bytes > USER_INBOX_BYTES:
                self._handle_users(None)
            self._kick()
            return
        self._guard(kind, name, rest, handler, payload)
        self._kick()

    def _handle_users(self, slice_s: float | None) -> None:
        """Handle the users' messages waiting, in order: for about ``slice_s``, or all."""
        inbox = self._inbox
        until = time.monotonic() + slice_s if slice_s is not None else 0.0
        while inbox:
            name, rest, handler, payload = inbox.popleft()
            self._inbox_bytes -= len(payload)
            self._guard("user", name, rest, handler, payload)
            if slice_s is not None and time.monotonic() > until:
                break

    def _guard(
        self,
        kind: str,
        name: str,
        rest: str,
        handler: Callable[[str, bytes], None],
        payload: bytes,
    ) -> None:
        """Run a handler; whatever it raises is counted and answered, never propagated.
        (The caller kicks the tick that sends what the handler changed.)"""
        try:
            handler(name, payload)
        except DecodeError as exc:
            self.outbox.bad_message(kind, name, rest, exc)
        except Exception as exc:
            self.counters["internal_errors"] += 1
            log.exception("failed to handle a message on %s/%s", name, rest)
            if kind == "user":
                self.outbox.error(
                    name,
                    ErrorCode.INTERNAL,
                    f"the balancer failed to handle this message: {exc}",
                    topic=rest,
                )

    def _on_dashboard(self, payload: bytes) -> None:
        """A dashboard came online: send it the recent history, so that its charts do not
        start empty."""
        try:
            online = decode(DashboardStatus, payload).online
        except DecodeError as exc:
            self.outbox.bad_message("dashboard", "-", "status", exc)
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
        history = BalancerHistory(instance=self.instance, samples=list(self.tally.history))
        t.publish(self.topics.balancer_history, history.encode(), qos=1)

    # ------------------------------------------------------------------ ticks

    def _kick(self) -> None:
        if not self._tick_soon:
            self._tick_soon = True
            asyncio.get_running_loop().call_soon(self._tick)

    def _tick_at(self, when: float) -> None:
        """A tick at ``when`` (time.monotonic()) at the latest."""
        timer = self._tick_timer
        if timer is not None and self._tick_timer_at <= when:
            return
        if timer is not None:
            timer.cancel()
        self._tick_timer_at = when
        self._tick_timer = asyncio.get_running_loop().call_later(
            max(0.0, when - time.monotonic()), self._timed_tick
        )

    def _timed_tick(self) -> None:
        self._tick_timer = None
        self._kick()

    def _tick(self) -> None:
        self._tick_soon = False
        if self._inbox:
            self._handle_users(USER_SLICE_S)
            if self._inbox:
                self._kick()  # (the rest next tick, once the loop has read what came)
        self.changes.notify()  # (the waiters of until() look once this tick is done)
        table = self.table
        if table.round_wanted and not self.journal_writer.error:
            # (while the journal fails, no placement: its set could not go out, and the
            # node would be blamed for not taking it)
            table.round_wanted = False
            table.place()
        if table.straggle_wanted and not self.journal_writer.error:
            table.straggle_wanted = False
            table.straggle()
            if table.round_wanted:  # (tasks taken back: placed on the idle slots now)
                table.round_wanted = False
                table.place()
        t = self._transport
        outbox = self.outbox
        if t is None or not t.connected:
            self._commit_journal()
            return  # states and sets go out after the reconnect (sets are rebuilt whole)
        sets = (t.publish, self.topics, self.nodes, table.tasks, self.instance)
        if outbox.dirty_nodes:
            # new work first: the sets that give a node work go out (written at once) as
            # soon as the tasks they place are on disk, before the rest of the tick's
            # records (a burst of queued submits) is written and its states encoded
            if not self._commit_journal(unqueued=True):
                return  # states and sets wait until what they announce is on disk
            outbox.flush_sets(*sets, giving=True)  # (results next: flush_sets)
            t.flush()
        # (at least JOURNAL_PART, and never more than JOURNAL_LAG left for later: under a
        # flood of submits the journal keeps pace with what is read)
        limit = max(JOURNAL_PART, len(outbox.durable) - JOURNAL_LAG)
        if not self._commit_journal(limit=limit):
            return
        # (held states wait for their task's next one; the last tick, in stop(), sends them)
        if not outbox.release_held(math.inf if self.loops.closing else time.monotonic()):
            self._tick_at(outbox.held_due)
        outbox.flush_states(t.publish, self.topics, table.tasks, table.state_dict)
        outbox.flush_sets(*sets)
        t.flush()  # (before the loop reads on: a burst of submits can take it a while)
        if outbox.durable:
            self._kick()  # the rest of a burst, once the loop has read what waits

    def _commit_journal(self, *, unqueued: bool = False, limit: int | None = None) -> bool:
        failing = self.journal_writer.error
        ok = self.journal_writer.commit(unqueued=unqueued, limit=limit)
        if ok and failing:
            self._kick()  # the placements held back during the outage
        return ok

    # ------------------------------------------------------------------ housekeeping

    async def _health_loop(self) -> None:
        expired_at = time.monotonic()
        while True:
            await asyncio.sleep(HEALTH_CHECK_S)
            self._health_step()
            if time.monotonic() - expired_at >= EXPIRY_CHECK_S:  # (one timer: fewer wakes)
                expired_at = time.monotonic()
                self.expire(time.time())

    def _health_step(self) -> None:
        t = self._transport
        now = time.monotonic()
        if t is not None and t.connected and self.fleet.wants_probe(now):
            t.publish(self.topics.balancer_probe, self.fleet.probe(), qos=0)
        self.check_health(now)
        if self.scheduler.holding:
            self.table.round_wanted = True  # a task waits for a faster slot: look again
        self.table.straggle_wanted = True
        self._kick()

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval_s)
            self._stats_step()

    def _stats_step(self) -> None:
        t = self._transport
        stats = self.stats()
        self.tally.sample(stats)
        if t is not None and t.connected:
            t.publish(self.topics.balancer_stats, stats.encode(), qos=0, retain=True)
