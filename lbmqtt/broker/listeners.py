"""Broker configurations: the embedded broker's amqtt configuration (its listeners, plain
and TLS, and its plugins), the one reader of the port a listener is bound to, and the
loopback variant of the shipped ``broker/mosquitto.conf`` that tests and benchmarks run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker

AMQTT_VERSION = "amqtt 0.12.1"


@dataclass(frozen=True)
class TlsListener:
    """A second, TLS-only listener: ``cert``/``key`` are PEM files."""

    host: str
    port: int
    cert: str
    key: str


def broker_config(
    host: str,
    port: int,
    *,
    max_connections: int = 0,
    anonymous: bool = True,
    tls: TlsListener | None = None,
) -> dict[str, Any]:
    """The amqtt configuration of the embedded broker.

    Plugins are listed explicitly: amqtt's defaults add ``$SYS`` publishing and packet
    logging. Anonymous access is allowed only for the one-command demo on loopback; with
    accounts, :class:`PatchedBroker` checks every login itself before amqtt sees the
    CONNECT, and amqtt's plugin then only insists on a user name.
    """
    listeners: dict[str, Any] = {
        "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": max_connections},
    }
    if tls is not None:
        listeners["tls"] = {
            "type": "tcp",
            "bind": f"{tls.host}:{tls.port}",
            "max_connections": max_connections,
            "ssl": True,
            "certfile": tls.cert,
            "keyfile": tls.key,
        }
    return {
        "listeners": listeners,
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": anonymous},
        },
    }


def bound_port(broker: Broker, listener: str = "default") -> int:
    """The TCP port one of amqtt's listeners is bound to.

    amqtt keeps it only in a private attribute; this is the one place that reads it.
    """
    server = broker._servers[listener]
    port: int = server.instance.sockets[0].getsockname()[1]
    return port


SCHEMES = {"default": "mqtt", "tls": "mqtts"}
"""The URL scheme of each of the embedded broker's listeners (by amqtt listener name)."""


def bound_urls(broker: Broker) -> list[str]:
    """``mqtt://HOST:PORT`` / ``mqtts://HOST:PORT`` of every socket the broker's listeners
    are bound to, as the kernel reports them (plain first)."""
    urls: list[str] = []
    for name, scheme in SCHEMES.items():
        server = broker._servers.get(name)
        if server is None:
            continue
        for sock in server.instance.sockets:
            host, port = sock.getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            urls.append(f"{scheme}://{host}:{port}")
    return list(dict.fromkeys(urls))


def loopback_mosquitto_conf(shipped: str, port: int) -> str:
    """The shipped ``broker/mosquitto.conf`` turned into an anonymous broker on one
    loopback port without persistence: what the tests and benchmarks run (the tests of
    logins and ACLs write their own)."""
    swap = {
        "listener 1883 0.0.0.0": f"listener {port} 127.0.0.1",
        "allow_anonymous false": "allow_anonymous true",
    }
    return (
        "\n".join(
            swap.get(line, line)
            for line in shipped.splitlines()
            if not line.startswith(("password_file", "acl_file", "persistence", "plugin"))
        )
        + "\n"
    )
