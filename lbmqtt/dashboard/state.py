"""The dashboard's MQTT side and the samples it keeps for the pages.

The dashboard is an MQTT client like any other: it subscribes to ``balancer/stats`` (a
:class:`~lbmqtt.protocol.BalancerStats` snapshot, about twice a second) and
``balancer/status``, and announces its URL on ``dashboard/status`` (retained; the will
says offline). The balancer answers that announcement with ``balancer/history``, its last
minutes of samples, so a restarted dashboard starts with full charts.

One :class:`DashboardState` per process holds a bounded ring buffer of :class:`Sample` s and
the latest stats. MQTT messages feed it on the loop thread; pages read it through
:meth:`DashboardState.snapshot`, which returns immutable values under a lock (Bokeh 3.10
builds documents in worker threads).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..config import Settings
from ..errors import DecodeError
from ..mqtt import MessageHandler, MqttTransport, Will, client_id, connection_options
from ..protocol import (
    BalancerHistory,
    BalancerStats,
    BalancerStatus,
    DashboardStatus,
    HistorySample,
    StreamBar,
    Topics,
    decode,
    plausible_time,
)

log = logging.getLogger(__name__)

ROLLOVER: Final = 720
"""Points kept per chart (and samples kept in the ring buffer): 6 minutes at 2 Hz."""
ALL_TASKS: Final = "all tasks"
BARS_KEPT: Final = 2000
"""Ended task attempts kept for the task stream."""
RATE_WINDOW_S: Final = 2.0
"""Throughput is the number of tasks finished over about this long, per second."""

Bands = tuple[tuple[str, int], ...]
"""Queued tasks per priority band, in band order."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the time series, taken from one :class:`BalancerStats` (or one
    :class:`HistorySample` the balancer sent)."""

    seq: int
    """Position in the stream of samples (1, 2, ...): a page remembers the last it showed."""
    time: float
    queued: int
    running: int
    busy: int
    slots: int
    done_total: int
    failed_total: int
    rate: float = 0.0
    """Tasks finished per second, over the last few samples."""
    bands: Bands = ()
    names: tuple[tuple[str, Bands], ...] = ()
    """Queued per band for the most queued task names."""

    def bands_of(self, name: str) -> Bands:
        """Queued per band of task ``name`` (:data:`ALL_TASKS`: of all)."""
        if name == ALL_TASKS:
            return self.bands
        return next((b for n, b in self.names if n == name), ())


def _bands(d: dict[str, int]) -> Bands:
    return tuple(d.items())


def _sample_of(seq: int, h: HistorySample, rate: float) -> Sample:
    return Sample(
        seq,
        h.time,
        h.queued,
        h.running,
        h.busy,
        h.slots,
        h.done_total,
        h.failed_total,
        rate,
        _bands(h.bands),
        tuple((n, _bands(b)) for n, b in h.names.items()),
    )


def _rate(prev: deque[Sample], t: float, finished: int) -> float:
    """Tasks finished per second since the newest sample at least RATE_WINDOW_S old."""
    base = None
    for s in reversed(prev):
        base = s
        if t - s.time >= RATE_WINDOW_S:
            break
    if base is None or t <= base.time:
        return 0.0
    return max(0.0, (finished - base.done_total - base.failed_total) / (t - base.time))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a page needs for one update; immutable, so it can cross threads."""

    stats: BalancerStats | None
    balancer_online: bool | None
    mqtt_connected: bool
    received: int
    bad_messages: int
    age_s: float | None
    """Seconds since the latest stats arrived (None before the first)."""
    stale: bool
    samples: tuple[Sample, ...]
    """Samples newer than the ``since`` given to :meth:`DashboardState.snapshot` (all of
    them when ``epoch`` is not the one given)."""
    closed: bool
    epoch: int = 0
    bars: tuple[StreamBar, ...] = ()
    """The task stream: attempts that ended (oldest first), then those running."""
    """Changes when the buffer is rebuilt (history arrived): pages then redraw from scratch."""


class DashboardState:
    """Shared by every page of one dashboard process: a ring buffer of samples and the latest
    stats. Written on the event loop thread, read from any thread.

    Args:
        capacity: samples kept (older ones are dropped).
        stale_after_s: stats older than this are reported as stale on the page.
    """

    def __init__(
        self,
        capacity: int = ROLLOVER,
        stale_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._lock = threading.Lock()
        self._samples: deque[Sample] = deque(maxlen=capacity)
        self._clock = clock
        self.stale_after_s = stale_after_s
        self._seq = 0
        self._epoch = 0
        self._stats: BalancerStats | None = None
        self._stats_at: float | None = None
        self._balancer_online: bool | None = None
        self._mqtt_connected = False
        self._received = 0
        self._bad = 0
        self._closed = False
        self._ended: dict[tuple[str, str, float], StreamBar] = {}
        self._running: tuple[StreamBar, ...] = ()

    # -- writers (event loop thread) -----------------------------------------------------

    def add_stats(self, stats: BalancerStats) -> bool:
        """Record a stats snapshot. Returns False for a replay of one already recorded
        (same balancer instance, not newer), which updates nothing."""
        if not plausible_time(stats.time, time.time()):
            self._count_bad(
                "stats", DecodeError(f"stats time {stats.time} is not a time of now", b"")
            )
            return False
        with self._lock:
            self._received += 1
            last = self._stats
            if last is not None and last.instance == stats.instance and stats.time <= last.time:
                return False
            same = last is not None and last.instance == stats.instance
            rate = (
                _rate(self._samples, stats.time, stats.done_total + stats.failed_total)
                if same
                else 0.0
            )
            self._seq += 1
            self._samples.append(_sample_of(self._seq, HistorySample.of(stats), rate))
            self._stats, self._stats_at = stats, self._clock()
            self._add_bars(stats.stream)
            return True

    def _add_bars(self, bars: list[StreamBar]) -> None:
        """Keep the ended attempts a snapshot lists (each once), and its running ones."""
        running = []
        for b in bars:
            if b.end is None:
                running.append(b)
                continue
            key = (b.id, b.node, b.start)
            if key not in self._ended:
                self._ended[key] = b
        while len(self._ended) > BARS_KEPT:
            del self._ended[next(iter(self._ended))]
        ended = {(b.id, b.node, b.start) for b in running} & self._ended.keys()
        self._running = tuple(b for b in running if (b.id, b.node, b.start) not in ended)

    def add_history(self, history: BalancerHistory) -> int:
        """Put the balancer's recent history in front of the samples (those older than the
        first one kept); returns how many were added. History from another balancer
        instance than the current stats' is ignored."""
        with self._lock:
            if self._stats is not None and history.instance != self._stats.instance:
                return 0
            first = self._samples[0].time if self._samples else math.inf
            older = [h for h in history.samples if h.time < first]
            if not older:
                return 0
            room = (self._samples.maxlen or ROLLOVER) - len(self._samples)
            older = older[-room:] if room > 0 else []
            if not older:
                return 0
            rebuilt: deque[Sample] = deque(maxlen=self._samples.maxlen)
            seq = 0
            items: list[HistorySample | Sample] = [*older, *self._samples]
            for item in items:
                seq += 1
                finished = item.done_total + item.failed_total
                rate = _rate(rebuilt, item.time, finished) if rebuilt else 0.0
                rebuilt.append(
                    _sample_of(seq, item, rate)
                    if isinstance(item, HistorySample)
                    else dataclasses.replace(item, seq=seq, rate=rate)
                )
            self._samples, self._seq = rebuilt, seq
            self._epoch += 1
            return len(older)

    def feed_stats(self, payload: bytes) -> bool:
        """Decode and record a ``balancer/stats`` payload; a malformed one is counted in
        :attr:`bad_messages` and ignored. An empty payload (retained message cleared) is
        ignored."""
        if not payload:
            return False
        try:
            stats = decode(BalancerStats, payload)
        except DecodeError as exc:
            self._count_bad("stats", exc)
            return False
        return self.add_stats(stats)

    def feed_history(self, payload: bytes) -> int:
        """Decode and record a ``balancer/history`` payload (malformed: counted, ignored)."""
        if not payload:
            return 0
        try:
            history = decode(BalancerHistory, payload)
        except DecodeError as exc:
            self._count_bad("history", exc)
            return 0
        return self.add_history(history)

    def feed_balancer_status(self, payload: bytes) -> None:
        """Decode a ``balancer/status`` payload (malformed: counted and ignored)."""
        if not payload:
            return
        try:
            status = decode(BalancerStatus, payload)
        except DecodeError as exc:
            self._count_bad("status", exc)
            return
        with self._lock:
            self._balancer_online = status.online

    def _count_bad(self, what: str, exc: DecodeError) -> None:
        with self._lock:
            self._bad += 1
            first = self._bad == 1
        # a broken publisher repeats itself twice a second: warn once, then debug
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "ignoring a malformed balancer %s message: %s",
            what,
            exc,
        )

    def set_connected(self, connected: bool) -> None:
        """Record whether the dashboard is connected to the broker."""
        with self._lock:
            self._mqtt_connected = connected

    def close(self) -> None:
        """Mark the dashboard as stopping: pages drop their update callbacks."""
        with self._lock:
            self._closed = True

    # -- readers (any thread) ------------------------------------------------------------

    @property
    def bad_messages(self) -> int:
        """Malformed messages received and ignored."""
        return self._bad

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest sample (0 before the first)."""
        return self._seq

    def samples(self) -> tuple[Sample, ...]:
        """Every sample still in the ring buffer, oldest first."""
        with self._lock:
            return tuple(self._samples)

    def snapshot(self, since: int = 0, epoch: int | None = None) -> Snapshot:
        """Everything a page shows, with the samples whose ``seq`` is above ``since`` (all
        of them if ``epoch`` is given and is not the buffer's)."""
        with self._lock:
            if epoch is not None and epoch != self._epoch:
                since = 0
            new: tuple[Sample, ...] = ()
            if self._samples and self._seq > since:
                first = self._samples[0].seq
                start = max(0, since + 1 - first)
                new = tuple(itertools.islice(self._samples, start, None))
            age = None if self._stats_at is None else self._clock() - self._stats_at
            return Snapshot(
                stats=self._stats,
                balancer_online=self._balancer_online,
                mqtt_connected=self._mqtt_connected,
                received=self._received,
                bad_messages=self._bad,
                age_s=age,
                stale=age is not None and age > self.stale_after_s,
                samples=new,
                closed=self._closed,
                epoch=self._epoch,
                bars=(*self._ended.values(), *self._running),
            )


def subscriptions(topics: Topics) -> list[tuple[str, int]]:
    """The dashboard's MQTT subscriptions, from protocol's topic table (stats at QoS 0: a
    later snapshot replaces a lost one; the history, sent once, at QoS 1)."""
    return topics.inbound("monitor")


def message_handler(state: DashboardState, topics: Topics) -> MessageHandler:
    """An MQTT message handler that feeds ``state``."""

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        if topic == topics.balancer_stats:
            state.feed_stats(payload)
        elif topic == topics.balancer_status:
            state.feed_balancer_status(payload)
        elif topic == topics.balancer_history:
            state.feed_history(payload)

    return on_message


def dashboard_transport(settings: Settings, state: DashboardState, url: str) -> MqttTransport:
    """The dashboard's MQTT connection (not started): feeds ``state``, announces ``url``
    retained on ``dashboard/status`` on every connect (the balancer answers with its recent
    history), and leaves an offline will."""
    topics = Topics(settings.topic_prefix)
    online = DashboardStatus(online=True, url=url).encode()

    def on_connect() -> None:
        state.set_connected(True)
        transport.publish(topics.dashboard_status, online, qos=1, retain=True)

    transport = MqttTransport(
        **connection_options(settings),
        client_id=client_id("dashboard"),
        on_message=message_handler(state, topics),
        subscriptions=subscriptions(topics),
        on_connect=on_connect,
        on_disconnect=lambda: state.set_connected(False),
        will=Will(topics.dashboard_status, DashboardStatus(online=False).encode()),
    )
    return transport
