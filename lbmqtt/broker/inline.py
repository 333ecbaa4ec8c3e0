"""``inline_qos0``, the broker's side: what lets :mod:`lbmqtt.broker.reader` hand a QoS 0
message to ``direct_qos0`` as it reads it, as a mixin of
:class:`~lbmqtt.broker.patches.PatchedBroker` (it reaches that class's and amqtt's
internals: the module docstring of :mod:`lbmqtt.broker.patches` says what the patch does).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from amqtt.broker import RetainedApplicationMessage
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt.packet import SUBSCRIBE
from amqtt.session import Session

from .reader import AHEAD_MAX

if TYPE_CHECKING:
    from ..access import AccessGuard

_INLINE_EVENTS = (
    MQTTEvents.PACKET_RECEIVED,
    BrokerEvents.MESSAGE_RECEIVED,
    BrokerEvents.MESSAGE_BROADCAST,
)
"""Plugin events a message delivered inline would skip (inline_qos0 declines, leaving the
message to amqtt's path, while a plugin listens for any)."""
_RETAIN_EVENTS = (*_INLINE_EVENTS, BrokerEvents.RETAINED_MESSAGE)
"""...and those a retained one would skip too."""


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class InlineReading:
    """The ``inline_qos0`` part of :class:`~lbmqtt.broker.patches.PatchedBroker`."""

    if TYPE_CHECKING:  # (PatchedBroker's and amqtt's, which this mixin comes before)
        patches: frozenset[str]
        guard: AccessGuard | None
        _retained_messages: dict[str, RetainedApplicationMessage]
        plugins_manager: Any
        inline_deliveries: int

        def _send_direct(self, topic: str, data: bytes | bytearray) -> bool: ...

        async def _handle_disconnect(self, session: Session, handler: Any, w: Any) -> None: ...

        async def _handle_subscription(self, session: Session, handler: Any, w: Any) -> None: ...

        async def _handle_unsubscription(self, session: Session, handler: Any, w: Any) -> None: ...

        async def _handle_message_delivery(
            self, session: Session, handler: Any, w: Any
        ) -> bool: ...

    @staticmethod
    def _keep_an_early_end(handler: Any) -> None:
        """A DISCONNECT, a second CONNECT or an EOF read before ``handler.start()`` has
        made the future it is reported to (start() makes it last, after its reader runs)
        is kept, and reported once start() returns. amqtt's reader, slowed by a task per
        read, mostly read later; when it did not, the report was lost and the session
        stayed "connected" for good, its will never sent."""
        early: list[Any] = []
        disconnect, connect, start = (
            handler.handle_disconnect,
            handler.handle_connect,
            handler.start,
        )

        async def handle_disconnect(packet: Any) -> None:
            if handler._disconnect_waiter is None:
                early.append(packet)
            await disconnect(packet)

        async def handle_connect(packet: Any) -> None:
            if handler._disconnect_waiter is None:
                early.append(None)  # (reported as a connection lost: the will fires)
            await connect(packet)

        async def start_then_report() -> None:
            await start()
            waiter = handler._disconnect_waiter
            if early and waiter is not None and not waiter.done():
                waiter.set_result(early[0])

        handler.handle_disconnect = handle_disconnect
        handler.handle_connect = handle_connect
        handler.start = start_then_report

    def _publish_inline(
        self, handler: Any, topic: str, data: bytes, running_tasks: Any, retain: bool = False
    ) -> bool:
        """Deliver a QoS 0 message that ``handler``'s reader has just read, as amqtt's path
        would but without its tasks, if nothing of that client is ahead of it and nothing
        asks to see it on the way; ``retain``: then keep it as the topic's retained message
        (an empty one clears it), as amqtt's path would once it has broadcast it. False
        (nothing done): amqtt's path.

        Retained messages come this way too: lbmqtt's assignment sets are, and a set that
        took amqtt's path made the message behind it (the tick's states) take it as well,
        to keep their order: ~0.3 ms more a lone task's set took to reach its node than
        with Mosquitto (``bench/run.py latency --stages``)."""
        if not self._inline_allowed(_RETAIN_EVENTS if retain else _INLINE_EVENTS):
            return False
        session = handler.session
        waiters = getattr(handler, "lbmqtt_waiters", None)
        ending = handler._disconnect_waiter
        if (
            waiters is None  # (its per-client loop not started, or ended)
            or any(w.done() for w in waiters)  # (that loop has something to handle)
            or ending is None
            or ending.done()  # (a DISCONNECT or a protocol violation read: nothing after)
            or any(not t.done() for t in running_tasks)  # (a packet before it in hand)
            or not session.delivered_message_queue.empty()
            or not handler.lbmqtt_changes.empty()  # (its SUBSCRIBEs and UNSUBSCRIBEs)
        ):
            return False
        if not topic or topic[0] == "$" or "#" in topic or "+" in topic:
            return False  # (dollar_publish, and amqtt, say what to do)
        if self.guard is not None:
            role = getattr(session, "lbmqtt_role", None)
            if role is None or not self.guard.may(
                role, "publish", topic, session.username or "", session.client_id or ""
            ):
                return False  # (refused: amqtt's path counts and logs it)
            if retain and not self.guard.may(
                role, "retain", topic, session.username or "", session.client_id or ""
            ):
                return False  # (refused: amqtt's path drops, counts and logs it)
        # (without a guard, amqtt's topic plugins decide, asynchronously: _deliver_now
        # declines when there are any)
        if not self._send_direct(topic, data):
            return False
        if retain:  # (amqtt's Broker.retain_message but for its plugin event: none listens)
            if data:
                self._retained_messages[topic] = RetainedApplicationMessage(session, topic, data, 0)
            else:
                self._retained_messages.pop(topic, None)
        self.inline_deliveries += 1
        return True

    def _inline_allowed(self, events: tuple[Any, ...]) -> bool:
        """No amqtt plugin listens for ``events`` (their handlers are coroutines: amqtt's
        path fires them)."""
        callbacks = getattr(self.plugins_manager, "_event_plugin_callbacks", None)
        return callbacks is not None and not any(e in callbacks for e in events)

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        """amqtt's per-client loop, which also leaves the futures it waits on in
        ``handler.lbmqtt_waiters``: while none is done, the loop has nothing in hand
        (inline_qos0 may deliver). With lbmqtt's reader (``handler.lbmqtt_changes``), a
        client's SUBSCRIBEs and UNSUBSCRIBEs come in one queue, and take effect in the
        order sent: amqtt keeps two, and when both have one ready it serves the SUBSCRIBE
        first, so an UNSUBSCRIBE then SUBSCRIBE of one filter, read together, ended
        unsubscribed (amqtt's reader, slower, made that rarer)."""
        changes: asyncio.Queue[tuple[int, Any]] | None = getattr(handler, "lbmqtt_changes", None)
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        if changes is None:
            subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
            unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        else:
            subscribe_waiter = asyncio.ensure_future(changes.get())
            unsubscribe_waiter = asyncio.get_running_loop().create_future()  # (never done)
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        connected = True
        try:
            while connected:
                try:
                    waiters = (
                        disconnect_waiter,
                        subscribe_waiter,
                        unsubscribe_waiter,
                        wait_deliver,
                    )
                    handler.lbmqtt_waiters = waiters
                    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    if disconnect_waiter in done:
                        await self._handle_disconnect(client_session, handler, disconnect_waiter)
                        connected = False
                    if subscribe_waiter in done and changes is not None:
                        kind, change = subscribe_waiter.result()
                        ready = asyncio.get_running_loop().create_future()
                        ready.set_result(change)
                        if kind == SUBSCRIBE:
                            await self._handle_subscription(client_session, handler, ready)
                        else:
                            await self._handle_unsubscription(client_session, handler, ready)
                        subscribe_waiter = asyncio.ensure_future(changes.get())
                    elif subscribe_waiter in done:
                        await self._handle_subscription(client_session, handler, subscribe_waiter)
                        subscribe_waiter = asyncio.ensure_future(
                            handler.get_next_pending_subscription()
                        )
                    if unsubscribe_waiter in done:
                        await self._handle_unsubscription(
                            client_session, handler, unsubscribe_waiter
                        )
                        unsubscribe_waiter = asyncio.ensure_future(
                            handler.get_next_pending_unsubscription()
                        )
                    if wait_deliver in done:
                        if not await self._handle_message_delivery(
                            client_session, handler, wait_deliver
                        ):
                            break
                        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                        drained = getattr(handler, "lbmqtt_drained", None)
                        if (
                            drained is not None
                            and client_session.delivered_message_queue.qsize() <= AHEAD_MAX // 2
                        ):
                            _resolve(drained)  # (the reader may read from the client again)
                except asyncio.CancelledError:
                    break
        finally:
            handler.lbmqtt_waiters = None
            _resolve(getattr(handler, "lbmqtt_drained", None))
        pending = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        for waiter in pending:
            waiter.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
