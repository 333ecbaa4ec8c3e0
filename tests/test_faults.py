"""Fault injection with real processes and a real broker: each scenario streams CHAOS tasks,
injects a fault mid-stream, and ends with an accounting - every task has exactly one final
state, every result is right, none is lost, and none ran to completion twice unless a fault
forced a retry (see tests/cluster.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from lbmqtt.protocol import Topics

from .cluster import Cluster, NetNs, Stream, account, wait_until
from .conftest import stop_paho

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _paho(cluster: Cluster) -> Iterator[paho.Client]:
    c = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311
    )
    c.connect(cluster.host, cluster.port)
    c.loop_start()
    try:
        wait_until(c.is_connected, 10, "a paho client to connect")
        yield c
    finally:
        stop_paho(c)


def _retained(cluster: Cluster, topic: str) -> Callable[[], bytes | None]:
    """A probe: a fresh subscription's retained message on ``topic``, or None."""

    def probe() -> bytes | None:
        got: list[bytes] = []
        with _paho(cluster) as c:
            c.on_message = lambda _c, _u, m: got.append(m.payload) if m.retain else None
            c.subscribe(topic, 1)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: got, 0.5, "a retained message")
        return got[0] if got else None

    return probe


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def _run_through(
    cluster: Cluster, stream: Stream, fault: Callable[[], None], *, after: int
) -> None:
    stream.start()
    wait_until(lambda: len(stream.expected) >= after, 60, f"{after} tasks submitted")
    fault()


def _finish(cluster: Cluster, stream: Stream, *, min_retried: int = 0) -> None:
    try:
        # (within pytest's 120 s for the whole test: a task still missing is then reported
        # with the processes' logs, not cut short by the timeout)
        states = stream.collect(timeout=80)
        acc = account(stream.expected, states, cluster.runs_log)
        print("accounting:", acc.summary())
        acc.assert_clean()
        assert acc.retried >= min_retried, (
            f"the fault forced no retry: it did not hit a running task {acc.summary()}"
        )
    except AssertionError:
        print(cluster.log_tail())
        raise
    finally:
        stream.close()


@pytest.mark.parametrize("journal", ["sqlite", "log"])
def test_balancer_killed_and_restarted_loses_nothing(tmp_path: Path, journal: str) -> None:
    cluster = Cluster(
        tmp_path,
        overrides={"JOURNAL_FORMAT": journal, "JOURNAL_PATH": str(tmp_path / f"j.{journal}")},
    )
    try:
        cluster.start(n1=2)
        stream = Stream(cluster, count=120, interval_s=0.01, task_ms=50)

        def fault() -> None:
            cluster.kill("balancer", signal.SIGKILL)
            time.sleep(0.5)  # submits and results pile up while it is away
            cluster.start_balancer()

        _run_through(cluster, stream, fault, after=60)
        _finish(cluster, stream)
        assert cluster.journal_format() == journal
    finally:
        cluster.close()


def test_without_the_journal_a_killed_balancer_loses_its_queue(tmp_path: Path) -> None:
    # The control for the test above: the same fault with JOURNAL_PATH none must lose
    # tasks, or that test proves nothing.
    cluster = Cluster(tmp_path, overrides={"JOURNAL_PATH": "none", "CLIENT_ACK_TIMEOUT_S": 10})
    try:
        cluster.start(n1=2)
        stream = Stream(cluster, count=80, interval_s=0.005, task_ms=50)

        def fault() -> None:
            cluster.kill("balancer", signal.SIGKILL)
            cluster.start_balancer()

        _run_through(cluster, stream, fault, after=60)
        states = stream.collect(timeout=8)
        stream.close()
        acc = account(stream.expected, states, cluster.runs_log)
        print("accounting:", acc.summary())
        assert acc.lost > 0
        assert acc.duplicated == 0 and acc.wrong == 0
    finally:
        cluster.close()


def test_worker_processes_killed_mid_task_lose_nothing(cluster: Cluster) -> None:
    cluster.start(n1=2)
    stream = Stream(cluster, count=80, interval_s=0.005, task_ms=200)

    def fault() -> None:  # the queue is longer than the slots: both workers are busy
        workers = cluster.workers_of("n1")
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)

    _run_through(cluster, stream, fault, after=40)
    _finish(cluster, stream, min_retried=1)


def test_node_daemon_killed_loses_nothing_and_comes_back(cluster: Cluster) -> None:
    cluster.start(n1=2, n2=2)
    stream = Stream(cluster, count=100, interval_s=0.005, task_ms=150)

    def fault() -> None:
        cluster.kill("n1", signal.SIGKILL)  # its workers die with it (PDEATHSIG)
        cluster.start_node("n1", workers=2)

    _run_through(cluster, stream, fault, after=50)
    _finish(cluster, stream, min_retried=1)


def test_frozen_node_is_declared_dead_and_reconciled_when_it_thaws(cluster: Cluster) -> None:
    cluster.start(n1=2, n2=2)
    stream = Stream(cluster, count=100, interval_s=0.01, task_ms=150)

    def fault() -> None:  # SIGSTOP: the TCP link stays up, only the heartbeats stop
        cluster.send("n1", signal.SIGSTOP)
        for pid in cluster.workers_of("n1"):
            os.kill(pid, signal.SIGSTOP)
        time.sleep(3.5)  # past NODE_TIMEOUT_S (2 s) and the broker's 1.5 x keep-alive (3 s)
        for pid in cluster.workers_of("n1"):
            os.kill(pid, signal.SIGCONT)
        cluster.send("n1", signal.SIGCONT)

    _run_through(cluster, stream, fault, after=40)
    _finish(cluster, stream, min_retried=1)


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_broker_restart_loses_nothing(tmp_path: Path, broker: str) -> None:
    if broker == "mosquitto" and not (
        shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()
    ):
        pytest.skip("needs the Debian package mosquitto (.ci/run installs it)")
    cluster = Cluster(tmp_path, broker=broker)
    try:
        cluster.start(n1=2)
        # a foreign MQTT client's task, finished before the restart
        topics = Topics(cluster.prefix)
        retained_result = _retained(cluster, topics.result("mqtt-user", "before-restart"))
        with _paho(cluster) as c:
            c.publish(
                topics.submit("mqtt-user"),
                json.dumps(
                    {
                        "v": 1,
                        "id": "before-restart",
                        "name": "CHAOS",
                        "args": {"value": 21, "log": str(cluster.runs_log)},
                    }
                ),
                qos=1,
            ).wait_for_publish(5)
        assert json.loads(wait_until(retained_result, 20, "the result"))["status"] == "done"
        stream = Stream(cluster, count=100, interval_s=0.01, task_ms=100)

        def fault() -> None:  # no persistence: every retained message and session is gone
            cluster.restart("broker", cluster.start_broker)

        _run_through(cluster, stream, fault, after=40)
        _finish(cluster, stream)
        # the balancer published the retained result again for MQTT clients that read it
        state = json.loads(wait_until(retained_result, 20, "the result to be retained again"))
        assert state["result"] == {"value": 42}
    finally:
        cluster.close()


def test_node_cut_off_the_network_and_back_loses_nothing(tmp_path: Path) -> None:
    why = NetNs.available()
    if why:
        pytest.skip(why)
    with NetNs() as ns:
        # the broker listens on our end of the veth; the node lives in the namespace
        cluster = Cluster(tmp_path, host=ns.host_ip)
        try:
            cluster.start_broker()
            cluster.start_balancer()
            cluster.start_node("local", workers=1)
            cluster.start_node("far", workers=2, wrap=ns.wrap)
            stream = Stream(cluster, count=90, interval_s=0.01, task_ms=150)

            def fault() -> None:
                ns.cut()
                time.sleep(4)  # the broker drops it after 1.5 x keep-alive; its will fires
                ns.mend()

            _run_through(cluster, stream, fault, after=30)
            _finish(cluster, stream, min_retried=1)
            wait_until(lambda: cluster.alive("far"), 5, "the far node to survive")
        finally:
            cluster.close()


def test_sigterm_drains_a_node_without_losing_or_rerunning_anything(cluster: Cluster) -> None:
    cluster.start(n1=2, n2=2)
    stream = Stream(cluster, count=60, interval_s=0.01, task_ms=300)
    outcome: dict[str, float | int | None] = {}

    def fault() -> None:  # n1 is busy and holds tasks it has not started
        t0 = time.monotonic()
        outcome["status"] = cluster.kill("n1", signal.SIGTERM, timeout=20)
        outcome["seconds"] = time.monotonic() - t0

    _run_through(cluster, stream, fault, after=30)
    states = stream.collect(timeout=80)
    stream.close()
    acc = account(stream.expected, states, cluster.runs_log)
    print("accounting:", acc.summary(), outcome)
    acc.assert_clean()
    # graceful: it finished what it ran, gave back the rest, and nothing ran twice
    assert outcome["status"] == 0
    assert (acc.retried, acc.reruns) == (0, 0), acc.summary()
    assert any(s is not None and s.node == "n1" for s in states.values())
