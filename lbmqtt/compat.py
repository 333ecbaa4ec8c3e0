"""pyLoadBalancer's API on lbmqtt: change the import, keep the code.

::

    # from pyLoadBalancer import startAll, WorkerHub, Client
    from lbmqtt.compat import startAll, WorkerHub, Client

What maps to what:

* ``startAll(parametersfile)`` starts the embedded broker (unless ``BROKER_EMBEDDED`` is
  false), the balancer and the dashboard as child processes and returns them, like before
  without blocking; they are stopped when the calling program exits.
* ``WorkerHub(parametersfile)`` is a node: ``addTask(name, fn, **kwargs)`` registers
  ``fn``, called as before as ``fn(task=<the task dict>, arguments=kwargs)``;
  ``startWKHUB()`` runs the node until Ctrl-C. Its worker groups come from
  ``WKHUB_WORKERS``, as before.
* ``Client(parametersfile)``: ``sendTask(name, taskdict, priority=0, userid=...)`` returns
  ``{"taskid": ...}``; ``getTask(taskid or [taskids])`` returns ``{"progress": ...,
  "result": ...}`` with progress ``0`` (queued), ``1..99`` (running), ``100`` (done),
  ``None`` (unknown id or failed; ``"error"`` says why) or ``"cancelled"``;
  ``cancelTask(taskid)`` returns ``{"LB": "OK"}`` or ``{"LB": "ERROR", ...}``.

Differences: pyLoadBalancer's socket keys (``LB_IP``, ``SOCKET_TIMEOUT``, ...) are ignored
(everything goes through the MQTT broker: ``BROKER_HOST`` / ``BROKER_PORT``); task
functions must be module-level functions and ``addTask`` keyword arguments JSON values,
since worker processes are started fresh and import them.
"""

from __future__ import annotations

import atexit
import os
import subprocess
from collections.abc import Callable
from typing import Any

from .client import Client as _Client
from .config import Settings, load_settings
from .errors import LbmqttError, UnknownTask
from .launcher import Child, _spawn, stop_children
from .node import Node
from .protocol import Status, TaskState
from .registry import in_worker

__all__ = ["Client", "WorkerHub", "startAll"]

DEFAULT_USER = "default"


def _settings(parametersfile: str | os.PathLike[str] | None) -> Settings:
    return load_settings(parametersfile)


def startAll(parametersfile: str | os.PathLike[str] | None = None) -> list[subprocess.Popen[bytes]]:
    """Start the broker (if embedded), the balancer and the dashboard; return their processes.

    Does not block; the processes stop when this program exits.
    """
    if in_worker():
        return []
    s = _settings(parametersfile)
    common = ["--parameters", str(parametersfile)] if parametersfile else []
    children: list[Child] = []
    try:
        if s.broker_embedded:
            children.append(_spawn("broker", ["broker", *common]))
            if s.broker_port == 0:
                common += ["--broker-port", str(children[0].info["port"])]
        children.append(_spawn("balancer", ["balancer", *common]))
        children.append(_spawn("dashboard", ["dashboard", *common]))
    except BaseException:
        stop_children(children)
        raise
    atexit.register(stop_children, children)
    return [c.proc for c in children]


class WorkerHub:
    """A node daemon with pyLoadBalancer's API (see the module docstring)."""

    def __init__(self, parametersfile: str | os.PathLike[str] | None = None, *_: Any, **__: Any):
        self.node = Node(_settings(parametersfile))

    def addTask(self, taskname: str, taskfunct: Callable[..., Any], **kwargs: Any) -> None:
        """Register ``taskfunct``, called as ``taskfunct(task=..., arguments=kwargs)``."""
        self.node.registry.add_task(taskname, taskfunct, style="pyloadbalancer", arguments=kwargs)

    def rmvTask(self, taskname: str) -> None:
        """Forget a task."""
        self.node.registry.remove_task(taskname)

    def startWKHUB(self, *_: Any) -> None:
        """Run the node until Ctrl-C (blocking, as before)."""
        self.node.run_forever()


class Client:
    """pyLoadBalancer's client (see the module docstring); one lbmqtt user per ``userid``."""

    def __init__(self, parametersfile: str | os.PathLike[str] | None = None):
        self.settings = _settings(parametersfile)
        self._clients: dict[str, _Client] = {}
        self._owner: dict[str, str] = {}
        atexit.register(self.close)

    def _client(self, userid: str) -> _Client:
        c = self._clients.get(userid)
        if c is None:
            c = self._clients[userid] = _Client(self.settings, user=userid)
        return c

    def sendTask(
        self, taskname: str, taskdict: Any, priority: int = 0, userid: str = DEFAULT_USER
    ) -> dict[str, Any]:
        """Submit a task; ``{"taskid": ...}``, or ``{"LB": "ERROR", "error": ...}``."""
        try:
            tid = self._client(userid).submit(taskname, taskdict, priority=priority)
        except LbmqttError as exc:
            return {"LB": "ERROR", "error": str(exc)}
        self._owner[tid] = userid
        return {"taskid": tid}

    def getTask(self, taskid: str | list[str]) -> dict[str, Any]:
        """State of one task, or ``{taskid: state}`` for a list of ids."""
        if isinstance(taskid, list):
            return {tid: self._one(tid) for tid in taskid}
        return self._one(taskid)

    def _one(self, taskid: str) -> dict[str, Any]:
        try:
            state = self._client(self._owner.get(taskid, DEFAULT_USER)).get(taskid)
        except UnknownTask:
            return {"progress": None, "result": None, "error": f"unknown task {taskid}"}
        except LbmqttError as exc:
            return {"progress": None, "result": None, "error": str(exc)}
        return _old_state(state)

    def cancelTask(self, taskid: str) -> dict[str, Any]:
        """Cancel a task: ``{"LB": "OK"}``, or ``{"LB": "ERROR", "error": ...}``."""
        try:
            ok = self._client(self._owner.get(taskid, DEFAULT_USER)).cancel(taskid)
        except LbmqttError as exc:
            return {"LB": "ERROR", "error": str(exc)}
        return {"LB": "OK"} if ok else {"LB": "ERROR", "error": "the task had finished"}

    def close(self) -> None:
        """Disconnect (also done at exit)."""
        for c in self._clients.values():
            c.close()
        self._clients.clear()


def _old_state(state: TaskState) -> dict[str, Any]:
    if state.status == Status.DONE:
        return {"progress": 100, "result": state.result}
    if state.status == Status.CANCELLED:
        return {"progress": "cancelled", "result": None}
    if state.status.final:
        err = state.error
        return {
            "progress": None,
            "result": None,
            "error": f"{err.type}: {err.message}" if err else state.status.value,
        }
    if state.status == Status.RUNNING:
        return {"progress": max(1, min(99, state.progress)), "result": None}
    return {"progress": 0, "result": None}
