"""One asyncio adapter over paho-mqtt: connect, reconnect, will, publish, subscribe.

paho's socket is driven from the running event loop (``add_reader`` / ``add_writer`` and a
1 s housekeeping task), so every paho callback runs on the loop thread: no thread hops, no
locks in lbmqtt's components. Only the blocking TCP connect runs in the default executor.

Facts this module is built on (NOTES.md):

* paho never sets TCP_NODELAY; without it a QoS 1 round trip costs 40-90 ms. We set it
  when the socket opens.
* amqtt speaks MQTT 3.1.1 only: always ``MQTTv311``.
* A clean session loses its subscriptions on reconnect: they are re-sent in ``on_connect``.
* An exception escaping a paho callback breaks paho's state: every callback is wrapped.
* Publishing to a ``$`` topic makes an amqtt connection a zombie: refused here.
* A refused login (CONNACK 4 or 5) is final for a connection never accepted yet: the
  connection loop ends with :class:`~lbmqtt.errors.LoginRefused` (``start(wait=True)``,
  :meth:`MqttTransport.wait_ready` and :meth:`MqttTransport.watch` raise it). Once accepted,
  a refusal (a password changed while a daemon runs) is logged once and retried with
  back-off, as any lost connection: the daemon comes back when its login works again.

This module writes no topic: callers pass filters and a message handler. Client ids and the
connection options from the settings are in :mod:`lbmqtt.connect`; the short-lived reader of
retained messages, :func:`lbmqtt.health.read_retained`, is built on the transport. The
transport's own loops are watched by its owner's supervised loops (:meth:`MqttTransport.watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from .backoff import compute_backoff
from .connect import client_id, connection_options, tls_context
from .errors import BrokerUnavailable, ConfigError, LoginRefused
from .paho_fixes import PahoClient, coalesce
from .protocol import validate_topic_for_publish

__all__ = [
    "MessageHandler",
    "MqttTransport",
    "Will",
    "client_id",
    "connection_options",
    "tls_context",
]

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, bool], None]
"""Called on the loop thread with ``(topic, payload, retained)`` for every message."""


@dataclass(frozen=True)
class Will:
    """Last-will message the broker publishes if the connection drops without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttTransport:
    """A reconnecting MQTT 3.1.1 connection on the running asyncio loop.

    Args:
        host, port: the broker.
        client_id: unique MQTT client id (a second connection with the same id takes over).
        on_message: handler for every received message (must not block).
        subscriptions: ``(filter, qos)`` pairs, (re)subscribed on every connect.
        on_connect: called on the loop after each successful connect, before subscriptions
            are acknowledged (e.g. to publish a retained status).
        on_disconnect: called on the loop when a connection ends.
        will: last will, set on every connect.
        keepalive_s: MQTT keep-alive; the broker drops us after ~1.5x of silence.
        username, password: broker credentials (none = anonymous).
        tls: connect with TLS using this context (None: plain TCP).
        reconnect_min_s, reconnect_max_s: jittered exponential back-off bounds.
        max_queued: bound on QoS>0 messages queued while disconnected.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        on_message: MessageHandler,
        subscriptions: Sequence[tuple[str, int]] = (),
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        will: Will | None = None,
        keepalive_s: int = 5,
        username: str | None = None,
        password: str | None = None,
        reconnect_min_s: float = 0.05,
        reconnect_max_s: float = 5.0,
        max_queued: int = 100_000,
        connect_timeout_s: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ):
        self.host = host
        self.port = port
        self.client_id = client_id
        self._handler = on_message
        self._subscriptions: dict[str, int] = dict(subscriptions)
        self._on_connect_hook = on_connect
        self._on_disconnect_hook = on_disconnect
        self._keepalive = int(keepalive_s)
        self._reconnect_min = reconnect_min_s
        self._reconnect_max = reconnect_max_s
        self._connect_timeout = connect_timeout_s
        self._username = username

        c = PahoClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(max_queued)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if username is not None:
            c.username_pw_set(username, password)
        if tls is not None:
            c.tls_set_context(tls)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_socket_register_write
        c.on_socket_unregister_write = self._on_socket_unregister_write
        self._client = c

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._fd: int | None = None
        self._writer_fd: int | None = None
        self._write_soon = False
        self._connected = False
        self._started = asyncio.Event()  # (start() has created the loops)
        self._ready = asyncio.Event()  # connected and subscriptions acknowledged
        self._connack = asyncio.Event()
        self._session_ended: asyncio.Event | None = None
        self._sub_mids: dict[int, asyncio.Future[None]] = {}
        self._initial_sub_mid: int | None = None
        self._pub_waiters: dict[int, asyncio.Future[None]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._connecting: asyncio.Future[Any] | None = None
        self._closing = False
        self._refused: int | None = None  # CONNACK 4 or 5 of the last attempt
        self._refusal_logged = False  # (once per outage)
        self.last_error: str | None = None
        self.connects = 0
        self.bad_messages = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, wait: bool = False, timeout_s: float | None = None) -> None:
        """Start connecting in the background.

        Args:
            wait: wait until connected and subscribed.
            timeout_s: with ``wait``, give up after this long (default: connect timeout).

        Raises:
            BrokerUnavailable: with ``wait``, the broker was not reachable in time.
        """
        if not 0 < self.port < 65536:
            raise ConfigError(
                f"cannot connect to the MQTT broker at port {self.port}: BROKER_PORT 0 means "
                f"'pick a free port' for the embedded broker only; give clients the port it "
                f"printed (--broker-port N or LBMQTT_BROKER_PORT=N)"
            )
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._tasks = [
            asyncio.create_task(self._connection_loop(), name=f"mqtt-connect-{self.client_id}"),
            asyncio.create_task(self._misc_loop(), name=f"mqtt-misc-{self.client_id}"),
        ]
        self._started.set()
        if wait:
            await self.wait_ready(timeout_s if timeout_s is not None else self._connect_timeout)

    async def watch(self) -> None:
        """Run as one of the owner's supervised loops (:class:`lbmqtt.service.Loops`): wait
        until one of the transport's own loops dies, and raise its error, so that the owner
        goes down with a traceback instead of staying up deaf."""
        await self._started.wait()
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if not t.cancelled() and (exc := t.exception()) is not None:
                raise exc

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until connected with subscriptions acknowledged.

        Raises:
            LoginRefused: the broker refused the login before ever accepting it.
            BrokerUnavailable: not ready within ``timeout_s``; says why when known.
        """
        ready = asyncio.ensure_future(self._ready.wait())
        conn = self._tasks[:1]  # the connection loop: it ends on a final refusal
        try:
            await asyncio.wait(
                [ready, *conn],
                timeout=None if timeout_s == float("inf") else timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            ready.cancel()
        if self._ready.is_set():
            return
        died = conn[0] if conn and conn[0].done() and not conn[0].cancelled() else None
        if died is not None and (exc := died.exception()) is not None:
            raise exc
        why = f" ({self.last_error})" if self.last_error else ""
        hint = "is `lbmqtt up` or `lbmqtt broker` running (see BROKER_HOST / BROKER_PORT)?"
        if self.last_error and self.last_error.startswith("broker refused"):
            hint = (
                "check the login: BROKER_USERNAME and BROKER_PASSWORD (or "
                "LBMQTT_BROKER_PASSWORD, BROKER_PASSWORD_FILE), an account of "
                "`lbmqtt user list` on the broker's machine"
            )
        raise BrokerUnavailable(
            f"cannot reach the MQTT broker at {self.host}:{self.port}{why} "
            f"within {timeout_s:g} s: {hint}"
        )

    async def close(self, timeout_s: float = 2.0) -> None:
        """Disconnect cleanly (no will is published) and stop reconnecting."""
        self._closing = True
        if self._connected:
            ended = self._session_ended
            self._client.disconnect()
            if ended is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), timeout_s)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        connecting = self._connecting
        if connecting is not None and not connecting.done():
            # a connect still running in the executor would open a socket after us
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(connecting), self._connect_timeout)
        self._unregister_fds()
        sock = self._client.socket()
        if sock is not None:  # closed before (or without) a clean DISCONNECT
            with contextlib.suppress(OSError):
                sock.close()
        for fut in [*self._pub_waiters.values(), *self._sub_mids.values()]:
            if not fut.done():
                fut.cancel()

    async def __aenter__(self) -> MqttTransport:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True while connected with subscriptions acknowledged."""
        return self._ready.is_set()

    # ---------------------------------------------------------------- operations

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Publish without waiting. Returns False if the message was dropped.

        QoS 0 messages are dropped while disconnected; QoS 1 messages are queued by paho
        and sent after the reconnect (up to ``max_queued``).

        Raises:
            ValueError: the topic is not publishable (``$``, wildcard, empty).
        """
        validate_topic_for_publish(topic)
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return True
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return qos > 0
        log.warning("publish to %s dropped: %s", topic, paho.error_string(info.rc))
        return False

    async def publish_confirmed(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout_s: float = 5.0
    ) -> bool:
        """Publish at QoS 1 and wait for the broker's PUBACK. Returns False on timeout."""
        validate_topic_for_publish(topic)
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.is_published():
            return True
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pub_waiters[info.mid] = fut
        if info.is_published():
            self._pub_waiters.pop(info.mid, None)
            return True
        try:
            await asyncio.wait_for(fut, timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            return False
        finally:
            self._pub_waiters.pop(info.mid, None)
        return True

    async def subscribe(self, topic_filter: str, qos: int = 0, timeout_s: float = 5.0) -> None:
        """Add a subscription (kept across reconnects) and wait for its SUBACK if connected."""
        self._subscriptions[topic_filter] = qos
        if not self._connected:
            return
        rc, mid = self._client.subscribe(topic_filter, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._sub_mids[mid] = fut
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout_s)

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription (and stop re-sending it on reconnect)."""
        if self._subscriptions.pop(topic_filter, None) is not None and self._connected:
            self._client.unsubscribe(topic_filter)

    def drop_connection(self) -> None:
        """Cut the TCP connection without DISCONNECT (the broker publishes our will).

        The transport reconnects by itself; tests use this to simulate a dropped link.
        """
        self._force_close()

    # ------------------------------------------------------------------ internals

    def _in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def _backoff(self, attempt: int) -> float:
        lo, hi = self._reconnect_min, self._reconnect_max
        return compute_backoff(attempt, min_s=lo, max_s=max(lo, hi))

    async def _connection_loop(self) -> None:
        assert self._loop is not None
        attempt = 0
        failing_since: float | None = None
        last_report = 0.0
        while not self._closing:
            ended = asyncio.Event()
            self._session_ended = ended
            self._connack.clear()
            self._refused = None
            try:
                self._connecting = self._loop.run_in_executor(None, self._client.reconnect)
                await asyncio.shield(self._connecting)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.last_error = _describe(exc)
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning(
                        "cannot reach the MQTT broker at %s:%s (%s); retrying",
                        self.host,
                        self.port,
                        self.last_error,
                    )
                    last_report = now
                elif now - last_report > 30:
                    log.warning(
                        "still cannot reach the MQTT broker at %s:%s after %.0f s (%s)",
                        self.host,
                        self.port,
                        now - failing_since,
                        self.last_error,
                    )
                    last_report = now
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1
                continue
            # TCP is up and CONNECT sent: wait for CONNACK (on_connect) or the end.
            try:
                await asyncio.wait_for(self._wait_connack_or_end(ended), self._connect_timeout)
            except TimeoutError:
                self.last_error = "no CONNACK from the broker"
                log.warning(
                    "no CONNACK from %s:%s within %.0f s; reconnecting",
                    self.host,
                    self.port,
                    self._connect_timeout,
                )
                self._force_close()
            if self._refused is not None:
                self._login_refused()
            if self._connected:
                if failing_since is not None:
                    log.info(
                        "connected to the MQTT broker at %s:%s after %.1f s",
                        self.host,
                        self.port,
                        time.monotonic() - failing_since,
                    )
                failing_since = None
                attempt = 0
            await ended.wait()
            if self._closing:
                break
            if failing_since is None:
                failing_since = time.monotonic()
                last_report = failing_since
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1

    def _login_refused(self) -> None:
        """The broker refused our login: final if it never accepted it (the same login
        cannot do better), else logged once per outage and retried (its password may have
        been changed while we run, and changed back or given to us again)."""
        assert self._refused is not None
        error = LoginRefused(self.host, self.port, self._username, self._refused)
        if not self.connects:
            raise error
        if not self._refusal_logged:
            self._refusal_logged = True
            log.warning("%s; retrying with back-off until it is accepted again", error)

    async def _wait_connack_or_end(self, ended: asyncio.Event) -> None:
        waits = {asyncio.ensure_future(self._connack.wait()), asyncio.ensure_future(ended.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._client.socket() is not None:
                try:
                    self._client.loop_misc()
                except Exception:
                    log.exception("paho loop_misc failed")

    def _force_close(self) -> None:
        shutdown = getattr(self._client.socket(), "shutdown", None)
        if shutdown is not None:
            with contextlib.suppress(OSError):
                shutdown(socket.SHUT_RDWR)

    def _unregister_fds(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if self._fd is not None:
            loop.remove_reader(self._fd)
            self._fd = None
        if self._writer_fd is not None:
            loop.remove_writer(self._writer_fd)
            self._writer_fd = None

    # ---------------------------------------------------------- paho callbacks
    # Every callback runs on the loop thread except the socket-open/close/register
    # callbacks fired from the executor during reconnect(); those hop with _in_loop.

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = sock.fileno()

        def register() -> None:
            assert self._loop is not None
            self._unregister_fds()
            try:
                self._loop.add_reader(fd, self._on_readable)
            except (OSError, ValueError):
                return
            self._fd = fd
            if client.want_write():
                self._watch_writable(fd)

        self._in_loop(register)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._unregister_fds)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()

        def soon() -> None:
            # Write once the running callback is over, not on the next poll for
            # writability: what the rest of this loop iteration publishes goes out in the
            # same write (coalesce), and the socket is watched only when it is full.
            assert self._loop is not None
            if self._fd == fd and not self._write_soon and self._writer_fd is None:
                self._write_soon = True
                self._loop.call_soon(self._write_now)

        self._in_loop(soon)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        def unregister() -> None:
            assert self._loop is not None
            if self._writer_fd is not None:
                self._loop.remove_writer(self._writer_fd)
                self._writer_fd = None

        self._in_loop(unregister)

    def flush(self) -> None:
        """Write what is published so far now, not when this loop iteration is over: a
        component that has just published a batch of work (the balancer at the end of a
        tick) sends it before the loop goes on to read the next burst of messages."""
        if self._write_soon:
            self._write_now()

    def _write_now(self) -> None:
        if not self._write_soon:
            return  # (flushed already)
        self._write_soon = False
        fd = self._fd
        if fd is None:
            return
        self._on_writable()
        if self._client.want_write() and self._fd == fd:
            self._watch_writable(fd)  # the socket's buffer is full: go on when it has room

    def _watch_writable(self, fd: int) -> None:
        """Write what paho still holds once the socket has room."""
        if self._writer_fd is not None:
            return
        assert self._loop is not None
        try:
            self._loop.add_writer(fd, self._on_writable)
        except (OSError, ValueError):
            return
        self._writer_fd = fd

    def _on_readable(self) -> None:
        # Read every packet already in the socket buffer in one go, so that a burst of
        # messages is handled in one loop iteration (and batched by the components).
        if self._fd is None:
            return  # (unregistered since: a call_soon from below, after close())
        client = self._client
        for _ in range(512):
            try:
                rc = client.loop_read()
            except Exception:
                log.exception("paho loop_read failed; dropping the connection")
                self._force_close()
                return
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if client.buffered():
                continue  # (read from the socket already: paho takes it from there)
            sock = client.socket()
            if sock is None:
                return
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                continue
            try:
                readable, _, _ = select.select([sock], [], [], 0)
            except (OSError, ValueError):
                return
            if not readable:
                return
        # (512 turns over and bytes still buffered: the socket may be dry now, it would not
        # wake us for them)
        if client.buffered():
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)

    def _on_writable(self) -> None:
        client = self._client
        try:
            if client._out_packet:
                coalesce(client._out_packet)
            client.loop_write()
        except Exception:
            log.exception("paho loop_write failed; dropping the connection")
            self._force_close()

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        try:
            if reason.is_failure:
                self.last_error = f"broker refused the connection: {reason}"
                self._refused = _login_refusal(reason)
                if self._refused is None:
                    log.error(
                        "the MQTT broker at %s:%s refused the connection: %s",
                        self.host,
                        self.port,
                        reason,
                    )
                return
            self._connected = True
            self._refusal_logged = False
            self.connects += 1
            self.last_error = None
            self._connack.set()
            if self._subscriptions:
                rc, mid = client.subscribe(list(self._subscriptions.items()))
                self._initial_sub_mid = mid if rc == MQTTErrorCode.MQTT_ERR_SUCCESS else None
            else:
                self._ready.set()
            if self._on_connect_hook is not None:
                self._on_connect_hook()
        except Exception:
            log.exception("on_connect handler failed")

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        try:
            failed = [r for r in reasons if getattr(r, "is_failure", False)]
            if failed:
                log.error("the broker refused a subscription (%s): check the broker ACL", failed)
            if mid == self._initial_sub_mid:
                self._initial_sub_mid = None
                self._ready.set()
            fut = self._sub_mids.pop(mid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        except Exception:
            log.exception("on_subscribe handler failed")

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        fut = self._pub_waiters.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        try:
            was_connected = self._connected
            self._connected = False
            self._ready.clear()
            self._initial_sub_mid = None
            if was_connected and not self._closing:
                log.warning(
                    "%s lost its connection to the MQTT broker at %s:%s (%s); reconnecting",
                    self.client_id,
                    self.host,
                    self.port,
                    reason,
                )
            if self._session_ended is not None:
                self._session_ended.set()
            if was_connected and self._on_disconnect_hook is not None:
                self._on_disconnect_hook()
        except Exception:
            log.exception("on_disconnect handler failed")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self.bad_messages += 1
            return
        try:
            self._handler(topic, bytes(msg.payload), bool(msg.retain))
        except Exception:
            self.bad_messages += 1
            log.exception("message handler failed on %s", topic)


def _login_refusal(reason: Any) -> int | None:
    """The MQTT 3.1.1 CONNACK return code of a refused login (4 or 5), or None for another
    refusal. (paho hands 3.1.1 codes over as MQTT 5 reason codes: 4 as 134, 5 as 135.)"""
    value = getattr(reason, "value", None)
    return {134: 4, 135: 5}.get(value) if isinstance(value, int) else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"unknown host: {exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
