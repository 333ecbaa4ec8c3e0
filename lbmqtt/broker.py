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
``connect_close`` (part of every broker, not optional)
    amqtt closes the socket for only some failed CONNECTs: a first packet other than
    CONNECT left the connection open and never read again, and a client that left before
    its CONNECT ended left a socket in CLOSE_WAIT until the garbage collector ran, and a
    client resetting the connection as its CONNECT was refused never gave back its
    connection slot. We close the socket whenever the CONNECT fails, and free the slot.
``takeover``
    amqtt handles a CONNECT before it checks the login: a CONNECT with someone else's
    client id deletes (clean session) or rewrites (persistent session) that client's
    session, and a connected client is taken over even when the login then fails. With
    accounts (:class:`~lbmqtt.access.AccessGuard`) we check the login first and refuse a
    client id held by another login; this patch is part of the guard, not optional.
``offline_queue``
    amqtt keeps every QoS 1 message for a disconnected persistent session (a login with
    ``clean_session`` false) in an unbounded queue: a client that subscribes and never
    comes back makes the broker grow without end. We keep at most
    :data:`MAX_OFFLINE_MESSAGES` (and :data:`MAX_OFFLINE_BYTES`) per session and drop (and
    count) the rest.
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
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Action, Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    SERVER_UNAVAILABLE,
    ConnackPacket,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from .access import AccessGuard, Role, check_role
from .config import Settings, is_loopback, service_accounts
from .errors import ConfigError
from .protocol import BrokerStatus, Topics
from .ratelog import ForeignLogFilter, LogLimiter

log = logging.getLogger(__name__)

AMQTT_VERSION = "amqtt 0.12.1"
ALL_PATCHES: frozenset[str] = frozenset(
    {"keepalive", "retained_leak", "dollar_publish", "socket_leak", "offline_queue"}
)
MAX_OFFLINE_MESSAGES = 10_000
"""QoS 1 messages the broker keeps for one disconnected persistent session, at most..."""
MAX_OFFLINE_BYTES = 64 * 2**20
"""... and bytes of them."""
KEEPALIVE_GRACE = 1.5
DENIED_LOG_INTERVAL_S = 10.0
STATUS_EVERY_S = 5.0
"""The broker republishes its status (with its refusal counts) at most this often."""
ACCOUNTS_CHECK_S = 2.0
"""How often the broker looks at the accounts file for removed logins and new roles."""
HASH_THREADS = 2
"""Threads checking password hashes: a flood of logins costs the broker two cores, not all;
logins seen to succeed since the accounts file changed are not hashed again."""
HASH_QUEUE_MAX = 64
"""Logins waiting for a hash check, at most; more are refused (server unavailable) at
once, and their clients retry."""
MAX_SUBSCRIPTIONS = 100
"""Subscriptions one client (other than the balancer) may hold, with accounts."""
SUBSCRIBE_MAX_BYTES = 16_384
"""Largest SUBSCRIBE or UNSUBSCRIBE packet (lbmqtt's parts send a few hundred bytes)."""
CONNECT_TIMEOUT_S = 10.0
"""A new connection must have sent its CONNECT by then, or it is closed."""
TOPIC_SLACK_BYTES = 65_536 + 16
"""What a packet may carry beyond its payload: the topic (at most 64 KiB) and headers."""


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


class PacketTooLarge(AMQTTError):  # type: ignore[misc]
    """A client announced a packet larger than its limit: its connection is closed."""


class _LimitedReader(StreamReaderAdapter):  # type: ignore[misc]
    """amqtt's reader adapter, following the packet framing of everything amqtt reads.

    amqtt reads each fixed header a byte at a time, then the packet's body in one or more
    reads. Following that, this refuses a packet from its header, before a byte of its
    body is buffered, when

    * its remaining length is over ``limit`` (amqtt itself would take 256 MB), or over
      :data:`SUBSCRIBE_MAX_BYTES` for SUBSCRIBE and UNSUBSCRIBE (amqtt checks every
      filter of one packet without yielding: a 2 MB SUBSCRIBE froze it for 11 s);
    * it is a QoS 2 PUBLISH and ``no_qos2`` is set (amqtt holds an unreleased QoS 2
      message forever, before any access check; lbmqtt never uses QoS 2);
    * the CONNECT has not arrived by ``connect_deadline`` (amqtt waits for it forever).

    A refused connection is aborted: the client's will fires.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        limit: int,
        transport: Any,
        on_refuse: Callable[[str, Exception], None],
    ):
        super().__init__(reader)
        self.limit = limit
        self.no_qos2 = False
        self._transport = transport
        self._on_refuse = on_refuse
        self.connect_deadline: float | None = asyncio.get_running_loop().time() + CONNECT_TIMEOUT_S
        # framing: "head" (next byte starts a packet), "length" (in its remaining length),
        # "body" (so many bytes of the body still to come)
        self._state = "head"
        self._type = 0
        self._length = 0
        self._shift = 1
        self._body = 0

    def _refuse(self, exc: Exception) -> None:
        peer = self._transport.get_extra_info("peername")
        self._transport.abort()
        self._on_refuse(str(peer), exc)

    async def read(self, n: int = -1) -> bytes:
        if n > self.limit or (self._state == "body" and n > self._body):
            # (the second: amqtt reads past the length the packet announced: malformed)
            exc = PacketTooLarge(
                f"a read of {n} bytes; the limit is {self.limit}, the "
                f"packet has {self._body if self._state == 'body' else 0} "
                f"left"
            )
            self._refuse(exc)
            raise exc
        if self.connect_deadline is None:
            data: bytes = await super().read(n)
        else:
            remaining = self.connect_deadline - asyncio.get_running_loop().time()
            try:
                data = await asyncio.wait_for(super().read(n), max(0.0, remaining))
            except TimeoutError:
                self._refuse(TimeoutError(f"no CONNECT within {CONNECT_TIMEOUT_S:g} s"))
                raise NoDataError(f"no CONNECT within {CONNECT_TIMEOUT_S:g} s") from None
        self._follow(data)
        return data

    def _follow(self, data: bytes) -> None:
        # (amqtt reads a header a byte at a time, then the body in one piece: those two
        # cases first, as this runs for every read of every connection)
        if self._state == "body":
            n = len(data)
            if n < self._body:
                self._body -= n
                return
            rest, self._body, self._state = n - self._body, 0, "head"
            if rest:
                self._follow(data[n - rest :])
            return
        for i, byte in enumerate(data):
            if self._state == "body":
                self._follow(data[i:])
                return
            if self._state == "head":
                self._type, self._length, self._shift = byte, 0, 1
                self._state = "length"
                if self.no_qos2 and byte >> 4 == 3 and (byte >> 1) & 3 == 2:
                    exc = PacketTooLarge("a QoS 2 PUBLISH: this broker takes QoS 0 and 1")
                    self._refuse(exc)
                    raise exc
                continue
            self._length += (byte & 0x7F) * self._shift
            self._shift *= 128
            if byte & 0x80:
                continue
            cap = SUBSCRIBE_MAX_BYTES if self._type >> 4 in (8, 10) else self.limit
            if self._length > cap:
                exc = PacketTooLarge(
                    f"a packet of type {self._type >> 4} announcing "
                    f"{self._length} bytes, the limit is {cap}"
                )
                self._refuse(exc)
                raise exc
            self._body = self._length
            self._state = "body" if self._body else "head"


class _ClosingStreamWriter(StreamWriterAdapter):  # type: ignore[misc]
    """amqtt's writer adapter, but the transport is closed even if ``write_eof`` fails."""

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._writer.close()


class PatchedBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with lbmqtt's patches (see the module docstring)."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        patches: Iterable[str] = ALL_PATCHES,
        guard: AccessGuard | None = None,
        max_packet_bytes: int = 256 * 2**20,
        client_max_packet_bytes: int | None = None,
    ):
        super().__init__(config)
        unknown = set(patches) - ALL_PATCHES
        if unknown:
            raise ValueError(f"unknown broker patches: {sorted(unknown)}")
        self.patches = frozenset(patches)
        self.guard = guard
        self.max_packet_bytes = max_packet_bytes
        """Largest packet the balancer (or, without accounts, anyone) may send."""
        self.client_max_packet_bytes = client_max_packet_bytes or max_packet_bytes
        """Largest packet any other login may send (and anyone before logging in)."""
        self.dropped_dollar_publishes = 0
        self.keepalive_drops = 0
        self.refused_logins = 0
        self.denied = 0
        self.too_large = 0
        self.offline_dropped = 0
        self.connect_timeouts = 0
        self.revoked = 0
        self._denied_log = LogLimiter(log, DENIED_LOG_INTERVAL_S)
        self._hash_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=HASH_THREADS, thread_name_prefix="lbmqtt-login"
        )
        self._hashes_waiting = 0
        self._claims: dict[str, tuple[str, object]] = {}
        self._held: dict[str, set[str]] = {}
        self.transports: set[asyncio.WriteTransport] = set()
        """Every client connection being served (see abort_all)."""

    # -- keepalive (and the login check, with accounts) -------------------------------

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Session]:
        try:
            if self.guard is None:
                handler, session = await super()._initialize_client_session(
                    reader, writer, remote_address, remote_port
                )
            else:
                handler, session = await self._login(reader, writer, remote_address, remote_port)
        except (AMQTTError, MQTTError, NoDataError, OSError) as exc:
            # amqtt closes the socket only for some failed CONNECTs: a first packet that
            # is not a CONNECT left it open and unread, a client gone before its CONNECT
            # ended left it in CLOSE_WAIT until the garbage collector came by; and a reset
            # while refusing a CONNECT (an OSError) escaped the code that frees its
            # connection slot
            with contextlib.suppress(Exception):
                await writer.close()
            if isinstance(exc, OSError):
                raise AMQTTError(
                    f"connection from {remote_address}:{remote_port} lost during its CONNECT: {exc}"
                ) from exc
            raise
        if isinstance(reader, _LimitedReader):
            reader.connect_deadline = None
        if "keepalive" in self.patches and session.keep_alive and session.keep_alive > 0:
            # amqtt's reader loop waits this long for the next packet, then calls
            # handle_read_timeout (a no-op upstream) and keeps waiting forever.
            session.keep_alive = math.ceil(session.keep_alive * KEEPALIVE_GRACE * 10) / 10
            handler.handle_read_timeout = lambda: self._drop_silent_client(handler)
        return handler, session

    async def _login(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Session]:
        """amqtt's session set-up, with the login checked before any session is touched."""
        assert self.guard is not None
        try:
            handler, fresh = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except (MQTTError, NoDataError) as exc:
            raise AMQTTError(f"invalid CONNECT from {remote_address}:{remote_port}: {exc}") from exc
        if isinstance(reader, _LimitedReader):
            reader.connect_deadline = None  # (the hashing below has no deadline)
        login = fresh.username
        role = self.guard.quick_check(login, fresh.password)
        why, code = "", 0
        if role is False:  # hashing takes ~90 ms: in the broker's own two threads
            assert login is not None and fresh.password is not None
            if self._hashes_waiting >= HASH_QUEUE_MAX:
                why, code = "too many logins being checked: try again", SERVER_UNAVAILABLE
                role = None
            else:
                self._hashes_waiting += 1
                try:
                    role = await asyncio.get_running_loop().run_in_executor(
                        self._hash_pool, self.guard.slow_check, login, fresh.password
                    )
                finally:
                    self._hashes_waiting -= 1
        if not code and not role:
            why, code = "unknown login or wrong password", BAD_USERNAME_PASSWORD
        elif role and not code:
            held = self._sessions.get(fresh.client_id)
            claim = self._claims.get(fresh.client_id)
            if (held is not None and held[0].username != login) or (
                claim is not None and claim[0] != login
            ):
                why, code = ("its client id belongs to another login", IDENTIFIER_REJECTED)
            elif fresh.will_flag and not self.guard.may(
                role, "publish", fresh.will_topic or "", login, fresh.client_id
            ):
                why, code = "may not publish its will there", NOT_AUTHORIZED
        if code:
            self.refused_logins += 1
            # (keyed by address, names cut short: both are the client's to choose)
            self._log_denied(
                f"login from {remote_address}",
                f"login {str(login)[:64]!r} from {remote_address} refused: {why}",
            )
            with contextlib.suppress(Exception):
                await ConnackPacket.build(0, code).to_stream(writer)
                await writer.close()
            raise AMQTTError(f"login {str(login)[:64]!r} refused: {why}")
        assert isinstance(role, str) and login is not None
        # the client id is this login's from here (no await since the check above), until
        # the connection ends: two logins racing for one new id cannot both get it
        claim = (login, object())
        self._claims[fresh.client_id] = claim
        fresh.lbmqtt_claim = claim
        if isinstance(reader, _LimitedReader):
            reader.limit = (
                self.max_packet_bytes if role == "balancer" else self.client_max_packet_bytes
            )
            reader.no_qos2 = True
        # amqtt's own session handling from here (Broker._initialize_client_session)
        session = fresh
        account = self.guard.account_key(login)
        if (
            not session.clean_session
            and session.client_id in self._sessions
            and getattr(self._sessions[session.client_id][0], "lbmqtt_account", None) != account
        ):
            # a persistent session kept from before the login's role or password changed:
            # its subscriptions were granted under the old rights
            await self._delete_session(session.client_id)
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            old, _ = self._sessions[session.client_id]
            for attr in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "keep_alive",
                "username",
                "password",
                "lbmqtt_claim",
            ):
                setattr(old, attr, getattr(session, attr))
            session = old
            session.parent = 1
        else:
            session.parent = 0
        session.lbmqtt_role = role
        session.lbmqtt_account = account
        return handler, session

    async def _handle_client_session(  # noqa: PLR0917 (amqtt's signature)
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: Any,
        server: Any,
        listener_name: str,
    ) -> None:
        try:
            await super()._handle_client_session(
                reader, writer, client_session, handler, server, listener_name
            )
        finally:
            claim = getattr(client_session, "lbmqtt_claim", None)
            if claim is not None and self._claims.get(client_session.client_id) is claim:
                del self._claims[client_session.client_id]

    # -- subscriptions (with accounts: bounded; amqtt never forgets an emptied filter) --

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        if self.guard is not None and getattr(session, "lbmqtt_role", None) != "balancer":
            held = self._held.setdefault(session.client_id, set())
            if subscription[0] not in held and len(held) >= MAX_SUBSCRIPTIONS:
                self.denied += 1
                self._log_denied(
                    f"subscriptions {session.username}",
                    f"{session.username!r} ({session.client_id}) holds "
                    f"{MAX_SUBSCRIPTIONS} subscriptions: no more",
                )
                return 0x80
            code: int = await super().add_subscription(subscription, session)
            if code != 0x80:
                held.add(subscription[0])
            return code
        code = await super().add_subscription(subscription, session)
        return code

    async def _handle_unsubscription(
        self, client_session: Session, handler: Any, unsubscribe_waiter: asyncio.Future[Any]
    ) -> None:
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)
        held = self._held.get(client_session.client_id)
        for topic in unsubscribe_waiter.result().topics:
            if held is not None:
                held.discard(topic)
            if not self._subscriptions.get(topic, True):
                del self._subscriptions[topic]  # (amqtt keeps it, and matches every
                # message against it for good: 200k of them cut throughput 180-fold)

    async def _del_all_subscriptions(self, session: Session) -> None:
        await super()._del_all_subscriptions(session)
        self._held.pop(session.client_id, None)

    # -- access rules (with accounts) -------------------------------------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if self.guard is None:
            ok: bool = await super()._topic_filtering(session, topic, action)
            return ok
        if action == Action.RECEIVE:
            return True  # every granted subscription is within the login's reading rights
        role: Role | None = getattr(session, "lbmqtt_role", None)
        verb: Literal["publish", "subscribe"] = (
            "publish" if action == Action.PUBLISH else "subscribe"
        )
        if role is not None and self.guard.may(
            role, verb, topic, session.username or "", session.client_id or ""
        ):
            return True
        self.denied += 1
        self._log_denied(
            f"denied {session.username}",
            f"{session.username!r} ({session.client_id}) may not {verb} {topic[:200]!r}",
        )
        return False

    def _log_denied(self, key: str, what: str) -> None:
        """Log ``what`` at most once per DENIED_LOG_INTERVAL_S per ``key`` (a kind and
        a login or an address: never free text a client chose)."""
        self._denied_log.warning(key, "%s", what)

    def _refuse_connection(self, who: str, exc: Exception) -> None:
        if isinstance(exc, TimeoutError):
            self.connect_timeouts += 1
            self._log_denied(who, f"{exc}: connection closed")
            return
        self.too_large += 1
        self._log_denied(who, f"sent too large a packet ({exc}): connection closed")

    def _drop_silent_client(self, handler: Any) -> None:
        session = handler.session
        client_id = session.client_id if session is not None else "?"
        log.info(
            "client %s silent for %.1f s (1.5 x keep-alive): closing its connection",
            client_id,
            session.keep_alive if session is not None else 0,
        )
        self.keepalive_drops += 1
        self.close_connection(handler)

    def close_connection(self, handler: Any) -> None:
        """End a client's connection as if it had dropped (its will fires)."""
        writer = handler.writer
        transport = getattr(getattr(writer, "_writer", None), "transport", None)
        if transport is not None:
            # abort, not close: a frozen peer may never drain our buffer. The reader then
            # sees EOF, the session ends abnormally and the broker publishes the will.
            transport.abort()
        elif writer is not None:
            self._closing = asyncio.ensure_future(writer.close())

    # -- socket_leak ----------------------------------------------------------------------

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        adapter = (
            _ClosingStreamWriter(writer)
            if "socket_leak" in self.patches
            else StreamWriterAdapter(writer)
        )
        limit = self.max_packet_bytes if self.guard is None else self.client_max_packet_bytes
        limited = _LimitedReader(reader, limit, writer.transport, self._refuse_connection)
        self.transports.add(writer.transport)
        try:
            await self._client_connected(listener_name, limited, adapter)
        finally:
            self.transports.discard(writer.transport)

    def abort_all(self) -> None:
        """Cut every connection still open (amqtt's shutdown leaves those of clients it
        lost track of, zombies among them, to the garbage collector)."""
        for transport in list(self.transports):
            transport.abort()
        self.transports.clear()

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

    # -- offline_queue --------------------------------------------------------------------

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        if "offline_queue" in self.patches:
            queue = target_session.retained_messages
            if queue.empty():  # (drained when it came back: count afresh)
                target_session.lbmqtt_kept_bytes = 0
            kept = getattr(target_session, "lbmqtt_kept_bytes", 0)
            size = len(broadcast.get("data") or b"")
            if queue.qsize() >= MAX_OFFLINE_MESSAGES or kept + size > MAX_OFFLINE_BYTES:
                self.offline_dropped += 1
                self._denied_log.warning(
                    f"offline {target_session.client_id}",
                    "client %s is away with %d messages (%d bytes) kept for it: dropping more",
                    target_session.client_id,
                    queue.qsize(),
                    kept,
                )
                return
            target_session.lbmqtt_kept_bytes = kept + size
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    # -- dollar_publish -------------------------------------------------------------------

    async def _handle_message_delivery(
        self, client_session: Session, handler: Any, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        if "dollar_publish" in self.patches:
            message = wait_deliver.result()
            topic = getattr(message, "topic", None) if message is not None else None
            if message is not None and isinstance(topic, str) and topic.startswith("$"):
                self.dropped_dollar_publishes += 1
                log.info(
                    "client %s published to %r: '$' topics are reserved; dropped",
                    client_session.client_id,
                    topic,
                )
                return True
            if message is not None and (not topic or "#" in topic or "+" in topic):
                log.info(
                    "client %s published to an invalid topic %r: closing its connection",
                    client_session.client_id,
                    topic,
                )
                self.close_connection(handler)
                return True
        if self.guard is not None:
            message = wait_deliver.result()
            packet = getattr(message, "publish_packet", None)
            role = getattr(client_session, "lbmqtt_role", None)
            if (
                message is not None
                and packet is not None
                and packet.retain_flag
                and role is not None
                and not self.guard.may(
                    role,
                    "retain",
                    message.topic,
                    client_session.username or "",
                    client_session.client_id or "",
                )
            ):
                self.denied += 1
                self._log_denied(
                    f"retain {client_session.username}",
                    f"{client_session.username!r} may not retain on "
                    f"{message.topic[:200]!r}: dropped",
                )
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
        guard: accounts and topic rules; None: anonymous, no rules (loopback only).
        tls: a second listener serving TLS (its port: :attr:`tls_port`).
        max_packet_bytes: largest packet from the balancer (without a guard: anyone).
        client_max_packet_bytes: largest packet from any other login.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        patches: Iterable[str] = ALL_PATCHES,
        prefix: str | None = None,
        guard: AccessGuard | None = None,
        tls: TlsListener | None = None,
        max_packet_bytes: int = 256 * 2**20,
        client_max_packet_bytes: int | None = None,
    ):
        self.host = host
        self.requested_port = port
        self.patches = frozenset(patches)
        self.prefix = prefix
        self.guard = guard
        self.tls = tls
        self.max_packet_bytes = max_packet_bytes
        self.client_max_packet_bytes = client_max_packet_bytes
        self.broker: PatchedBroker | None = None
        self.port = 0
        self.tls_port: int | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None

    async def _watch_accounts(self) -> None:
        """Every ACCOUNTS_CHECK_S: if the accounts file changed, end the connections of
        logins that were removed or whose role or password changed (they must log in
        again), and forget their persistent sessions (granted under the old rights)."""
        while True:
            await asyncio.sleep(ACCOUNTS_CHECK_S)
            broker, guard = self.broker, self.guard
            if broker is None or guard is None:
                return
            if not await asyncio.to_thread(guard.refresh):
                continue
            for client_id, (session, handler) in list(broker._sessions.items()):
                was = getattr(session, "lbmqtt_account", None)
                if was is None:
                    continue
                now = guard.account_key(session.username or "")
                if now == was:
                    continue
                what = (
                    "gone"
                    if now is None
                    else (f"a {now[0]}" if now[0] != was[0] else "given a new password")
                )
                broker.revoked += 1
                if session.transitions.state == "connected":
                    log.warning(
                        "login %r is %s now: closing its connection (%s)",
                        session.username,
                        what,
                        client_id,
                    )
                    session.lbmqtt_account = None  # (a resumed session starts afresh)
                    broker.close_connection(handler)
                else:
                    log.warning(
                        "login %r is %s now: forgetting its session %s",
                        session.username,
                        what,
                        client_id,
                    )
                    await broker._delete_session(client_id)

    async def start(self) -> None:
        """Start listening; afterwards :attr:`port` holds the bound port."""
        config = broker_config(
            self.host, self.requested_port, anonymous=self.guard is None, tls=self.tls
        )
        self.broker = PatchedBroker(
            config,
            patches=self.patches,
            guard=self.guard,
            max_packet_bytes=self.max_packet_bytes,
            client_max_packet_bytes=self.client_max_packet_bytes,
        )
        await self.broker.start()
        self.port = bound_port(self.broker)
        if self.guard is not None and self.guard.accounts_file is not None:
            self._watcher = asyncio.create_task(
                self._watch_accounts(), name="lbmqtt-broker-accounts"
            )
        if self.tls is not None:
            self.tls_port = bound_port(self.broker, "tls")
        if self.prefix is not None:
            await self._publish_status()
            self._reporter = asyncio.create_task(
                self._report_refusals(), name="lbmqtt-broker-status"
            )

    def refusals(self) -> dict[str, int]:
        """What the broker refused since it started, by kind (see BrokerStatus)."""
        b = self.broker
        if b is None:
            return {}
        return {
            "logins": b.refused_logins,
            "denied": b.denied,
            "too_large": b.too_large,
            "connect_timeouts": b.connect_timeouts,
            "revoked": b.revoked,
            "offline_dropped": b.offline_dropped,
            "dollar_publishes": b.dropped_dollar_publishes,
        }

    async def _publish_status(self) -> None:
        assert self.broker is not None and self.prefix is not None
        status = BrokerStatus(
            online=True,
            host=self.host,
            port=self.port,
            version=AMQTT_VERSION,
            refused=self.refusals(),
        )
        await self.broker.retain_message(
            None, Topics(self.prefix).broker_status, status.encode(), 1
        )
        # (retain_message stores it; subscribers hear of it at their next subscribe, so
        # tell the ones subscribed now too)
        await self.broker.internal_message_broadcast(
            Topics(self.prefix).broker_status, status.encode(), 1
        )

    async def _report_refusals(self) -> None:
        sent = self.refusals()
        while self.broker is not None:
            await asyncio.sleep(STATUS_EVERY_S)
            now = self.refusals()
            if now != sent:
                sent = now
                await self._publish_status()

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        if self.broker is not None:
            self.broker._hash_pool.shutdown(wait=False, cancel_futures=True)
        for task in (self._watcher, self._reporter):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._reporter = None
        if self.broker is not None:
            await self.broker.shutdown()
            self.broker.abort_all()
            await asyncio.sleep(0)  # (the aborted transports close on the next turn)
            self.broker = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def bound_port(broker: Broker, listener: str = "default") -> int:
    """The TCP port one of amqtt's listeners is bound to.

    amqtt keeps it only in a private attribute; this is the one place that reads it.
    """
    server = broker._servers[listener]
    port: int = server.instance.sockets[0].getsockname()[1]
    return port


def embedded_broker(settings: Settings) -> EmbeddedBroker:
    """The embedded broker these settings describe, refusing an unsafe one.

    Raises:
        ConfigError: it would listen beyond loopback without accounts (anyone on the LAN
            could then read and cancel every task), or the accounts file is bad.
    """
    extra = {name: (check_role(role), pw) for name, (role, pw) in service_accounts().items()}
    guard = None
    if settings.auth_file or extra:
        guard = AccessGuard(settings.topic_prefix, settings.auth_file, extra=extra)
        for name in extra:
            if guard.in_file(name):
                log.warning(
                    "account %r of the accounts file is taken by a part `lbmqtt up` "
                    "started (its node has that name): that account cannot log in "
                    "while `up` runs",
                    name,
                )
    host = settings.bind_host
    tls = None
    if settings.tls_listener:
        assert settings.broker_tls_cert and settings.broker_tls_key
        for path in (settings.broker_tls_cert, settings.broker_tls_key):
            if not os.path.isfile(path):
                raise ConfigError(f"BROKER_TLS_CERT / BROKER_TLS_KEY: no such file {path}")
        tls = TlsListener(
            host, settings.broker_tls_port, settings.broker_tls_cert, settings.broker_tls_key
        )
        host = "127.0.0.1"  # plain MQTT only for the parts on this machine
    if guard is None and not (is_loopback(host) and (tls is None or is_loopback(tls.host))):
        where = tls.host if tls is not None else host
        raise ConfigError(
            f"refusing to listen on {where} without accounts: anyone on the network could "
            f"then read, submit and cancel every task. Create accounts and point AUTH_FILE "
            f"at them, e.g.\n  lbmqtt user add alice --role user --file accounts\n  lbmqtt "
            f'user add gpu-box --role node --file accounts\nthen set "AUTH_FILE": '
            f'"accounts" in parameters.json (or LBMQTT_AUTH_FILE=accounts); or listen on '
            f'127.0.0.1 only (see README, "Running on a shared LAN")'
        )
    return EmbeddedBroker(
        host,
        settings.broker_port,
        prefix=settings.topic_prefix,
        guard=guard,
        tls=tls,
        max_packet_bytes=settings.broker_max_packet_bytes,
        client_max_packet_bytes=settings.max_payload_bytes + TOPIC_SLACK_BYTES,
    )


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
            if not line.startswith(("password_file", "acl_file", "persistence"))
        )
        + "\n"
    )


def quiet_amqtt_logs(level: int) -> None:
    """amqtt logs every connection at INFO; keep it at WARNING unless debugging, and let
    through at most one line per kind every 10 s (it logs one per refused or broken
    connection, so a client could flood the log)."""
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(
            logging.DEBUG if level <= logging.DEBUG else logging.WARNING
        )
    if level > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, ForeignLogFilter) for f in handler.filters):
                handler.addFilter(ForeignLogFilter())


async def serve(
    settings: Settings, *, ready_fd: int | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run the embedded broker until SIGINT/SIGTERM (or ``stop`` is set).

    Prints ``lbmqtt broker: listening on HOST:PORT`` and, with ``ready_fd``, writes one
    JSON line ``{"host": ..., "port": ...}`` to that file descriptor once listening.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    broker = embedded_broker(settings)
    host = broker.host
    amqtt_log = logging.getLogger("amqtt.broker")
    level = amqtt_log.level
    amqtt_log.setLevel(logging.CRITICAL)  # it logs a traceback; we say it in one line
    try:
        await broker.start()
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise OSError(
            f"cannot listen on {host}:{settings.broker_port} ({cause}): is another broker "
            f"or `lbmqtt up` running there? --broker-port 0 picks a free port"
        ) from exc
    finally:
        amqtt_log.setLevel(level)
    print(f"lbmqtt broker: listening on {host}:{broker.port} ({AMQTT_VERSION})", flush=True)
    if broker.tls is not None:
        print(f"lbmqtt broker: TLS on {broker.tls.host}:{broker.tls_port}", flush=True)
    if broker.guard is not None:
        print(
            "lbmqtt broker: logins required"
            + (f" (accounts: {settings.auth_file})" if settings.auth_file else ""),
            flush=True,
        )
    advertiser = None
    if settings.broker_advertise:
        from .discovery import Advertiser

        advertiser = (
            Advertiser(broker.tls.host, broker.tls_port or 0, settings.topic_prefix)
            if broker.tls is not None
            else Advertiser(host, broker.port, settings.topic_prefix)
        )
        try:
            addresses = await asyncio.to_thread(advertiser.start)
        except Exception as exc:  # no multicast here: the broker serves all the same
            log.warning("could not advertise the broker by mDNS: %s", exc)
            advertiser = None
        else:
            if addresses:
                print(
                    f"lbmqtt broker: advertised by mDNS on {', '.join(addresses)} "
                    f'(BROKER_HOST "auto" finds it)',
                    flush=True,
                )
    if ready_fd is not None:
        with os.fdopen(ready_fd, "w") as f:
            f.write(
                json.dumps({"host": host, "port": broker.port, "tls_port": broker.tls_port}) + "\n"
            )
    try:
        await stop.wait()
    finally:
        if advertiser is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(advertiser.close)
        await broker.stop()
        print("lbmqtt broker: stopped", flush=True)
