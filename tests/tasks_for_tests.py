"""Tasks used by the tests. ``BLOCK`` waits for a gate file, so a test decides exactly when
a task finishes instead of guessing with sleeps."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lbmqtt import Registry

tasks = Registry()


def _wait_gate(gate: str | None, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while gate and not Path(gate).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@tasks.task("BLOCK")
def block(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Mark ``started`` (a file), report ``progress`` if given, wait for ``gate``. With
    ``per_attempt``, both files are the attempt's own (``started.2``, ``gate.2``)."""
    suffix = f".{ctx.attempt}" if args.get("per_attempt") else ""
    if args.get("started"):  # written then renamed: a reader never sees it half-written
        tmp = Path(args["started"] + suffix + ".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.rename(args["started"] + suffix)
    if "progress" in args:
        ctx.progress(args["progress"])
    gate = args.get("gate")
    opened = _wait_gate(gate + suffix if gate else None, float(args.get("limit_s", 60)))
    return {
        "pid": os.getpid(),
        "opened": opened,
        "attempt": ctx.attempt,
        "value": args.get("value"),
    }


@tasks.task("ECHO")
def echo(args: Any, ctx: Any) -> dict[str, Any]:
    """Return the arguments and what the context says."""
    return {
        "args": args,
        "task_id": ctx.task_id,
        "user": ctx.user,
        "name": ctx.name,
        "priority": ctx.priority,
        "attempt": ctx.attempt,
        "pid": os.getpid(),
        "nice": os.nice(0),
    }


@tasks.task("CRASH_ONCE")
def crash_once(args: dict[str, Any], ctx: Any) -> str:
    """Kill its own worker process on the first attempt; succeed on the next."""
    if ctx.attempt == 1:
        os._exit(17)
    return f"survived on attempt {ctx.attempt}"


@tasks.task("NOT_JSON")
def not_json(args: Any) -> Any:
    """Return something that is not JSON-serializable."""
    return {1, 2, 3}


@tasks.task("SPAWN")
def spawn(args: dict[str, Any]) -> int:
    """Start a child process (as real tasks do: ffmpeg, make...), note its pid, wait."""
    import subprocess

    child = subprocess.Popen(["sleep", "120"])
    tmp = Path(args["pidfile"] + ".tmp")
    tmp.write_text(str(child.pid))
    tmp.rename(args["pidfile"])
    _wait_gate(args.get("gate"), 60)
    child.kill()
    child.wait()
    return child.pid


@tasks.task("CHAOS")
def chaos(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Sleep ``ms``, then append ``"<task id> <attempt> <pid>"`` to the file ``log`` (one
    write, so lines from concurrent workers never mix): the fault tests count from it how
    often each task ran to completion. Returns ``value * 2``."""
    time.sleep(float(args.get("ms", 0)) / 1000)
    line = f"{ctx.task_id} {ctx.attempt} {os.getpid()}\n".encode()
    fd = os.open(args["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return {"value": args["value"] * 2}
