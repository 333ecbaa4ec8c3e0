"""``inline_qos0``: amqtt's per-connection reader loop, lighter, for the patched broker.

amqtt 0.12.1 reads each packet under its own ``asyncio.wait_for`` (on Python 3.11 a task
and a timer per packet, for the keep-alive), parses it through a chain of coroutines,
then makes a task to handle it; a PUBLISH then goes through the session's queue to the
broker's per-client loop, which wakes through ``asyncio.wait`` on four futures and makes a
new task to wait for the next one: about five tasks per message, most of the broker's
CPU for a message.

:func:`reader_loop` does what amqtt's loop does, packet for packet, but:

* a DISCONNECT or an EOF it reads before ``handler.start()`` has returned is not lost
  (:meth:`InlineReading._keep_an_early_end
  <lbmqtt.broker.inline.InlineReading._keep_an_early_end>` keeps it for the
  future start() makes only at its end; amqtt's loop, slowed by the task of its
  ``wait_for``, mostly read later, and when it did not the session stayed "connected"
  for good, its will never sent);
* the keep-alive is watched by one timer per keep-alive period (:class:`Silence`), with
  amqtt's rule (the time spent waiting for the next packet's header), and no
  ``wait_for``, which on Python 3.11 swallows a cancellation that meets a finished read
  (CPython gh-86296): a client that kept sending after a DISCONNECT or a protocol
  violation was never cut off;
* a PUBLISH is read as one body and parsed in one function (:func:`parse_publish`), with
  amqtt's reading of the topic (invalid UTF-8 included) and the same packet object for
  amqtt's handlers; one too short for what its header announces, or with a wildcard in
  its topic, closes the connection (MQTT-4.8.0-1, as amqtt's reads past its end did);
* SUBSCRIBE and UNSUBSCRIBE go, in the order read, to one queue, ``handler.lbmqtt_changes``
  (amqtt keeps one of each, and applies a SUBSCRIBE first when both have one ready);
* a QoS 0 PUBLISH (retained or not) is handed to ``deliver`` as soon as it is read, when
  nothing of the same client is still ahead of it (:meth:`InlineReading._publish_inline
  <lbmqtt.broker.inline.InlineReading._publish_inline>` decides, and may decline: then
  amqtt's path, as before).

Every other packet, and any PUBLISH that ``deliver`` declines, goes amqtt's way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

from amqtt.codecs_amqtt import read_or_raise
from amqtt.errors import AMQTTError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RESERVED_0,
    RESERVED_15,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import Subscription, UnSubscription
from amqtt.mqtt.publish import PublishPacket, PublishPayload, PublishVariableHeader

log = logging.getLogger(__name__)

_HANDLERS = {
    CONNACK: "handle_connack",
    SUBACK: "handle_suback",
    UNSUBACK: "handle_unsuback",
    PUBACK: "handle_puback",
    PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel",
    PUBCOMP: "handle_pubcomp",
    PINGREQ: "handle_pingreq",
    PINGRESP: "handle_pingresp",
    PUBLISH: "handle_publish",
    DISCONNECT: "handle_disconnect",
}
"""amqtt's handler method for each packet type it serves, in a task (CONNECT is awaited;
SUBSCRIBE and UNSUBSCRIBE go to ``handler.lbmqtt_changes``)."""

Deliver = Callable[[Any, str, bytes, "collections.deque[asyncio.Task[None]]", bool], bool]
"""``deliver(handler, topic, data, running_tasks, retain)``: True if it delivered the QoS 0
message (and, ``retain``, retained it: nothing more to do), False to leave it to amqtt's
path."""


class MalformedPublish(ValueError):
    """A PUBLISH whose body is too short for what its header announces, or whose topic
    holds a wildcard: a protocol violation, so its connection is closed (MQTT-4.8.0-1)
    and its will fires."""


class Silence:
    """The keep-alive watch: ``on_timeout`` once the connection has waited ``seconds`` for
    the next packet's header (amqtt's ``wait_for`` rule), with one timer per period rather
    than a task and a timer per packet."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, seconds: float, on_timeout: Callable[[], None]
    ):
        self._loop = loop
        self._seconds = seconds
        self._on_timeout = on_timeout
        self.since: float | None = loop.time()
        """When the wait for the next header began (None: a packet is being read)."""
        self._timer = loop.call_at(self.since + seconds, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        due = now + self._seconds
        if self.since is not None:
            if now - self.since >= self._seconds:
                self.since = now  # (amqtt waits a whole period again after a timeout)
                try:
                    self._on_timeout()
                except Exception:  # (a timer callback: nothing above to catch it)
                    log.exception("keep-alive timeout handler failed")
            else:
                due = self.since + self._seconds
        self._timer = self._loop.call_at(due, self._check)

    def cancel(self) -> None:
        self._timer.cancel()


def parse_publish(fixed_header: MQTTFixedHeader, body: bytes) -> tuple[str, int | None, bytes]:
    """A PUBLISH body's topic, packet id (None at QoS 0) and payload, read as amqtt reads
    them (a topic that is not UTF-8 becomes ``str()`` of its bytes). MalformedPublish if
    the body is too short for what its header announces."""
    size = len(body)
    if size < 2:
        raise MalformedPublish(f"a PUBLISH of {size} bytes: no room for its topic")
    end = 2 + int.from_bytes(body[:2], "big")
    packet_id = None
    pos = end
    if (fixed_header.flags >> 1) & 0x03:
        pos = end + 2
        if size < pos:
            raise MalformedPublish(
                f"a PUBLISH of {size} bytes: no room for its topic and packet id"
            )
        packet_id = int.from_bytes(body[end:pos], "big")
    elif size < end:
        raise MalformedPublish(f"a PUBLISH of {size} bytes: no room for its topic")
    raw = body[2:end]
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError:
        topic = str(raw)  # (amqtt's decode_string does this)
    return topic, packet_id, body[pos:]


YIELD_EVERY = 64
"""Packets read in a row before the loop lets other connections' work run (packets
already buffered are read without waiting)."""
AHEAD_MAX = 32
"""Messages of one client waiting in its session's queue for the per-client loop before
the reader stops reading from that client, until half have gone (the rest waits in the
socket: a client that floods is slowed down, not buffered in the broker)..."""
AHEAD_RECHECK_S = 1.0
"""...or this long has passed, to look again (the queue emptied some other way, or the
per-client loop ended)."""


async def reader_loop(handler: Any, deliver: Deliver) -> None:
    """amqtt's ``ProtocolHandler._reader_loop`` for ``handler``, with the changes in the
    module docstring. It ends as amqtt's does: connection closed, handler stopped."""
    session = handler.session
    if session is None:
        raise AMQTTError("Session is not initialized.")
    if not handler._reader_ready:
        raise ProtocolHandlerError("Reader ready is not initialized.")
    loop = asyncio.get_running_loop()
    running_tasks: collections.deque[asyncio.Task[None]] = collections.deque()
    keepalive = session.keep_alive if session.keep_alive and session.keep_alive > 0 else None
    silence = Silence(loop, keepalive, handler.handle_read_timeout) if keepalive else None
    plugins = handler.plugins_manager
    changes: asyncio.Queue[tuple[int, Any]] = handler.lbmqtt_changes
    ahead: asyncio.Queue[Any] = session.delivered_message_queue
    in_a_row = 0
    try:
        while True:
            try:
                handler._reader_ready.set()
                in_a_row += 1
                if in_a_row >= YIELD_EVERY:
                    in_a_row = 0
                    await asyncio.sleep(0)
                while (
                    ahead.qsize() >= AHEAD_MAX
                    and getattr(handler, "lbmqtt_waiters", None) is not None  # (its loop runs)
                ):
                    drained: asyncio.Future[None] = loop.create_future()
                    handler.lbmqtt_drained = drained  # (InlineReading._client_message_loop)
                    await asyncio.wait((drained,), timeout=AHEAD_RECHECK_S)
                while running_tasks and running_tasks[0].done():
                    running_tasks.popleft()
                reader = handler.reader
                if reader is None:
                    log.warning("Reader is not initialized!")
                    break
                if silence is not None:
                    silence.since = loop.time()
                fixed_header = await MQTTFixedHeader.from_stream(reader)
                if silence is not None:
                    silence.since = None
                if not fixed_header:
                    break  # (EOF)
                kind = fixed_header.packet_type
                if kind in (RESERVED_0, RESERVED_15):
                    log.warning(
                        "%s sent a reserved packet type: closing its connection",
                        session.client_id,
                    )
                    await handler.handle_connection_closed()
                    continue
                if kind == PUBLISH:
                    body = await read_or_raise(reader, fixed_header.remaining_length)
                    topic, packet_id, data = parse_publish(fixed_header, body)
                    if (
                        fixed_header.flags <= 1  # (QoS 0, not DUP; retained or not)
                        and deliver(handler, topic, data, running_tasks, fixed_header.flags == 1)
                    ):
                        continue
                    try:
                        header = PublishVariableHeader(topic, packet_id)
                    except MQTTError as e:  # (a wildcard in its topic: MQTT-3.3.2-2)
                        raise MalformedPublish(str(e)) from None
                    packet: Any = PublishPacket(fixed_header, header, PublishPayload(data))
                else:
                    packet = await packet_class(fixed_header).from_stream(
                        reader, fixed_header=fixed_header
                    )
                await plugins.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=session)
                if kind == CONNECT:
                    await handler.handle_connect(packet)
                    continue
                if kind in (SUBSCRIBE, UNSUBSCRIBE):
                    # (one queue, in the order read: InlineReading._client_message_loop)
                    if packet.variable_header is None or packet.payload is None:
                        raise MQTTError(f"a packet of type {kind} without its header or payload")
                    change = Subscription if kind == SUBSCRIBE else UnSubscription
                    changes.put_nowait(
                        (kind, change(packet.variable_header.packet_id, packet.payload.topics))
                    )
                    continue
                name = _HANDLERS.get(kind)
                if name is None:
                    log.warning("%s sent an unhandled packet type %d", session.client_id, kind)
                    continue
                running_tasks.append(asyncio.create_task(getattr(handler, name)(packet)))
            except MalformedPublish as e:
                log.info("%s sent %s: closing its connection", session.client_id, e)
                break
            except MQTTError:
                log.debug("message discarded")
            except asyncio.CancelledError:
                break
            except NoDataError:
                pass
            except Exception as e:  # (as amqtt: any other error ends the connection)
                log.warning("%s unhandled exception in the reader: %r", type(handler).__name__, e)
                break
    finally:
        if silence is not None:
            silence.cancel()
    while running_tasks:
        running_tasks.popleft().cancel()
    await handler.handle_connection_closed()
    handler._reader_stopped.set()
    await handler.stop()


__all__ = [
    "AHEAD_MAX",
    "AHEAD_RECHECK_S",
    "YIELD_EVERY",
    "Deliver",
    "MalformedPublish",
    "Silence",
    "parse_publish",
    "reader_loop",
]
