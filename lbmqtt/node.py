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
import json
import logging
import os
import pickle
import signal
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from . import __version__
from .config import Settings, WorkerGroup, coerce_settings
from .discovery import resolve as resolve_broker
from .errors import ConfigError
from .health import online_status
from .mqtt import MqttTransport, Will, client_id, connection_options
from .protocol import (
    Assignment,
    AssignmentSet,
    ErrorInfo,
    GroupInfo,
    Heartbeat,
    NodeReport,
    NodeStatus,
    Progress,
    Result,
    Started,
    TaskRef,
    Topics,
    decode,
    encode_json,
)
from .ratelog import LogLimiter
from .registry import Registry, function_reference, in_worker, load_sources
from .worker import _HEADER

log = logging.getLogger(__name__)

PROGRESS_FLUSH_S = 0.1
HANDOFF_SHORT_S = 0.002
"""Tasks that ran shorter than this on average (per task name, on this node) are handed to a
worker several at a time, in one write, and the worker sends their results together: for
no-op tasks the hand-off, not the task, is the work."""
HANDOFF_BATCH = 8
"""Most short tasks handed to one worker at a time."""
REPORT_GAP_S = 0.002
"""Reports go out at most this often: a lone result leaves at once, a busy node's results
share a report (fewer messages for the broker and fewer rounds for the balancer)."""
RESTART_BACKOFF_MAX_S = 30.0


def default_node_name() -> str:
    """The host name, reduced to a valid node name."""
    raw = socket.gethostname().split(".")[0] or "node"
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in raw)[:64]
    return name if name[0].isalnum() or name[0] == "_" else f"n{name}"[:64]


def _memory_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass
class _LocalTask:
    a: Assignment
    args_json: bytes
    state: Literal["pending", "running", "finished"] = "pending"
    worker: _Worker | None = None
    result: Result | None = None
    result_sent_at: float = 0.0
    started_mono: float = 0.0
    timeout_handle: asyncio.TimerHandle | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.a.id, self.a.attempt)


@dataclass
class _Worker:
    group: GroupInfo
    slot: int
    state: Literal["starting", "idle", "busy", "killing", "dead"] = "starting"
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    queue: deque[_LocalTask] = field(default_factory=deque)
    """Handed to this worker, in order: the first runs, the others (short tasks only,
    handed over in one write) wait in the worker."""
    kill_expected: bool = False
    pid: int = 0
    deaths: deque[float] = field(default_factory=lambda: deque(maxlen=5))

    @property
    def task(self) -> _LocalTask | None:
        """The task it runs (the first handed over and not finished)."""
        return self.queue[0] if self.queue else None

    def kill(self) -> None:
        """Kill the worker and whatever its task started (its own session and group).

        It takes no more work, and what it still says is ignored, until it is restarted.
        (Tasks still waiting in it: the node takes them back first, :meth:`Node._kill`.)
        """
        self.kill_expected = True
        self.queue.clear()
        if self.state != "dead":
            self.state = "killing"
        if self.proc is not None and self.proc.returncode is None:
            # os.kill, not Process.kill(): the latter polls (waitpid) first and may reap the
            # child under asyncio's child watcher ("Unknown child process pid" warnings)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)


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
        self._workers_ready = asyncio.Event()
        self._local: dict[str, _LocalTask] = {}
        self._pending: dict[int, deque[_LocalTask]] = {}
        self._workers: list[_Worker] = []
        self._worker_tasks: list[asyncio.Task[None]] = []
        self._closing_writers: list[asyncio.StreamWriter] = []
        self._bg: list[asyncio.Task[None]] = []
        self._transport: MqttTransport | None = None
        self._started: list[Started] = []
        self._progress: dict[str, Progress] = {}
        self._results: dict[str, Result] = {}
        self._flush_soon = False
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_due = 0.0
        self._runtimes: dict[str, float] = {}
        self._dispatch_wanted = False
        self._last_flush = 0.0
        self._progress_timer: asyncio.TimerHandle | None = None
        self._hb_seq = 0
        self._stopping = False
        self._draining = False
        self._local_changed = asyncio.Event()
        self._all_names: list[str] = []
        self._worker_args: list[str] = []
        self.started_at = time.time()
        self.counters = {"started": 0, "done": 0, "failed": 0, "lost": 0, "killed": 0}

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
                    json.dumps(
                        {
                            "name": tname,
                            "ref": function_reference(entry.fn),
                            "style": entry.style,
                            "arguments": entry.arguments,
                        }
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
        self._worker_args = args
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
            subscriptions=[(self.topics.assign(self.name), 1)],
            on_connect=self._on_connect,
            will=will,
        )
        for g in groups:
            self._pending[g.index] = deque()
            for slot in range(g.workers):
                w = _Worker(group=g, slot=slot)
                self._workers.append(w)
                self._worker_tasks.append(
                    asyncio.create_task(self._worker_loop(w), name=f"worker-{g.index}-{slot}")
                )
        await self._transport.start()
        self._bg = [
            asyncio.create_task(self._heartbeat_loop(), name="node-heartbeat"),
            asyncio.create_task(self._resend_loop(), name="node-resend"),
            asyncio.create_task(self._ready_watch(), name="node-ready"),
        ]
        log.info(
            "node %s: %d worker slots in %d groups, tasks: %s",
            self.name,
            len(self._workers),
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
        self._draining = True  # from now on nothing new starts
        if not t.connected and self._local:
            # cut off from the broker: the balancer cannot take anything back or
            # acknowledge results until we are back, so wait (within the grace) for that
            with contextlib.suppress(Exception):
                await t.wait_ready(max(0.0, deadline - time.monotonic()))
        if not t.connected:
            return not self._local
        self._flush()  # "started" reports go before the status: started tasks stay ours
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
            self._local_changed.clear()
            waits = [asyncio.ensure_future(self._local_changed.wait())]
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
        t = self._transport
        if t is not None and t.connected:
            self._flush()
            await t.publish_confirmed(
                self.topics.node_status(self.name),
                NodeStatus(node=self.name, instance=self.instance, online=False).encode(),
                retain=True,
                timeout_s=2.0,
            )
        for task in self._bg:
            task.cancel()
        for w in self._workers:
            w.kill()
        for task in self._worker_tasks:
            task.cancel()
        await asyncio.gather(*self._bg, *self._worker_tasks, return_exceptions=True)
        for writer in self._closing_writers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
        for w in self._workers:
            if w.proc is not None and w.proc.returncode is None:
                w.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.proc.wait(), 5)
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

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(
        self, stop: asyncio.Event | None = None, *, on_ready: Callable[[Node], None] | None = None
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
            urgent = asyncio.Event()  # a second signal: stop now
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, urgent.set)
            await self.drain(urgent=urgent)
        finally:
            await self.stop()

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

    @property
    def resources(self) -> dict[str, float]:
        """Counted resources announced: the machine's cores and memory, then NODE_RESOURCES."""
        return {
            "cores": float(os.cpu_count() or 1),
            "memory_mb": float(_memory_mb()),
            **self.settings.node_resources,
        }

    @property
    def slots(self) -> int:
        """Number of worker slots (processes)."""
        return len(self._workers)

    @property
    def task_names(self) -> list[str]:
        """Names of the tasks this node serves (known after :meth:`start`)."""
        return list(self._all_names)

    # --------------------------------------------------------------- MQTT in

    def _status(self) -> NodeStatus:
        return NodeStatus(
            node=self.name,
            instance=self.instance,
            online=True,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            started_at=self.started_at,
            groups=self._group_info,
            tasks=self._all_names,
            cores=os.cpu_count() or 1,
            memory_mb=_memory_mb(),
            speed=self.settings.node_speed,
            heartbeat_s=self.settings.heartbeat_s,
            resources=self.resources,
            tags=sorted(set(self.settings.node_tags)),
            draining=self._draining,
            pending=[
                TaskRef(id=lt.a.id, attempt=lt.a.attempt)
                for lt in self._local.values()
                if lt.state == "pending"
            ]
            if self._draining
            else [],
        )

    def _on_connect(self) -> None:
        assert self._transport is not None
        self._transport.publish(
            self.topics.node_status(self.name), self._status().encode(), qos=1, retain=True
        )
        # after a reconnect, everything not yet acknowledged goes again
        for lt in self._local.values():
            if lt.state == "finished" and lt.result is not None:
                self._results[lt.a.id] = lt.result
        self._schedule_flush()

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic != self.topics.assign(self.name):
            return
        if not payload:
            self._apply_set([])
            return
        try:
            node, tasks = self._decode_set(payload)
        except Exception as exc:
            self._bad_log.warning("assign", "ignoring a malformed assignment set: %s", exc)
            return
        if node != self.name:
            self._bad_log.warning("addressee", "ignoring an assignment set addressed to %r", node)
            return
        self._apply_set(tasks)

    def _decode_set(self, payload: bytes) -> tuple[str, list[Assignment]]:
        """The addressee and the tasks of an assignment set.

        A busy node's set comes again at every change, mostly with the tasks it holds
        already: only the ones it does not hold (by id and attempt; an attempt's
        assignment never changes) are validated, which costs a third of validating all.
        """
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):
            data = None
        tasks = data.get("tasks") if isinstance(data, dict) else None
        if not isinstance(tasks, list):
            aset = decode(AssignmentSet, payload)  # the error, with its reason
            return aset.node, aset.tasks
        head = AssignmentSet.model_validate({**data, "tasks": []})
        out: list[Assignment] = []
        for item in tasks:
            tid = item.get("id") if isinstance(item, dict) else None
            lt = self._local.get(tid) if isinstance(tid, str) else None
            if (
                lt is not None
                and type(item.get("attempt")) is int
                and (item["attempt"] == lt.a.attempt)
            ):
                out.append(lt.a)
            else:
                out.append(Assignment.model_validate(item))
        return head.node, out

    def _apply_set(self, tasks: list[Assignment]) -> None:
        wanted = {a.id: a for a in tasks}
        added = False
        for tid, lt in list(self._local.items()):
            a = wanted.get(tid)
            if a is not None and a.attempt == lt.a.attempt:
                continue
            # gone from the set (or replaced by a newer attempt): cancelled, moved or acked
            del self._local[tid]
            self._local_changed.set()
            self._results.pop(tid, None)
            self._progress.pop(tid, None)
            if lt.timeout_handle is not None:
                lt.timeout_handle.cancel()
            if lt.state == "running" and lt.worker is not None:
                w = lt.worker
                if w.task is lt:
                    log.info(
                        "task %s (attempt %d) withdrawn while running: killing its worker",
                        tid,
                        lt.a.attempt,
                    )
                    self.counters["killed"] += 1
                    self._kill(w)
                else:  # handed over, not started: the worker skips it
                    w.queue.remove(lt)
                    lt.worker = None
                    self._send(w, ("skip", tid, lt.a.attempt))
        for a in tasks:
            if a.id in self._local:
                continue
            if a.group not in self._pending:
                log.warning("task %s assigned to unknown group %d; ignored", a.id, a.group)
                continue
            lt = _LocalTask(a=a, args_json=encode_json(a.args))
            self._local[a.id] = lt
            self._pending[a.group].append(lt)
            added = True
        if added and self._draining and self._transport is not None:
            # sent before the balancer saw us draining: list them, so they go back too
            self._transport.publish(
                self.topics.node_status(self.name), self._status().encode(), qos=1, retain=True
            )
        self._dispatch()

    # --------------------------------------------------------------- running

    def _dispatch_soon(self) -> None:
        """Dispatch once the worker messages already read are handled: a burst of results
        from a worker is answered by one hand-off."""
        if not self._dispatch_wanted:
            self._dispatch_wanted = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _is_short(self, name: str) -> bool:
        rt = self._runtimes.get(name)
        return rt is not None and rt < HANDOFF_SHORT_S

    def _dispatch(self) -> None:
        self._dispatch_wanted = False
        if self._draining:
            return  # what is not started goes back to the balancer
        for w in self._workers:
            if w.state not in ("idle", "busy") or w.writer is None:
                continue
            if w.queue and (
                len(w.queue) >= HANDOFF_BATCH or not all(self._is_short(x.a.name) for x in w.queue)
            ):
                continue  # busy with a task not known to be short, or full
            queue = self._pending[w.group.index]
            if not queue:
                continue
            # the highest priority first, then the oldest: an urgent task does not wait
            # behind ordinary ones held in this node's pipelining window
            live = [lt for lt in queue if self._local.get(lt.a.id) is lt and lt.state == "pending"]
            queue.clear()
            if not live:
                continue
            order = sorted(range(len(live)), key=lambda i: (-live[i].a.priority, i))
            take: list[_LocalTask] = []
            for i in order:
                lt = live[i]
                if (w.queue or take) and not self._is_short(lt.a.name):
                    break  # only short tasks share a hand-off (and only behind short ones)
                take.append(lt)
                if len(w.queue) + len(take) >= HANDOFF_BATCH:
                    break
            chosen = {id(lt) for lt in take}
            queue.extend(lt for lt in live if id(lt) not in chosen)
            self._hand_over(w, take)

    def _send(self, w: _Worker, *msgs: tuple[Any, ...]) -> bool:
        """Write frames to a worker in one write. False if it is going away."""
        data = b"".join(
            _HEADER.pack(len(f)) + f
            for f in (pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL) for m in msgs)
        )
        try:
            assert w.writer is not None
            w.writer.write(data)
        except (AssertionError, OSError, RuntimeError) as exc:
            log.warning("could not write to worker %d (%s)", w.pid, exc)
            w.state = "dead"
            return False
        return True

    def _hand_over(self, w: _Worker, tasks: list[_LocalTask]) -> None:
        frames = [
            (
                "run",
                lt.a.id,
                lt.a.attempt,
                lt.a.name,
                lt.args_json,
                {"user": lt.a.user, "name": lt.a.name, "priority": lt.a.priority},
            )
            for lt in tasks
        ]
        if not self._send(w, *frames):
            # the worker is going away: the tasks wait for the next idle worker
            self._pending[w.group.index].extendleft(reversed(tasks))
            return
        now = time.time()
        was_idle = not w.queue
        w.state = "busy"
        for lt in tasks:
            w.queue.append(lt)
            lt.state = "running"
            lt.worker = w
            self.counters["started"] += 1
            self._started.append(Started(id=lt.a.id, attempt=lt.a.attempt, time=now))
        if was_idle:
            self._began(w)
        self._schedule_flush(urgent=False)

    def _began(self, w: _Worker) -> None:
        """The worker's first task has started (as far as the node can tell)."""
        lt = w.queue[0]
        lt.started_mono = time.monotonic()
        if lt.a.timeout_s is not None:
            lt.timeout_handle = asyncio.get_running_loop().call_later(
                lt.a.timeout_s, self._on_timeout, lt
            )

    def _take_back(self, w: _Worker) -> list[_LocalTask]:
        """The tasks waiting in a worker behind the one it runs (handed over, never
        started) go back to the front of their queue; returns them."""
        waiting = list(w.queue)[1:]
        for _ in waiting:
            w.queue.pop()
        for lt in waiting:
            lt.state = "pending"
            lt.worker = None
        self._pending[w.group.index].extendleft(reversed(waiting))
        return waiting

    def _kill(self, w: _Worker) -> None:
        """Kill a worker, taking back the tasks waiting in it."""
        self._take_back(w)
        w.kill()

    def _on_timeout(self, lt: _LocalTask) -> None:
        if lt.state != "running" or self._local.get(lt.a.id) is not lt or lt.worker is None:
            return
        w = lt.worker
        if w.task is not lt:
            return
        log.info(
            "task %s passed its timeout of %g s: killing its worker", lt.a.id, lt.a.timeout_s or 0
        )
        self._finish(
            lt,
            Result(
                id=lt.a.id,
                attempt=lt.a.attempt,
                status="timeout",
                error=ErrorInfo(
                    type="TimeoutError",
                    message=f"task {lt.a.name!r} exceeded its timeout of "
                    f"{lt.a.timeout_s:g} s; its worker process was killed",
                ),
                runtime_s=time.monotonic() - lt.started_mono,
                finished_at=time.time(),
            ),
        )
        self._kill(w)
        self._dispatch()

    def _finish(self, lt: _LocalTask, result: Result) -> None:
        lt.state = "finished"
        lt.result = result
        w = lt.worker
        lt.worker = None
        if w is not None and w.task is lt:
            w.queue.popleft()
            if w.queue:
                self._began(w)
        if lt.timeout_handle is not None:
            lt.timeout_handle.cancel()
            lt.timeout_handle = None
        self._progress.pop(lt.a.id, None)
        self._results[lt.a.id] = result
        key = {"done": "done", "lost": "lost"}.get(result.status, "failed")
        self.counters[key] += 1
        self._schedule_flush()

    def _on_worker_message(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ready":
            w.state = "idle"
            w.pid = msg[1]
            if all(x.state in ("idle", "busy") for x in self._workers):
                self._workers_ready.set()
            self._dispatch()
            return
        lt = w.task
        if lt is None or msg[1] != lt.a.id or msg[2] != lt.a.attempt:
            return  # a late message about a task already withdrawn or timed out
        if kind == "progress":
            self._progress[lt.a.id] = Progress(
                id=lt.a.id, attempt=lt.a.attempt, progress=int(msg[3])
            )
            self._schedule_progress()
        elif kind == "done":
            self._ran(lt.a.name, msg[4])
            self._finish(
                lt,
                Result(
                    id=lt.a.id,
                    attempt=lt.a.attempt,
                    status="done",
                    result=json.loads(msg[3]),
                    runtime_s=msg[4],
                    finished_at=time.time(),
                ),
            )
            if not w.queue:
                w.state = "idle"
            self._dispatch_soon()
        elif kind == "failed":
            self._ran(lt.a.name, msg[6])
            self._finish(
                lt,
                Result(
                    id=lt.a.id,
                    attempt=lt.a.attempt,
                    status="failed",
                    error=ErrorInfo(type=msg[3], message=msg[4], traceback=msg[5]),
                    runtime_s=msg[6],
                    finished_at=time.time(),
                ),
            )
            if not w.queue:
                w.state = "idle"
            self._dispatch_soon()

    def _ran(self, name: str, secs: float) -> None:
        """Moving average of a task name's runtimes here (decides batched hand-offs)."""
        old = self._runtimes.get(name)
        self._runtimes[name] = secs if old is None else 0.8 * old + 0.2 * secs

    async def _worker_loop(self, w: _Worker) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.0
        while not self._stopping:
            if backoff:
                await asyncio.sleep(backoff)
            parent_sock, child_sock = socket.socketpair()
            w.state = "starting"
            w.kill_expected = False
            try:
                w.proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "lbmqtt.worker",
                    "--fd",
                    str(child_sock.fileno()),
                    "--parent",
                    str(os.getpid()),
                    "--nice",
                    str(w.group.nice),
                    *self._worker_args,
                    pass_fds=[child_sock.fileno()],
                    stdin=asyncio.subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                log.error("cannot start a worker process: %s", exc)
                child_sock.close()
                parent_sock.close()
                backoff = min(RESTART_BACKOFF_MAX_S, max(1.0, backoff * 2))
                continue
            finally:
                with contextlib.suppress(OSError):
                    child_sock.close()
            reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
            w.writer = writer
            try:
                while True:
                    head = await reader.readexactly(_HEADER.size)
                    (n,) = _HEADER.unpack(head)
                    body = await reader.readexactly(n)
                    try:
                        self._on_worker_message(w, pickle.loads(body))  # noqa: S301 - our child
                    except Exception:
                        log.exception("failed to handle a message from worker %d", w.pid)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                # no more work for it from here on, even before its process is reaped
                w.writer = None
                if not w.kill_expected:
                    w.state = "dead"
                writer.close()
                self._closing_writers.append(writer)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
            self._closing_writers.remove(writer)
            rc = await w.proc.wait()
            w.state = "dead"
            lt = w.task
            waiting = self._take_back(w)
            w.queue.clear()
            if lt is not None and lt.state == "running" and self._local.get(lt.a.id) is lt:
                how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
                log.warning(
                    "worker process %d died (%s) while running task %s", w.pid, how, lt.a.id
                )
                self._finish(
                    lt,
                    Result(
                        id=lt.a.id,
                        attempt=lt.a.attempt,
                        status="lost",
                        error=ErrorInfo(
                            type="WorkerLost",
                            message=f"the worker process died ({how}) while running the task",
                        ),
                        runtime_s=time.monotonic() - lt.started_mono,
                        finished_at=time.time(),
                    ),
                )
            elif not w.kill_expected and not self._stopping:
                log.warning("worker process %d exited (code %s); restarting it", w.pid, rc)
            if waiting and not self._stopping:
                self._dispatch()  # to the other workers
            now = loop.time()
            if not w.kill_expected:
                w.deaths.append(now)
            recent = [t for t in w.deaths if now - t < 10]
            backoff = (
                0.0 if len(recent) < 3 else min(RESTART_BACKOFF_MAX_S, 0.5 * 2 ** (len(recent) - 3))
            )

    async def _ready_watch(self) -> None:
        t = self._transport
        assert t is not None
        await t.wait_ready(float("inf"))
        await self._workers_ready.wait()
        self.ready.set()

    # --------------------------------------------------------------- MQTT out

    def _schedule_flush(self, *, urgent: bool = True) -> None:
        """Send a report soon: results (``urgent``) at once unless a report left less than
        REPORT_GAP_S ago while other tasks run or wait here (their results are due to share
        the next report: as in Nagle's algorithm, only a sender with more coming waits),
        then when that gap is over; started notices alone wait a gap, so that a short
        task's result carries them."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not urgent:
            due = now + REPORT_GAP_S
        elif any(w.queue for w in self._workers) or any(self._pending.values()):
            due = max(now, self._last_flush + REPORT_GAP_S)
        else:
            due = now  # nothing else would ride along: a lone task is not held back
        if self._flush_soon:
            if self._flush_due <= due:
                return
            if self._flush_handle is not None:
                self._flush_handle.cancel()
        self._flush_soon = True
        self._flush_due = due
        if due > now:
            self._flush_handle = loop.call_at(due, self._flush)
        else:
            self._flush_handle = None
            loop.call_soon(self._flush)

    def _schedule_progress(self) -> None:
        if self._progress_timer is None:
            self._progress_timer = asyncio.get_running_loop().call_later(
                PROGRESS_FLUSH_S, self._flush
            )

    def _flush(self) -> None:
        self._flush_soon = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        t = self._transport
        if t is None or not (self._started or self._progress or self._results):
            return
        if not t.connected:
            return  # kept: resent on reconnect (results) or superseded (progress)
        now = time.monotonic()
        report = NodeReport(
            node=self.name,
            instance=self.instance,
            started=self._started,
            progress=list(self._progress.values()),
            results=list(self._results.values()),
        )
        t.publish(self.topics.reports(self.name), report.encode(), qos=1)
        self._last_flush = asyncio.get_running_loop().time()
        for tid in self._results:
            lt = self._local.get(tid)
            if lt is not None:
                lt.result_sent_at = now
        self._started = []
        self._progress = {}
        self._results = {}

    async def _heartbeat_loop(self) -> None:
        t = self._transport
        assert t is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            if not t.connected:
                continue
            self._hb_seq += 1
            try:
                load = list(os.getloadavg())
            except OSError:
                load = []
            running = [
                TaskRef(id=lt.a.id, attempt=lt.a.attempt)
                for lt in self._local.values()
                if lt.state == "running"
            ]
            pending = sum(1 for lt in self._local.values() if lt.state == "pending")
            held = [TaskRef(id=lt.a.id, attempt=lt.a.attempt) for lt in self._local.values()]
            hb = Heartbeat(
                node=self.name,
                instance=self.instance,
                seq=self._hb_seq,
                time=time.time(),
                load=load,
                running=running,
                pending=pending,
                held=held,
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
                    self._results[lt.a.id] = lt.result
            if self._results:
                self._flush()
