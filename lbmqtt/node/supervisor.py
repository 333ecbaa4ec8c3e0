"""The node's worker-process supervisor: one worker process per slot.

It starts (and restarts, with a back-off when they keep dying) the worker processes, hands
them the tasks the node holds, reads what they say (:mod:`lbmqtt.protocol_worker`), kills a
worker whose task was withdrawn or timed out, and takes back the tasks handed to a worker
that went away. What it learns goes to the report batcher; it knows nothing of MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..backoff import Backoff, compute_backoff
from ..protocol import Assignment, ErrorInfo, GroupInfo, Progress, Result
from ..protocol.codec import decode_json
from ..protocol_worker import (
    Done,
    Failed,
    Hello,
    Message,
    Run,
    Skip,
    TaskProgress,
    WorkerMessageError,
    encode,
    take,
)
from ..ratelog import LogLimiter
from .reports import ReportBatcher

__all__ = [
    "HANDOFF_BATCH",
    "HANDOFF_SHORT_S",
    "HANDOFF_WORK_S",
    "RESTART_BACKOFF_MAX_S",
    "HeldTask",
    "Supervisor",
    "WorkerProc",
]

log = logging.getLogger(__name__)

HANDOFF_SHORT_S = 0.002
"""Tasks that ran shorter than this on average (per task name, on this node) are handed to a
worker several at a time, in one write: for no-op tasks the hand-off, not the task, is the
work."""
HANDOFF_WORK_S = 0.002
"""A hand-off of short tasks holds about this much of their work (their average runtime
here): 8 tasks of 0.25 ms, 64 no-op ones. Idle workers share the pending tasks evenly."""
HANDOFF_BATCH = 64
"""Most short tasks handed to one worker at a time. (8 before the hand-off was sized by
runtime: a node spent a quarter of its time writing to its workers, and the workers a
third of theirs reading, at 8 no-op tasks a write.)"""
HANDOFF_NEXT_S = 0.25
"""A worker running a task of a name that ran shorter than this on average (here) is
handed its next task, if that one is known to be as brief, while it runs: it starts that
one as soon as it is done, not a hand-off later (~1-2 ms of idle slot per task, 2-4 % of a
50 ms task). Workers with nothing to run are served first."""
RESTART_BACKOFF_MAX_S = 30.0
DEATHS_WINDOW_S = 10.0
"""A worker that died this many times (3 or more) within this window is restarted after a
back-off (0.5 s, doubling)."""


@dataclass
class HeldTask:
    """A task attempt the node holds: from its assignment until the balancer acknowledges
    its result (by leaving it out of the node's assignment set)."""

    a: Assignment
    args_json: bytes
    state: Literal["pending", "running", "finished"] = "pending"
    worker: WorkerProc | None = None
    result: Result | None = None
    result_sent_at: float = 0.0
    started_mono: float = 0.0
    timeout_handle: asyncio.TimerHandle | None = None
    start_reported: bool = False
    """Its ``Started`` went to the reports (at hand-over; for a task handed over behind a
    brief one, when the worker starts it)."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.a.id, self.a.attempt)


@dataclass
class WorkerProc:
    """One slot's worker process, as the supervisor sees it."""

    group: GroupInfo
    slot: int
    state: Literal["starting", "idle", "busy", "killing", "dead"] = "starting"
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    queue: deque[HeldTask] = field(default_factory=deque)
    """Handed to this worker, in order: the first runs, the others (short tasks only,
    handed over in one write) wait in the worker."""
    kill_expected: bool = False
    pid: int = 0
    deaths: deque[float] = field(default_factory=lambda: deque(maxlen=5))

    @property
    def task(self) -> HeldTask | None:
        """The task it runs (the first handed over and not finished)."""
        return self.queue[0] if self.queue else None

    def kill(self) -> None:
        """Kill the worker and whatever its task started (its own session and group).

        It takes no more work, and what it still says is ignored, until it is restarted.
        (Tasks still waiting in it: the supervisor takes them back first,
        :meth:`Supervisor.kill`.)
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


class Supervisor:
    """The worker processes of a node and the tasks handed to them.

    Args:
        held: the tasks the node holds, by id (shared with the node, which adds and removes
            them as its assignment set changes).
        reports: where "started" notices, progress and results go.
        counters: the node's counters (started, done, failed, lost, killed).
        on_change: called after every change of a held task's state.
    """

    def __init__(
        self,
        held: dict[str, HeldTask],
        reports: ReportBatcher,
        counters: dict[str, int],
        on_change: Callable[[], None],
    ):
        self.held = held
        self.reports = reports
        self.counters = counters
        self.on_change = on_change
        self.workers: list[WorkerProc] = []
        self.pending: dict[int, deque[HeldTask]] = {}
        """Tasks held and not handed over yet, per worker group, in arrival order."""
        self.all_started = asyncio.Event()
        """Set once every worker process has said hello."""
        self.draining = False
        """Nothing new starts (what is not started goes back to the balancer)."""
        self.stopping = False
        self.worker_args: list[str] = []
        self.worker_cwd: str | None = None
        self._runtimes: dict[str, float] = {}
        self._dispatch_wanted = False
        self._closing_writers: list[asyncio.StreamWriter] = []
        self._bad_log = LogLimiter(log)

    def add_groups(
        self, groups: list[GroupInfo], worker_args: list[str], cwd: str | None = None
    ) -> None:
        """One worker slot per worker of each group; ``worker_args`` say what to load,
        ``cwd`` where from (the folder the node loaded them in: relative ``.py`` paths and
        dotted names resolve the same way in every worker, restarted ones too)."""
        self.worker_args = worker_args
        self.worker_cwd = cwd
        for g in groups:
            self.pending[g.index] = deque()
            for slot in range(g.workers):
                self.workers.append(WorkerProc(group=g, slot=slot))

    def loops(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        """The background loops, named: one per worker slot."""
        return [
            (f"worker-{w.group.index}-{w.slot}", functools.partial(self._worker_loop, w))
            for w in self.workers
        ]

    def busy(self) -> bool:
        """Whether any task is handed to a worker or waits for one."""
        return any(w.queue for w in self.workers) or any(self.pending.values())

    def kill_all(self) -> None:
        """Kill every worker process (on stop; they are not restarted)."""
        self.stopping = True
        for w in self.workers:
            w.kill()

    async def reap(self) -> None:
        """After the loops have ended: wait for the sockets to close and the processes to
        exit (killing any still alive)."""
        for writer in self._closing_writers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.proc.wait(), 5)

    # ------------------------------------------------------------ held tasks

    def enqueue(self, lt: HeldTask) -> bool:
        """Queue a newly held task for a worker of its group; False if no such group."""
        queue = self.pending.get(lt.a.group)
        if queue is None:
            return False
        queue.append(lt)
        return True

    def withdraw(self, lt: HeldTask) -> None:
        """A held task left the assignment set: a running one has its worker killed, one
        handed over and not started is skipped by its worker."""
        if lt.timeout_handle is not None:
            lt.timeout_handle.cancel()
        if lt.state == "running" and lt.worker is not None:
            w = lt.worker
            if w.task is lt:
                log.info(
                    "task %s (attempt %d) withdrawn while running: killing its worker",
                    lt.a.id,
                    lt.a.attempt,
                )
                self.counters["killed"] += 1
                self.kill(w)
            else:  # handed over, not started: the worker skips it
                lt.worker = None
                if lt in w.queue:  # (not when the worker is gone: a drain that ended)
                    w.queue.remove(lt)
                    self._send(w, Skip(lt.a.id, lt.a.attempt))

    # ------------------------------------------------------------ hand-off

    def _dispatch_soon(self) -> None:
        """Dispatch once the worker messages already read are handled: a burst of results
        from a worker is answered by one hand-off."""
        if not self._dispatch_wanted:
            self._dispatch_wanted = True
            asyncio.get_running_loop().call_soon(self.dispatch)

    def _is_short(self, name: str) -> bool:
        rt = self._runtimes.get(name)
        return rt is not None and rt < HANDOFF_SHORT_S

    def _is_brief(self, name: str) -> bool:
        rt = self._runtimes.get(name)
        return rt is not None and rt < HANDOFF_NEXT_S

    def dispatch(self) -> None:
        """Hand the pending tasks to the idle workers (short ones several at a time, an
        even share each), then a brief task to each worker that runs one
        (:data:`HANDOFF_NEXT_S`)."""
        self._dispatch_wanted = False
        if self.draining:
            return  # what is not started goes back to the balancer
        takers = [w for w in self.workers if self._takes_more(w, False)]
        if takers:
            count = Counter(w.group.index for w in takers)
            share = {g: -(-len(self.pending[g]) // n) for g, n in count.items()}  # (ceil)
            for w in takers:
                g = w.group.index
                take = self._pick(self.pending[g], w, False, share[g])
                if take:
                    self._hand_over(w, take)
        for w in self.workers:
            if self._takes_more(w, True):
                take = self._pick(self.pending[w.group.index], w, True)
                if take:
                    self._hand_over(w, take, behind=True)

    def _takes_more(self, w: WorkerProc, ahead: bool) -> bool:
        """Whether ``w`` may be handed tasks now: first round, it is idle or runs short
        ones (fewer than HANDOFF_BATCH); second round (``ahead``), it runs one brief one."""
        if w.state not in ("idle", "busy") or w.writer is None:
            return False
        if ahead:
            head = w.queue[0] if len(w.queue) == 1 else None
            return (
                head is not None and self._is_brief(head.a.name) and not self._is_short(head.a.name)
            )
        return not w.queue or (
            len(w.queue) < HANDOFF_BATCH and all(self._is_short(x.a.name) for x in w.queue)
        )

    def _pick(
        self, queue: deque[HeldTask], w: WorkerProc, ahead: bool, share: int = 1
    ) -> list[HeldTask]:
        """Take from ``queue`` (a group's pending tasks) what ``w`` gets: the highest
        priority first, then the oldest (an urgent task does not wait behind ordinary ones
        held in this node's pipelining window); behind a task, only short ones behind short
        ones (the worker's tasks then hold up to HANDOFF_WORK_S of their average runtime
        here, ``share`` and HANDOFF_BATCH tasks), or (``ahead``) one brief one."""
        if not queue:
            return []
        live = [lt for lt in queue if self.held.get(lt.a.id) is lt and lt.state == "pending"]
        queue.clear()
        if not live:
            return []
        top = live[0].a.priority
        # (one priority, the common case: the queue's order already; no sort of the whole
        # queue for each worker's pick)
        uniform = all(lt.a.priority == top for lt in live)
        order: Sequence[int] = (
            range(len(live))
            if uniform
            else sorted(range(len(live)), key=lambda i: (-live[i].a.priority, i))
        )
        take: list[HeldTask] = []
        runtimes = self._runtimes
        work = sum(runtimes.get(x.a.name, 0.0) for x in w.queue)  # (short ones only)
        most = min(share, HANDOFF_BATCH)
        for i in order:
            lt = live[i]
            if ahead:
                if self._is_brief(lt.a.name):
                    take.append(lt)
                break  # (one, and only a brief one)
            short = self._is_short(lt.a.name)
            if w.queue or take:
                if not short:
                    break  # only short tasks share a hand-off
                if len(w.queue) + len(take) >= most:
                    break
                if work + runtimes[lt.a.name] > HANDOFF_WORK_S + 1e-9:
                    break
            if short:
                work += runtimes[lt.a.name]
            take.append(lt)
            if not short:
                break  # (a task not known to be short goes alone: none waits behind it)
        if uniform:  # (``take`` is the head of ``order``: here, of ``live``)
            queue.extend(live[len(take) :])
        else:
            chosen = {id(lt) for lt in take}
            queue.extend(lt for lt in live if id(lt) not in chosen)
        return take

    def _send(self, w: WorkerProc, *msgs: Message) -> bool:
        """Write messages to a worker in one write. False if it is going away."""
        try:
            assert w.writer is not None
            w.writer.write(encode(*msgs))
        except (AssertionError, OSError, RuntimeError) as exc:
            log.warning("could not write to worker %d (%s)", w.pid, exc)
            w.state = "dead"
            return False
        return True

    def _hand_over(self, w: WorkerProc, tasks: list[HeldTask], *, behind: bool = False) -> None:
        """Send ``tasks`` to ``w``; ``behind``: one that waits in it behind a brief task
        (its ``Started`` goes out when it starts)."""
        runs = [
            Run(lt.a.id, lt.a.attempt, lt.a.name, lt.args_json, lt.a.user, lt.a.priority)
            for lt in tasks
        ]
        if not self._send(w, *runs):
            # the worker is going away: the tasks wait for the next idle worker
            self.pending[w.group.index].extendleft(reversed(tasks))
            return
        now = time.time()
        was_idle = not w.queue
        w.state = "busy"
        started = self.reports.started
        for lt in tasks:
            w.queue.append(lt)
            lt.state = "running"
            lt.worker = w
            self.counters["started"] += 1
            if not behind:
                lt.start_reported = True
                started.append((lt.a.id, lt.a.attempt, now))
        if was_idle:
            self._began(w)
        if not behind:
            short = all(self._is_short(lt.a.name) for lt in tasks)
            self.reports.schedule(urgent=False, short=short)

    def _began(self, w: WorkerProc) -> None:
        """The worker's first task has started (as far as the node can tell)."""
        lt = w.queue[0]
        lt.started_mono = time.monotonic()
        if not lt.start_reported:
            lt.start_reported = True
            self.reports.started.append((lt.a.id, lt.a.attempt, time.time()))
            self.reports.schedule(urgent=False)
        if lt.a.timeout_s is not None:
            lt.timeout_handle = asyncio.get_running_loop().call_later(
                lt.a.timeout_s, self._on_timeout, lt
            )

    def _take_back(self, w: WorkerProc) -> list[HeldTask]:
        """The tasks waiting in a worker behind the one it runs (handed over, never
        started) go back to the front of their queue; returns them."""
        waiting = list(w.queue)[1:]
        for _ in waiting:
            w.queue.pop()
        for lt in waiting:
            lt.state = "pending"
            lt.worker = None
        self.pending[w.group.index].extendleft(reversed(waiting))
        return waiting

    def kill(self, w: WorkerProc) -> None:
        """Kill a worker, taking back the tasks waiting in it."""
        self._take_back(w)
        w.kill()

    # ------------------------------------------------------------ endings

    def _on_timeout(self, lt: HeldTask) -> None:
        if lt.state != "running" or self.held.get(lt.a.id) is not lt or lt.worker is None:
            return
        w = lt.worker
        if w.task is not lt:
            return
        log.info(
            "task %s passed its timeout of %g s: killing its worker", lt.a.id, lt.a.timeout_s or 0
        )
        # the tasks handed over behind it go back first: _finish would start the next one
        # on this worker, which is about to be killed (and that one was then never ended)
        self._take_back(w)
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
        self.kill(w)
        self.dispatch()
        self.on_change()

    def _finish(self, lt: HeldTask, result: Result) -> None:
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
        reports = self.reports
        reports.progress.pop(lt.a.id, None)
        reports.results[lt.a.id] = result
        key = {"done": "done", "lost": "lost"}.get(result.status, "failed")
        self.counters[key] += 1
        reports.schedule()

    # ------------------------------------------------------------ worker messages

    def _on_worker_message(self, w: WorkerProc, msg: Message) -> None:
        if isinstance(msg, Done):
            lt = w.task
            if lt is None or msg.id != lt.a.id or msg.attempt != lt.a.attempt:
                return  # a late message about a task already withdrawn or timed out
            self._ran(lt.a.name, msg.runtime_s)
            self._finish(
                lt,
                Result(
                    id=lt.a.id,
                    attempt=lt.a.attempt,
                    status="done",
                    result=decode_json(msg.result_json),
                    runtime_s=msg.runtime_s,
                    finished_at=time.time(),
                ),
            )
            if not w.queue:
                w.state = "idle"
            self._dispatch_soon()
        elif isinstance(msg, Failed):
            lt = w.task
            if lt is None or msg.id != lt.a.id or msg.attempt != lt.a.attempt:
                return
            self._ran(lt.a.name, msg.runtime_s)
            self._finish(
                lt,
                Result(
                    id=lt.a.id,
                    attempt=lt.a.attempt,
                    status="failed",
                    error=ErrorInfo(type=msg.type, message=msg.message, traceback=msg.traceback),
                    runtime_s=msg.runtime_s,
                    finished_at=time.time(),
                ),
            )
            if not w.queue:
                w.state = "idle"
            self._dispatch_soon()
        elif isinstance(msg, TaskProgress):
            lt = w.task
            if lt is None or msg.id != lt.a.id or msg.attempt != lt.a.attempt:
                return
            self.reports.progress[lt.a.id] = Progress(
                id=lt.a.id, attempt=lt.a.attempt, progress=int(msg.percent)
            )
            self.reports.schedule_progress()
        elif isinstance(msg, Hello):
            w.state = "idle"
            w.pid = msg.pid
            if all(x.state in ("idle", "busy") for x in self.workers):
                self.all_started.set()
            self.dispatch()
        else:  # Run, Skip: the node's own messages, not a worker's
            self._bad_log.warning(
                "direction", "worker %d sent a %s message; ignored", w.pid, type(msg).__name__
            )

    def _ran(self, name: str, secs: float) -> None:
        """Moving average of a task name's runtimes here (decides batched hand-offs)."""
        old = self._runtimes.get(name)
        self._runtimes[name] = secs if old is None else 0.8 * old + 0.2 * secs

    # ------------------------------------------------------------ the process

    async def _worker_loop(self, w: WorkerProc) -> None:
        loop = asyncio.get_running_loop()
        # a worker that cannot be started: 1 s, doubling up to 30 s; one that keeps dying
        # (3+ deaths in 10 s): 0.5 s, doubling. No jitter: restarts of local processes do
        # not come back in a herd, and the bounds are what a test may count on.
        spawn_backoff = Backoff(min_s=1.0, max_s=RESTART_BACKOFF_MAX_S, jitter=False)
        delay = 0.0
        while not self.stopping:
            if delay:
                await asyncio.sleep(delay)
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
                    *self.worker_args,
                    pass_fds=[child_sock.fileno()],
                    stdin=asyncio.subprocess.DEVNULL,
                    start_new_session=True,
                    cwd=self.worker_cwd,
                )
            except OSError as exc:
                log.error("cannot start a worker process: %s", exc)
                child_sock.close()
                parent_sock.close()
                delay = spawn_backoff.next()
                continue
            finally:
                with contextlib.suppress(OSError):
                    child_sock.close()
            spawn_backoff.reset()
            await self._serve(w, parent_sock)
            rc = await w.proc.wait()
            self._ended(w, rc)
            now = loop.time()
            if not w.kill_expected:
                w.deaths.append(now)
            recent = sum(1 for t in w.deaths if now - t < DEATHS_WINDOW_S)
            delay = (
                0.0
                if recent < 3
                else compute_backoff(
                    recent - 3, min_s=0.5, max_s=RESTART_BACKOFF_MAX_S, jitter=False
                )
            )

    async def _serve(self, w: WorkerProc, sock: socket.socket) -> None:
        """Read a worker's messages until its socket closes."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        w.writer = writer
        buf = bytearray()
        try:
            # what has arrived, at once: a busy worker's results are many small frames,
            # and two awaits each (header, body) cost more than handling them
            while chunk := await reader.read(1 << 16):
                buf += chunk
                while True:
                    try:
                        msg = take(buf)
                        if msg is None:
                            break
                        self._on_worker_message(w, msg)
                    except WorkerMessageError as exc:
                        self._bad_log.warning("frame", "worker %d: %s; ignored", w.pid, exc)
                    except Exception:
                        log.exception("failed to handle a message from worker %d", w.pid)
                self.on_change()
        except ConnectionError:
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

    def _ended(self, w: WorkerProc, rc: int) -> None:
        """A worker process exited with ``rc``: its task is lost, the tasks waiting in it go
        back to their queue."""
        w.state = "dead"
        lt = w.task
        waiting = self._take_back(w)
        w.queue.clear()
        if lt is not None and lt.state == "running" and self.held.get(lt.a.id) is lt:
            how = f"signal {_signal_name(-rc)}" if rc < 0 else f"exit code {rc}"
            log.warning("worker process %d died (%s) while running task %s", w.pid, how, lt.a.id)
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
        elif not w.kill_expected and not self.stopping:
            log.warning("worker process %d exited (code %s); restarting it", w.pid, rc)
        if waiting and not self.stopping:
            self.dispatch()  # to the other workers
        self.on_change()


def _signal_name(signum: int) -> str:
    """SIGKILL for 9; the number for a signal the enum lacks (real-time ones: 34..64)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
