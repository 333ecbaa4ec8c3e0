"""Demo tasks, run by the local node of ``lbmqtt up``.

``lbmqtt node --tasks nodes/demo_tasks.py`` serves them on any machine. A task function
gets the task's JSON arguments and, if it takes a second parameter, a context whose
``progress(percent)`` reports progress 0..100.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from lbmqtt import Registry

tasks = Registry()


@tasks.task("HELLO")
def hello(args: dict[str, str]) -> str:
    """pyLoadBalancer's README example: ``{"firstName": "John", "lastName": "Doe"}``."""
    return f"Hello {args['firstName']} {args['lastName']} !"


@tasks.task("SLEEP")
def sleep(args: dict[str, Any] | None, ctx: Any) -> dict[str, Any]:
    """Sleep ``seconds`` (default 5) in ``steps`` steps (default 10), reporting progress."""
    args = args or {}
    seconds = float(args.get("seconds", 5))
    steps = max(1, int(args.get("steps", 10)))
    for i in range(steps):
        time.sleep(seconds / steps)
        ctx.progress(100 * (i + 1) / steps)
    return {"slept_s": seconds, "pid": os.getpid()}


@tasks.task("WORK")
@tasks.task("WORK_LONG")
def work(args: dict[str, Any] | None, ctx: Any) -> dict[str, Any]:
    """``seconds`` (default 1) of work on a machine of speed 1, in ``steps`` steps (default
    10) reporting progress: it sleeps that long times ``DEMO_SLOWDOWN`` (an environment
    variable of the node, default 1), so that nodes on one host can play machines of
    different speeds (``bench/run.py unequal``). Two names: a batch can hold a name the
    cluster has never seen."""
    args = args or {}
    factor = float(os.environ.get("DEMO_SLOWDOWN", "1"))
    seconds = float(args.get("seconds", 1)) * factor
    steps = max(1, int(args.get("steps", 10)))
    for i in range(steps):
        time.sleep(seconds / steps)
        ctx.progress(100 * (i + 1) / steps)
    return {"worked_s": seconds, "pid": os.getpid()}


@tasks.task("ADD")
def add(args: list[float]) -> float:
    """Sum a list of numbers."""
    return sum(args)


@tasks.task("NOOP")
def noop(args: Any) -> None:
    """Do nothing: for measuring the system's own overhead."""
    return None


@tasks.task("FAIL")
def fail(args: dict[str, Any] | None) -> None:
    """Raise ``ValueError(message)``: shows how errors and tracebacks come back."""
    raise ValueError((args or {}).get("message", "this task always fails"))


@tasks.task("HASH")
def hash_work(args: dict[str, Any], ctx: Any) -> str:
    """CPU work: ``rounds`` SHA-256 rounds over ``data`` (default 200000 rounds)."""
    data = str(args.get("data", "lbmqtt")).encode()
    rounds = int(args.get("rounds", 200_000))
    for i in range(rounds):
        data = hashlib.sha256(data).digest()
        if i % 20_000 == 0:
            ctx.progress(100 * i / rounds)
    return data.hex()
