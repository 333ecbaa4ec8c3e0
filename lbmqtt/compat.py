"""pyLoadBalancer 0.2.0's API on lbmqtt: change the import, keep the code.

::

    # from pyLoadBalancer import startAll, startWorkerHub, Client
    from lbmqtt.compat import startAll, startWorkerHub, Client

Every public name of pyLoadBalancer 0.2.0 is here, with its signature, its return shapes and
its process semantics:

* ``startAll(pfile=None, returnStartFct=False)`` starts three ``multiprocessing.Process``
  children, as before: the load balancer (the embedded broker, unless ``BROKER_EMBEDDED`` is
  false, and the balancer, supervised as ``lbmqtt up`` does), the health check (prints
  ``HC - WARNING : LB HAS NO WORKERS`` every second while no node is online) and the monitor
  (the Bokeh dashboard on ``MONITOR_IP:MONITOR_PORT``). It returns them once the balancer
  answers; they are not daemons, so a script that only calls ``startAll`` stays up until
  Ctrl-C, as before. ``returnStartFct=True`` also returns the three start functions.
* ``startWorkerHub(pfile, tasks, returnStartFct=False)`` starts a worker hub (a node) in a
  ``multiprocessing.Process`` with ``tasks`` (``{name: function}``) registered.
  (``returnStartFct`` had no default in 0.2.0, which made its own test suite fail.)
* ``WorkerHub(parametersfile)`` is a node: ``addTask(name, fn, **kwargs)`` registers ``fn``,
  called as before as ``fn(task=<the task dict>, arguments=kwargs)``; ``startWKHUB()`` runs
  the node until Ctrl-C. Its worker groups come from ``WKHUB_WORKERS``, as before.
* ``LoadBalancer(parametersfile).startLB()``, ``HealthCheck(parametersfile).startHC()`` and
  ``startMonitorServer(parametersfile)`` (also as ``Monitor.MonitoringApp``) run one part in
  the calling process until Ctrl-C / SIGTERM.
* ``Client(parametersfile)`` answers as pyLoadBalancer's balancer did, for a task id from any
  process of the same system (the id carries its user):

  - ``sendTask(name, taskdict, priority=0, userid=None)``: ``{'taskid': ...}``;
    ``{'error': 'User has too many pending task (N)'}`` over ``LB_QUEING_MAXPERUSER``;
    ``{'LB': 'ERROR'}`` when the balancer does not answer within 3 x ``SOCKET_TIMEOUT`` + 2 s
    (as long as the old client's three tries, 1 s apart, took; 3.5 s by default). A
    priority is any number (or a numeric string; anything else is 0, as before); a
    fraction takes the band of its integer part.
    Without ``userid`` the task goes to user ``default``, with one warning (0.2.0 refused
    it when ``LB_QUEING_MAXPERUSER`` > 0).
  - ``getTask(taskid)`` / ``getTask([taskids])`` (then ``{taskid: answer}``):
    ``{'progress': 0, 'result': None}`` queued, and running until the task reports a
    progress (1..99); ``{'progress': 100, 'result': ...}`` done; ``{'progress':
    'cancelled', 'result': None}``; ``{'progress': None, 'result': None}`` for an unknown or
    expired id (and a failed task, with ``'error'`` saying why: 0.2.0 had no failure).
  - ``cancelTask(taskid)``: ``{'deleted': True, 'from': 'queue' | 'pending' | 'done'}`` or
    ``{'deleted': False, 'from': None}`` (unknown, or already cancelled).

Queued tasks expire ``QUEUED_TTL_S`` after their submission (48 h by default, as before).
Task functions must be module-level functions (worker processes import them) and ``addTask``
keyword arguments JSON values.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .registry import in_worker

if TYPE_CHECKING:  # (imported late: a worker process imports the script that imports this)
    from .client import Client as _Client
    from .config import Settings
    from .node import Node
    from .protocol import TaskState

__all__ = [
    "Client",
    "HealthCheck",
    "LoadBalancer",
    "Monitor",
    "MonitoringApp",
    "WorkerHub",
    "startAll",
    "startHCProcess",
    "startLBProcess",
    "startMonitorProcess",
    "startMonitorServer",
    "startWorkerHub",
    "startWorkerHubProcess",
]

log = logging.getLogger(__name__)

DEFAULT_USER = "default"
"""The user of tasks sent without ``userid``."""
OLD_SOCKET_TIMEOUT_MS = 500
"""pyLoadBalancer 0.2.0's SOCKET_TIMEOUT when a parameters file did not set it."""
READY_TIMEOUT_S = 60.0
"""How long ``startAll`` waits for the balancer to answer before it returns anyway."""
PATH = str | os.PathLike[str] | None


def _settings(parametersfile: PATH) -> Settings:
    from .config import load_settings

    return load_settings(parametersfile)


def _params(pfile: PATH) -> list[str]:
    return ["--parameters", os.fspath(pfile)] if pfile is not None else []


def _pfile_arg(what: str) -> str | None:
    import argparse

    parser = argparse.ArgumentParser(description=f"{what} of pyLoadBalancer (on lbmqtt).")
    parser.add_argument("-p", "--pfile", default=None, help="parameter file, in JSON format")
    pfile: str | None = parser.parse_args().pfile
    return pfile


def _cprint(text: str) -> None:
    _line(" " + text)


def _line(text: str) -> None:
    """Print ``text`` as one write (not print()'s text, then newline: unbuffered, as with
    PYTHONUNBUFFERED, another process's line on the same terminal or pipe could come
    between them and run into ours)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- the parts


class LoadBalancer:
    """The load balancer: the embedded broker (unless ``BROKER_EMBEDDED`` is false) and the
    balancer, supervised (a part that dies is started again).

    Args:
        parametersfile: a parameters.json (pyLoadBalancer's keys are read).
        queues: pyLoadBalancer's queue layout; lbmqtt's scheduler has its own (ignored).
    """

    def __init__(self, parametersfile: PATH = None, queues: Any = None):
        self.parametersfile = parametersfile
        self.settings = _settings(parametersfile)

    def startLB(self) -> None:
        """Run until Ctrl-C / SIGTERM (blocking, as before)."""
        from .cli import main

        rc = main(["up", "--no-node", "--no-dashboard", *_params(self.parametersfile)])
        if rc:
            sys.exit(rc)

    @staticmethod
    def main() -> None:
        """The old ``pyLoadBalancer_LB [-p PFILE]`` command."""
        LoadBalancer(parametersfile=_pfile_arg("Load Balancer")).startLB()


class HealthCheck:
    """Watches the balancer and the nodes and says on the console what is wrong, as
    pyLoadBalancer's did: ``HC - WARNING : LB HAS NO WORKERS`` while no node is online,
    ``HC - CAN'T GET WORKER LIST : LB DOWN ??`` while the balancer is not online, and each
    of the balancer's warnings when it appears. (Liveness itself is the balancer's job.)
    """

    def __init__(self, parametersfile: PATH = None):
        self.settings = _settings(parametersfile)
        self.exiting = False
        self._warned: set[str] = set()

    def on_exit(self, *args: Any) -> None:
        """Stop the loop of :meth:`startHC`."""
        self.exiting = True

    def doHealthCheckTasks(self) -> None:
        """One check: read the balancer's status and stats, print what is wrong."""
        from .errors import BrokerUnavailable, DecodeError
        from .health import read_retained
        from .mqtt import tls_context
        from .protocol import BalancerStats, BalancerStatus, Topics, decode

        s = self.settings
        topics = Topics(s.topic_prefix)
        try:
            got = asyncio.run(
                read_retained(
                    host=s.broker_host,
                    port=s.broker_port,
                    filters=[topics.balancer_status, topics.balancer_stats],
                    prefix=s.topic_prefix,
                    username=s.broker_username,
                    password=s.password,
                    tls=tls_context(s),
                    timeout_s=min(3.0, s.connect_timeout_s),
                )
            )
        except BrokerUnavailable as exc:
            _cprint(f"HC - CAN'T GET WORKER LIST : LB DOWN ??{exc}")
            return
        try:
            status = decode(BalancerStatus, got.get(topics.balancer_status, b"null"))
            # (no stats yet: the balancer has just started and has no node)
            stats = decode(BalancerStats, got.get(topics.balancer_stats, b'{"v": 1, "time": 0}'))
        except DecodeError:
            _cprint("HC - CAN'T GET WORKER LIST : LB DOWN ??")
            return
        if not status.online:
            _cprint("HC - CAN'T GET WORKER LIST : LB DOWN ??")
            return
        if not any(n.online and n.slots for n in stats.nodes):
            _cprint("HC - WARNING : LB HAS NO WORKERS")
        for w in stats.warnings:
            if w not in self._warned:
                _cprint(f"HC - WARNING : {w}")
        self._warned = set(stats.warnings)

    def startHC(self, checkTimer: float = 1) -> None:
        """Check every ``checkTimer`` seconds until Ctrl-C / SIGTERM (blocking)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.on_exit)
            signal.signal(signal.SIGINT, self.on_exit)
        while not self.exiting:
            t0 = time.monotonic()
            self.doHealthCheckTasks()
            while not self.exiting and time.monotonic() - t0 < checkTimer:
                time.sleep(min(0.1, checkTimer))  # (a daemon's pace, not a test's wait)
        _cprint("EXITED Health Check")

    @staticmethod
    def main() -> None:
        """The old ``pyLoadBalancer_HC [-p PFILE]`` command."""
        HealthCheck(parametersfile=_pfile_arg("Health Check")).startHC()


def startMonitorServer(parametersfile: PATH = None) -> None:
    """Run the monitor (the Bokeh dashboard on ``MONITOR_IP:MONITOR_PORT``) until Ctrl-C."""
    from .cli import main

    rc = main(["dashboard", *_params(parametersfile)])
    if rc:
        sys.exit(rc)


class MonitoringApp:
    """``pyLoadBalancer.Monitor.MonitoringApp``: ``startMonitorServer(parametersfile)``."""

    startMonitorServer = staticmethod(startMonitorServer)

    @staticmethod
    def main() -> None:
        """The old ``pyLoadBalancer_Monitor [-p PFILE]`` command."""
        startMonitorServer(parametersfile=_pfile_arg("Monitor Server"))


class Monitor:
    """``pyLoadBalancer.Monitor``: ``Monitor.MonitoringApp.startMonitorServer(...)``."""

    MonitoringApp = MonitoringApp


def startLBProcess(pfile: PATH) -> None:
    """The load balancer process's body (as ``startAll`` runs it)."""
    LoadBalancer(parametersfile=pfile).startLB()


def startHCProcess(pfile: PATH) -> None:
    """The health check process's body (as ``startAll`` runs it)."""
    HealthCheck(parametersfile=pfile).startHC()


def startMonitorProcess(pfile: PATH) -> None:
    """The monitor process's body (as ``startAll`` runs it)."""
    startMonitorServer(parametersfile=pfile)


def _balancer_online(settings: Settings) -> bool:
    from .errors import BrokerUnavailable
    from .health import read_online
    from .protocol import BalancerStatus, Topics

    topic = Topics(settings.topic_prefix).balancer_status
    if settings.broker_host != "auto":
        try:  # (no MQTT client, and no "cannot reach the broker" line, before it listens)
            socket.create_connection((settings.broker_host, settings.broker_port), 1.0).close()
        except OSError:
            return False
    try:
        return asyncio.run(read_online(settings, topic, BalancerStatus)) is not None
    except BrokerUnavailable:
        return False


def startAll(pfile: PATH = None, returnStartFct: bool = False) -> Any:
    """Start the load balancer, the health check and the monitor; return their processes.

    Args:
        pfile: a parameters.json (pyLoadBalancer's keys are read).
        returnStartFct: also return the three start functions.

    Returns:
        ``[LBProcess, HCProcess, MonitorProcess]`` (``multiprocessing.Process`` objects:
        ``is_alive()``, ``terminate()``, ``join()``), or ``[[those], [startLBProcess,
        startHCProcess, startMonitorProcess]]``. Returns once the balancer answers (at most
        ``READY_TIMEOUT_S``); the processes are not daemons: the program stays up with them.
    """
    if in_worker():
        return [[], []] if returnStartFct else []
    settings = _settings(pfile)
    fns = [startLBProcess, startHCProcess, startMonitorProcess]
    procs = [multiprocessing.Process(target=fn, args=(pfile,)) for fn in fns]
    procs[0].start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while procs[0].is_alive() and time.monotonic() < deadline:
        if _balancer_online(settings):
            break
        time.sleep(0.2)  # (a start-up poll: each try above waits for its answer)
    for p in procs[1:]:
        p.start()
    if returnStartFct:
        return [procs, fns]
    return procs


def startWorkerHubProcess(pfile: PATH, tasks: Mapping[str, Callable[..., Any]]) -> None:
    """The worker hub process's body (as ``startWorkerHub`` runs it)."""
    hub = WorkerHub(parametersfile=pfile)
    for name, fn in tasks.items():
        hub.addTask(name, fn)
    hub.startWKHUB()


def startWorkerHub(
    pfile: PATH, tasks: Mapping[str, Callable[..., Any]], returnStartFct: bool = False
) -> Any:
    """Start a worker hub (a node) with ``tasks`` (``{name: function}``) in its own process.

    Returns:
        The ``multiprocessing.Process``, or ``[process, startWorkerHubProcess]``.
    """
    proc = multiprocessing.Process(target=startWorkerHubProcess, args=(pfile, dict(tasks)))
    if not in_worker():
        proc.start()
    if returnStartFct:
        return [proc, startWorkerHubProcess]
    return proc


class WorkerHub:
    """A node daemon with pyLoadBalancer's API (see the module docstring)."""

    def __init__(self, parametersfile: PATH = None, *_: Any, **__: Any):
        from .node import Node

        self.node: Node = Node(_settings(parametersfile))

    def addTask(self, taskname: str, taskfunct: Callable[..., Any], **kwargs: Any) -> None:
        """Register ``taskfunct``, called as ``taskfunct(task=..., arguments=kwargs)``."""
        self.node.registry.add_task(taskname, taskfunct, style="pyloadbalancer", arguments=kwargs)

    def rmvTask(self, taskname: str) -> None:
        """Forget a task."""
        self.node.registry.remove_task(taskname)

    def startWKHUB(self, *_: Any) -> None:
        """Run the node until Ctrl-C (blocking, as before)."""
        self.node.run_forever()


# --------------------------------------------------------------------------- the client


def user_of(userid: Any) -> str:
    """The lbmqtt user of a pyLoadBalancer ``userid`` (any JSON value): itself when it is a
    valid user name, else ``u-`` and a digest of it (the same in every process)."""
    from .protocol.names import is_valid_name

    if userid is None:
        return DEFAULT_USER
    text = userid if isinstance(userid, str) else json.dumps(userid, sort_keys=True, default=str)
    if is_valid_name(text):
        return text
    return "u-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def owner_of(taskid: str) -> str:
    """The user of a task id ``sendTask`` made (``<uuid>@<user>``), else ``default``."""
    from .protocol.names import is_valid_name

    _, at, user = taskid.rpartition("@")
    return user if at and is_valid_name(user) else DEFAULT_USER


def old_priority(priority: Any) -> int:
    """A priority as pyLoadBalancer read it (``float(p)``, else 0), as lbmqtt's integer:
    a fraction takes its integer part's band (floor), beyond 32 bits is clamped."""
    try:
        p = float(priority)
    except (TypeError, ValueError, OverflowError):
        return 0
    if math.isnan(p):
        return 0
    lo, hi = -(2**31), 2**31 - 1
    if p <= lo:
        return lo
    if p >= hi:
        return hi
    return math.floor(p)


UNKNOWN: dict[str, Any] = {"progress": None, "result": None}
LB_ERROR: dict[str, Any] = {"LB": "ERROR"}


class Client:
    """pyLoadBalancer's client (see the module docstring); one lbmqtt user per ``userid``.

    Args:
        parametersfile: a parameters.json (``LB_IP`` is the broker's host; ``SOCKET_TIMEOUT``
            bounds how long a call waits, as before).
    """

    def __init__(self, parametersfile: PATH = None):
        from .config import old_timeout_s

        s = _settings(parametersfile)
        # pyLoadBalancer read its own parameters.json under every file: SOCKET_TIMEOUT was
        # 500 ms when a file did not say, so a call gave up after about 3.5 s
        unset = {"client_ack_timeout_s", "connect_timeout_s"} - s.model_fields_set
        if unset:
            s = s.with_overrides(**dict.fromkeys(unset, old_timeout_s(OLD_SOCKET_TIMEOUT_MS)))
        self.settings = s
        self._clients: dict[str, _Client] = {}
        self._cancelled_done: set[str] = set()
        self._warned_userid = False
        atexit_register(self.close)

    def _client(self, user: str) -> _Client:
        from .client import Client as _Client

        c = self._clients.get(user)
        if c is None:
            c = self._clients[user] = _Client(self.settings, user=user)
        return c

    def _failed(self, call: str, exc: Exception) -> dict[str, Any]:
        _line(f"{call} ERROR WHILE SENDING/RECEIVING SOCKET: {exc}")
        return dict(LB_ERROR)

    def sendTask(
        self, taskname: str, taskdict: Any, priority: Any = 0, userid: Any = None
    ) -> dict[str, Any]:
        """Submit a task: ``{'taskid': ...}``, ``{'error': ...}`` (refused), or
        ``{'LB': 'ERROR'}`` (no balancer)."""
        from .errors import (
            BalancerUnavailable,
            BrokerUnavailable,
            InvalidTask,
            LbmqttError,
            QuotaExceeded,
        )

        if userid is None and not self._warned_userid and self.settings.lb_queing_maxperuser:
            self._warned_userid = True
            log.warning(
                "sendTask without userid: the tasks go to user %r (pyLoadBalancer 0.2.0 "
                "refused them while LB_QUEING_MAXPERUSER > 0)",
                DEFAULT_USER,
            )
        user = user_of(userid)
        tid = f"{uuid.uuid4()}@{user}"
        try:
            self._client(user).submit(
                taskname, taskdict, priority=old_priority(priority), task_id=tid
            )
        except QuotaExceeded:
            cap = self.settings.lb_queing_maxperuser
            return {"error": f"User has too many pending task ({cap})"}
        except InvalidTask as exc:
            return {"ERROR": "while adding task, please check message syntax", "why": str(exc)}
        except (BalancerUnavailable, BrokerUnavailable) as exc:
            return self._failed("sendTask", exc)
        except LbmqttError as exc:
            return {"ERROR": "while adding task, please check message syntax", "why": str(exc)}
        return {"taskid": tid}

    def getTask(self, taskid: Any) -> dict[str, Any]:
        """The state of a task, or ``{taskid: state}`` for a list of ids (see the module
        docstring); ``{'LB': 'ERROR'}`` when the balancer does not answer."""
        from .errors import BalancerUnavailable, BrokerUnavailable

        try:
            if isinstance(taskid, list):
                return {tid: self._one(tid) for tid in taskid}
            return self._one(taskid)
        except (BalancerUnavailable, BrokerUnavailable) as exc:
            return self._failed("getTask", exc)

    def _state(self, taskid: Any) -> TaskState | None:
        from .errors import InvalidTask, UnknownTask
        from .protocol.names import is_valid_task_id

        if not isinstance(taskid, str) or not is_valid_task_id(taskid):
            return None
        try:
            return self._client(owner_of(taskid)).get(taskid)
        except (UnknownTask, InvalidTask):
            return None

    def _one(self, taskid: Any) -> dict[str, Any]:
        state = self._state(taskid)
        if state is None:
            return dict(UNKNOWN)
        if taskid in self._cancelled_done:
            return {"progress": "cancelled", "result": None}
        return old_answer(state)

    def cancelTask(self, taskid: Any) -> dict[str, Any]:
        """Cancel a task: ``{'deleted': True, 'from': 'queue' | 'pending' | 'done'}``, or
        ``{'deleted': False, 'from': None}``; ``{'LB': 'ERROR'}`` when no balancer answers."""
        from .errors import BalancerUnavailable, BrokerUnavailable, UnknownTask
        from .protocol import Status

        no = {"deleted": False, "from": None}
        try:
            state = self._state(taskid)
            if state is None or taskid in self._cancelled_done:
                return no
            if state.status == Status.DONE:
                self._cancelled_done.add(taskid)
                return {"deleted": True, "from": "done"}
            if state.status.final:
                return no
            where = "queue" if state.status == Status.QUEUED else "pending"
            try:
                ok = self._client(owner_of(taskid)).cancel(taskid)
            except UnknownTask:
                return no
            if ok:
                return {"deleted": True, "from": where}
            self._cancelled_done.add(taskid)  # it finished meanwhile: as if done
            return {"deleted": True, "from": "done"}
        except (BalancerUnavailable, BrokerUnavailable) as exc:
            return self._failed("cancelTask", exc)

    def close(self) -> None:
        """Disconnect (also done at exit)."""
        for c in self._clients.values():
            c.close()
        self._clients.clear()


def atexit_register(fn: Callable[[], None]) -> None:
    import atexit

    atexit.register(fn)


def old_answer(state: TaskState) -> dict[str, Any]:
    """What pyLoadBalancer's balancer answered ``getTask`` for a task in this state."""
    from .protocol import Status

    status = state.status
    if status == Status.DONE:
        return {"progress": 100, "result": state.result}
    if status == Status.CANCELLED:
        return {"progress": "cancelled", "result": None}
    if status == Status.FAILED:
        err = state.error
        why = f"{err.type}: {err.message}" if err else status.value
        return {"progress": None, "result": None, "error": why}
    if status.final:  # expired: forgotten, as pyLoadBalancer forgot it
        return dict(UNKNOWN)
    if status == Status.RUNNING:
        return {"progress": max(0, min(99, state.progress)), "result": None}
    return {"progress": 0, "result": None}
