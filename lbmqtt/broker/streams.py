"""The stream adapters the patched broker serves every connection through.

``packet_limits`` (part of every broker, not optional)
    amqtt has no maximum packet size (a client can make it buffer up to 256 MB), checks
    every filter of a SUBSCRIBE without yielding (a 2 MB SUBSCRIBE froze it for 11 s),
    holds an unreleased QoS 2 message forever before any access check, and waits for a
    CONNECT forever. :class:`LimitedReader` follows amqtt's packet framing and refuses such
    a packet from its header, closing the connection (NOTES.md, amqtt bug 6; no upstream
    issue found).
``socket_leak``
    :class:`ClosingStreamWriter`: see :mod:`lbmqtt.broker.patches`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.errors import AMQTTError, NoDataError

SUBSCRIBE_MAX_BYTES = 16_384
"""Largest SUBSCRIBE or UNSUBSCRIBE packet (lbmqtt's parts send a few hundred bytes)."""
CONNECT_TIMEOUT_S = 10.0
"""A new connection must have sent its CONNECT by then, or it is closed."""


REMAINING_LENGTH_MAX_SHIFT = 128**3
"""The multiplier of a packet's 4th remaining-length byte, the last one MQTT allows."""


class PacketTooLarge(AMQTTError):  # type: ignore[misc]
    """A client announced a packet larger than its limit: its connection is closed."""


class LimitedReader(StreamReaderAdapter):  # type: ignore[misc]
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
                if self._shift > REMAINING_LENGTH_MAX_SHIFT:
                    # (MQTT's remaining length takes 4 bytes at most: a fifth is garbage,
                    # and an endless run of them grew the length to thousands of digits)
                    exc = PacketTooLarge(
                        f"a packet of type {self._type >> 4} whose remaining length "
                        "runs over 4 bytes"
                    )
                    self._refuse(exc)
                    raise exc
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


class ClosingStreamWriter(StreamWriterAdapter):  # type: ignore[misc]
    """amqtt's writer adapter, but the transport is closed even if ``write_eof`` fails."""

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._writer.close()
