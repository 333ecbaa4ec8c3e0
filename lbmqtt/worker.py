"""Worker process: runs task functions for a node daemon, one task at a time.

Started by the node as ``python -m lbmqtt.worker --fd N ...`` with one end of a
socketpair. Standard library only (plus the task modules), so that it starts fast and a
restart after a cancel or a crash is cheap.

The messages on the socket (:class:`~lbmqtt.protocol_worker.Run`, ``Skip`` from the node;
``Hello``, ``TaskProgress``, ``Done``, ``Failed`` to it) and their framing are defined in
:mod:`lbmqtt.protocol_worker`.

Tasks run in the order they were handed over. The node hands short tasks over several at a
time, in one write; before each task the worker looks at what else has arrived, so a
``skip`` (the task was withdrawn before it started) is seen in time. Each result is sent as
soon as its task returns. (They used to wait up to 1 ms for the next ones, with a thread to
send them if the next task ran long: waking that thread cost the workers more than the
writes it saved, 52 against 42 µs of worker CPU per no-op task in ``bench/run.py
throughput``, and the node's CPU per task did not grow without it.)

Cancel and timeouts of a running task are the node's business: it kills this process and
starts another.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any

from .protocol_worker import (
    Done,
    Failed,
    Hello,
    Message,
    Run,
    Skip,
    TaskProgress,
    decode_json,
    decode_task_reference,
    encode,
    encode_result,
    take,
)

PR_SET_PDEATHSIG = 1
PROGRESS_MIN_INTERVAL_S = 0.05


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send us ``sig`` when our parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(0)


class Channel:
    """Framed messages over a socket: blocking receive, a non-blocking look at what has
    arrived, and sends (whole frames, also from a task's own threads reporting progress)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()
        self._in = bytearray()
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    def send(self, msg: Message) -> None:
        """Send ``msg`` now."""
        data = encode(msg)
        with self._lock:
            self.sock.sendall(data)

    def recv(self) -> Message | None:
        """The next message, waiting for it; None when the node has closed the socket."""
        while True:
            msg = take(self._in)
            if msg is not None:
                return msg
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return None
            self._in += chunk

    def poll(self) -> list[Message]:
        """The messages that have arrived, without waiting: those already read (a
        :meth:`recv` reads up to 64 KiB and returns one message) and what waits in the
        socket."""
        if self._poller.poll(0):  # (~1 µs; a recv that finds nothing raises, ~3 µs)
            try:
                while True:
                    chunk = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
                    if not chunk:
                        break
                    self._in += chunk
            except (BlockingIOError, InterruptedError):
                pass
        out = []
        while (msg := take(self._in)) is not None:
            out.append(msg)
        return out


class Context:
    """The :class:`~lbmqtt.registry.TaskContext` handed to task functions."""

    def __init__(self, channel: Channel, run: Run):
        self._channel = channel
        self.task_id = run.id
        self.attempt = run.attempt
        self.user: str = run.user
        self.name: str = run.name
        self.priority: int = run.priority
        self._last_sent = -1
        self._last_time = 0.0

    def progress(self, percent: float) -> None:
        """Report progress 0..100; calls closer than 50 ms apart are coalesced."""
        try:
            p = int(max(0.0, min(100.0, float(percent))))
        except (TypeError, ValueError):
            return
        now = time.monotonic()
        if p == self._last_sent or (now - self._last_time < PROGRESS_MIN_INTERVAL_S and p < 100):
            return
        self._last_sent, self._last_time = p, now
        self._channel.send(TaskProgress(self.task_id, self.attempt, p))

    def __repr__(self) -> str:
        return f"<TaskContext {self.name} id={self.task_id} attempt={self.attempt}>"


def _load(sources: list[str], refs: list[str]) -> dict[str, Any]:
    """Task entries by name: from the sources' registries, then from ``--ref`` JSON items
    ``{"name", "ref", "style", "arguments"}`` (functions registered on a Node object)."""
    from .registry import TaskEntry, load_sources, resolve_reference

    reg = load_sources(sources)
    tasks: dict[str, Any] = dict(reg.entries())
    for item in refs:
        r = decode_task_reference(item)
        tasks[r.name] = TaskEntry(resolve_reference(r.ref), r.style, r.arguments)
    return tasks


def _caller(entry: Any) -> Any:
    """A function ``call(args, ctx)`` running the entry in its calling style."""
    from .registry import wants_context

    fn = entry.fn
    if entry.style == "pyloadbalancer":
        arguments = dict(entry.arguments or {})
        return lambda args, ctx: fn(task=args, arguments=arguments)
    if wants_context(fn):
        return fn
    return lambda args, ctx: fn(args)


def run(channel: Channel, tasks: dict[str, Any]) -> None:
    """Serve ``run`` requests, in order, until the node closes the socket."""
    callers = {name: _caller(entry) for name, entry in tasks.items()}
    channel.send(Hello(os.getpid(), sorted(tasks)))
    todo: deque[Run] = deque()

    def receive(msg: Message) -> None:
        if type(msg) is Run:
            todo.append(msg)
        elif type(msg) is Skip:  # withdrawn before it started (if it already ran: no-op)
            for m in todo:
                if m.id == msg.id and m.attempt == msg.attempt:
                    todo.remove(m)
                    break

    while True:
        if not todo:
            msg = channel.recv()
            if msg is None:
                return
            receive(msg)
        for msg in channel.poll():
            receive(msg)
        if not todo:
            continue
        job = todo.popleft()
        name, args_json = job.name, job.args_json
        t0 = time.perf_counter()
        try:
            call = callers.get(name)
            if call is None:
                raise LookupError(f"this node has no task named {name!r}")
            args = decode_json(args_json) if args_json else None
            result = call(args, Context(channel, job))
            try:
                data = encode_result(result)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"the result of task {name!r} is not JSON-serializable: {exc}"
                ) from exc
        except BaseException as exc:  # any failure of user code is reported
            if isinstance(exc, KeyboardInterrupt):
                raise
            tb = traceback.format_exc(limit=50)
            channel.send(
                Failed(
                    job.id, job.attempt, type(exc).__name__, str(exc), tb, time.perf_counter() - t0
                )
            )
            continue
        channel.send(Done(job.id, job.attempt, data, time.perf_counter() - t0))


def main(argv: list[str] | None = None) -> None:
    """Entry point of a worker process."""
    ap = argparse.ArgumentParser(prog="lbmqtt.worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--source", action="append", default=[])
    ap.add_argument("--ref", action="append", default=[])
    ns = ap.parse_args(argv)
    # The node owns our life: ignore the terminal's Ctrl-C, die if the node dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(ns.parent)
    os.environ["LBMQTT_WORKER"] = "1"  # = registry.WORKER_ENV: daemons stay inert in here
    if ns.nice:
        try:
            os.nice(ns.nice)
        except OSError as exc:
            print(f"lbmqtt worker: cannot change nice level by {ns.nice}: {exc}", file=sys.stderr)
    sock = socket.socket(fileno=ns.fd)
    channel = Channel(sock)
    try:
        tasks = _load(ns.source, ns.ref)
    except BaseException:
        traceback.print_exc()
        channel.send(
            Failed("", 0, "ImportError", "cannot load task modules", traceback.format_exc(), 0.0)
        )
        sys.exit(3)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        run(channel, tasks)


if __name__ == "__main__":
    main()
