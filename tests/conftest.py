"""Shared fixtures: a real embedded broker per session, real balancers and nodes per test.

Everything talks real MQTT on 127.0.0.1. Each test gets its own topic prefix, so tests
share one broker without seeing each other's messages. Async components run on an event
loop in a background thread (:class:`LoopThread`), so tests stay plain functions.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from lbmqtt import access
from lbmqtt.access import AccessGuard, Account
from lbmqtt.balancer import Balancer, JournalStore, TaskRecord
from lbmqtt.broker import ALL_PATCHES, EmbeddedBroker, PatchedBroker, loopback_mosquitto_conf
from lbmqtt.client import Client
from lbmqtt.config import Settings, load_settings
from lbmqtt.node import Node

from .cluster import children_of as descendants  # noqa: F401  (the tests import it from here)
from .cluster import free_port, start_mosquitto, wait_until  # noqa: F401  (free_port: imported from here)

T = TypeVar("T")

# The balancers' journals (JOURNAL_PATH "auto") go to a throw-away state directory, also in
# the processes the tests start: never into the user's ~/.local/state.
STATE_DIR = tempfile.mkdtemp(prefix="lbmqtt-test-state-")
os.environ["XDG_STATE_HOME"] = STATE_DIR
atexit.register(shutil.rmtree, STATE_DIR, True)
ROOT = Path(__file__).resolve().parent.parent
DEMO_TASKS = str(ROOT / "nodes" / "demo_tasks.py")
TEST_TASKS = str(ROOT / "tests" / "tasks_for_tests.py")


class LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-loop")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            # let transports closed just now run their connection_lost callbacks: a
            # closed loop drops them and the sockets leak (ResourceWarning)
            await asyncio.sleep(0.05)

        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class BrokerThread:
    """An :class:`EmbeddedBroker` on its own loop thread (as in production, apart from
    the balancer's loop)."""

    def __init__(
        self,
        patches: frozenset[str] = ALL_PATCHES,
        prefix: str | None = None,
        *,
        broker: EmbeddedBroker | None = None,
        **kwargs: Any,
    ):
        """``broker``: one built elsewhere (else one on a free loopback port, with
        ``kwargs``: guard, limits... of :class:`EmbeddedBroker`)."""
        self.lt = LoopThread()
        self.broker = broker or EmbeddedBroker(
            "127.0.0.1", 0, patches=patches, prefix=prefix, **kwargs
        )
        self.lt.run(self.broker.start())
        self.port = self.broker.port

    @property
    def patched(self) -> PatchedBroker:
        """The running amqtt broker (its counters, sessions...)."""
        assert self.broker.broker is not None
        return self.broker.broker

    def stop(self) -> None:
        self.lt.run(self.broker.stop())
        self.lt.close()


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerThread]:
    b = BrokerThread()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real Mosquitto on a free loopback port, configured like broker/mosquitto.conf."""
    shipped = (ROOT / "broker" / "mosquitto.conf").read_text()
    m = start_mosquitto(
        tmp_path_factory.mktemp("mosquitto"), lambda port: loopback_mosquitto_conf(shipped, port)
    )
    yield m.port
    m.stop()


@pytest.fixture
def prefix() -> str:
    return f"t/{uuid.uuid4().hex[:10]}"


def task_record(tid: str, user: str = "u") -> TaskRecord:
    """A queued task of ``user`` as the balancer records it (for unit tests of its parts)."""
    return TaskRecord(
        id=tid,
        user=user,
        name="N",
        args_json=b"null",
        priority=0,
        seq=1,
        submitted_at=1.0,
        notify="events",
    )


def make_settings(port: int, prefix: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "BROKER_PORT": port,
        "TOPIC_PREFIX": prefix,
        "HEARTBEAT_S": 0.3,
        "NODE_TIMEOUT_S": 3.0,
        "STATS_INTERVAL_S": 0.2,
        "CLIENT_ACK_TIMEOUT_S": 10.0,
        "CONNECT_TIMEOUT_S": 5.0,
        "BROKER_KEEPALIVE_S": 5,
        # (a free port: the repository's parameters.json names 9110, which the tests'
        # balancers running side by side took in turn, logging an error for each other)
        "METRICS_PORT": 0,
        "NODE_TASKS": [DEMO_TASKS],
        "WKHUB_WORKERS": [
            {"nWorkers": 2, "minP": 0, "maxP": 9, "processP": 0},
            {"nWorkers": 1, "minP": 10, "maxP": 1000, "processP": 0},
        ],
    }
    base.update(overrides)
    return load_settings(None, env={}, overrides=base)


@pytest.fixture
def broker_port(broker: BrokerThread) -> int:
    """The port of the broker a test talks to (test_e2e.py runs on Mosquitto too)."""
    return broker.port


@pytest.fixture
def settings(broker_port: int, prefix: str) -> Settings:
    return make_settings(broker_port, prefix)


class System:
    """A balancer and nodes of one test, on one loop thread."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.lt = LoopThread()
        self.balancer: Balancer | None = None
        self.nodes: list[Node] = []

    def start_balancer(
        self, settings: Settings | None = None, journal: JournalStore | None = None
    ) -> Balancer:
        """``journal``: a store to use instead of JOURNAL_PATH's (a MemoryJournal)."""

        async def go() -> Balancer:
            b = Balancer(settings or self.settings, journal=journal)
            await b.start()
            await asyncio.wait_for(b.ready.wait(), 10)
            return b

        self.balancer = self.lt.run(go())
        return self.balancer

    def start_node(self, name: str = "n1", settings: Settings | None = None, **kwargs: Any) -> Node:
        async def go() -> Node:
            n = Node(settings or self.settings, name=name, **kwargs)
            await n.start()
            await asyncio.wait_for(n.ready.wait(), 30)
            return n

        node = self.lt.run(go(), timeout=40)
        self.nodes.append(node)
        if self.balancer is not None:
            self.until(lambda b: name in b.scheduler.nodes, 10, f"balancer to see node {name}")
        return node

    def stop_node(self, node: Node) -> None:
        self.lt.run(node.stop())
        self.nodes.remove(node)

    def until(self, pred: Callable[[Balancer], object], timeout: float, what: str) -> None:
        """Wait until ``pred(balancer)`` is true, checked on the loop thread after every
        tick of the balancer (:meth:`Balancer.until`); TimeoutError says ``what``."""
        b = self.balancer
        assert b is not None
        self.lt.run(b.until(pred, timeout, what), timeout=timeout + 10)

    def stats(self) -> Any:
        b = self.balancer
        assert b is not None
        return self.lt.call(b.stats)

    def record(self, task_id: str) -> Any:
        b = self.balancer
        assert b is not None
        return self.lt.call(lambda: b.tasks.get(task_id))

    def close(self) -> None:
        for n in list(self.nodes):
            self.lt.run(n.stop())
        if self.balancer is not None:
            self.lt.run(self.balancer.stop())
        self.lt.close()


@pytest.fixture
def system(settings: Settings) -> Iterator[System]:
    s = System(settings)
    yield s
    s.close()


@pytest.fixture
def running(system: System) -> System:
    """A balancer and one node ``n1`` (2 slots for 0..9, 1 slot for 10..1000)."""
    system.start_balancer()
    system.start_node("n1")
    return system


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings, user="alice") as c:
        yield c


def stop_paho(c: paho.Client) -> None:
    """Disconnect a paho client, stop its network thread and close the socket pair that
    ``loop_start`` made. (paho leaves that pair to ``Client.__del__``; a client in a
    reference cycle - a callback holding its owner - is collected with its sockets, whose
    own finalizers may run first: an "unclosed socket" ResourceWarning, which fails this
    suite, at whatever later test the collector happens to run in.)"""
    c.disconnect()
    c.loop_stop()
    c._reset_sockets()


class RawClient:
    """A plain paho client (its own network thread), as a foreign MQTT client would be."""

    def __init__(self, port: int, client_id: str | None = None, keepalive: int = 30):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"raw-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.subacks: list[int] = []
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda c, u, mid, rc, p: self.subacks.append(mid)
        self.port = port
        self.keepalive = keepalive

    def _on_message(self, c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def connect(self) -> RawClient:
        self.c.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        self.c.loop_start()
        wait_until(self.c.is_connected, 5, "raw client to connect")
        return self

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> None:
        _, mid = self.c.subscribe(topic, qos)
        wait_until(lambda: mid in self.subacks, timeout, f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)

    def payloads(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def states(self, events_topic: str) -> list[dict[str, Any]]:
        """The task states of every message seen on a user's ``events`` topic, in order."""
        return [st for p in self.payloads(events_topic) for st in json.loads(p)["states"]]

    def close(self) -> None:
        stop_paho(self.c)


@pytest.fixture
def raw(broker_port: int) -> Iterator[Callable[..., RawClient]]:
    made: list[RawClient] = []

    def make(**kwargs: Any) -> RawClient:
        rc = RawClient(broker_port, **kwargs).connect()
        made.append(rc)
        return rc

    yield make
    for rc in made:
        rc.close()


def lbmqtt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lbmqtt", *args]


def run_cli(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")}
    full_env.update(env or {})
    return subprocess.run(
        lbmqtt_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or ROOT,
        check=False,
    )


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


# ----------------------------------------------------------------- `lbmqtt up`


@dataclass
class Up:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    port: int = 0
    url: str = ""
    reader: threading.Thread | None = None

    def text(self) -> str:
        return "\n".join(self.lines)


def start_up(*extra: str, port: int = 0, env_extra: dict[str, str] | None = None) -> Up:
    """``lbmqtt up`` on a free broker, dashboard and metrics port, once it says it is up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")}
    env.update(env_extra or {})
    proc = subprocess.Popen(
        lbmqtt_cmd(
            "up", "--broker-port", str(port), "--monitor-port", "0", "--metrics-port", "0", *extra
        ),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    up = Up(proc)

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when up and every child closed the pipe
            up.lines.append(line.rstrip("\n"))

    up.reader = threading.Thread(target=reader, daemon=True)
    up.reader.start()
    wait_until(
        lambda: "Ctrl-C stops everything." in up.lines or proc.poll() is not None,
        90,
        "`lbmqtt up` to be ready",
    )
    assert proc.poll() is None, up.text()
    m = re.search(r"--broker-port (\d+)", up.text())
    up.port = int(m.group(1)) if m else port
    d = re.search(r"dashboard\s+(http://\S+)", up.text())
    up.url = d.group(1) if d else ""
    return up


def finish(up: Up) -> None:
    if up.proc.poll() is None:
        up.proc.kill()
    up.proc.wait(10)
    if up.reader is not None:
        up.reader.join(30)
    if up.proc.stdout is not None and (up.reader is None or not up.reader.is_alive()):
        up.proc.stdout.close()


# ---------------------------------------------- accounts (test_security, test_login)

PASSWORDS = {
    "alice": "pw-alice",
    "bob": "pw-bob",
    "n1": "pw-n1",
    "n2": "pw-n2",
    "mon": "pw-mon",
    "lb": "pw-lb",
}
ROLES: dict[str, access.Role] = {
    "alice": "user",
    "bob": "user",
    "n1": "node",
    "n2": "node",
    "mon": "monitor",
    "lb": "balancer",
}


def write_accounts(path: Path, iterations: int = 1000) -> None:
    """The test accounts (cheap hashes: these tests are about rules, not hashing cost)."""
    access.write_accounts(
        path,
        [
            Account(name, ROLES[name], access.hash_password(pw, iterations=iterations))
            for name, pw in PASSWORDS.items()
        ],
    )


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[BrokerThread, Path]]:
    """An embedded broker with the test accounts (prefix ``p``), on its own loop."""
    f = tmp_path / "accounts"
    write_accounts(f)
    bt = BrokerThread(guard=AccessGuard("p", f))
    yield bt, f
    bt.stop()
