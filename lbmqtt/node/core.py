"""The node daemon: runs assigned tasks in worker processes and reports on them.

One worker process per slot, in the groups of ``WKHUB_WORKERS`` (nice level from
``processP``). The node announces itself with a retained status (capabilities) and a
retained last will ``online: false``, heartbeats every ``HEARTBEAT_S``, and follows the
retained assignment set the balancer keeps for it:

* a task in the set that the node does not hold yet is queued for a slot of its group
  and started as soon as a worker of that group is idle;
* a task the node holds that is no longer in the set was cancelled, moved, or its result
  was recorded: a running one has its worker killed (and restarted), a finished one is
  forgotten;
* a finished task stays held (and its result is resent every ``RESULT_RESEND_S`` and
  after a reconnect) until it leaves the set: that is the balancer's acknowledgement.

A worker process that dies under a task reports the attempt ``lost`` (the balancer retries
it); a task past its ``timeout_s`` has its worker killed and is reported ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .. import service
from ..config import Settings, WorkerGroup, coerce_settings
from ..discovery import resolve as resolve_broker
from ..errors import ConfigError
from ..health import online_status
from ..mqtt import MqttTransport, Will, client_id, connection_options
from ..protocol import Assignment, GroupInfo, NodeStatus, Topics, encode_json
from ..protocol.assign import decode_assignment_set
from ..protocol_worker import TaskReference, encode_task_reference
from ..ratelog import LogLimiter
from ..registry import Registry, function_reference, in_worker, load_sources
from . import announce
from .announce import default_node_name
from .reports import ReportBatcher
from .supervisor import HeldTask, Supervisor

__all__ = ["Node"]

log = logging.getLogger(__name__)


class Node:
    """A node daemon: use as an async context manager, or :meth:`run_forever`.

    Args:
        parameters: settings, a parameters.json path, or None (``./parameters.json`` or
            defaults).
        name: node name (default ``NODE_NAME``, else the host name); unique on the LAN.
        tasks: task sources (dotted modules or .py paths) to load. ``NODE_TASKS`` is loaded
            only when neither these nor tasks registered on this object (``node.task``)
            are given.
        groups: worker groups (default ``WKHUB_WORKERS``).

    Example::

        node = Node("parameters.json")

        @node.task("HELLO")
        def hello(args, ctx):
            return f"Hello {args['firstName']} {args['lastName']} !"

        if __name__ == "__main__":
            node.run_forever()
    """

    def __init__(
        self,
        parameters: Settings | str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        tasks: Sequence[str] = (),
        groups: Sequence[WorkerGroup] | None = None,
    ):
        self.settings = coerce_settings(parameters)
        self.name = (
            name or self.settings.node_name or self.settings.broker_username or default_node_name()
        )
        self._bad_log = LogLimiter(log)
        self.registry = Registry()
        # NODE_TASKS only when this node is given no tasks of its own (see start)
        self._sources = list(tasks)
        self._groups = list(groups if groups is not None else self.settings.wkhub_workers)
        self.topics = Topics(self.settings.topic_prefix)
        self.instance = uuid.uuid4().hex[:12]
        self.ready = asyncio.Event()
        """Set once connected, subscribed, and every worker process has started."""
        self._local: dict[str, HeldTask] = {}
        """The tasks this node holds, by id: from their assignment until the balancer
        acknowledges their result."""
        self.loops = service.Loops("node")
        """The background loops (heartbeat, resend, one per worker slot), supervised."""
        self._transport: MqttTransport | None = None
        self._hb_seq = 0
        self._stopping = False
        self.changes = service.Changes(f"node {self.name}")
        """Notified at every change of the tasks it holds (:meth:`until`)."""
        self._all_names: list[str] = []
        self._group_info: list[GroupInfo] = []
        self.started_at = time.time()
        self.counters = {"started": 0, "done": 0, "failed": 0, "lost": 0, "killed": 0}
        self.reports = ReportBatcher(
            self.name,
            self.instance,
            self.topics.reports(self.name),
            self._local,
            self.changes.notify,
        )
        self.supervisor = Supervisor(self._local, self.reports, self.counters, self.changes.notify)
        self.reports.busy = self.supervisor.busy

    # --------------------------------------------------------------- registry

    def task(self, name: str | None = None) -> Callable[[Any], Any]:
        """Decorator: register a module-level function as task ``name``."""
        return self.registry.task(name)

    def add_task(self, name: str, fn: Callable[..., Any]) -> None:
        """Register a module-level function as task ``name``."""
        self.registry.add_task(name, fn)

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load tasks, start worker processes, connect and announce.

        Raises:
            ConfigError: a task module cannot be imported, no task is defined, or another
                node with this name is online.
        """
        if not self._sources and not len(self.registry):
            self._sources = list(self.settings.node_tasks)
        cwd = os.getcwd()  # (dotted names resolve from here; the workers start here)
        try:
            loaded = load_sources(self._sources)
        except (ImportError, ValueError, SyntaxError) as exc:
            raise ConfigError(
                f"cannot load task modules {self._sources}: {type(exc).__name__}: {exc}"
            ) from exc
        names = set(loaded.names())
        refs = []
        for tname, entry in self.registry.entries():
            try:
                refs.append(
                    encode_task_reference(
                        TaskReference(
                            tname, function_reference(entry.fn), entry.style, entry.arguments
                        )
                    )
                )
            except TypeError as exc:
                raise ConfigError(
                    f"the arguments given with task {tname!r} must be JSON "
                    f"values (they are sent to the worker processes): {exc}"
                ) from exc
            names.add(tname)
        if not names:
            raise ConfigError(
                "this node has no tasks: pass --tasks MODULE (or NODE_TASKS in "
                "parameters.json, or register tasks with node.task)"
            )
        self._all_names = sorted(names)
        args: list[str] = []
        for src in self._sources:
            args += ["--source", src]
        for r in refs:
            args += ["--ref", r]
        self.settings = await resolve_broker(self.settings)
        await self._check_name_is_free()
        groups = [
            GroupInfo(index=i, workers=g.n_workers, min_p=g.min_p, max_p=g.max_p, nice=g.process_p)
            for i, g in enumerate(self._groups)
        ]
        self._group_info = groups
        s = self.settings
        will = Will(
            self.topics.node_status(self.name),
            NodeStatus(node=self.name, instance=self.instance, online=False).encode(),
        )
        self._transport = MqttTransport(
            **connection_options(s),
            client_id=client_id("node", self.name),
            on_message=self._on_message,
            subscriptions=self.topics.inbound("node", self.name),
            on_connect=self._on_connect,
            will=will,
        )
        self.reports.transport = self._transport
        self.supervisor.add_groups(groups, args, cwd=cwd)
        # the worker processes start while the node connects
        await self.loops.start(dict(self._loops()), once={"node-ready"})
        await self._transport.start()
        log.info(
            "node %s: %d worker slots in %d groups, tasks: %s",
            self.name,
            self.slots,
            len(groups),
            ", ".join(self._all_names),
        )

    async def _check_name_is_free(self) -> None:
        other = await online_status(
            self.settings,
            self.topics.node_status(self.name),
            NodeStatus,
            what=f"no other node is named {self.name!r}",
        )
        if other is not None and other.instance != self.instance:
            raise ConfigError(
                f"a node named {self.name!r} is already online (host {other.host or '?'}, "
                f"pid {other.pid or '?'}): give this one another name with --name or "
                f"NODE_NAME"
                + (
                    " (with accounts, a node's name is its login: add a node account of "
                    "that name with `lbmqtt user add NAME --role node`)"
                    if self.settings.broker_username
                    else ""
                )
            )

    async def drain(
        self, grace_s: float | None = None, urgent: asyncio.Event | None = None
    ) -> bool:
        """Shut down gracefully: take no more work, let the running tasks finish and their
        results be acknowledged, while the balancer takes back the tasks not started yet.

        Waits at most ``grace_s`` (default ``NODE_DRAIN_S``), or until ``urgent`` is set.
        Returns True if the node was left holding nothing. Call :meth:`stop` afterwards.
        """
        grace = self.settings.node_drain_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        t = self._transport
        if t is None or self._stopping:
            return not self._local
        self.supervisor.draining = True  # from now on nothing new starts
        if not t.connected and self._local:
            # cut off from the broker: the balancer cannot take anything back or
            # acknowledge results until we are back, so wait (within the grace) for that
            with contextlib.suppress(Exception):
                await t.wait_ready(max(0.0, deadline - time.monotonic()))
        if not t.connected:
            return not self._local
        self.reports.flush()  # "started" reports go before the status: started tasks stay ours
        t.publish(self.topics.node_status(self.name), self._status().encode(), qos=1, retain=True)
        states = [lt.state for lt in self._local.values()]
        log.info(
            "node %s draining: %d task(s) running, %d finished awaiting their "
            "acknowledgement, %d not started go back (at most %g s)",
            self.name,
            states.count("running"),
            states.count("finished"),
            states.count("pending"),
            grace,
        )
        while self._local and not (urgent is not None and urgent.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            waits: list[asyncio.Future[Any]] = [self.changes.next()]
            if urgent is not None:
                waits.append(asyncio.ensure_future(urgent.wait()))
            await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        if self._local:
            log.warning(
                "node %s: %d task(s) still held at the end of the drain; the "
                "balancer requeues them",
                self.name,
                len(self._local),
            )
        return not self._local

    async def stop(self) -> None:
        """Announce offline, kill the worker processes, disconnect."""
        if self._stopping:
            return
        self._stopping = True
        self.loops.closing = True  # (a worker loop returns once its worker is killed)
        self.supervisor.stopping = True  # a worker that dies from here on stays dead
        heartbeat = self.loops.tasks.get("node-heartbeat")
        if heartbeat is not None:
            # (a heartbeat sent after the offline status, while it waits for its PUBACK,
            # would tell the balancer that the node is back: its tasks would be taken
            # back twice, one attempt counted for nothing)
            heartbeat.cancel()
        t = self._transport
        if t is not None and t.connected:
            self.reports.flush()
            await t.publish_confirmed(
                self.topics.node_status(self.name),
                NodeStatus(node=self.name, instance=self.instance, online=False).encode(),
                retain=True,
                timeout_s=2.0,
            )
        self.supervisor.kill_all()
        await self.loops.stop()
        await self.supervisor.reap()
        if t is not None:
            await t.close()
        c = self.counters
        log.info(
            "node %s stopped: %d started, %d done, %d failed, %d lost",
            self.name,
            c["started"],
            c["done"],
            c["failed"],
            c["lost"],
        )
        self.loops.raise_if_failed()  # (a dead loop: the process exits non-zero)

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(
        self, stop: asyncio.Event | None = None, *, on_ready: Callable[[Node], None] | None = None
    ) -> None:
        """Run until ``stop`` is set or SIGINT/SIGTERM arrives, then drain (a second
        signal: stop at once).

        Raises:
            LoopFailed: one of the node's background loops died.
        """
        await service.run(self, stop, on_ready=on_ready, drain=self._drain_on_stop)

    async def _drain_on_stop(self, urgent: asyncio.Event) -> None:
        await self.drain(urgent=urgent)

    def run_forever(self) -> None:
        """Blocking: run the node until Ctrl-C / SIGTERM; says when it is ready.

        Does nothing inside a worker process: a worker imports the script that defines its
        task functions, and a script without ``if __name__ == "__main__"`` would otherwise
        start a node in every worker.
        """
        if in_worker():
            return
        if not logging.getLogger().handlers:
            logging.basicConfig(
                level=self.settings.log_level,
                format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
            )

        def ready(n: Node) -> None:
            s = n.settings
            print(
                f"lbmqtt node {n.name}: ready with {n.slots} worker slots on "
                f"{s.broker_host}:{s.broker_port}, tasks {', '.join(n.task_names)}",
                flush=True,
            )

        asyncio.run(self.run(on_ready=ready))

    # --------------------------------------------------------------- waiting

    async def until(
        self, predicate: Callable[[Node], object], timeout_s: float, what: str | None = None
    ) -> None:
        """Wait until ``predicate(node)`` holds; it is checked now, then after every change
        of the node's tasks (an assignment set applied, a worker's message handled, a
        worker lost, a report sent).

        Args:
            predicate: a test of the node's state.
            timeout_s: the longest wait.
            what: what is waited for, for the error (default: the predicate's name).

        Raises:
            TimeoutError: the predicate did not hold within ``timeout_s``.
        """
        name = what or str(getattr(predicate, "__name__", repr(predicate)))
        await self.changes.until(lambda: predicate(self), timeout_s, name)

    async def join(self, timeout_s: float) -> None:
        """Wait until the node holds no task: every task it was given has finished and
        the balancer has acknowledged its result (or taken it back).

        Raises:
            TimeoutError: the node still held tasks after ``timeout_s``.
        """
        await self.until(lambda n: not n._local, timeout_s, "the node to hold no task")

    @property
    def held(self) -> int:
        """Number of tasks held: pending, running, or finished and not acknowledged."""
        return len(self._local)

    @property
    def resources(self) -> dict[str, float]:
        """Counted resources announced: the machine's cores and memory, then NODE_RESOURCES."""
        return announce.resources(self.settings)

    @property
    def slots(self) -> int:
        """Number of worker slots (processes)."""
        return len(self.supervisor.workers)

    @property
    def task_names(self) -> list[str]:
        """Names of the tasks this node serves (known after :meth:`start`)."""
        return list(self._all_names)

    # --------------------------------------------------------------- MQTT in

    def _status(self) -> NodeStatus:
        return announce.status(
            self.settings,
            node=self.name,
            instance=self.instance,
            started_at=self.started_at,
            groups=self._group_info,
            tasks=self._all_names,
            draining=self.supervisor.draining,
            held=self._local.values(),
        )

    def _on_connect(self) -> None:
        assert self._transport is not None
        self._transport.publish(
            self.topics.node_status(self.name), self._status().encode(), qos=1, retain=True
        )
        # after a reconnect, everything not yet acknowledged goes again
        for lt in self._local.values():
            if lt.state == "finished" and lt.result is not None:
                self.reports.results[lt.a.id] = lt.result
        self.reports.schedule()

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic != self.topics.assign(self.name):
            return
        if not payload:
            self._apply_set([])
            return
        try:
            node, tasks = decode_assignment_set(payload, self._held_assignment)
        except Exception as exc:
            self._bad_log.warning("assign", "ignoring a malformed assignment set: %s", exc)
            return
        if node != self.name:
            self._bad_log.warning("addressee", "ignoring an assignment set addressed to %r", node)
            return
        self._apply_set(tasks)

    def _held_assignment(self, task_id: str) -> Assignment | None:
        lt = self._local.get(task_id)
        return None if lt is None else lt.a

    def _apply_set(self, tasks: list[Assignment]) -> None:
        wanted = {a.id: a for a in tasks}
        added = False
        gone: set[str] = set()
        for tid, lt in list(self._local.items()):
            a = wanted.get(tid)
            if a is not None and a.attempt == lt.a.attempt:
                continue
            # gone from the set (or replaced by a newer attempt): cancelled, moved or acked
            del self._local[tid]
            gone.add(tid)
            self.supervisor.withdraw(lt)
        self.reports.forget(gone)
        for a in tasks:
            if a.id in self._local:
                continue
            lt = HeldTask(a=a, args_json=encode_json(a.args))
            if not self.supervisor.enqueue(lt):
                log.warning("task %s assigned to unknown group %d; ignored", a.id, a.group)
                continue
            self._local[a.id] = lt
            added = True
        if added and self.supervisor.draining and self._transport is not None:
            # sent before the balancer saw us draining: list them, so they go back too
            self._transport.publish(
                self.topics.node_status(self.name), self._status().encode(), qos=1, retain=True
            )
        self.supervisor.dispatch()
        self.changes.notify()

    # --------------------------------------------------------------- background

    def _loops(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        """Every background loop of the node, named: its own, and one per worker slot."""
        t = self._transport
        assert t is not None
        return [
            ("node-heartbeat", self._heartbeat_loop),
            ("node-resend", self._resend_loop),
            ("node-ready", self._ready_watch),
            ("node-transport", t.watch),
            *self.supervisor.loops(),
        ]

    async def _ready_watch(self) -> None:
        t = self._transport
        assert t is not None
        await t.wait_ready(float("inf"))
        await self.supervisor.all_started.wait()
        self.ready.set()

    async def _heartbeat_loop(self) -> None:
        t = self._transport
        assert t is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            if not t.connected:
                continue
            self._hb_seq += 1
            hb = announce.heartbeat(
                node=self.name, instance=self.instance, seq=self._hb_seq, held=self._local.values()
            )
            t.publish(self.topics.heartbeat(self.name), hb.encode(), qos=0)

    async def _resend_loop(self) -> None:
        period = self.settings.result_resend_s
        while True:
            await asyncio.sleep(period / 2)
            now = time.monotonic()
            for lt in self._local.values():
                if (
                    lt.state == "finished"
                    and lt.result is not None
                    and now - lt.result_sent_at >= period
                ):
                    self.reports.results[lt.a.id] = lt.result
            if self.reports.results:
                self.reports.flush()
