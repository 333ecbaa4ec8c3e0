"""Where and how every component connects to the broker: client ids, TLS, and the
connection options of :class:`~lbmqtt.mqtt.MqttTransport` from the settings."""

from __future__ import annotations

import secrets
import ssl
from typing import Any

from .config import Settings
from .errors import ConfigError

__all__ = ["client_id", "connection_options", "tls_context"]


def client_id(kind: str, name: str = "") -> str:
    """An MQTT client id nobody can guess: a broker hands a connection over to whoever
    connects with its client id next, and Mosquitto does so whatever the login (the
    embedded broker refuses another login's id). Ids never appear on any topic."""
    return f"lbmqtt-{kind}-{name + '-' if name else ''}{secrets.token_hex(8)}"


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context clients use (BROKER_TLS), verifying the broker against
    BROKER_CA_FILE or the system's CAs; None without BROKER_TLS."""
    if not settings.broker_tls:
        return None
    try:
        return ssl.create_default_context(cafile=settings.broker_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"BROKER_CA_FILE {settings.broker_ca_file}: {exc}") from exc


def connection_options(settings: Settings) -> dict[str, Any]:
    """Where and how every component connects: host, port, login, TLS."""
    return {
        "host": settings.broker_host,
        "port": settings.broker_port,
        "username": settings.broker_username,
        "password": settings.password,
        "tls": tls_context(settings),
        "keepalive_s": settings.broker_keepalive_s,
        "connect_timeout_s": settings.connect_timeout_s,
    }
