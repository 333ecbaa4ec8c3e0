"""Each amqtt patch of lbmqtt.broker, with the bug shown on a broker without that patch.

The ``unpatched`` cases assert that amqtt 0.12.1 still has the bug: if one of them fails
after an amqtt upgrade, the bug is fixed upstream and the patch can go.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from lbmqtt.broker import ALL_PATCHES

from .cluster import varint
from .conftest import BrokerThread, RawClient, wait_until


@pytest.fixture(params=["patched", "unpatched"])
def case(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def broker_for(case: str, patch: str) -> BrokerThread:
    return BrokerThread(ALL_PATCHES if case == "patched" else ALL_PATCHES - {patch})


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for t in reversed(things):
        if isinstance(t, RawClient | socket.socket):
            t.close()
    for t in things:
        if isinstance(t, BrokerThread):
            t.stop()
    with warnings.catch_warnings():
        # an unpatched broker leaks sockets by design of the test
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def raw_connect(
    port: int, client_id: str, keepalive: int, will_topic: str, will_message: bytes
) -> socket.socket:
    """A bare MQTT 3.1.1 client: CONNECT with a will, read CONNACK, then nothing."""
    flags = 0x02 | 0x04  # clean session, will flag (QoS 0, not retained)
    var = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    payload = (
        _str(client_id) + _str(will_topic) + struct.pack("!H", len(will_message)) + will_message
    )
    body = var + payload
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(bytes([0x10]) + varint(len(body)) + body)
    connack = s.recv(4)
    assert connack[:1] == b"\x20" and connack[3] == 0, connack
    return s


def raw_publish_packet(topic: str, payload: bytes, packet_id: int | None = None) -> bytes:
    """A PUBLISH: QoS 0, or QoS 1 with ``packet_id``."""
    if packet_id is None:
        body = _str(topic) + payload
        return bytes([0x30]) + varint(len(body)) + body
    body = _str(topic) + struct.pack("!H", packet_id) + payload
    return bytes([0x32]) + varint(len(body)) + body


def raw_subscribe_packet(topic_filter: str, packet_id: int = 1) -> bytes:
    """A SUBSCRIBE to one filter at QoS 0."""
    body = struct.pack("!H", packet_id) + _str(topic_filter) + b"\x00"
    return bytes([0x82]) + varint(len(body)) + body


def _raw_session(port: int, client_id: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    body = _str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _str(client_id)
    s.sendall(bytes([0x10]) + varint(len(body)) + body)
    assert s.recv(4)[:1] == b"\x20"
    return s


def _read_until(s: socket.socket, marker: bytes, seconds: float) -> bytes:
    got = b""
    deadline = time.monotonic() + seconds
    while marker not in got and time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            break
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.slow
def test_keepalive_silent_client_is_dropped_and_its_will_fires(
    case: str, cleanup: list[Any]
) -> None:
    broker = broker_for(case, "keepalive")
    cleanup.append(broker)
    watcher = RawClient(broker.port).connect()
    cleanup.append(watcher)
    watcher.subscribe("wills/#")
    # Given a client with keep-alive 1 s that then goes silent (a frozen or cut-off host)
    frozen = raw_connect(broker.port, "frozen", 1, "wills/frozen", b"gone")
    cleanup.append(frozen)
    started = time.monotonic()
    if case == "patched":
        # Then the broker drops it after 1.5 x keep-alive and publishes its will
        wait_until(lambda: watcher.payloads("wills/frozen"), 5, "the will")
        assert 1.2 < time.monotonic() - started < 4.5
    else:
        # amqtt 0.12.1 alone never does (Yakifo/amqtt#308): 3 keep-alives pass in silence
        with pytest.raises(AssertionError):
            wait_until(lambda: watcher.payloads("wills/frozen"), 3.5, "the will")


def test_retained_messages_go_only_to_matching_subscriptions(case: str, cleanup: list[Any]) -> None:
    broker = broker_for(case, "retained_leak")
    cleanup.append(broker)
    alice = RawClient(broker.port).connect()
    cleanup.append(alice)
    alice.subscribe("users/alice/#")
    alice.publish("users/alice/tasks/t1", b"alice's secret result", retain=True)
    wait_until(lambda: alice.payloads("users/alice/tasks/t1"), 5, "alice's own message")
    # When bob connects and subscribes only to his own topics
    bob = RawClient(broker.port).connect()
    cleanup.append(bob)
    bob.subscribe("users/bob/#")
    bob.publish("users/bob/marker", b"m")
    wait_until(lambda: bob.payloads("users/bob/marker"), 5, "bob's marker")
    # (a leak happens at CONNECT, before bob's SUBACK and marker: it would be here by now)
    leaked = bob.payloads("users/alice/tasks/t1")
    if case == "patched":
        assert leaked == []
    else:
        assert leaked == [b"alice's secret result"]


def test_a_clean_reconnect_closes_the_older_connection_and_drops_its_will(
    case: str, cleanup: list[Any]
) -> None:
    broker = broker_for(case, "clean_takeover")
    cleanup.append(broker)
    watcher = RawClient(broker.port).connect()
    cleanup.append(watcher)
    watcher.subscribe("wills/#")
    # Given a client (a node whose connection went half-open) with a retained will
    first = RawClient(broker.port, client_id="n1", keepalive=2)
    first.c.will_set("wills/n1", b"offline", qos=1, retain=True)
    first.connect()
    cleanup.append(first)
    closed = threading.Event()
    first.c.on_disconnect = lambda *a: closed.set()
    first.c.reconnect_delay_set(60, 60)  # (paho would come back with the same id)
    # When it connects again with the same id and a clean session
    again = RawClient(broker.port, client_id="n1").connect()
    cleanup.append(again)
    again.subscribe("back/#")
    again.publish("back/1", b"here")
    wait_until(lambda: again.payloads("back/1"), 5, "the new connection served")
    if case == "patched":
        # Then the older connection is closed (MQTT-3.1.4-2), and its will never speaks
        assert closed.wait(5), "the older connection of the id was kept"
        watcher.publish("wills/marker", b"m")
        wait_until(lambda: watcher.payloads("wills/marker"), 5, "the watcher's marker")
        assert watcher.payloads("wills/n1") == []
    else:
        # amqtt 0.12.1 alone keeps both connections of the id open
        assert not closed.wait(1)
        assert broker.patched._sessions["n1"][0].transitions.is_connected()


def test_dollar_publish_does_not_turn_the_connection_into_a_zombie(
    case: str, cleanup: list[Any]
) -> None:
    broker = broker_for(case, "dollar_publish")
    cleanup.append(broker)
    c = RawClient(broker.port).connect()
    cleanup.append(c)
    c.publish("$SYS/forged", b"x")
    if case == "patched":
        c.subscribe("after/#", timeout=5)
        c.publish("after/1", b"still alive")
        wait_until(lambda: c.payloads("after/1"), 5, "the client's own message")
    else:
        with pytest.raises(AssertionError, match="SUBACK"):
            c.subscribe("after/#", timeout=2)


def test_empty_topic_publish_closes_the_connection_and_fires_the_will(
    case: str, cleanup: list[Any]
) -> None:
    broker = broker_for(case, "dollar_publish")
    cleanup.append(broker)
    watcher = RawClient(broker.port).connect()
    cleanup.append(watcher)
    watcher.subscribe("wills/#")
    bad = raw_connect(broker.port, "bad", 60, "wills/bad", b"gone")
    cleanup.append(bad)
    # a protocol error [MQTT-4.7.3-1]; amqtt stops serving the client but keeps it open
    bad.sendall(raw_publish_packet("", b"x"))
    if case == "patched":
        wait_until(lambda: watcher.payloads("wills/bad"), 5, "the will")
    else:
        with pytest.raises(AssertionError):
            wait_until(lambda: watcher.payloads("wills/bad"), 2, "the will")


def client_leaving_while_messages_fly(port: int, n: int) -> None:
    """Publish to itself, say DISCONNECT and close at once. The broker's delivery reaches a
    closed socket, whose kernel answers with a reset after the broker has read the EOF, so
    amqtt's ``write_eof`` fails with ENOTCONN and its ``close`` never runs."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    body = _str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _str(f"leaver-{n}")
    s.sendall(bytes([0x10]) + varint(len(body)) + body)
    assert s.recv(4)[:1] == b"\x20"
    s.sendall(raw_subscribe_packet("x/#"))
    assert s.recv(5)[:1] == b"\x90"  # SUBACK
    s.sendall(raw_publish_packet("x/1", b"to myself") + b"\xe0\x00")  # + DISCONNECT
    s.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_disconnected_clients_do_not_leak_sockets(case: str, cleanup: list[Any]) -> None:
    # (unpatched: amqtt's own reader too, whose timing puts the message in flight as the
    # client leaves; inline_qos0 writes it as soon as it is read)
    patches = ALL_PATCHES if case == "patched" else ALL_PATCHES - {"socket_leak", "inline_qos0"}
    broker = BrokerThread(patches)
    cleanup.append(broker)
    gc.disable()  # leaked sockets would otherwise close whenever the collector runs
    try:
        before = _open_fds()
        for n in range(10):
            client_leaving_while_messages_fly(broker.port, n)
        if case == "patched":
            wait_until(lambda: _open_fds() - before <= 0, 5, "the broker to close its sockets")
        else:
            time.sleep(0.5)  # let the broker finish handling the disconnects
            assert _open_fds() - before >= 8
    finally:
        gc.enable()


def _client(
    broker: BrokerThread,
    cleanup: list[Any],
    topic: str | None = None,
    qos: int = 0,
    client_id: str | None = None,
) -> RawClient:
    """A client of ``broker`` (closed after the test), subscribed to ``topic`` if given."""
    c = RawClient(broker.port, client_id=client_id).connect()
    cleanup.append(c)
    if topic is not None:
        c.subscribe(topic, qos=qos)
    return c


def test_qos0_messages_reach_their_subscribers_in_publish_order(
    case: str, cleanup: list[Any]
) -> None:
    broker = broker_for(case, "direct_qos0")
    cleanup.append(broker)
    # Given a QoS 0 subscriber to everything, and a QoS 1 subscriber to one topic (the
    # messages it gets take amqtt's queue, the others may be written at once)
    a = _client(broker, cleanup, "t/#", 0)
    b = _client(broker, cleanup, "t/queued", 1)
    pub = _client(broker, cleanup)
    # (a lone message, nothing queued: the patched broker mostly writes it at once; on a
    # loaded machine a task of the connections may still run, and it takes amqtt's path)
    pub.publish("t/direct", b"-1", qos=0)
    wait_until(lambda: len(a.messages) == 1, 10, "the lone message")
    # When one client publishes a burst on both topics, back to back
    n = 600
    infos = [
        pub.c.publish("t/queued" if i % 3 == 0 else "t/direct", str(i).encode(), qos=0)
        for i in range(n)
    ]
    infos[-1].wait_for_publish(10)
    wait_until(lambda: len(a.messages) >= n + 1, 20, "every message at the QoS 0 subscriber")
    wait_until(lambda: len(b.messages) >= n // 3, 20, "every message at the QoS 1 subscriber")
    # Then each subscriber has them in the order they were published, each once
    assert [int(p) for _, p, _ in a.messages] == list(range(-1, n))
    assert [int(p) for _, p, _ in b.messages] == list(range(0, n, 3))
    # (both paths were taken: the order holds across them)
    assert (broker.patched.direct_deliveries > 0) == (case == "patched")


def test_a_message_behind_a_queued_one_waits_its_turn(cleanup: list[Any]) -> None:
    broker = BrokerThread()
    cleanup.append(broker)
    a = _client(broker, cleanup, "t/#", 0)
    _client(broker, cleanup, "t/queued", 1)  # (it holds the first in amqtt's queue)

    async def back_to_back() -> None:
        amqtt = broker.patched
        # (the first goes to amqtt's queue, a QoS 1 subscriber holding it; the second,
        # for QoS 0 subscribers only, comes before the queue has been served)
        await amqtt._broadcast_message(None, "t/queued", b"1")
        await amqtt._broadcast_message(None, "t/direct", b"2")

    broker.lt.run(back_to_back())
    wait_until(lambda: len(a.messages) >= 2, 10, "both messages")
    assert [p for _, p, _ in a.messages] == [b"1", b"2"]
    # and once the queue is empty, the next one goes straight
    before = broker.patched.direct_deliveries

    def served() -> bool:  # (the QoS 1 delivery's task too: it ends with the PUBACK)
        amqtt = broker.patched
        return not amqtt._queued and all(t.done() for t in amqtt._tasks_queue)

    wait_until(lambda: broker.lt.call(served), 10, "the queue served")
    broker.lt.run(broker.patched._broadcast_message(None, "t/direct", b"3"))
    assert broker.patched.direct_deliveries == before + 1
    wait_until(lambda: len(a.messages) >= 3, 10, "the third")


def test_a_live_message_does_not_overtake_a_retained_one_being_replayed(
    cleanup: list[Any],
) -> None:
    broker = BrokerThread()
    cleanup.append(broker)
    pub = _client(broker, cleanup)
    pub.publish("r/x", b"old", qos=0, retain=True)
    s = _client(broker, cleanup, "r/#", 0, client_id="s1")
    wait_until(lambda: s.payloads("r/x") == [b"old"], 10, "the retained message")

    async def race() -> None:
        amqtt = broker.patched
        session = amqtt._sessions["s1"][0]
        # a replay of the retained messages to s1 (as after a SUBSCRIBE or a reconnect):
        # once its publish tasks are made, but before they have run...
        replay = asyncio.ensure_future(
            amqtt._publish_retained_messages_for_subscription(("r/#", 0), session)
        )
        await asyncio.sleep(0)
        # ...a live message on the same topic comes
        await amqtt._broadcast_message(None, "r/x", b"new")
        await replay

    broker.lt.run(race())
    wait_until(lambda: len(s.payloads("r/x")) >= 3, 10, "the replay and the live message")
    # Then the subscriber has the older (retained) one first and the newer one last
    assert s.messages[-2:] == [("r/x", b"old", True), ("r/x", b"new", False)]


def test_a_new_or_dropped_subscription_counts_for_the_next_message(cleanup: list[Any]) -> None:
    broker = BrokerThread()
    cleanup.append(broker)
    amqtt = broker.patched
    a = _client(broker, cleanup, "t/#", 0)
    pub = _client(broker, cleanup)

    def matching() -> list[str]:
        return broker.lt.call(lambda: list(amqtt._filters_matching("t/x")))

    def sent(payload: bytes) -> None:
        n = len(a.messages)
        pub.publish("t/x", payload, qos=0)
        wait_until(lambda: len(a.messages) > n, 10, f"{payload!r} at a")

    sent(b"1")
    assert matching() == ["t/#"]  # (now in the cache)
    # When b subscribes to t/+ (a new filter), it counts for t/x, and the next message
    # reaches b
    b = _client(broker, cleanup, "t/+", 0)
    assert matching() == ["t/#", "t/+"]
    sent(b"2")
    wait_until(lambda: b.payloads("t/x") == [b"2"], 10, "the message after b subscribed")
    # And once b has unsubscribed (the filter gone), it no longer counts
    b.c.unsubscribe("t/+")
    wait_until(lambda: "t/+" not in amqtt._subscriptions, 10, "the filter dropped")
    assert matching() == ["t/#"]
    sent(b"3")
    assert b.payloads("t/x") == [b"2"]
    assert [p for _, p, _ in a.messages] == [b"1", b"2", b"3"]
    assert amqtt.direct_deliveries >= 1


def test_a_subscriber_that_stops_reading_holds_back_no_one(cleanup: list[Any]) -> None:
    broker = BrokerThread()
    cleanup.append(broker)
    # Given a subscriber that never reads its socket again, and one that does
    stuck = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    cleanup.append(stuck)
    body = _str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _str("stuck")
    stuck.sendall(bytes([0x10]) + varint(len(body)) + body)
    assert stuck.recv(4)[:1] == b"\x20"
    stuck.sendall(raw_subscribe_packet("big/#"))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader = _client(broker, cleanup, "big/#", 0)
    pub = _client(broker, cleanup)
    # When far more is published than the stuck one's socket can hold
    payload = b"x" * 65536
    n = 200  # 13 MB
    infos = [pub.c.publish("big/m", payload, qos=0) for _ in range(n)]
    infos[-1].wait_for_publish(20)
    # Then the other subscriber gets every message, and the broker still answers
    wait_until(lambda: len(reader.messages) >= n, 30, "every message at the reading subscriber")
    assert len(reader.messages) == n
    reader.publish("big/after", b"done", qos=0)
    wait_until(lambda: reader.payloads("big/after") == [b"done"], 10, "a message after")
    # (the first messages went straight; once the stuck socket backed up, amqtt's queue)
    assert 0 < broker.patched.direct_deliveries < n
    # (the stuck connection is closed and gone before the broker stops: a transport left
    # closing with bytes it cannot send would be reported unclosed in some later test)
    served = len(broker.patched.transports)
    stuck.close()
    wait_until(lambda: len(broker.patched.transports) < served, 20, "the stuck one dropped")


def test_qos0_read_and_delivered_at_once_keeps_order_with_qos1(
    case: str, cleanup: list[Any]
) -> None:
    broker = broker_for(case, "inline_qos0")
    cleanup.append(broker)
    a = _client(broker, cleanup, "t/#", 0)
    pub = _client(broker, cleanup)
    # Given a lone QoS 0 message, with nothing of its client ahead of it: the patched
    # broker mostly delivers it as its reader reads it (on a loaded machine a task of the
    # new connections may still run, and it takes amqtt's path: checked at the end)
    pub.publish("t/x", b"first", qos=0)
    wait_until(lambda: a.payloads("t/x") == [b"first"], 10, "the first message")
    # When a client then mixes QoS 1 messages (amqtt's tasks and queue) and QoS 0 ones
    # (inline once nothing is ahead), back to back (a raw client: paho holds QoS 1
    # messages back behind its in-flight window, and sends QoS 0 ones on)
    s = _raw_session(broker.port, "mixer")
    cleanup.append(s)
    n = 600
    packets = [
        raw_publish_packet("t/x", str(i).encode(), None if i % 4 else i + 1) for i in range(n)
    ]
    for k in range(0, n, 50):  # (in a few writes, so that some land with nothing ahead)
        s.sendall(b"".join(packets[k : k + 50]))
    wait_until(lambda: len(a.messages) >= n + 1, 20, "every message")
    # Then they arrive in the order they were published, each once
    assert [int(p) for _, p, _ in a.messages[1:]] == list(range(n))
    # (both paths were taken: the order holds across them)
    assert (broker.patched.inline_deliveries > 0) == (case == "patched")


def test_a_retained_qos0_message_is_delivered_at_once_and_kept_as_amqtt_keeps_it(
    case: str, cleanup: list[Any]
) -> None:
    broker = broker_for(case, "inline_qos0")
    cleanup.append(broker)
    a = _client(broker, cleanup, "r/#", 0)
    pub = _raw_session(broker.port, "retainer")
    cleanup.append(pub)
    retained = bytes([0x31])  # (PUBLISH, QoS 0, retained)
    before = broker.patched.inline_deliveries
    # When a client publishes retained QoS 0 messages, then a plain one behind them
    one = raw_publish_packet("r/x", b"one")
    two = raw_publish_packet("r/y", b"two")
    pub.sendall(retained + one[1:] + retained + two[1:] + raw_publish_packet("r/z", b"plain"))
    wait_until(lambda: len(a.messages) >= 3, 10, "the three messages")
    # Then its subscribers get them in order, as live messages (retain flag off)
    assert a.messages == [("r/x", b"one", False), ("r/y", b"two", False), ("r/z", b"plain", False)]
    # (the patched broker read and delivered them at once, without amqtt's tasks)
    assert (broker.patched.inline_deliveries - before >= 3) == (case == "patched")
    # When one of them is cleared by an empty retained message
    empty = raw_publish_packet("r/y", b"")
    pub.sendall(retained + empty[1:])
    wait_until(lambda: len(a.messages) >= 4, 10, "the empty message")
    assert a.messages[3] == ("r/y", b"", False)
    # Then a later subscriber gets the one still kept, flagged retained, and not the other
    late = _client(broker, cleanup)
    late.subscribe("r/#", qos=0)
    late.publish("r/marker", b"m", qos=0)
    wait_until(lambda: late.payloads("r/marker"), 10, "the late subscriber's marker")
    assert [m for m in late.messages if m[0] != "r/marker"] == [("r/x", b"one", True)]
    kept = broker.lt.call(lambda: broker.patched._retained_messages["r/x"])
    assert (kept.data, kept.qos, kept.source_session.client_id) == (b"one", 0, "retainer")


def test_a_retained_message_goes_amqtts_way_when_a_plugin_listens_for_retained_ones(
    cleanup: list[Any],
) -> None:
    from amqtt.events import BrokerEvents

    broker = BrokerThread()
    cleanup.append(broker)
    told: list[bytes] = []

    async def on_retained(**kwargs: Any) -> None:
        told.append(bytes(kwargs["retained_message"].data))

    callbacks = broker.patched.plugins_manager._event_plugin_callbacks
    broker.lt.call(lambda: callbacks[BrokerEvents.RETAINED_MESSAGE].append(on_retained))
    a = _client(broker, cleanup, "r/#", 0)
    pub = _raw_session(broker.port, "retainer")
    cleanup.append(pub)
    before = broker.patched.inline_deliveries
    # When a plugin listens for retained messages and a client keeps one, then clears it
    pub.sendall(bytes([0x31]) + raw_publish_packet("r/x", b"one")[1:])
    wait_until(lambda: told == [b"one"], 10, "the plugin told of the message")
    pub.sendall(bytes([0x31]) + raw_publish_packet("r/x", b"")[1:])
    wait_until(lambda: len(told) == 2, 10, "the plugin told of the clearing")
    wait_until(lambda: len(a.messages) == 2, 10, "both messages")
    # Then both took amqtt's path, which tells it (the inline one would not)
    assert told == [b"one", b""]
    assert a.messages == [("r/x", b"one", False), ("r/x", b"", False)]
    assert broker.patched.inline_deliveries == before


def test_a_publish_right_behind_its_subscribe_reaches_the_new_subscription(
    case: str, cleanup: list[Any]
) -> None:
    broker = broker_for(case, "inline_qos0")
    cleanup.append(broker)
    for n in range(5):
        s = _raw_session(broker.port, f"self-{n}")
        cleanup.append(s)
        # When a client subscribes and publishes to that topic in one write
        s.sendall(raw_subscribe_packet("me/#") + raw_publish_packet("me/x", b"mine"))
        # Then it gets its SUBACK, then its own message
        got = _read_until(s, b"mine", 10)
        assert got[:1] == b"\x90" and got.endswith(b"mine"), got


@pytest.mark.parametrize("reader", ["lbmqtt", "amqtt"])
def test_subscribe_and_unsubscribe_take_effect_in_the_order_sent(
    reader: str, cleanup: list[Any]
) -> None:
    broker = BrokerThread(ALL_PATCHES if reader == "lbmqtt" else ALL_PATCHES - {"inline_qos0"})
    cleanup.append(broker)
    pub = _client(broker, cleanup)
    subscribe = raw_subscribe_packet("o/#")
    unsub = struct.pack("!H", 2) + _str("o/#")
    unsubscribe = bytes([0xA2]) + varint(len(unsub)) + unsub
    for n in range(5):
        s = _raw_session(broker.port, f"order-{n}")
        cleanup.append(s)
        s.sendall(subscribe)
        assert _read_until(s, b"\x90", 5)[:1] == b"\x90"
        # When a client unsubscribes and subscribes again to the same filter, in one write
        s.sendall(unsubscribe + subscribe)
        acks = _read_until(s, b"\x90", 5)
        assert acks[:1] == b"\xb0" and b"\x90" in acks, acks  # (UNSUBACK, then SUBACK)
        # Then it holds the subscription (the later packet wins)
        pub.publish(f"o/{n}", b"still here", qos=0)
        assert _read_until(s, b"still here", 5).endswith(b"still here")


def test_a_flooding_client_waits_in_its_socket_not_in_the_broker(cleanup: list[Any]) -> None:
    from lbmqtt.broker.reader import AHEAD_MAX, YIELD_EVERY

    broker = BrokerThread()
    cleanup.append(broker)
    # Given a QoS 1 subscriber (so that every message takes amqtt's queue and tasks)
    a = _client(broker, cleanup, "f/#", 1)
    s = _raw_session(broker.port, "flooder")
    cleanup.append(s)
    # When a client sends far more than the broker can pass on at once
    n = 4000
    flood = b"".join(raw_publish_packet("f/x", str(i).encode()) for i in range(n))
    s.settimeout(30)  # (the broker reads the flood as fast as it passes it on)
    sender = threading.Thread(target=s.sendall, args=(flood,), daemon=True)
    sender.start()

    def backlog() -> int:
        session = broker.patched._sessions["flooder"][0]
        return int(session.delivered_message_queue.qsize())

    most = 0
    deadline = time.monotonic() + 30
    while len(a.messages) < n and time.monotonic() < deadline:
        most = max(most, broker.lt.call(backlog))
    # Then what waits in the broker for its per-client loop stays bounded (the rest
    # waits in the socket), and every message arrives, in order
    assert [int(p) for _, p, _ in a.messages] == list(range(n))
    assert most <= AHEAD_MAX + YIELD_EVERY
    sender.join(5)


def test_a_malformed_publish_closes_the_connection_and_fires_the_will(
    case: str, cleanup: list[Any]
) -> None:
    broker = broker_for(case, "inline_qos0")
    cleanup.append(broker)
    watcher = _client(broker, cleanup, "wills/#", 1)
    watcher.subscribe("after/#")
    bad = raw_connect(broker.port, "bad", 60, "wills/bad", b"gone")
    cleanup.append(bad)
    wildcard = raw_connect(broker.port, "wildcard", 60, "wills/wildcard", b"gone")
    cleanup.append(wildcard)
    # When a client sends a PUBLISH whose body is too short for its topic's length, then
    # a well-formed one (a protocol violation: MQTT-4.8.0-1), and another a PUBLISH to a
    # topic with a wildcard (MQTT-3.3.2-2)
    bad.sendall(bytes([0x30, 0x01, 0x00]) + raw_publish_packet("after/x", b"x"))
    wildcard.sendall(raw_publish_packet("after/#", b"w") + raw_publish_packet("after/z", b"z"))
    # Then each connection is closed, its will fires, and nothing after it is read
    wait_until(lambda: watcher.payloads("wills/bad"), 5, "the will")
    if case == "patched":  # (amqtt alone drops the wildcard one, then loses its place)
        wait_until(lambda: watcher.payloads("wills/wildcard"), 5, "the second will")
    watcher.publish("after/marker", b"m")
    wait_until(lambda: watcher.payloads("after/marker"), 5, "the watcher's marker")
    assert watcher.payloads("after/x") == []
    assert watcher.payloads("after/#") == []


def test_parse_publish_reads_as_amqtt_does() -> None:
    from amqtt.mqtt.packet import PUBLISH, MQTTFixedHeader

    from lbmqtt.broker.reader import MalformedPublish, parse_publish

    qos0 = MQTTFixedHeader(PUBLISH, 0x00)
    qos1 = MQTTFixedHeader(PUBLISH, 0x02)
    assert parse_publish(qos0, _str("a/b") + b"data") == ("a/b", None, b"data")
    assert parse_publish(qos0, _str("a/b")) == ("a/b", None, b"")
    assert parse_publish(qos1, _str("a") + b"\x01\x02" + b"d") == ("a", 0x0102, b"d")
    bad = b"\x00\x02\xff\xfe"  # (not UTF-8: amqtt's decode_string gives str() of it)
    assert parse_publish(qos0, bad) == ("b'\\xff\\xfe'", None, b"")
    for fh, body in [(qos0, b""), (qos0, b"\x00"), (qos0, b"\x00\x05ab"), (qos1, _str("a"))]:
        with pytest.raises(MalformedPublish):
            parse_publish(fh, body)


def test_broker_package_exports_its_public_names() -> None:
    import lbmqtt.broker as broker

    assert sorted(broker.__all__) == (
        """
        ALL_PATCHES AMQTT_VERSION EmbeddedBroker GuardedBroker MAX_OFFLINE_BYTES
        MAX_OFFLINE_MESSAGES MAX_SUBSCRIPTIONS PacketTooLarge PatchedBroker TlsListener
        bound_port broker_config embedded_broker loopback_mosquitto_conf quiet_amqtt_logs
        serve
        """.split()
    )
    assert all(hasattr(broker, name) for name in broker.__all__)


def test_every_switchable_patch_is_documented_with_the_bug_it_works_around() -> None:
    from lbmqtt.broker import patches

    doc = patches.__doc__ or ""
    for name in ALL_PATCHES:
        assert f"\n``{name}``\n" in doc, f"patch {name} is not described in lbmqtt.broker.patches"
