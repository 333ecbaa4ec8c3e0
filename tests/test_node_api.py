"""The Node Python API: tasks registered in a script, run as the README shows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lbmqtt import Client, Node, Registry

from .conftest import System, descendants, process_alive, wait_for

SCRIPT = textwrap.dedent("""
    from lbmqtt import Node

    node = Node(name="scripted")

    @node.task("SHOUT")
    def shout(args):
        return args.upper()

    def whisper(args, ctx):
        ctx.progress(50)
        return args.lower()

    node.add_task("WHISPER", whisper)

    if __name__ == "__main__":
        node.run_forever()
""")


def test_a_script_node_serves_its_decorated_and_added_tasks(
    system: System, tmp_path: Path, client: Client
) -> None:
    system.start_balancer()
    script = tmp_path / "my_node.py"
    script.write_text(SCRIPT)
    s = system.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")}
    env.update(
        LBMQTT_BROKER_PORT=str(s.broker_port),
        LBMQTT_TOPIC_PREFIX=s.topic_prefix,
        LBMQTT_WKHUB_WORKERS='[{"nWorkers": 1, "minP": 0, "maxP": 9}]',
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env)
    try:
        b = system.balancer
        assert b is not None
        wait_for(
            lambda: system.lt.call(lambda: "scripted" in b.scheduler.nodes),
            30,
            "the scripted node to join",
        )
        assert client.wait(client.submit("SHOUT", "hi"), timeout=20) == "HI"
        assert client.wait(client.submit("WHISPER", "HO"), timeout=20) == "ho"
        family = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        wait_for(lambda: not any(process_alive(p) for p in family), 10, "its workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_task_functions_must_be_importable_by_the_workers() -> None:
    reg = Registry()
    with pytest.raises(TypeError, match="module-level functions"):
        reg.add_task("LAMBDA", lambda args: args)

    def nested(args: object) -> object:
        return args

    with pytest.raises(TypeError, match="module-level functions"):
        Node(name="x").add_task("NESTED", nested)
    with pytest.raises(ValueError, match="invalid task name"):
        reg.add_task("has space", print)


def test_a_node_without_tasks_says_how_to_give_it_some(settings: object) -> None:
    import asyncio

    from lbmqtt.errors import ConfigError

    node = Node(settings.with_overrides(node_tasks=[]), name="empty")  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="pass --tasks MODULE"):
        asyncio.run(node.start())


def test_a_broken_task_module_is_a_clear_error(tmp_path: Path) -> None:
    from .conftest import run_cli

    bad = tmp_path / "bad_tasks.py"
    bad.write_text("import no_such_module_xyz\n")
    r = run_cli("node", "--tasks", str(bad), "--broker-port", "1", timeout=60)
    assert r.returncode == 2
    assert "cannot load task modules" in r.stderr and "no_such_module_xyz" in r.stderr
    assert "Traceback" not in r.stderr
