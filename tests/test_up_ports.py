"""``lbmqtt up``'s ports: its summary lists what the broker bound; ports picked with 0 are
picked once and kept by restarted parts."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import urllib.request
from pathlib import Path

from .cluster import self_signed_cert
from .conftest import Up, descendants, finish, process_alive, start_up, wait_until


def _part(up: Up, name: str) -> int:
    """The PID of the child of ``up`` running ``lbmqtt NAME``."""
    for pid in descendants(up.proc.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"lbmqtt" in argv and argv[argv.index(b"lbmqtt") + 1 :][:1] == [name.encode()]:
            return pid
    raise AssertionError(f"no {name} under `up`:\n{up.text()}")


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200, url
        return bytes(resp.read())


def test_a_restarted_dashboard_and_balancer_keep_the_ports_picked_with_0() -> None:
    up = start_up()  # --monitor-port 0 --metrics-port 0
    try:
        dashboard = up.url
        m = re.search(r"metrics\s+(http://\S+)", up.text())
        assert dashboard and m, up.text()
        metrics = m.group(1)
        assert "127.0.0.1" in dashboard and "127.0.0.1" in metrics
        assert b"Bokeh" in _get(dashboard) and b"lbmqtt_" in _get(metrics)
        killed = {name: _part(up, name) for name in ("dashboard", "balancer")}
        for pid in killed.values():
            os.kill(pid, signal.SIGKILL)
        for name, pid in killed.items():
            wait_until(
                lambda name=name: f"{name} is back" in up.text() or up.proc.poll() is not None,
                60,
                f"`up` to start the {name} again",
            )
            assert up.proc.poll() is None, up.text()
            assert not process_alive(pid) and _part(up, name) != pid
        # the URLs `up` printed answer again: the same ports
        assert b"Bokeh" in _get(dashboard)
        assert b"lbmqtt_" in _get(metrics)
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
    finally:
        finish(up)


def test_the_summary_lists_every_listener_the_broker_bound(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path, "127.0.0.2")
    # TLS on BROKER_BIND (a loopback address other than plain MQTT's 127.0.0.1)
    tls = {
        "LBMQTT_BROKER_TLS_CERT": str(cert),
        "LBMQTT_BROKER_TLS_KEY": str(key),
        "LBMQTT_BROKER_TLS_PORT": "0",
        "LBMQTT_BROKER_BIND": "127.0.0.2",
    }
    up = start_up("--no-dashboard", "--no-node", env_extra=tls)
    try:
        m = re.search(r"broker\s+(.+) \(embedded amqtt\)", up.text())
        assert m, up.text()
        found = [re.fullmatch(r"(mqtts?)://([\d.]+):(\d+)", u) for u in m.group(1).split(", ")]
        assert all(found), m.group(1)
        listeners = {f.group(1): (f.group(2), int(f.group(3))) for f in found if f}
        assert list(listeners) == ["mqtt", "mqtts"], m.group(1)
        assert listeners["mqtt"] == ("127.0.0.1", up.port)
        assert listeners["mqtts"][0] == "127.0.0.2"
        # each one is there: plain MQTT answers a TCP connect, TLS a verified handshake
        with socket.create_connection(listeners["mqtt"], timeout=10):
            pass
        context = ssl.create_default_context(cafile=str(cert))
        with (
            socket.create_connection(listeners["mqtts"], timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.2") as tls_sock,
        ):
            assert tls_sock.version()
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
    finally:
        finish(up)
