"""TLS for the LAN is one step: the README's three TLS keys, and other machines connect.

A hub and a desk, each a network namespace on a bridge of our own (tests/cluster.py Lan).
The hub runs ``lbmqtt broker`` with a certificate, accounts and nothing about addresses; the
desk reaches its TLS listener by the hub's LAN address, but not its plain MQTT port.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbmqtt.broker import embedded_broker
from lbmqtt.config import load_settings
from lbmqtt.errors import ConfigError

from .cluster import Cluster, Lan, NetNs, free_port, self_signed_cert

pytestmark = pytest.mark.slow

# connects over TLS, verifying the certificate against the CA file, with a login
CONNECT = textwrap.dedent("""
    import ssl, sys, threading
    import paho.mqtt.client as mqtt
    host, port, ca, user, password = sys.argv[1:6]
    got = threading.Event()
    codes = []
    def on_connect(client, userdata, flags, reason, properties):
        codes.append(int(reason.value))
        got.set()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="desk-tls-probe")
    c.username_pw_set(user, password)
    c.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
    c.on_connect = on_connect
    c.connect(host, int(port), keepalive=10)
    c.loop_start()
    ok = got.wait(20)
    c.loop_stop()
    print(codes[0] if ok else "timeout")
""")

# a plain TCP connection, as any MQTT client would open first
PLAIN = textwrap.dedent("""
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    except OSError as exc:
        print(type(exc).__name__)
    else:
        print("connected")
""")


@pytest.fixture
def lan() -> Iterator[Lan]:
    why = NetNs.available()
    if why:
        pytest.skip(why)
    with Lan() as lan:
        yield lan


def test_the_three_tls_keys_serve_tls_to_the_lan_and_keep_plain_mqtt_local(
    lan: Lan, tmp_path: Path
) -> None:
    hub, desk = lan.add_host("hub"), lan.add_host("desk")
    cert, key = self_signed_cert(tmp_path, hub.ip, "hub")
    tls_port = free_port()
    # the hub's parameters as the README gives them: accounts (a broker beyond loopback
    # needs them) and the three TLS keys; BROKER_HOST stays 127.0.0.1, no BROKER_BIND
    cluster = Cluster(
        tmp_path,
        host=hub.ip,  # (so that Cluster makes an accounts file)
        overrides={
            "BROKER_TLS_CERT": str(cert),
            "BROKER_TLS_KEY": str(key),
            "BROKER_TLS_PORT": tls_port,
        },
    )
    assert cluster.accounts is not None
    login = cluster.login("desk", "user")
    try:
        cluster._start(
            "broker", ["broker"], wrap=hub.wrap, env=cluster.env(BROKER_HOST="127.0.0.1")
        )
        log = (tmp_path / "broker.log").read_text()
        assert f"TLS on 0.0.0.0:{tls_port}" in log, log
        assert f"listening on 127.0.0.1:{cluster.port}" in log, log

        def in_desk(script: str, *args: object) -> str:
            run = subprocess.run(
                [*desk.wrap, sys.executable, "-c", script, *map(str, args)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert run.returncode == 0, run.stderr[-3000:] + cluster.log_tail()
            return run.stdout.strip()

        # TLS from the other machine, by the hub's LAN address: accepted (CONNACK 0)
        pw = login["BROKER_PASSWORD"]
        assert in_desk(CONNECT, hub.ip, tls_port, cert, "desk", pw) == "0", cluster.log_tail()
        # plain MQTT stays on the hub's loopback: the desk's connection is refused
        assert in_desk(PLAIN, hub.ip, cluster.port) == "ConnectionRefusedError"
    finally:
        cluster.close()


def test_tls_for_the_lan_without_accounts_is_refused_with_the_way_out(tmp_path: Path) -> None:
    # (in process, nothing listens: the refusal comes before any socket)
    cert, key = tmp_path / "hub.crt", tmp_path / "hub.key"
    cert.write_text("unused")
    key.write_text("unused")
    tls = {"BROKER_TLS_CERT": str(cert), "BROKER_TLS_KEY": str(key)}
    with pytest.raises(
        ConfigError, match=r"refusing to listen on 0\.0\.0\.0 without accounts"
    ) as e:
        embedded_broker(load_settings(None, env={}, overrides=tls))
    assert '"BROKER_BIND": "127.0.0.1"' in str(e.value)
    loopback = load_settings(None, env={}, overrides={**tls, "BROKER_BIND": "127.0.0.1"})
    broker = embedded_broker(loopback)
    assert broker.tls is not None and broker.tls.host == "127.0.0.1"
    assert broker.host == "127.0.0.1"
