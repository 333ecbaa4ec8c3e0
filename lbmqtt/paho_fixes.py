"""Where paho-mqtt 2.2 falls short for lbmqtt, fixed: the packets waiting in its out queue
are written in one go, what has arrived is read in one go too, and a TLS socket whose
handshake fails is closed (used by :class:`~lbmqtt.mqtt.MqttTransport`)."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import paho.mqtt.client as paho

JOINED = 0x00
"""The command byte :func:`coalesce` gives a joined write: neither a PUBLISH nor a
DISCONNECT, so that paho does nothing with it once it is written."""
JOIN_MAX_BYTES = 256 << 10
"""A joined write grows to about this much at most: paho sends what is left of an entry as
a slice of it, a copy, at every partial ``send``; a burst of megabytes joined whole would
be copied again and again while a slow reader takes it in pieces."""
READ_CHUNK = 64 << 10
"""What :meth:`PahoClient._sock_recv` asks the socket for at once."""


def coalesce(out: Any) -> None:
    """Join the packets waiting in paho's out queue into one write.

    paho sends each packet with its own ``send``: on loopback, with TCP_NODELAY, one
    syscall and one segment each, which the receiver also wakes up for. Once written, a
    packet needs nothing more from paho unless it is a DISCONNECT (closing): a QoS 1
    PUBLISH is tracked in paho's inflight table until its PUBACK, not by its out-queue
    entry; for a QoS 0 PUBLISH paho only calls ``on_publish`` (building an MQTT 5 reason
    code and properties for it: a tenth of the balancer's busy time with one task at a
    time, py-spy) and marks its ``MQTTMessageInfo`` published, and lbmqtt uses neither (it
    waits only for the PUBACK of a QoS 1 message: ``MqttTransport.publish_confirmed``).
    So every run of packets up to a DISCONNECT (and up to ``JOIN_MAX_BYTES``) is joined
    into one entry that paho takes for none of them (``JOINED``), a single QoS 0 PUBLISH
    too; a packet partly written already is not joined (a QoS 0 PUBLISH among them is
    marked ``JOINED`` all the same).
    """
    merged: list[Any] = []
    run: list[Any] = []
    size = 0  # (of the run)

    def close_run() -> None:
        nonlocal size
        if len(run) == 1 and not _is_qos0_publish(run[0]):
            merged.append(run[0])
        elif run:
            data = run[0]["packet"] if len(run) == 1 else b"".join(p["packet"] for p in run)
            merged.append(_joined(run[0], pos=0, to_process=len(data), packet=data))
        run.clear()
        size = 0

    changed = False
    for p in out:
        if run and size + len(p["packet"]) > JOIN_MAX_BYTES:
            close_run()
        if p["pos"] or p["command"] & 0xF0 == paho.DISCONNECT:
            close_run()
            if _is_qos0_publish(p):  # (partly written: the rest goes as it is)
                merged.append(_joined(p))
                changed = True
            else:
                merged.append(p)
        else:
            changed = changed or bool(run) or _is_qos0_publish(p)
            run.append(p)
            size += len(p["packet"])
    close_run()
    if changed:
        out.clear()
        out.extend(merged)


def _joined(p: Any, **changes: Any) -> dict[str, Any]:
    """Out-queue entry ``p`` (with ``changes``) as one paho takes for no packet kind."""
    return {**p, "command": JOINED, "mid": 0, "qos": 0, "info": None, **changes}


def _is_qos0_publish(p: Any) -> bool:
    return bool(p["command"] & 0xF0 == paho.PUBLISH and p["qos"] == 0)


class PahoClient(paho.Client):
    """paho's client, reading what has arrived in one ``recv``, and closing the TLS socket
    when the handshake fails (paho 2.2 leaves it open: one file descriptor leaked per
    failed attempt, every back-off, forever)."""

    _rbuf = b""
    """Bytes read from the socket that paho has not asked for yet (from ``_rpos`` on)."""
    _rpos = 0
    _rsock: Any = None
    """The socket ``_rbuf`` was read from (a new connection's socket starts with nothing)."""

    def _sock_recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes: from what the last read brought, else from one read of
        up to READ_CHUNK (or ``bufsize``, if more: a large body is read as paho reads it).
        paho asks for each packet's command byte, then for each byte of its length, then
        for the rest, and lbmqtt's loop asked the socket with a ``select`` whether more
        had come after each packet: three ``recv`` and a ``select`` for a message under
        128 bytes. One read now serves a whole burst. Same-run ABBA, one task at a time with
        Mosquitto (``bench/run.py latency``, 3 blocks of 1,000): p50 1.56 vs 1.33 ms, CPU
        a task over all processes 2,133 vs 1,831 µs; throughput unchanged."""
        buf = self._rbuf
        pos = self._rpos
        if pos >= len(buf) or self._rsock is not self._sock:
            data = super()._sock_recv(max(bufsize, READ_CHUNK))  # (errors mapped by paho)
            if len(data) <= bufsize:
                self._rbuf, self._rpos = b"", 0
                return data
            self._rbuf, self._rpos, self._rsock = data, bufsize, self._sock
            return data[:bufsize]
        end = pos + bufsize
        if end >= len(buf):
            self._rbuf, self._rpos = b"", 0
            return buf[pos:]
        self._rpos = end
        return buf[pos:end]

    def buffered(self) -> bool:
        """Bytes read from the socket wait here for paho. The socket may have nothing
        left, so whoever reads must go on without waiting for it to be readable."""
        return self._rpos < len(self._rbuf) and self._rsock is self._sock

    def _sock_close(self) -> None:
        self._rbuf, self._rpos, self._rsock = b"", 0, None
        super()._sock_close()

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        context = self._ssl_context
        assert context is not None and context.check_hostname  # (tls_context makes it so)
        ssl_sock = context.wrap_socket(
            tcp_sock, server_hostname=self._host, do_handshake_on_connect=False
        )
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except BaseException:
            ssl_sock.close()
            raise
        return ssl_sock
