"""What a node says about itself: its name, its retained status, its heartbeats."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable

from .. import __version__
from ..config import Settings
from ..protocol import GroupInfo, Heartbeat, NodeStatus, TaskRef
from .supervisor import HeldTask

__all__ = ["default_node_name", "heartbeat", "memory_mb", "resources", "status"]


def default_node_name() -> str:
    """The host name, reduced to a valid node name."""
    raw = socket.gethostname().split(".")[0] or "node"
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in raw)[:64]
    return name if name[0].isalnum() or name[0] == "_" else f"n{name}"[:64]


def memory_mb() -> int:
    """The machine's memory in MiB (0 if unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
    except (ValueError, OSError, AttributeError):
        return 0


def resources(settings: Settings) -> dict[str, float]:
    """Counted resources announced: the machine's cores and memory, then NODE_RESOURCES."""
    return {
        "cores": float(os.cpu_count() or 1),
        "memory_mb": float(memory_mb()),
        **settings.node_resources,
    }


def status(
    settings: Settings,
    *,
    node: str,
    instance: str,
    started_at: float,
    groups: list[GroupInfo],
    tasks: list[str],
    draining: bool,
    held: Iterable[HeldTask],
) -> NodeStatus:
    """The node's retained status (online); a draining node lists what it has not started,
    for the balancer to take back."""
    return NodeStatus(
        node=node,
        instance=instance,
        online=True,
        host=socket.gethostname(),
        pid=os.getpid(),
        version=__version__,
        started_at=started_at,
        groups=groups,
        tasks=tasks,
        cores=os.cpu_count() or 1,
        memory_mb=memory_mb(),
        speed=settings.node_speed,
        heartbeat_s=settings.heartbeat_s,
        resources=resources(settings),
        tags=sorted(set(settings.node_tags)),
        draining=draining,
        pending=[TaskRef(id=lt.a.id, attempt=lt.a.attempt) for lt in held if lt.state == "pending"]
        if draining
        else [],
    )


def heartbeat(*, node: str, instance: str, seq: int, held: Iterable[HeldTask]) -> Heartbeat:
    """A heartbeat: the machine's load, and the tasks the node runs, waits on and holds."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    tasks = list(held)
    return Heartbeat(
        node=node,
        instance=instance,
        seq=seq,
        time=time.time(),
        load=load,
        running=[
            TaskRef(id=lt.a.id, attempt=lt.a.attempt) for lt in tasks if lt.state == "running"
        ],
        pending=sum(1 for lt in tasks if lt.state == "pending"),
        held=[TaskRef(id=lt.a.id, attempt=lt.a.attempt) for lt in tasks],
    )
