"""The ``lbmqtt`` command, as a user runs it: ``up``, ``submit``, ``status``, shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, Up, finish, lbmqtt_cmd, process_alive, run_cli, start_up, wait_until

HELLO = '{"firstName": "John", "lastName": "Doe"}'


@pytest.fixture
def system_up() -> Iterator[Up]:
    up = start_up()
    yield up
    finish(up)


@pytest.mark.slow
def test_up_then_submit_status_and_a_clean_ctrl_c(system_up: Up) -> None:
    from .conftest import descendants

    port = str(system_up.port)
    # submit --wait prints the result
    r = run_cli("submit", "HELLO", HELLO, "--wait", "--broker-port", port)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello John Doe !\n"
    # a failing task: exit status 1 and the worker's traceback
    r = run_cli("submit", "FAIL", '{"message": "boom"}', "--wait", "--broker-port", port)
    assert r.returncode == 1 and "ValueError: boom" in r.stderr and "Traceback" in r.stderr
    # without --wait: the id; then get and cancel by id
    r = run_cli("submit", "SLEEP", '{"seconds": 60}', "--id", "cli-sleep", "--broker-port", port)
    assert r.stdout.strip() == "cli-sleep"
    r = run_cli("cancel", "cli-sleep", "--broker-port", port)
    assert r.returncode == 0 and "cli-sleep: cancelled" in r.stdout
    r = run_cli("get", "cli-sleep", "--json", "--broker-port", port)
    assert json.loads(r.stdout)["status"] == "cancelled"
    # status --json is the balancer's stats
    r = run_cli("status", "--json", "--broker-port", port)
    stats = json.loads(r.stdout)
    assert stats["done_total"] >= 1 and stats["failed_total"] >= 1
    assert [n["online"] for n in stats["nodes"]] == [True]
    r = run_cli("status", "--broker-port", port)
    assert "HELLO" in r.stdout and "online" in r.stdout
    # the dashboard page answers
    assert system_up.url
    with urllib.request.urlopen(system_up.url, timeout=10) as resp:
        assert resp.status == 200 and b"Bokeh" in resp.read()
    # Ctrl-C stops everything, with no process left behind
    family = descendants(system_up.proc.pid)
    assert len(family) >= 4 + 3  # broker, balancer, dashboard, node + its 3 workers
    system_up.proc.send_signal(signal.SIGINT)
    assert system_up.proc.wait(60) == 0
    wait_until(lambda: not any(process_alive(p) for p in family), 10, "every child to exit")
    assert "lbmqtt: stopped" in system_up.text()


@pytest.mark.slow
def test_a_killed_up_takes_its_children_with_it() -> None:
    from .conftest import descendants

    up = start_up("--no-dashboard")
    family = descendants(up.proc.pid)
    assert family
    up.proc.kill()  # SIGKILL: no chance to clean up; the kernel tells the children
    finish(up)
    wait_until(lambda: not any(process_alive(p) for p in family), 20, "every child to exit")


@pytest.mark.slow
def test_up_uses_an_external_broker_when_configured(mosquitto: int) -> None:
    up = start_up("--no-dashboard", port=mosquitto, env_extra={"LBMQTT_BROKER_EMBEDDED": "false"})
    try:
        assert "embedded" not in up.text() and "lbmqtt broker: listening" not in up.text()
        assert f"mqtt://127.0.0.1:{mosquitto}" in up.text()
        r = run_cli("submit", "HELLO", HELLO, "--wait", "--broker-port", str(mosquitto))
        assert r.stdout == "Hello John Doe !\n", r.stderr
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
    finally:
        finish(up)


def test_submit_without_a_broker_says_what_to_do() -> None:
    r = run_cli(
        "submit",
        "HELLO",
        HELLO,
        "--broker-port",
        "1",
        timeout=60,
        env={"LBMQTT_CONNECT_TIMEOUT_S": "1"},
    )
    assert r.returncode == 3
    assert "cannot reach the MQTT broker at 127.0.0.1:1" in r.stderr
    assert "lbmqtt up" in r.stderr and "Traceback" not in r.stderr


def test_submit_with_bad_json_arguments_is_a_usage_error() -> None:
    r = run_cli("submit", "HELLO", "{not json", "--broker-port", "1")
    assert r.returncode == 2 and "ARGS is not valid JSON" in r.stderr


def test_submit_wait_says_why_a_task_cannot_run(running: Any) -> None:
    s = running.settings
    r = run_cli(
        "submit",
        "NOPE",
        "{}",
        "--wait",
        "--timeout",
        "1",
        "--broker-port",
        str(s.broker_port),
        "--prefix",
        s.topic_prefix,
    )
    assert r.returncode == 4
    assert "is queued: no online node offers task 'NOPE'" in r.stderr
    assert "status: queued: no online node offers task 'NOPE'" in r.stderr


def test_node_tasks_flag_replaces_node_tasks(running: Any) -> None:
    import os

    from .conftest import TEST_TASKS

    s = running.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")}
    proc = subprocess.Popen(
        lbmqtt_cmd(
            "node",
            "--tasks",
            TEST_TASKS,
            "--name",
            "cli-node",
            "--workers",
            "1",
            "--broker-port",
            str(s.broker_port),
            "--prefix",
            s.topic_prefix,
        ),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the ready line (the process is killed if it hangs)
        assert line.startswith("lbmqtt node cli-node: ready with 1 worker slots")
        assert "ECHO" in line and "HELLO" not in line  # ./parameters.json lists the demo
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.slow
def test_up_starts_a_killed_balancer_again_and_the_tasks_carry_on() -> None:
    from .conftest import descendants

    up = start_up("--no-dashboard")
    try:
        port = str(up.port)
        r = run_cli(
            "submit", "SLEEP", '{"seconds": 1.5}', "--id", "survivor", "--broker-port", port
        )
        assert r.returncode == 0, r.stderr
        queued = [
            run_cli("submit", "HELLO", HELLO, "--broker-port", port).stdout.strip()
            for _ in range(3)
        ]
        balancer = next(
            p
            for p in descendants(up.proc.pid)
            if b"balancer" in Path(f"/proc/{p}/cmdline").read_bytes()
        )
        os.kill(balancer, signal.SIGKILL)
        wait_until(
            lambda: "balancer is back" in up.text() or up.proc.poll() is not None,
            60,
            "`up` to start the balancer again",
        )
        assert up.proc.poll() is None, up.text()
        # the running task finished where it ran; the queued ones ran
        r = run_cli(
            "submit",
            "SLEEP",
            '{"seconds": 1.5}',
            "--id",
            "survivor",
            "--wait",
            "--json",
            "--broker-port",
            port,
        )
        state = json.loads(r.stdout)
        assert state["status"] == "done" and state["attempt"] == 1, state
        for tid in queued:
            r = run_cli("submit", "HELLO", HELLO, "--id", tid, "--wait", "--broker-port", port)
            assert r.stdout == "Hello John Doe !\n", r.stderr
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
    finally:
        finish(up)


def test_tune_gc_makes_collections_rare_and_balancer_command_uses_it() -> None:
    # the balancer's heap is large and long-lived: the default thresholds cost a fifth of
    # its time accepting 300,000 tasks (bench/run.py scale); `lbmqtt balancer` raises them
    import gc
    import inspect

    from lbmqtt import cli
    from lbmqtt.balancer import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        # (the first threshold only: Python 3.14's incremental collector reads the others
        # differently)
        assert gc.get_threshold()[0] == GC_THRESHOLDS[0] >= 50 * 700
    finally:
        gc.set_threshold(*before)
    source = inspect.getsource(cli.cmd_balancer)
    assert 0 <= source.find("\n    tune_gc()\n") < source.find("asyncio.run(")
