"""The shared lifecycle (lbmqtt.service): supervised loops and run(); and the balancer's
ways to be waited on (until, join)."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lbmqtt import Client
from lbmqtt.balancer import Balancer
from lbmqtt.config import Settings
from lbmqtt.mqtt import MqttTransport
from lbmqtt.node import Node
from lbmqtt.service import LoopFailed, Loops

from .conftest import ROOT, TEST_TASKS, LoopThread, System, wait_until


def test_a_loop_that_raises_is_logged_stops_the_others_and_is_raised_by_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        loops = Loops("thing")
        other_cancelled = asyncio.Event()

        async def boom() -> None:
            await asyncio.sleep(0.01)
            raise ZeroDivisionError("boom")

        async def forever() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                other_cancelled.set()

        await loops.start({"thing-boom": boom, "thing-forever": forever})
        await asyncio.wait_for(loops.dead.wait(), 5)
        await asyncio.wait_for(other_cancelled.wait(), 5)
        await loops.stop()  # (does not raise: the component finishes its own shutdown)
        with pytest.raises(LoopFailed, match="thing-boom loop died") as info:
            loops.raise_if_failed()
        assert isinstance(info.value.__cause__, ZeroDivisionError)

    with caplog.at_level(logging.ERROR, logger="lbmqtt.service"):
        asyncio.run(scenario())
    assert "the thing-boom loop died" in caplog.text
    assert "ZeroDivisionError: boom" in caplog.text  # the traceback


def test_stopping_healthy_loops_cancels_them_and_raises_nothing() -> None:
    async def scenario() -> None:
        loops = Loops("calm")
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        await loops.start({"calm-tick": tick})
        await asyncio.sleep(0.01)
        assert loops.running
        await loops.stop()
        assert not loops.running and not loops.dead.is_set()
        loops.raise_if_failed()
        assert ticks > 0

    asyncio.run(scenario())


def test_a_loop_that_returns_by_mistake_counts_as_dead_but_a_one_shot_loop_may_return(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        loops = Loops("thing")
        ready = asyncio.Event()

        async def one_shot() -> None:
            ready.set()

        async def forgetful() -> None:
            await ready.wait()  # (returns: a `while True` lost in an edit)

        async def forever() -> None:
            await asyncio.Event().wait()

        with caplog.at_level(logging.ERROR, logger="lbmqtt.service"):
            await loops.start(
                {"thing-ready": one_shot, "thing-forgetful": forgetful, "thing-forever": forever},
                once={"thing-ready"},
            )
            await asyncio.wait_for(loops.dead.wait(), 5)
        await loops.stop()
        with pytest.raises(LoopFailed, match="the thing-forgetful loop returned"):
            loops.raise_if_failed()
        assert "thing-ready" not in caplog.text

    asyncio.run(scenario())


def test_loops_that_return_while_closing_are_not_dead() -> None:
    async def scenario() -> None:
        loops = Loops("thing")
        done = asyncio.Event()

        async def until_done() -> None:
            await done.wait()

        await loops.start({"thing-work": until_done})
        loops.closing = True  # (the component begins to stop: its loops wind down)
        done.set()
        await asyncio.sleep(0)
        await loops.stop()
        assert not loops.dead.is_set()
        loops.raise_if_failed()

    asyncio.run(scenario())


def test_stopping_loops_does_not_swallow_a_cancellation_of_the_caller() -> None:
    async def scenario() -> None:
        loops = Loops("stubborn")
        release = asyncio.Event()

        async def slow_to_die() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                await release.wait()  # its clean-up takes a while

        await loops.start({"stubborn-loop": slow_to_die})
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await loops.stop()  # the caller's time is up: it must hear so
        release.set()

    asyncio.run(scenario())


def test_a_balancer_whose_loop_dies_logs_it_and_run_raises(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a balancer whose stats loop will raise (fault injection)
    def broken(self: Balancer) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(Balancer, "_stats_step", broken)
    lt = LoopThread()
    readied: list[str] = []
    try:
        b = Balancer(settings)
        # When it runs, Then run() ends by itself with the loop's error
        with (
            caplog.at_level(logging.ERROR, logger="lbmqtt.service"),
            pytest.raises(LoopFailed, match="balancer-stats loop died"),
        ):
            lt.run(b.run(on_ready=lambda b: readied.append(b.instance)), timeout=30)
    finally:
        lt.close()
    assert "RuntimeError: injected fault" in caplog.text  # with its traceback
    assert readied == [b.instance]
    assert b.journal is None  # and it stopped: journal closed, transport closed


def test_a_node_whose_loop_dies_logs_it_stops_its_workers_and_run_raises(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a node whose heartbeat loop raises once the node is up (fault injection)
    up = asyncio.Event()

    async def broken(self: Node) -> None:
        await up.wait()
        raise RuntimeError("injected fault")

    def on_ready(n: Node) -> None:
        readied.append(n.name)
        up.set()

    monkeypatch.setattr(Node, "_heartbeat_loop", broken)
    lt = LoopThread()
    readied: list[str] = []
    try:
        n = Node(settings, name="n-dies", tasks=[TEST_TASKS])
        # When it runs, Then run() ends by itself with the loop's error
        with (
            caplog.at_level(logging.ERROR, logger="lbmqtt.service"),
            pytest.raises(LoopFailed, match="node-heartbeat loop died"),
        ):
            lt.run(n.run(on_ready=on_ready), timeout=40)
    finally:
        lt.close()
    assert "RuntimeError: injected fault" in caplog.text  # with its traceback
    assert readied == ["n-dies"]
    assert not n.loops.running  # and it stopped: its worker loops are gone too


def test_a_balancer_whose_mqtt_transport_dies_goes_down_rather_than_on_deaf(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an MQTT transport whose housekeeping loop raises (fault injection)
    async def broken(self: MqttTransport) -> None:
        raise RuntimeError("injected transport fault")

    monkeypatch.setattr(MqttTransport, "_misc_loop", broken)
    lt = LoopThread()
    try:
        b = Balancer(settings)
        # When a balancer runs on it, Then run() ends with the transport's error
        with (
            caplog.at_level(logging.ERROR, logger="lbmqtt.service"),
            pytest.raises(LoopFailed, match="balancer-transport loop died"),
        ):
            lt.run(b.run(), timeout=30)
    finally:
        lt.close()
    assert "RuntimeError: injected transport fault" in caplog.text


def test_the_balancer_command_exits_non_zero_when_a_loop_dies(settings: Settings) -> None:
    # a real `lbmqtt balancer` process whose health loop raises (the fault injected by
    # patching the method before the command runs: no test hook in lbmqtt)
    code = (
        "import sys\n"
        "import lbmqtt.balancer.core as core\n"
        "def broken(self):\n"
        "    raise RuntimeError('injected fault')\n"
        "core.Balancer._health_step = broken\n"
        "from lbmqtt.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "balancer",
            "--broker-port",
            str(settings.broker_port),
            "--prefix",
            settings.topic_prefix,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "RuntimeError: injected fault" in r.stderr  # the traceback, logged
    assert "balancer-health loop died" in r.stderr


def test_until_returns_once_true_and_times_out_saying_what_it_waited_for(
    system: System, client: Client
) -> None:
    system.start_balancer()
    system.start_node("n1", tasks=[TEST_TASKS])
    tid = client.submit("ECHO", 1)
    system.until(lambda b: tid in b.tasks and b.tasks[tid].status.final, 20, "ECHO to finish")
    assert client.wait(tid, timeout=5)["args"] == 1
    with pytest.raises(
        TimeoutError, match=r"balancer: timed out after 0\.2 s waiting for a miracle"
    ):
        system.until(lambda b: False, 0.2, "a miracle")


def test_join_returns_once_no_task_is_queued_or_placed(system: System, client: Client) -> None:
    b = system.start_balancer()
    system.start_node("n1", tasks=[TEST_TASKS])
    ids = [client.submit("ECHO", i) for i in range(20)]
    system.lt.run(b.join(30), timeout=40)
    recs = [system.record(t) for t in ids]
    assert all(r.status.final for r in recs)
    assert system.lt.call(lambda: b.scheduler.queued) == 0


# The fault is injected into the balancer process of `lbmqtt up` from outside lbmqtt: a
# sitecustomize module (Python imports it at start-up from PYTHONPATH) that, in the process
# whose command line is `lbmqtt balancer`, makes the stats step raise once the test has
# created the marker file, and deletes the file (so the restarted balancer runs normally).
_FAULT_HOOK = """
import os
if b"balancer" in open("/proc/self/cmdline", "rb").read().split(b"\\0"):
    import lbmqtt.balancer.core as core

    marker = os.environ["FAULT_MARKER"]
    healthy = core.Balancer._stats_step

    def step(self):
        if os.path.exists(marker):
            os.unlink(marker)
            raise RuntimeError("injected fault")
        healthy(self)

    core.Balancer._stats_step = step
"""


@pytest.mark.slow
def test_up_starts_a_balancer_whose_loop_died_again(tmp_path: Path) -> None:
    from .conftest import finish, run_cli, start_up

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_FAULT_HOOK)
    marker = tmp_path / "fault"
    env = {"PYTHONPATH": str(hook), "FAULT_MARKER": str(marker)}
    up = start_up("--no-dashboard", env_extra=env)
    try:
        # When the balancer's stats loop raises
        marker.touch()
        wait_until(
            lambda: "balancer is back" in up.text() or up.proc.poll() is not None,
            60,
            "`up` to start the balancer again",
        )
        # Then it died with its traceback and a non-zero status, and `up` started it again
        assert up.proc.poll() is None, up.text()
        assert not marker.exists()
        assert "the balancer-stats loop died" in up.text()
        assert "RuntimeError: injected fault" in up.text()
        assert "balancer exited unexpectedly (status 1)" in up.text()
        # and the new one works
        r = run_cli(
            "submit",
            "HELLO",
            '{"firstName": "John", "lastName": "Doe"}',
            "--wait",
            "--broker-port",
            str(up.port),
        )
        assert r.stdout == "Hello John Doe !\n", r.stderr
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
    finally:
        finish(up)
