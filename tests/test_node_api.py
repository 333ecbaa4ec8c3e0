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
from lbmqtt.errors import DecodeError
from lbmqtt.protocol import Assignment, AssignmentSet, Status, decode
from lbmqtt.protocol.assign import decode_assignment_set

from .conftest import TEST_TASKS, System, descendants, process_alive, wait_until

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
        system.until(lambda b: "scripted" in b.scheduler.nodes, 30, "the scripted node to join")
        assert client.wait(client.submit("SHOUT", "hi"), timeout=20) == "HI"
        assert client.wait(client.submit("WHISPER", "HO"), timeout=20) == "ho"
        family = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        wait_until(lambda: not any(process_alive(p) for p in family), 10, "its workers to exit")
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


def test_a_node_can_be_waited_on_until_a_state_holds_and_until_it_holds_nothing(
    system: System, client: Client, tmp_path: Path
) -> None:
    system.start_balancer()
    node = system.start_node("n1", tasks=[TEST_TASKS])
    gate, started = tmp_path / "gate", tmp_path / "started"
    # Given a task that runs on n1 until its gate opens
    tid = client.submit("BLOCK", {"gate": str(gate), "started": str(started)})
    system.lt.run(node.until(lambda n: n.counters["started"] == 1, 20, "the task to start"))
    assert system.lt.call(lambda: node.held) == 1
    # Then waiting for the node to hold nothing times out while it runs, saying what for
    with pytest.raises(
        TimeoutError, match=r"n1: timed out after 0\.05 s waiting for the node to hold no task"
    ):
        system.lt.run(node.join(0.05))
    # and returns once its result is acknowledged (the balancer has it)
    gate.touch()
    system.lt.run(node.join(20))
    assert system.lt.call(lambda: (node.held, node.counters["done"])) == (0, 1)
    assert system.record(tid).status == Status.DONE  # (the client may hear of it later)


# ------------------------------------------------------------------ the assignment set


def _set(tasks: list[object], node: str = "n1") -> bytes:
    import json

    return json.dumps({"v": 1, "node": node, "balancer": "b", "seq": 3, "tasks": tasks}).encode()


def _assignment(tid: str, attempt: int = 1, **extra: object) -> dict[str, object]:
    return {"id": tid, "attempt": attempt, "user": "u", "name": "ECHO", "args": [1], **extra}


SETS = [
    _set([]),
    _set([_assignment("a"), _assignment("b", 2, priority=5, timeout_s=1.5, tags=["gpu"])]),
    _set([_assignment("held"), _assignment("new", group=1, requires={"cores": 2})]),
    _set([_assignment("held", 2)]),  # a newer attempt of a held task: validated again
    # new ones around a held one (validated in one call, put back in their places)
    _set([_assignment("n1"), _assignment("held"), _assignment("n2", 3), _assignment("n3")]),
    _set([_assignment("a", unknown_field="ignored")]),
]


@pytest.mark.parametrize("payload", SETS)
def test_the_node_reads_an_assignment_set_as_full_validation_does(payload: bytes) -> None:
    held = Assignment.model_validate(_assignment("held"))
    full = decode(AssignmentSet, payload)
    node, tasks = decode_assignment_set(payload, {"held": held}.get)
    assert (node, tasks) == (full.node, full.tasks)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'{"v": 1, "node": "n1"}',  # no balancer, no seq
        _set([{"id": "x", "attempt": "one", "user": "u", "name": "ECHO"}]),
        _set([_assignment("x", user=None)]),
        _set(["not an object"]),
        b'{"v": 1, "node": "n1", "balancer": "b", "seq": 1, "tasks": "no list"}',
    ],
)
def test_a_malformed_assignment_set_is_refused_as_full_validation_refuses_it(
    payload: bytes,
) -> None:
    from pydantic import ValidationError

    with pytest.raises((DecodeError, ValidationError)):
        decode(AssignmentSet, payload)
    with pytest.raises((DecodeError, ValidationError)):
        decode_assignment_set(payload, lambda tid: None)


def test_a_bad_task_among_new_ones_is_named_by_its_own_error() -> None:
    from pydantic import ValidationError

    payload = _set([_assignment("ok"), _assignment("x", attempt="one"), _assignment("ok2")])
    with pytest.raises(ValidationError) as info:
        decode_assignment_set(payload, lambda tid: None)
    assert info.value.title == "Assignment"  # (not list[Assignment], with an index)
    assert [e["loc"] for e in info.value.errors()] == [("attempt",)]
