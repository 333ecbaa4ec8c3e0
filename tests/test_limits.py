"""Limits and bad input: the submit rate, packet sizes at the broker, and fuzzed payloads.

The fuzzing publishes hypothesis-generated payloads (wrong types, huge numbers, deep
nesting, invalid UTF-8, NaN, oversized, protocol-shaped objects with bad fields) on every
topic a part of lbmqtt reads: the balancer's (submit, cancel, ack, query, node status,
heartbeats, reports, dashboard presence), a node's assignments, a client's events and
errors, and the dashboard's stats and history; plus ``$`` topics. Afterwards a normal
task still round-trips, every part is still connected, and the balancer's books agree
with its scheduler.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from lbmqtt import access
from lbmqtt.access import AccessGuard, Account
from lbmqtt.client import Client
from lbmqtt.dashboard import DashboardState, message_handler
from lbmqtt.errors import RateLimited
from lbmqtt.launcher import spawn, stop_children
from lbmqtt.mqtt import MqttTransport
from lbmqtt.protocol import Status, Topics

from .conftest import (
    TEST_TASKS,
    BrokerThread,
    RawClient,
    System,
    make_settings,
    stop_paho,
    wait_until,
)

# ----------------------------------------------------------------------------- rate


def test_submits_beyond_the_rate_are_refused_and_map_sends_them_again(
    system: System, broker: BrokerThread, prefix: str
) -> None:
    s = make_settings(broker.port, prefix, SUBMIT_RATE=40, SUBMIT_BURST=10)
    system.start_balancer(s)
    system.start_node("n1", s)
    with Client(s, user="alice") as c:
        with pytest.raises(RateLimited, match="SUBMIT_RATE"):
            c.submit_many([{"name": "ADD", "args": [i, 1]} for i in range(25)])
        assert c.map("ADD", [[i, 1] for i in range(60)], timeout=60) == [i + 1 for i in range(60)]
        # another user has a bucket of their own
        with Client(s, user="bob") as bob:
            assert bob.wait(bob.submit("ADD", [2, 2]), timeout=20) == 4
    stats = system.stats()
    assert stats.refused_by_code["rate_limited"] >= 15
    assert stats.done_total >= 60 + 10 + 1


# ----------------------------------------------------------------------------- packets


def alice_and_lb(tmp_path: Path) -> Path:
    """An accounts file with the user alice (password "a") and the balancer lb ("b")."""
    f = tmp_path / "accounts"
    access.write_accounts(
        f,
        [
            Account("alice", "user", access.hash_password("a", iterations=1000)),
            Account("lb", "balancer", access.hash_password("b", iterations=1000)),
        ],
    )
    return f


def test_the_broker_caps_packets_by_role(tmp_path: Path) -> None:
    f = alice_and_lb(tmp_path)
    bt = BrokerThread(
        guard=AccessGuard("p", f), max_packet_bytes=1_000_000, client_max_packet_bytes=100_000
    )
    broker, lt = bt.broker, bt.lt
    try:
        got: list[tuple[str, int]] = []
        lb = MqttTransport(
            host="127.0.0.1",
            port=broker.port,
            client_id="lb-1",
            username="lb",
            password="b",
            on_message=lambda t, p, r: got.append((t, len(p))),
            subscriptions=[("p/#", 1)],
        )
        alice = MqttTransport(
            host="127.0.0.1",
            port=broker.port,
            client_id="alice-1",
            username="alice",
            password="a",
            on_message=lambda *a: None,
        )
        lt.run(lb.start(wait=True))
        lt.run(alice.start(wait=True))
        lt.call(lambda: alice.publish("p/users/alice/submit", b"x" * 99_000, qos=1))
        wait_until(lambda: ("p/users/alice/submit", 99_000) in got, 10, "the small one")
        connects = alice.connects
        lt.call(lambda: alice.publish("p/users/alice/submit", b"x" * 200_000, qos=1))
        wait_until(lambda: bt.patched.too_large == 1, 10, "the broker to refuse 200 kB from a user")
        wait_until(lambda: alice.connects > connects, 10, "alice to reconnect")
        lt.call(lambda: lb.publish("p/users/alice/events", b"y" * 500_000, qos=1))
        wait_until(lambda: ("p/users/alice/events", 500_000) in got, 10, "the balancer's")
        assert ("p/users/alice/submit", 200_000) not in got
        lt.run(alice.close())
        lt.run(lb.close())
    finally:
        bt.stop()


# ----------------------------------------------------------------------------- fuzzing

KEYS = [
    "v",
    "name",
    "args",
    "id",
    "ids",
    "priority",
    "tasks",
    "node",
    "online",
    "slots",
    "groups",
    "results",
    "started",
    "progress",
    "instance",
    "status",
    "samples",
    "timeout_s",
    "requires",
    "tags",
    "notify",
    "ref",
    "seq",
    "errors",
    "events",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63, max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", "$SYS", "../x", "a/b", "+", "#", "x" * 200, "\u0000", "\ud800"]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=6),
    ),
    max_leaves=25,
)


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True, default=str).encode("utf-8", "surrogatepass")


PAYLOADS = st.one_of(
    JSON.map(_encode),
    st.dictionaries(st.sampled_from(KEYS), JSON, max_size=8).map(lambda d: _encode({"v": 1, **d})),
    st.binary(max_size=300),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.sampled_from(
        [
            b"",
            b"null",
            b"NaN",
            b"-Infinity",
            b"1e999999",
            b'"\xff\xfe"',
            b'{"v": 1, "ids": [' + b'"x",' * 20000 + b'"x"]}',
            b'{"v": 1, "name": "ADD", "priority": NaN}',
            b'{"v": 1, "name": "ADD", "priority": -1e300}',
            b'{"v": 1, "tasks": [' + b'{"name": "NOOP"},' * 3000 + b"{}]}",
            b'{"v": 1, "name": "NOOP", "id": "$bad"}',
            b'{"v": 1, "name": "NOOP", "id": "a/b/#"}',
            b'{"v": 1, "name": "NOOP", "args": ' + b"9" * 5000 + b"}",
        ]
    ),
)


def inbound_topics(t: Topics) -> list[str]:
    """Every topic some part of lbmqtt reads, for users and nodes that exist and not."""
    out = []
    for user in ("alice", "mallory", "_x.y-z"):
        out += [t.submit(user), t.cancel(user), t.ack(user), t.query(user)]
    for node in ("n1", "ghost"):
        out += [t.node_status(node), t.heartbeat(node), t.reports(node)]
    out += [
        t.assign("n1"),
        t.events("alice"),
        t.errors("alice"),
        t.dashboard_status,
        t.balancer_stats,
        t.balancer_status,
        t.balancer_history,
        t.task("alice", "x"),
        f"{t.prefix}/users/alice",
        f"{t.prefix}/nodes",
        f"{t.prefix}/users//submit",
        "$SYS/x",
        "$share/g/" + t.submit("alice"),
    ]
    return out


class Fuzzer:
    """A raw paho client publishing at QoS 0, counting what it sent."""

    def __init__(self, port: int):
        self.c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"fuzz-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.c.max_queued_messages_set(0)
        self.connects = 0
        self.connected = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: self.connected.clear()
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        assert self.connected.wait(10)
        self.sent: Counter[str] = Counter()

    def _on_connect(self, *a: Any) -> None:
        self.connects += 1
        self.connected.set()

    def send(self, topic: str, payload: bytes) -> None:
        if not self.connected.wait(10):
            raise AssertionError("the fuzzing client could not reconnect")
        self.c.publish(topic, payload, qos=0)
        self.sent[topic] += 1

    def close(self) -> None:
        stop_paho(self.c)


@pytest.fixture
def broker_process(tmp_path: Path) -> Iterator[int]:
    """An embedded broker in its own process, as ``lbmqtt up`` runs it (its output in
    ``broker.log``): a flood it relays costs the test's process, where the balancer, the
    node and the clients run, no interpreter time, and leaves nothing behind in the
    session's broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")}
    with open(tmp_path / "broker.log", "wb") as out:
        child = spawn("broker", ["broker", "--broker-port", "0"], env=env, stdout=out)
    try:
        yield int(child.info["port"])
    finally:
        stop_children([child])


@pytest.mark.slow
def test_fuzzed_payloads_on_every_inbound_topic_break_nothing(
    system: System, broker_process: int, prefix: str, tmp_path: Path
) -> None:
    # (with the session's in-process broker, whose thread relaying the flood competes with
    # the balancer's loop for the interpreter, this failed now and then under load: bob's
    # submit unanswered for 10 s, the balancer, node and dashboard connections silent past
    # their keep-alive)
    # Hypothesis draws the payloads before anything starts: drawn while the balancer's
    # threads run, its check that a strategy leaves the global `random` alone sees their
    # backoff jitter now and then (more often under load) and fails the test with a
    # 138 kB repr of the strategy, which CPython 3.11 could not always format
    rounds: list[list[bytes]] = []

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(PAYLOADS, min_size=25, max_size=25))
    def draw(payloads: list[bytes]) -> None:
        rounds.append(payloads)

    draw()
    assert len(rounds) == 40

    port = broker_process
    # What the flood may cost is time, never a task or an answer. On 2 cores with three
    # more tests beside it (and the balancer, node and dashboard sharing this process's
    # loop): the broker's backlog of the flood's deliveries took longer than the usual
    # 10 s to acknowledge bob's submit; the flood's empty payloads on nodes/n1/assign (the
    # balancer's "set cleared", which anyone may publish when the broker has no accounts)
    # withdrew alice's running task more often than three attempts allow; and the broker
    # heard nothing from the node for 1.5 x the usual 5 s keep-alive and closed its
    # connection. Hence more attempts and longer waits here, not anything less checked.
    s = make_settings(
        port,
        prefix,
        NODE_TASKS=[TEST_TASKS],
        MAX_PAYLOAD_BYTES=65536,
        TASK_MAX_ATTEMPTS=100,
        CLIENT_ACK_TIMEOUT_S=60.0,
        BROKER_KEEPALIVE_S=30,
    )
    topics = Topics(prefix)
    b = system.start_balancer(s)
    node = system.start_node("n1", s)
    dash = DashboardState()
    dash_t = MqttTransport(
        host="127.0.0.1",
        port=port,
        client_id="fuzz-dash",
        on_message=message_handler(dash, topics),
        subscriptions=[(topics.balancer_stats, 0), (topics.balancer_history, 1)],
    )
    system.lt.run(dash_t.start(wait=True))
    fuzz = Fuzzer(port)
    targets = inbound_topics(topics)
    oversized = b'{"v": 1, "name": "NOOP", "args": "' + b"x" * 70_000 + b'"}'
    with Client(s, user="alice") as alice:
        gate = tmp_path / "gate"
        running = alice.submit("BLOCK", {"gate": str(gate), "limit_s": 60})
        wait_until(lambda: alice.get(running).status == Status.RUNNING, 20, "a running task")

        for payloads in rounds:
            for p in payloads:  # each payload on every topic
                for topic in targets:
                    fuzz.send(topic, p)
            fuzz.send(topics.submit("alice"), oversized)
        total = sum(fuzz.sent.values())
        assert total >= 25_000
        # the balancer has worked through the flood once it answers a query sent after
        # it. amqtt forgets a delivery not acknowledged within 5 s (NOTES.md, bug 4), and
        # the balancer may be that far behind: ask again, as lbmqtt's client would
        probe = RawClient(port).connect()
        probe.subscribe(topics.errors("alice"))
        for attempt in range(12):
            probe.publish(topics.query("alice"), f'{{"v": 1, "ids": ["after-the-fuzz-{attempt}"]}}')
            try:
                wait_until(
                    lambda: any(
                        b"after-the-fuzz" in p for p in probe.payloads(topics.errors("alice"))
                    ),
                    5,
                    "the balancer to answer after the fuzz",
                )
                break
            except AssertionError:
                if attempt == 11:
                    raise
        probe.close()

        # everything still works: the task it was running, new ones, every connection
        # (alice's own queue may be full: some fuzzed submits were valid NOOP tasks,
        # which this node does not offer)
        gate.touch()
        assert alice.wait(running, timeout=60)["opened"] is True
    with Client(s, user="bob") as bob:
        assert bob.wait(bob.submit("ECHO", [1, 2]), timeout=60)["args"] == [1, 2]
        assert [r["args"] for r in bob.map("ECHO", list(range(20)), timeout=60)] == list(range(20))
    assert system.lt.call(lambda: b._transport is not None and b._transport.connected)
    assert system.lt.call(lambda: node._transport is not None and node._transport.connected)
    assert system.lt.call(lambda: dash_t.connected)
    wait_until(lambda: dash.snapshot().stats is not None, 10, "the dashboard's stats")
    st_ = system.stats()
    assert st_.bad_messages_total > 1000  # they were read, and counted
    assert st_.done_total >= 22
    assert "n1" in {n.name for n in st_.nodes if n.online}

    # the books agree with the scheduler
    def books() -> None:
        queued = [r for r in b.tasks.values() if r.status == Status.QUEUED]
        assert b.scheduler.queued == len(queued)
        for user in {r.user for r in b.tasks.values()}:
            assert b.scheduler.queued_for(user) == sum(r.user == user for r in queued)

    system.lt.call(books)
    system.lt.run(dash_t.close())
    fuzz.close()


@pytest.mark.parametrize("case", ["patched", "unpatched"])
def test_a_persistent_session_that_never_returns_holds_a_bounded_queue(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lbmqtt.broker.patches as broker_mod
    from lbmqtt.broker import ALL_PATCHES

    monkeypatch.setattr(broker_mod, "MAX_OFFLINE_MESSAGES", 100)
    monkeypatch.setattr(broker_mod, "MAX_OFFLINE_BYTES", 10_000)
    f = alice_and_lb(tmp_path)
    patches = ALL_PATCHES if case == "patched" else ALL_PATCHES - {"offline_queue"}
    bt = BrokerThread(patches, guard=AccessGuard("p", f))
    broker = bt.broker
    try:
        # alice subscribes in a persistent session, then goes away for good
        away = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="alice-away",
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        away.username_pw_set("alice", "a")
        away.connect("127.0.0.1", broker.port)
        away.loop_start()
        wait_until(away.is_connected, 5, "alice to connect")
        subscribed = threading.Event()
        away.on_subscribe = lambda *a: subscribed.set()
        away.subscribe("p/users/alice/events", 1)
        assert subscribed.wait(5)
        stop_paho(away)
        b = bt.patched
        wait_until(
            lambda: b._sessions["alice-away"][0].transitions.state != "connected",
            5,
            "the broker to see alice gone",
        )
        lb = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="lb-x",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        lb.username_pw_set("lb", "b")
        lb.max_inflight_messages_set(1000)
        lb.connect("127.0.0.1", broker.port)
        lb.loop_start()
        wait_until(lb.is_connected, 5, "the publisher to connect")
        lb.publish("p/users/alice/events", b"x" * 20_000, qos=1)  # over the bytes bound
        for i in range(150):
            info = lb.publish("p/users/alice/events", f"{i:03}", qos=1)
        info.wait_for_publish(10)
        queue = b._sessions["alice-away"][0].retained_messages
        if case == "patched":  # the big one by size, then 50 by count
            wait_until(lambda: b.offline_dropped == 51, 10, "51 dropped")
            assert queue.qsize() == 100
            assert all(len(m.data) == 3 for m in list(queue._queue))
        else:  # amqtt keeps all of it, and would keep anything more
            wait_until(lambda: queue.qsize() == 151, 10, "151 kept")
        stop_paho(lb)
    finally:
        bt.stop()


@pytest.mark.parametrize("accounts", [False, True])
def test_a_connection_that_never_says_connect_is_closed(
    accounts: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    import lbmqtt.broker.streams as broker_mod

    monkeypatch.setattr(broker_mod, "CONNECT_TIMEOUT_S", 0.5)
    guard = None
    if accounts:
        f = tmp_path / "accounts"
        access.write_accounts(
            f, [Account("alice", "user", access.hash_password("a", iterations=1000))]
        )
        guard = AccessGuard("p", f)
    bt = BrokerThread(guard=guard)
    broker = bt.broker
    try:
        silent = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
        half = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
        half.sendall(b"\x10\x20\x00\x04MQ")  # the start of a CONNECT, then nothing
        for s in (silent, half):
            with s:
                assert s.recv(16) == b""  # closed by the broker (else: timeout, error)
        assert bt.patched.connect_timeouts == 2
        # and a client that does speak is served as ever
        c = RawClient(broker.port)
        if accounts:
            c.c.username_pw_set("alice", "a")
        c.connect().close()
    finally:
        bt.stop()


def test_many_unknown_ids_get_one_answer_and_too_many_are_refused(
    running: System, raw: Any, prefix: str
) -> None:
    from lbmqtt.protocol import MAX_IDS

    c = raw()
    c.subscribe(f"{prefix}/users/eve/errors")
    c.publish(
        f"{prefix}/users/eve/query", json.dumps({"v": 1, "ids": [f"nope-{i}" for i in range(500)]})
    )
    c.publish(
        f"{prefix}/users/eve/cancel",
        json.dumps({"v": 1, "ids": [f"x{i}" for i in range(MAX_IDS + 1)]}),
    )

    def errors() -> list[dict[str, Any]]:
        return [
            e for m in c.payloads(f"{prefix}/users/eve/errors") for e in json.loads(m)["errors"]
        ]

    wait_until(lambda: len(errors()) >= 2, 10, "two answers")
    got = errors()
    assert len(got) == 2, [e["message"][:80] for e in got]
    assert got[0]["code"] == "unknown_task" and "500 in all" in got[0]["message"]
    assert got[1]["code"] == "invalid" and got[1]["topic"] == "cancel"
