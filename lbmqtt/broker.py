"""The embedded MQTT broker: amqtt 0.12.1 with lbmqtt's patches for its known bugs.

It runs in its own process by default (``lbmqtt broker``, started by ``lbmqtt up``): its
CPU per message would otherwise compete with the balancer's event loop. Each patch can be
switched off (``patches=``) so that the tests can show the bug it fixes.

Patches (NOTES.md, "Bugs to work around"):

``keepalive``
    amqtt never drops a client that stops talking (Yakifo/amqtt#308): the read timeout
    handler is a no-op, so a frozen or cut-off client stays "connected" and its last will
    never fires. We close the connection after 1.5 x its keep-alive of silence (MQTT 3.1.1
    section 3.1.2.10), which ends the session abnormally and publishes the will.
``retained_leak``
    On every CONNECT amqtt replays the retained messages of every filter that *any* client
    holds to the new client, leaking other users' retained task states and duplicating
    messages. We replay retained messages only for filters the session itself holds.
``dollar_publish``
    A PUBLISH to a ``$`` topic (or with a wildcard / empty topic) breaks amqtt's per-client
    loop while leaving the connection open: later publishes are dropped, SUBSCRIBE is
    never answered and the will never fires. We drop ``$`` publishes and keep serving the
    client; a wildcard or empty publish topic is a protocol error and closes the
    connection properly (so the will fires).
``socket_leak``
    When a client disconnects, amqtt closes its side with ``drain(); write_eof(); close()``.
    If a message to the client was in flight as it left (a client that publishes, then
    says DISCONNECT and closes), the peer's reset makes ``write_eof`` fail with ENOTCONN,
    ``close`` is never called and the socket stays open until the garbage collector finds
    it: a broker serving short-lived clients leaks a file descriptor per such client. We
    always close it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
from collections.abc import Iterable
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.session import Session

from .config import Settings
from .protocol import BrokerStatus, Topics

log = logging.getLogger(__name__)

AMQTT_VERSION = "amqtt 0.12.1"
ALL_PATCHES: frozenset[str] = frozenset(
    {"keepalive", "retained_leak", "dollar_publish", "socket_leak"})
KEEPALIVE_GRACE = 1.5


def broker_config(host: str, port: int, *, max_connections: int = 0) -> dict[str, Any]:
    """The amqtt configuration of the embedded broker.

    Plugins are listed explicitly: amqtt's defaults add ``$SYS`` publishing and packet
    logging. Anonymous access is allowed (the one-command demo on loopback).
    """
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}",
                        "max_connections": max_connections},
        },
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


class _ClosingStreamWriter(StreamWriterAdapter):  # type: ignore[misc]
    """amqtt's writer adapter, but the transport is closed even if ``write_eof`` fails."""

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._writer.close()


class PatchedBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with lbmqtt's patches (see the module docstring)."""

    def __init__(self, config: dict[str, Any], *, patches: Iterable[str] = ALL_PATCHES):
        super().__init__(config)
        unknown = set(patches) - ALL_PATCHES
        if unknown:
            raise ValueError(f"unknown broker patches: {sorted(unknown)}")
        self.patches = frozenset(patches)
        self.dropped_dollar_publishes = 0
        self.keepalive_drops = 0

    # -- keepalive ------------------------------------------------------------------------

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[Any, Session]:
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port)
        if "keepalive" in self.patches and session.keep_alive and session.keep_alive > 0:
            # amqtt's reader loop waits this long for the next packet, then calls
            # handle_read_timeout (a no-op upstream) and keeps waiting forever.
            session.keep_alive = math.ceil(session.keep_alive * KEEPALIVE_GRACE * 10) / 10
            handler.handle_read_timeout = lambda: self._drop_silent_client(handler)
        return handler, session

    def _drop_silent_client(self, handler: Any) -> None:
        session = handler.session
        client_id = session.client_id if session is not None else "?"
        log.info("client %s silent for %.1f s (1.5 x keep-alive): closing its connection",
                 client_id, session.keep_alive if session is not None else 0)
        self.keepalive_drops += 1
        writer = handler.writer
        transport = getattr(getattr(writer, "_writer", None), "transport", None)
        if transport is not None:
            # abort, not close: a frozen peer may never drain our buffer. The reader then
            # sees EOF, the session ends abnormally and the broker publishes the will.
            transport.abort()
        elif writer is not None:
            self._closing = asyncio.ensure_future(writer.close())

    # -- socket_leak ----------------------------------------------------------------------

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        adapter = (_ClosingStreamWriter(writer) if "socket_leak" in self.patches
                   else StreamWriterAdapter(writer))
        await self._client_connected(listener_name, StreamReaderAdapter(reader), adapter)

    # -- retained_leak --------------------------------------------------------------------

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        if "retained_leak" in self.patches:
            topic_filter = subscription[0]
            holders = self._subscriptions.get(topic_filter, ())
            if not any(s.client_id == session.client_id for s, _ in holders):
                return
        await super()._publish_retained_messages_for_subscription(subscription, session)

    # -- dollar_publish -------------------------------------------------------------------

    async def _handle_message_delivery(self, client_session: Session, handler: Any,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
        if "dollar_publish" in self.patches:
            message = wait_deliver.result()
            topic = getattr(message, "topic", None) if message is not None else None
            if message is not None and isinstance(topic, str) and topic.startswith("$"):
                self.dropped_dollar_publishes += 1
                log.info("client %s published to %r: '$' topics are reserved; dropped",
                         client_session.client_id, topic)
                return True
            if message is not None and (not topic or "#" in topic or "+" in topic):
                log.info("client %s published to an invalid topic %r: closing its connection",
                         client_session.client_id, topic)
                self._drop_silent_client(handler)
                return True
        result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return result


class EmbeddedBroker:
    """The embedded broker on the running loop, as an async context manager.

    Args:
        host: address to listen on.
        port: TCP port; 0 picks a free one (read it back from :attr:`port`).
        patches: which of :data:`ALL_PATCHES` to apply (all by default).
        prefix: topic prefix under which to retain ``broker/status`` (None: don't).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 patches: Iterable[str] = ALL_PATCHES, prefix: str | None = None):
        self.host = host
        self.requested_port = port
        self.patches = frozenset(patches)
        self.prefix = prefix
        self.broker: PatchedBroker | None = None
        self.port = 0

    async def start(self) -> None:
        """Start listening; afterwards :attr:`port` holds the bound port."""
        self.broker = PatchedBroker(broker_config(self.host, self.requested_port),
                                    patches=self.patches)
        await self.broker.start()
        self.port = bound_port(self.broker)
        if self.prefix is not None:
            status = BrokerStatus(online=True, host=self.host, port=self.port,
                                  version=AMQTT_VERSION)
            await self.broker.retain_message(None, Topics(self.prefix).broker_status,
                                             status.encode(), 1)

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        if self.broker is not None:
            await self.broker.shutdown()
            self.broker = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def bound_port(broker: Broker) -> int:
    """The TCP port amqtt's default listener is bound to.

    amqtt keeps it only in a private attribute; this is the one place that reads it.
    """
    server = broker._servers["default"]
    port: int = server.instance.sockets[0].getsockname()[1]
    return port


def quiet_amqtt_logs(level: int) -> None:
    """amqtt logs every connection at INFO; keep it at WARNING unless debugging."""
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG
                                         else logging.WARNING)


async def serve(settings: Settings, *, ready_fd: int | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the embedded broker until SIGINT/SIGTERM (or ``stop`` is set).

    Prints ``lbmqtt broker: listening on HOST:PORT`` and, with ``ready_fd``, writes one
    JSON line ``{"host": ..., "port": ...}`` to that file descriptor once listening.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    host = settings.bind_host
    broker = EmbeddedBroker(host, settings.broker_port, prefix=settings.topic_prefix)
    amqtt_log = logging.getLogger("amqtt.broker")
    level = amqtt_log.level
    amqtt_log.setLevel(logging.CRITICAL)  # it logs a traceback; we say it in one line
    try:
        await broker.start()
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise OSError(
            f"cannot listen on {host}:{settings.broker_port} ({cause}): is another broker "
            f"or `lbmqtt up` running there? --broker-port 0 picks a free port") from exc
    finally:
        amqtt_log.setLevel(level)
    print(f"lbmqtt broker: listening on {host}:{broker.port} ({AMQTT_VERSION})", flush=True)
    advertiser = None
    if settings.broker_advertise:
        from .discovery import Advertiser

        advertiser = Advertiser(host, broker.port, settings.topic_prefix)
        try:
            addresses = await asyncio.to_thread(advertiser.start)
        except Exception as exc:  # no multicast here: the broker serves all the same
            log.warning("could not advertise the broker by mDNS: %s", exc)
            advertiser = None
        else:
            if addresses:
                print(f"lbmqtt broker: advertised by mDNS on {', '.join(addresses)} "
                      f"(BROKER_HOST \"auto\" finds it)", flush=True)
    if ready_fd is not None:
        with os.fdopen(ready_fd, "w") as f:
            f.write(json.dumps({"host": host, "port": broker.port}) + "\n")
    try:
        await stop.wait()
    finally:
        if advertiser is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(advertiser.close)
        await broker.stop()
        print("lbmqtt broker: stopped", flush=True)
