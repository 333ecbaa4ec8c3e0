"""lbmqtt's patches for amqtt 0.12.1's bugs, as one Broker subclass: :class:`PatchedBroker`.

Each patch named in :data:`ALL_PATCHES` can be switched off (``patches=``) so that the
tests (tests/test_broker_patches.py) can show the bug it fixes on a broker without it;
they are overrides of one subclass rather than changes to amqtt's classes, so a patched
and an unpatched broker can run side by side in one process. The patches that are part of
every broker are listed last. amqtt 0.12.1 is pinned exactly (pyproject.toml): these
overrides reach its internals.

Patches (NOTES.md, "Bugs to work around"):

``keepalive``
    amqtt never drops a client that stops talking (Yakifo/amqtt#308): the read timeout
    handler is a no-op, so a frozen or cut-off client stays "connected" and its last will
    never fires. We close the connection after 1.5 x its keep-alive of silence (MQTT 3.1.1
    section 3.1.2.10), which ends the session abnormally and publishes the will.
``retained_leak``
    On every CONNECT amqtt replays the retained messages of every filter that *any* client
    holds to the new client, leaking other users' retained task states and duplicating
    messages. We replay retained messages only for filters the session itself holds (no
    upstream issue found).
``dollar_publish``
    A PUBLISH to a ``$`` topic (or with a wildcard / empty topic) breaks amqtt's per-client
    loop while leaving the connection open: later publishes are dropped, SUBSCRIBE is
    never answered and the will never fires. We drop ``$`` publishes and keep serving the
    client; a wildcard or empty publish topic is a protocol error and closes the
    connection properly (so the will fires). No upstream issue found.
``offline_queue``
    amqtt keeps every QoS 1 message for a disconnected persistent session (a login with
    ``clean_session`` false) in an unbounded queue: a client that subscribes and never
    comes back makes the broker grow without end. We keep at most
    :data:`MAX_OFFLINE_MESSAGES` (and :data:`MAX_OFFLINE_BYTES`) per session and drop (and
    count) the rest. Upstream: Yakifo/amqtt#14 ("inactive client sessions grow RAM forever").
``socket_leak``
    When a client disconnects, amqtt closes its side with ``drain(); write_eof(); close()``.
    If a message to the client was in flight as it left (a client that publishes, then
    says DISCONNECT and closes), the peer's reset makes ``write_eof`` fail with ENOTCONN,
    ``close`` is never called and the socket stays open until the garbage collector finds
    it: a broker serving short-lived clients leaks a file descriptor per such client. We
    always close it (:class:`~lbmqtt.broker.streams.ClosingStreamWriter`).
``clean_takeover``
    A clean-session CONNECT with the client id of a connected client deletes that client's
    session but leaves its connection open (MQTT-3.1.4-2 says the server must close it):
    two connections share one id, the older one deaf, and its will can still fire later
    (by keep-alive) over the newer one's retained state, e.g. mark a node that
    reconnected after a half-open connection offline. amqtt's own take-over code runs only
    for persistent sessions. We close the older connection and drop its will (the client
    is back), as Mosquitto does. No upstream issue found.
``direct_qos0``
    (Speed, not a bug.) amqtt hands every message to a broadcast queue, then one task
    per subscriber that builds and writes the packet: ~0.45 ms of broker CPU per message
    crossing on these machines. A message whose subscribers all hold QoS 0 subscriptions
    is written to their sockets at once, one packet built for all, when it can go in
    order: nothing waits in the queue or in a subscriber's task before it, no
    subscriber's socket is backed up, and no amqtt plugin has receive rules to ask
    (lbmqtt's guard has none). Else amqtt's
    path, as before. The filters a topic matches are kept until a filter is added or
    dropped (amqtt matches each message against every filter held). Same-run A/B: the
    broker's CPU fell from ~57 % to ~49 % in ``bench/run.py latency`` and from ~20 % to
    ~15.5 % in ``throughput``; at rest with 200 nodes from ~6.8 % to ~5.1 %
    (``bench/nodes.py``), and to ~4.1 % with the cache of matches.
``inline_qos0``
    (Speed, and three bugs of amqtt's reader loop.) amqtt reads each packet under a
    ``wait_for`` (a task and a timer per packet on Python 3.11), makes a task to handle
    it, and passes a PUBLISH through the session's queue to the per-client loop, which
    wakes through ``asyncio.wait`` and makes a task to wait for the next: ~5 tasks per
    message. lbmqtt's reader loop (:mod:`lbmqtt.broker.reader`) watches the keep-alive
    with one timer per period instead, and hands a QoS 0 PUBLISH to direct_qos0's writes
    as it is read (a retained one is then kept as amqtt keeps it), when nothing of the same
    client is ahead of it: no task of its packets unfinished, nothing in its queues, its
    per-client loop idle, and no plugin that sees each packet or message (or, for a
    retained one, each message kept; else amqtt's path, as before). Same order, same access
    rules (for a retained one, the right to retain too). It also has none of three bugs of
    amqtt's loop (see that module): a DISCONNECT or EOF read before ``start()`` returned
    was lost (a zombie session), a client that kept sending after a protocol violation was
    never cut off (Python 3.11's ``wait_for``), and an UNSUBSCRIBE then SUBSCRIBE read
    together ended unsubscribed (:mod:`lbmqtt.broker.inline`).
``connect_close`` (part of every broker, not optional)
    amqtt closes the socket for only some failed CONNECTs: a first packet other than
    CONNECT left the connection open and never read again, and a client that left before
    its CONNECT ended left a socket in CLOSE_WAIT until the garbage collector ran, and a
    client resetting the connection as its CONNECT was refused never gave back its
    connection slot. We close the socket whenever the CONNECT fails, and free the slot.
``empty_filters`` (part of every broker, not optional)
    amqtt keeps a topic filter nobody holds any more after an UNSUBSCRIBE and matches
    every message against it for good (200k of them cut throughput 180-fold). We forget it.
``packet_limits`` (part of every broker, not optional)
    No maximum packet size, no CONNECT deadline: see :mod:`lbmqtt.broker.streams`.
``takeover`` (part of the guard, not optional)
    A CONNECT could take over another login's client id: see :mod:`lbmqtt.broker.auth`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterable
from typing import Any, cast

from amqtt.adapters import StreamWriterAdapter
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.session import Session

from ..access import AccessGuard
from .auth import GuardedBroker
from .inline import InlineReading
from .reader import reader_loop
from .streams import ClosingStreamWriter, LimitedReader

log = logging.getLogger(__name__)

ALL_PATCHES: frozenset[str] = frozenset(
    {
        "keepalive",
        "retained_leak",
        "dollar_publish",
        "socket_leak",
        "offline_queue",
        "clean_takeover",
        "direct_qos0",
        "inline_qos0",
    }
)
DIRECT_MAX_BUFFER = 64 * 1024
"""direct_qos0 writes to a subscriber only while its socket buffer holds less than this."""


MATCH_CACHE = 4096
"""Topics whose matching filters direct_qos0 remembers (then it starts again)..."""
MATCH_CACHE_TOPIC = 256
"""...if they are no longer than this."""


class _Filters(dict[str, Any]):
    """amqtt's filter -> subscribers dict, with a version that changes whenever a filter
    is added or dropped (the key of a cache of matches)."""

    version = 0

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self:
            self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.version += 1
        super().__delitem__(key)

    def clear(self) -> None:
        self.version += 1
        super().clear()

    def pop(self, key: str, *default: Any) -> Any:
        self.version += 1
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, Any]:
        self.version += 1
        return super().popitem()

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self.version += 1
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.version += 1
        super().update(*args, **kwargs)


def publish_packet(topic: str, data: bytes | bytearray) -> bytes:
    """An MQTT 3.1.1 PUBLISH at QoS 0, not retained (section 3.3)."""
    name = topic.encode()
    rest = len(name) + 2 + len(data)
    head = bytearray([0x30])
    while True:
        byte, rest = rest % 128, rest // 128
        head.append(byte | 0x80 if rest else byte)
        if not rest:
            break
    return bytes(head) + len(name).to_bytes(2, "big") + name + bytes(data)


MAX_OFFLINE_MESSAGES = 10_000
"""QoS 1 messages the broker keeps for one disconnected persistent session, at most..."""
MAX_OFFLINE_BYTES = 64 * 2**20
"""... and bytes of them."""
KEEPALIVE_GRACE = 1.5


class PatchedBroker(InlineReading, GuardedBroker):
    """amqtt's Broker with lbmqtt's patches (see the module docstring) and, with a
    ``guard``, its logins and access rules (:class:`~lbmqtt.broker.auth.GuardedBroker`)."""

    _subscriptions: dict[str, list[tuple[Session, int]]]

    def __init__(
        self,
        config: dict[str, Any],
        *,
        patches: Iterable[str] = ALL_PATCHES,
        guard: AccessGuard | None = None,
        max_packet_bytes: int = 256 * 2**20,
        client_max_packet_bytes: int | None = None,
    ):
        super().__init__(
            config,
            guard=guard,
            max_packet_bytes=max_packet_bytes,
            client_max_packet_bytes=client_max_packet_bytes,
        )
        unknown = set(patches) - ALL_PATCHES
        if unknown:
            raise ValueError(f"unknown broker patches: {sorted(unknown)}")
        self.patches = frozenset(patches)
        self.dropped_dollar_publishes = 0
        self.keepalive_drops = 0
        self.too_large = 0
        self.offline_dropped = 0
        self.connect_timeouts = 0
        self._subscriptions = _Filters(self._subscriptions)
        self._matched: dict[str, list[str]] = {}
        self._matched_version = -1
        self._replaying = 0
        """Retained messages being replayed to a subscriber (their tasks made, maybe not run)."""
        self.direct_deliveries = 0
        self.inline_deliveries = 0
        """Of those, messages delivered by the reader as it read them (inline_qos0)."""
        self._queued = 0
        """Messages put in amqtt's broadcast queue and not yet handed to their tasks."""
        self.transports: set[asyncio.WriteTransport] = set()
        """Every client connection being served (see abort_all)."""

    # -- keepalive, connect_close -------------------------------------------------------

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Session]:
        try:
            handler, session = await super()._initialize_client_session(
                reader, writer, remote_address, remote_port
            )
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
        if isinstance(reader, LimitedReader):
            reader.connect_deadline = None
        if "keepalive" in self.patches and session.keep_alive and session.keep_alive > 0:
            # amqtt's reader loop waits this long for the next packet, then calls
            # handle_read_timeout (a no-op upstream) and keeps waiting forever.
            session.keep_alive = math.ceil(session.keep_alive * KEEPALIVE_GRACE * 10) / 10
            handler.handle_read_timeout = lambda: self._drop_silent_client(handler)
        if "inline_qos0" in self.patches and isinstance(reader, LimitedReader):
            self._keep_an_early_end(handler)
            handler.lbmqtt_changes = asyncio.Queue()
            handler._reader_loop = lambda: reader_loop(handler, self._publish_inline)
        return handler, session

    async def _delete_session(self, client_id: str) -> None:
        held = self._sessions.get(client_id)
        await super()._delete_session(client_id)
        if "clean_takeover" not in self.patches or held is None:
            return
        old, handler = held
        if handler is not None and old.transitions.is_connected():
            # (clean_takeover) the client connected again: its older connection goes, and
            # its will with it, before the new one is served
            log.info("client %s connected again: closing its older connection", client_id)
            old.will_flag = False
            await handler.stop()

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

    # -- empty_filters ------------------------------------------------------------------

    async def _handle_unsubscription(
        self, client_session: Session, handler: Any, unsubscribe_waiter: asyncio.Future[Any]
    ) -> None:
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)
        for topic in unsubscribe_waiter.result().topics:
            if not self._subscriptions.get(topic, True):
                del self._subscriptions[topic]  # (amqtt keeps it, and matches every
                # message against it for good: 200k of them cut throughput 180-fold)

    # -- socket_leak ----------------------------------------------------------------------

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        adapter = (
            ClosingStreamWriter(writer)
            if "socket_leak" in self.patches
            else StreamWriterAdapter(writer)
        )
        limit = self.max_packet_bytes if self.guard is None else self.client_max_packet_bytes
        limited = LimitedReader(reader, limit, writer.transport, self._refuse_connection)
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
        self._replaying += 1  # (direct_qos0 waits: a live message must not overtake it)
        try:
            await super()._publish_retained_messages_for_subscription(subscription, session)
        finally:
            self._replaying -= 1

    async def _publish_session_retained_messages(self, session: Session) -> None:
        self._replaying += 1
        try:
            await super()._publish_session_retained_messages(session)
        finally:
            self._replaying -= 1

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

    # -- direct_qos0 -----------------------------------------------------------------------

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        if force_qos is None and topic and data is not None and self._send_direct(topic, data):
            return
        self._queued += 1
        await super()._broadcast_message(session, topic, data, force_qos)

    def _send_direct(self, topic: str, data: bytes | bytearray) -> bool:
        """direct_qos0 for one message, if nothing waits in amqtt's broadcast queue before
        it (order) and :meth:`_deliver_now` can write it: True once it is written."""
        if (
            "direct_qos0" in self.patches
            and not self._queued
            and self._broadcast_queue.empty()
            and self._deliver_now(topic, data)
        ):
            self.direct_deliveries += 1
            return True
        return False

    async def _run_broadcast(self, running_tasks: Any) -> None:
        try:
            await super()._run_broadcast(running_tasks)
        finally:
            self._queued = max(0, self._queued - 1)

    def _deliver_now(self, topic: str, data: bytes | bytearray) -> bool:
        """Write a message to every subscriber now, if it can go without amqtt's
        broadcast queue and a task per subscriber: only QoS 0 subscribers, nothing
        queued before it (order), no receive rules to ask (async plugins) and every
        subscriber's socket free to take it. False (nothing written): the queue, then."""
        plugins = self.plugins_manager
        if self.guard is None and getattr(plugins, "_topic_plugins", True):
            return False  # (receive rules of amqtt plugins: async; lbmqtt's guard: none)
        callbacks = getattr(plugins, "_event_plugin_callbacks", None)
        if callbacks is None or MQTTEvents.PACKET_SENT in callbacks:
            return False  # (a plugin that sees each packet sent: amqtt's path tells it)
        if self._replaying or any(not t.done() for t in self._tasks_queue):
            return False
        writers = []
        subs = self._subscriptions
        for k_filter in self._filters_matching(topic):
            for target, sub_qos in subs[k_filter]:
                if sub_qos:
                    return False
                if target.transitions.state != "connected":
                    continue
                handler = self._get_handler(target)
                writer = getattr(handler, "writer", None)
                if handler is None or writer is None:
                    continue
                if handler._write_lock.locked():
                    return False
                transport = getattr(getattr(writer, "_writer", None), "transport", None)
                if (
                    transport is None  # (not a stream: a websocket, say)
                    or transport.is_closing()
                    or transport.get_write_buffer_size() > DIRECT_MAX_BUFFER
                ):
                    return False
                writers.append(writer)
        if writers:
            packet = publish_packet(topic, data)
            for w in writers:
                w.write(packet)
        return True

    def _filters_matching(self, topic: str) -> list[str]:
        """The subscription filters ``topic`` matches, from a cache that a new or a
        dropped filter empties (amqtt matches a message against every filter held)."""
        subs = cast(_Filters, self._subscriptions)
        if self._matched_version != subs.version:
            self._matched.clear()
            self._matched_version = subs.version
        found = self._matched.get(topic)
        if found is None:
            found = [f for f in subs if self._matches(topic, f)]
            if len(topic) <= MATCH_CACHE_TOPIC:  # (bounded: topics may be long without a guard)
                if len(self._matched) >= MATCH_CACHE:
                    self._matched.clear()
                self._matched[topic] = found
        return found

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
        result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return result
