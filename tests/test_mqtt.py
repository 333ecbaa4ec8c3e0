"""The asyncio paho adapter against a real broker."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from typing import Any

import pytest
from paho.mqtt.enums import CallbackAPIVersion

from lbmqtt.broker import EmbeddedBroker
from lbmqtt.errors import BrokerUnavailable, ConfigError
from lbmqtt.mqtt import MqttTransport, Will
from lbmqtt.paho_fixes import JOIN_MAX_BYTES, JOINED, READ_CHUNK, PahoClient, coalesce

from .cluster import free_port


async def until(predicate: Any, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110 - state changes in paho callbacks
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def test_reconnects_and_resubscribes_after_a_broker_restart() -> None:
    async def scenario() -> None:
        port = free_port()
        got: list[bytes] = []
        broker = EmbeddedBroker("127.0.0.1", port)
        await broker.start()
        sub = MqttTransport(
            host="127.0.0.1",
            port=port,
            client_id="sub",
            on_message=lambda t, p, r: got.append(p),
            subscriptions=[("r/#", 1)],
            reconnect_max_s=0.2,
        )
        pub = MqttTransport(
            host="127.0.0.1",
            port=port,
            client_id="pub",
            on_message=lambda *a: None,
            reconnect_max_s=0.2,
        )
        await sub.start(wait=True)
        await pub.start(wait=True)
        pub.publish("r/1", b"before", qos=1)
        await until(lambda: got == [b"before"])
        # When the broker goes away and comes back on the same port
        await broker.stop()
        await until(lambda: not sub.connected and not pub.connected)
        broker = EmbeddedBroker("127.0.0.1", port)
        await broker.start()
        # Then both reconnect by themselves, and the subscription is back
        await sub.wait_ready(10)
        await pub.wait_ready(10)
        pub.publish("r/2", b"after", qos=1)
        await until(lambda: got == [b"before", b"after"])
        assert sub.connects == 2
        await sub.close()
        await pub.close()
        await broker.stop()

    asyncio.run(scenario())


def test_will_is_published_when_the_connection_drops() -> None:
    async def scenario() -> None:
        async with EmbeddedBroker() as broker:
            wills: list[bytes] = []
            watcher = MqttTransport(
                host="127.0.0.1",
                port=broker.port,
                client_id="w",
                on_message=lambda t, p, r: wills.append(p),
                subscriptions=[("status/#", 1)],
            )
            node = MqttTransport(
                host="127.0.0.1",
                port=broker.port,
                client_id="n",
                on_message=lambda *a: None,
                will=Will("status/n", b"offline", retain=False),
            )
            await watcher.start(wait=True)
            await node.start(wait=True)
            node.drop_connection()
            await until(lambda: wills == [b"offline"])
            await node.wait_ready(10)  # and it comes back by itself
            await node.close()  # a clean close publishes no will
            await watcher.close()
            assert wills == [b"offline"]

    asyncio.run(scenario())


def test_tcp_nodelay_is_set_on_the_socket() -> None:
    async def scenario() -> None:
        async with EmbeddedBroker() as broker:
            t = MqttTransport(
                host="127.0.0.1", port=broker.port, client_id="x", on_message=lambda *a: None
            )
            await t.start(wait=True)
            sock = t._client.socket()
            assert sock is not None
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            await t.close()

    asyncio.run(scenario())


def test_flush_writes_what_is_published_before_the_loop_goes_on() -> None:
    """publish() leaves the write to the end of the loop iteration (what else is published
    meanwhile shares it); flush() writes at once, so that a balancer's tick is on the wire
    before its loop reads the next burst of messages."""

    async def scenario() -> None:
        async with EmbeddedBroker() as broker:
            t = MqttTransport(
                host="127.0.0.1", port=broker.port, client_id="x", on_message=lambda *a: None
            )
            await t.start(wait=True)
            client = t._client
            t.publish("f/1", b"one", qos=0)
            assert client.want_write()  # queued, not written yet
            t.flush()
            assert not client.want_write()  # written
            t.flush()  # nothing left: a no-op
            await t.close()

    asyncio.run(scenario())


def test_publishing_to_a_dollar_topic_is_refused_locally() -> None:
    t = MqttTransport(host="127.0.0.1", port=1, client_id="x", on_message=lambda *a: None)
    with pytest.raises(ValueError, match=r"'\$' topic"):
        t.publish("$SYS/x", b"")


def test_unreachable_broker_gives_a_clear_error() -> None:
    async def scenario() -> None:
        port = free_port()
        t = MqttTransport(host="127.0.0.1", port=port, client_id="x", on_message=lambda *a: None)
        with pytest.raises(BrokerUnavailable, match=rf"127.0.0.1:{port} \(connection refused\)"):
            await t.start(wait=True, timeout_s=1.0)
        await t.close()

    asyncio.run(scenario())


def test_port_zero_is_refused_for_a_client() -> None:
    async def scenario() -> None:
        t = MqttTransport(host="127.0.0.1", port=0, client_id="x", on_message=lambda *a: None)
        with pytest.raises(ConfigError, match="pick a free port"):
            await t.start()

    asyncio.run(scenario())


def test_queued_packets_are_joined_where_paho_needs_nothing_once_they_are_written() -> None:
    from collections import deque

    import paho.mqtt.client as paho

    def pkt(command: int, qos: int, data: bytes, pos: int = 0) -> dict[str, Any]:
        return {
            "command": command,
            "mid": 0,
            "qos": qos,
            "pos": pos,
            "to_process": len(data) - pos,
            "packet": bytearray(data),
            "info": None,
        }

    out = deque(
        [
            pkt(paho.PUBLISH, 1, b"AB", pos=1),  # partly written already: kept
            pkt(paho.PUBACK, 0, b"c"),
            pkt(paho.PUBLISH | 2, 1, b"d"),
            pkt(paho.PUBLISH, 0, b"e"),  # QoS 0: joined too (lbmqtt needs no on_publish)
            pkt(paho.PUBACK, 0, b"f"),
            pkt(paho.SUBSCRIBE, 1, b"g"),
            pkt(paho.DISCONNECT, 0, b"h"),  # paho closes the socket after it: alone
            pkt(paho.PUBLISH, 0, b"i"),
            pkt(paho.PUBLISH, 0, b"JK", pos=1),  # partly written, but no on_publish either
        ]
    )
    coalesce(out)
    assert [(bytes(p["packet"]), p["pos"], p["to_process"]) for p in out] == [
        (b"AB", 1, 1),
        (b"cdefg", 0, 5),
        (b"h", 0, 1),
        (b"i", 0, 1),
        (b"JK", 1, 1),
    ]
    assert out[2]["command"] == paho.DISCONNECT
    # a joined packet, or a lone QoS 0 PUBLISH, is never taken for a PUBLISH or a
    # DISCONNECT once written: paho builds no reason code for it and calls no callback
    for p in (out[1], out[3], out[4]):
        assert p["command"] == JOINED and p["info"] is None
    # a lone packet of another kind is left as it is
    single = deque([pkt(paho.SUBSCRIBE, 1, b"s")])
    kept = single[0]
    coalesce(single)
    assert list(single) == [kept]
    # a burst is joined in writes of JOIN_MAX_BYTES at most (paho copies what is left of
    # an entry at every partial send)
    n = JOIN_MAX_BYTES * 2 // 5
    burst = deque(pkt(paho.PUBLISH, 0, bytes(n)) for _ in range(5))
    coalesce(burst)
    assert [len(p["packet"]) for p in burst] == [2 * n, 2 * n, n]
    assert all(p["command"] == JOINED for p in burst)


def test_a_burst_of_every_size_arrives_whole_and_in_order() -> None:
    """Joined into few writes by the sender (coalesce), split anyhow by the sockets: a
    burst of QoS 0 messages from empty to several times a socket buffer arrives whole and
    in order."""
    sizes = [0, 1, 127, 128, 16_383, 16_384, 65_526, 65_536, 196_615, 32_759, 5, 300]
    sizes += [i % 41 for i in range(400)]
    sent = [(f"b/{i}", bytes([i % 251]) * n) for i, n in enumerate(sizes)]

    async def scenario() -> None:
        async with EmbeddedBroker() as broker:
            got: list[tuple[str, bytes]] = []
            sub = MqttTransport(
                host="127.0.0.1",
                port=broker.port,
                client_id="sub",
                on_message=lambda t, p, r: got.append((t, p)),
                subscriptions=[("b/#", 0)],
            )
            pub = MqttTransport(
                host="127.0.0.1", port=broker.port, client_id="pub", on_message=lambda *a: None
            )
            await sub.start(wait=True)
            await pub.start(wait=True)
            for topic, payload in sent:
                pub.publish(topic, payload)
            await until(lambda: len(got) >= len(sent), 30)
            assert got == sent
            await sub.close()
            await pub.close()

    asyncio.run(scenario())


def test_more_packets_than_one_turn_of_the_read_loop_takes_all_arrive_in_order() -> None:
    """A read brings up to READ_CHUNK bytes: thousands of tiny messages at once, more than
    the 512 packets one turn of the read loop takes. The rest wait in the client's buffer,
    not in the socket, so no readiness event would come for them: the loop must come back
    by itself."""
    n = 3000
    payloads = [str(i).encode() for i in range(n)]
    size = sum(2 + 2 + len("s/x") + len(p) for p in payloads)  # (header, topic, payload)
    assert size <= READ_CHUNK  # (all of them within one read)

    async def scenario() -> None:
        async with EmbeddedBroker() as broker:
            got: list[bytes] = []
            sub = MqttTransport(
                host="127.0.0.1",
                port=broker.port,
                client_id="sub",
                on_message=lambda t, p, r: got.append(p),
                subscriptions=[("s/#", 0)],
                keepalive_s=60,  # (no ping's answer to wake its loop meanwhile)
            )
            pub = MqttTransport(
                host="127.0.0.1", port=broker.port, client_id="pub", on_message=lambda *a: None
            )
            await sub.start(wait=True)
            await pub.start(wait=True)
            sock = sub._client.socket()
            assert sock is not None and sub._fd is not None
            loop = asyncio.get_running_loop()
            # Given every message waiting in the subscriber's socket at once (its loop not
            # reading meanwhile), within what one read takes
            loop.remove_reader(sub._fd)
            for p in payloads:
                pub.publish("s/x", p)
            pub.flush()

            def waiting() -> int:
                raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
                return int(struct.unpack("i", raw)[0])

            await until(lambda: waiting() >= size, 20)
            # When it reads again: one turn of its read loop takes 512 of them, and leaves
            # the rest buffered, none in the socket
            sub._on_readable()
            assert len(got) == 512 and sub._client.buffered() and waiting() == 0
            loop.add_reader(sub._fd, sub._on_readable)
            # Then every message arrives, in order
            await until(lambda: len(got) >= n, 10)
            assert got == payloads
            await sub.close()
            await pub.close()

    asyncio.run(scenario())


def test_the_read_buffer_serves_paho_s_small_reads_and_starts_empty_on_a_new_socket() -> None:
    c = PahoClient(CallbackAPIVersion.VERSION2)
    a, b = socket.socketpair()
    a2, b2 = socket.socketpair()
    try:
        for s in (a, a2):
            s.setblocking(False)
        c._sock = a
        # Given bytes that came in one go: paho's small reads are served from one recv
        b.sendall(b"abcdef")
        assert c._sock_recv(1) == b"a"
        assert c.buffered()
        assert c._sock_recv(2) == b"bc"
        assert c._sock_recv(10) == b"def"  # (less than asked: what there is)
        assert not c.buffered()
        with pytest.raises(BlockingIOError):
            c._sock_recv(1)  # (nothing buffered, nothing in the socket)
        # When a connection ends with bytes still buffered and a new one starts
        b.sendall(b"xyz")
        assert c._sock_recv(1) == b"x" and c.buffered()
        c._sock = a2
        # Then none of the old connection's bytes reach the new one
        assert not c.buffered()
        b2.sendall(b"new")
        assert c._sock_recv(3) == b"new"
        # (and closing the socket empties the buffer too)
        b2.sendall(b"123")
        assert c._sock_recv(1) == b"1" and c.buffered()
        c._sock_close()
        assert not c.buffered() and c._rbuf == b""
        # (bytes buffered, then the peer's end: the bytes first, then the end, b"")
        c._sock = a
        b.sendall(b"tail")
        b.shutdown(socket.SHUT_WR)
        assert c._sock_recv(1) == b"t" and c._sock_recv(10) == b"ail"
        assert c._sock_recv(1) == b""
    finally:
        for s in (a, b, a2, b2):
            s.close()
