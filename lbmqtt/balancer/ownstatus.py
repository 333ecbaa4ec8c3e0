"""The balancer's own status topic: what it retains there while it runs, and the guard that
puts it back when something else lands there (:class:`StatusGuard`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from ..errors import DecodeError
from ..mqtt import MqttTransport
from ..protocol import BalancerStatus, decode
from ..ratelog import LogLimiter

log = logging.getLogger(__name__)

STATUS_FIX_S = 1.0
"""The balancer publishes its status at most once per this many seconds when it replaces a
foreign one on its status topic (:meth:`StatusGuard.on_message`)."""


class StatusGuard:
    """Keeps the balancer's status (``status``, the encoded :class:`BalancerStatus` it
    retains while it runs) on its status topic.

    Without logins anyone may publish there, and a retained ``{"online": false}`` would
    tell ``lbmqtt status`` and the dashboards that this balancer is offline for good. A
    status that is not its own (offline, another instance's, empty, garbage) is replaced,
    at most once per :data:`STATUS_FIX_S`; the broker keeps the last one retained, so only
    the last one seen counts. A status that says another balancer is online is replaced too
    (anyone can forge one, with any start time), with a warning that names it: were it
    real, two balancers would overwrite each other's assignment sets, and the start-up
    check refuses a second one; their statuses would then alternate at most once a second
    each, which the warning explains.
    """

    def __init__(
        self,
        *,
        topic: str,
        instance: str,
        status: bytes,
        counters: Counter[str],
        transport: Callable[[], MqttTransport | None],
        closing: Callable[[], bool],
    ):
        self.topic = topic
        self.instance = instance
        self.status = status
        self._counters = counters
        self._transport = transport
        self._closing = closing
        self._sent_at = -1e9
        self._seen = b""
        """The last payload received on the status topic."""
        self._timer: asyncio.TimerHandle | None = None
        self._log = LogLimiter(log, 60.0)

    def publish(self) -> None:
        """Retain its status (at every connect, and to replace a foreign one)."""
        t = self._transport()
        assert t is not None
        self._sent_at = time.monotonic()
        t.publish(self.topic, self.status, qos=1, retain=True)

    def on_message(self, payload: bytes) -> None:
        """A message on its status topic: its own, or one to replace with its own."""
        self._seen = payload
        if self._timer is not None or not self._foreign(payload):
            return
        delay = max(0.0, self._sent_at + STATUS_FIX_S - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fix)

    def cancel(self) -> None:
        """Forget a replacement still to come (the balancer stops)."""
        if self._timer is not None:
            self._timer.cancel()

    def _foreign(self, payload: bytes) -> bool:
        """True if ``payload`` on its status topic is to be replaced by this one's status."""
        if payload == self.status or self._closing():
            return False
        try:
            other = decode(BalancerStatus, payload)
        except DecodeError:
            return True
        if other.online and other.instance != self.instance:
            self._log.warning(
                "other",
                "a status on %s says another balancer (instance %s, host %s, pid %s) is "
                "online: replaced by this one's. If that balancer is real, two balancers on "
                "one prefix overwrite each other's assignment sets: stop one of them",
                self.topic,
                other.instance,
                other.host or "?",
                other.pid or "?",
            )
        return True

    def _fix(self) -> None:
        self._timer = None
        t = self._transport()
        if t is None or not t.connected:
            return  # (the next connect publishes it)
        if self._foreign(self._seen):
            self.publish()
            self._counters["status_replaced"] += 1
            self._log.warning(
                "replaced",
                "a status this balancer did not publish was retained on %s (%r): "
                "published its own again",
                self.topic,
                self._seen[:120],
            )
