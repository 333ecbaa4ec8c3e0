"""Where paho-mqtt 2.2 falls short for lbmqtt, fixed: the packets waiting in its out queue
are written in one go, and a TLS socket whose handshake fails is closed (used by
:class:`~lbmqtt.mqtt.MqttTransport`)."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import paho.mqtt.client as paho


def coalesce(out: Any) -> None:
    """Join the packets waiting in paho's out queue into one write.

    paho sends each packet with its own ``send``: on loopback, with TCP_NODELAY, one
    syscall and one segment each, which the receiver also wakes up for. Once written, a
    packet needs nothing more from paho unless it is a QoS 0 PUBLISH (``on_publish``) or a
    DISCONNECT (closing), so runs of the others are joined (a QoS 1 PUBLISH is tracked in
    paho's inflight table until its PUBACK, not by its out-queue entry); a packet partly
    written already stays as it is.
    """
    merged: list[Any] = []
    run: list[Any] = []

    def close_run() -> None:
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            data = b"".join(p["packet"] for p in run)
            merged.append(
                {**run[0], "pos": 0, "to_process": len(data), "packet": data, "info": None}
            )
        run.clear()

    for p in out:
        cmd = p["command"] & 0xF0
        if p["pos"] or cmd == paho.DISCONNECT or (cmd == paho.PUBLISH and p["qos"] == 0):
            close_run()
            merged.append(p)
        else:
            run.append(p)
    close_run()
    if len(merged) < len(out):
        out.clear()
        out.extend(merged)


class PahoClient(paho.Client):
    """paho's client, closing the TLS socket when the handshake fails (paho 2.2 leaves it
    open: one file descriptor leaked per failed attempt, every back-off, forever)."""

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
