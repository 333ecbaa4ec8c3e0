"""The live dashboard: a Bokeh server page fed by the balancer's retained stats over MQTT.

The dashboard is an MQTT client like any other: it subscribes to ``balancer/stats`` (a
:class:`~lbmqtt.protocol.BalancerStats` snapshot, about twice a second) and
``balancer/status``, and announces its URL on ``dashboard/status`` (retained; the will
says offline). The balancer answers that announcement with ``balancer/history``, its last
minutes of samples, so a restarted dashboard starts with full charts.

The page: queued tasks over time stacked by priority band (selectable by task name), tasks
queued and running, busy and free slots, throughput, per-user running and queued, per-node
slots with load, speed and last-seen, wait and run time percentiles per task name, a table
of running and recent tasks with their progress, and the warnings.

Design (NOTES.md, "Bokeh"):

* One :class:`DashboardState` per process holds a bounded ring buffer of :class:`Sample` s and
  the latest stats. MQTT messages feed it on the loop thread; pages read it through
  :meth:`DashboardState.snapshot`, which returns immutable values under a lock (Bokeh 3.10
  builds documents in worker threads).
* :func:`make_document` builds one page per browser session. Its ``async def`` periodic
  callback streams only the samples it has not shown yet (``rollover``), so a session costs
  one callback however many samples arrive, and a closed session leaks nothing.
* BokehJS is served by the dashboard itself (no CDN: the LAN may have no internet), with
  compressed responses.

The server is assembled from Bokeh's public parts (``BokehTornado`` + tornado
``HTTPServer`` + ``BaseServer``) rather than ``bokeh.server.server.Server``, because the
websocket origin allow-list must name the actually bound port, which ``Server`` only learns
after it has built the allow-list (``Server(address="127.0.0.1", port=0)`` only allows
``localhost:PORT``, so a browser on ``http://127.0.0.1:PORT/`` gets its websocket refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import itertools
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, cast

from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.core.properties import value
from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, CustomJS, DataRange1d, FactorRange
from bokeh.models.annotations import Legend, LegendItem
from bokeh.models.widgets.inputs import Select
from bokeh.models.widgets.markups import Div
from bokeh.models.widgets.tables import DataTable, HTMLTemplateFormatter, TableColumn
from bokeh.plotting import figure
from bokeh.server.server import BaseServer
from bokeh.server.tornado import BokehTornado
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from .config import Settings
from .discovery import resolve as resolve_broker
from .errors import DecodeError
from .mqtt import MessageHandler, MqttTransport, Will, client_id, connection_options
from .protocol import (
    BalancerHistory,
    BalancerStats,
    BalancerStatus,
    DashboardStatus,
    HistorySample,
    Topics,
    band_order,
    decode,
    plausible_time,
)

log = logging.getLogger(__name__)

ROLLOVER: Final = 720
"""Points kept per chart (and samples kept in the ring buffer): 6 minutes at 2 Hz."""
UPDATE_MS: Final = 500
"""Period of each page's update callback."""
SAMPLE_COLUMNS: Final = (
    "t",
    "queued",
    "running",
    "busy",
    "free",
    "slots",
    "done_total",
    "failed_total",
    "rate",
)
NODE_COLUMNS: Final = (
    "name",
    "online",
    "host",
    "busy",
    "slots",
    "load",
    "speed",
    "last_seen",
    "tasks",
)
MAX_BANDS: Final = 6
"""Bands drawn in the queue chart; more are added up in the last one ("more")."""
ALL_TASKS: Final = "all tasks"
BAND_COLORS: Final = ("#d62728", "#ff7f0e", "#bcbd22", "#2ca02c", "#17becf", "#9467bd")
RATE_WINDOW_S: Final = 2.0
"""Throughput is the number of tasks finished over about this long, per second."""
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 (compared, not bound)

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
            return True

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
            )


def subscriptions(topics: Topics) -> list[tuple[str, int]]:
    """The dashboard's MQTT subscriptions (stats at QoS 0: a later snapshot replaces a lost
    one; the history, sent once, at QoS 1)."""
    return [(topics.balancer_stats, 0), (topics.balancer_status, 0), (topics.balancer_history, 1)]


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


# ------------------------------------------------------------------------------ the page


def _sample_columns(samples: tuple[Sample, ...]) -> dict[str, Any]:
    return {
        "t": [s.time * 1000.0 for s in samples],  # Bokeh datetimes are epoch milliseconds
        "queued": [s.queued for s in samples],
        "running": [s.running for s in samples],
        "busy": [s.busy for s in samples],
        "free": [max(0, s.slots - s.busy) for s in samples],
        "slots": [s.slots for s in samples],
        "done_total": [s.done_total for s in samples],
        "failed_total": [s.failed_total for s in samples],
        "rate": [round(s.rate, 2) for s in samples],
    }


def _bands_seen(
    labels: Iterable[str], stats: BalancerStats | None, samples: Iterable[Sample]
) -> list[str]:
    """Every band in ``labels``, ``stats`` and ``samples``, in priority order (a band no
    node serves now still has history to draw)."""
    seen = set(labels) | (set(stats.bands) if stats is not None else set())
    for s in samples:
        seen.update(b for b, _ in s.bands)
    return sorted(seen, key=band_order)


def _band_slots(bands: list[str]) -> list[str]:
    """Up to MAX_BANDS labels: the bands in order, the last one adding up any beyond."""
    if len(bands) <= MAX_BANDS:
        return bands
    return [*bands[: MAX_BANDS - 1], f"{bands[MAX_BANDS - 1]} and more"]


def _queue_columns(samples: tuple[Sample, ...], bands: list[str], name: str) -> dict[str, Any]:
    """Columns of the queue chart: ``t`` and ``b0``.. (queued per band slot) for ``name``."""
    index = {b: min(i, MAX_BANDS - 1) for i, b in enumerate(bands)}
    cols: dict[str, list[Any]] = {"t": [s.time * 1000.0 for s in samples]}
    for i in range(MAX_BANDS):
        cols[f"b{i}"] = [0] * len(samples)
    for k, s in enumerate(samples):
        for band, n in s.bands_of(name):
            slot = index.get(band)
            if slot is not None:
                cols[f"b{slot}"][k] += n
    return cols


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _node_columns(stats: BalancerStats | None) -> dict[str, Any]:
    # one row per name: the names are a chart's categories, which must be unique (a real
    # balancer never repeats one; a stray publisher might)
    nodes = (
        sorted({n.name: n for n in reversed(stats.nodes)}.values(), key=lambda n: n.name)
        if stats is not None
        else []
    )
    now = stats.time if stats is not None else 0.0
    return {
        "name": [n.name for n in nodes],
        "online": ["yes" if n.online else "no" for n in nodes],
        "host": [n.host for n in nodes],
        "slots": [n.slots for n in nodes],
        "busy": [n.busy for n in nodes],
        "free": [max(0, n.slots - n.busy) if n.online else 0 for n in nodes],
        "offline": [0 if n.online else max(1, n.slots) for n in nodes],
        "speed": [n.speed for n in nodes],
        "load": [f"{n.load[0]:.2f}" if n.load else "-" for n in nodes],
        "last_seen": [_age(max(0.0, now - n.last_seen)) if n.last_seen else "never" for n in nodes],
        "tasks": [", ".join(n.tasks) for n in nodes],
    }


def _user_columns(stats: BalancerStats | None) -> dict[str, Any]:
    users = (
        sorted({u.user: u for u in reversed(stats.users)}.values(), key=lambda u: u.user)
        if stats is not None
        else []
    )
    return {
        "user": [u.user for u in users],
        "running": [u.running for u in users],
        "queued": [u.queued for u in users],
    }


def _ms(v: float | None) -> str:
    """Milliseconds for a table cell ("-" for none yet)."""
    if v is None:
        return "-"
    ms = v * 1000.0
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _time_columns(stats: BalancerStats | None) -> dict[str, Any]:
    names = sorted(stats.names, key=lambda n: n.name) if stats is not None else []
    cols: dict[str, list[Any]] = {
        "name": [n.name for n in names],
        "queued": [n.queued for n in names],
        "running": [n.running for n in names],
        "done": [n.done for n in names],
        "failed": [n.failed for n in names],
    }
    for kind in ("wait", "run"):
        for q in ("p50", "p95", "p99"):
            cols[f"{kind}_{q}"] = [_ms(getattr(n, f"{kind}_{q}_s")) for n in names]
    cols["waiting"] = [n.waiting or "" for n in names]
    return cols


def _task_columns(stats: BalancerStats | None) -> dict[str, Any]:
    rows = stats.tasks if stats is not None else []
    return {
        "id": [r.id for r in rows],
        "user": [r.user for r in rows],
        "name": [r.name for r in rows],
        "node": [r.node or "" for r in rows],
        "status": [r.status for r in rows],
        "progress": [r.progress for r in rows],
        "priority": [r.priority for r in rows],
        "wait_ms": [_ms(r.wait_s) for r in rows],
        "run_ms": [_ms(r.run_s) for r in rows],
    }


def warnings_of(snap: Snapshot) -> list[str]:
    """The warnings a page shows for ``snap``: the dashboard's own, then the balancer's."""
    out: list[str] = []
    if not snap.mqtt_connected:
        out.append("not connected to the MQTT broker")
    if snap.balancer_online is False:
        out.append("balancer offline")
    if snap.stats is None:
        out.append("no balancer stats received yet")
    elif snap.stale and snap.age_s is not None:
        out.append(f"no balancer stats for {snap.age_s:.0f} s")
    if snap.bad_messages:
        out.append(f"{snap.bad_messages} malformed messages ignored")
    if snap.stats is not None:
        out.extend(snap.stats.warnings)
    return out


def _summary_html(snap: Snapshot) -> str:
    s = snap.stats
    if s is None:
        return "<b>lbmqtt</b>: waiting for the balancer"
    online = sum(1 for n in s.nodes if n.online)
    rate = snap.samples[-1].rate if snap.samples else None
    parts = [
        f"queued <b>{s.queued}</b>",
        f"running <b>{s.running}</b>",
        f"busy <b>{s.busy}</b> / {s.slots} slots",
        f"done {s.done_total}",
        f"failed {s.failed_total}",
        f"refused {s.refused_total}",
        f"nodes {online} / {len(s.nodes)}",
    ]
    if rate is not None:
        parts.insert(3, f"<b>{rate:.1f}</b> tasks/s")
    return f"<b>lbmqtt</b> balancer {html.escape(s.instance)}: " + " &middot; ".join(parts)


def _table(
    source: ColumnDataSource,
    name: str,
    columns: list[tuple[str, str]],
    height: int,
    progress: str | None = None,
) -> DataTable:
    cols = []
    for field, title in columns:
        fmt: Any = None
        if field == progress:
            fmt = HTMLTemplateFormatter(template=_PROGRESS_TEMPLATE)
        cols.append(
            TableColumn(field=field, title=title, formatter=fmt)
            if fmt is not None
            else TableColumn(field=field, title=title)
        )
    table = DataTable(
        source=source,
        index_position=None,
        height=height,
        sizing_mode="stretch_width",
        name=name,
        columns=cols,
    )
    # BokehJS (3.9) redraws a DataTable only when its CDSView's indices change, so new data
    # with as many rows as before would never show: nudge the view on every replacement.
    source.js_on_change("data", CustomJS(args={"table": table}, code="table.view.change.emit()"))
    return table


def _legend_above(fig: Any, renderers: list[Any], labels: list[str]) -> None:
    items = [
        LegendItem(label=value(t), renderers=[r]) for t, r in zip(labels, renderers, strict=True)
    ]
    fig.add_layout(Legend(items=items, orientation="horizontal", location="top_left"), "above")


_PROGRESS_TEMPLATE: Final = (
    '<div style="background:#eee;width:100%;height:12px;margin-top:4px;position:relative">'
    '<div style="background:#2ca02c;height:12px;width:<%= value %>%"></div>'
    '<span style="position:absolute;top:-3px;left:4px;font-size:10px"><%= value %>%</span>'
    "</div>"
)


class DashboardPage:
    """The models of one page (one per browser session) and its update coroutine."""

    def __init__(self, doc: Document, state: DashboardState):
        self.state = state
        snap = state.snapshot()
        self._last_seq = snap.samples[-1].seq if snap.samples else 0
        self._epoch = snap.epoch
        self._last_stats: BalancerStats | None = snap.stats
        self._band_labels = _bands_seen((), snap.stats, snap.samples)
        self._name = ALL_TASKS
        self._failed = False
        self.samples = ColumnDataSource(_sample_columns(snap.samples), name="samples")
        self.queue = ColumnDataSource(
            _queue_columns(snap.samples, self._band_labels, self._name), name="queue"
        )
        self.nodes = ColumnDataSource(_node_columns(snap.stats), name="nodes")
        self.users = ColumnDataSource(_user_columns(snap.stats), name="users")
        self.times = ColumnDataSource(_time_columns(snap.stats), name="times")
        self.tasks = ColumnDataSource(_task_columns(snap.stats), name="tasks")
        self.summary = Div(text=_summary_html(snap), name="summary")
        self.warnings = Div(text=self._warnings_html(snap), name="warnings")
        self.select = Select(
            title="queued tasks of",
            value=ALL_TASKS,
            name="name_select",
            options=self._name_options(snap.stats),
            width=240,
        )
        self.select.on_change("value", self._on_select)

        tools = "pan,xwheel_zoom,box_zoom,reset,save"

        def timeseries(title: str, name: str, **kw: Any) -> Any:
            return figure(
                title=title,
                x_axis_type="datetime",
                height=260,
                tools=tools,
                sizing_mode="stretch_width",
                name=name,
                y_range=DataRange1d(start=0),
                **kw,
            )

        queue = timeseries("Queued tasks by priority band", "queue_chart")
        stacked = queue.varea_stack(
            [f"b{i}" for i in range(MAX_BANDS)], x="t", color=list(BAND_COLORS), source=self.queue
        )
        self.band_items = [
            LegendItem(label=value(""), renderers=[r], visible=False) for r in stacked
        ]
        queue.add_layout(Legend(items=self.band_items, location="top_left", click_policy="hide"))
        self._show_bands()
        tasks = timeseries("Tasks", "tasks_chart", x_range=queue.x_range)
        tasks.line(
            "t", "queued", source=self.samples, legend_label="queued", color="#d62728", line_width=2
        )
        tasks.line(
            "t",
            "running",
            source=self.samples,
            legend_label="running",
            color="#2ca02c",
            line_width=2,
        )
        workers = timeseries("Worker slots: busy and free", "slots_chart", x_range=queue.x_range)
        workers.varea_stack(
            ["busy", "free"],
            x="t",
            color=["#1f77b4", "#c6dbef"],
            legend_label=["busy", "free"],
            source=self.samples,
        )
        rate = timeseries(
            "Throughput (tasks finished per second)", "rate_chart", x_range=queue.x_range
        )
        rate.line(
            "t", "rate", source=self.samples, legend_label="tasks/s", color="#9467bd", line_width=2
        )
        for fig in (tasks, workers, rate):
            fig.legend.location = "top_left"
            fig.legend.click_policy = "hide"

        self.user_range = FactorRange(factors=list(self.users.data["user"]))
        users = figure(
            title="Users: running and queued",
            y_range=self.user_range,
            height=260,
            sizing_mode="stretch_width",
            name="users_chart",
            tools="save",
            x_range=DataRange1d(start=0),
        )
        bars = users.hbar_stack(
            ["running", "queued"],
            y="user",
            height=0.7,
            source=self.users,
            color=["#2ca02c", "#d62728"],
        )
        _legend_above(users, bars, ["running", "queued"])
        self.node_range = FactorRange(factors=list(self.nodes.data["name"]))
        nodes = figure(
            title="Nodes: busy, free and offline slots",
            y_range=self.node_range,
            height=260,
            sizing_mode="stretch_width",
            name="nodes_chart",
            tools="save",
            x_range=DataRange1d(start=0),
        )
        bars = nodes.hbar_stack(
            ["busy", "free", "offline"],
            y="name",
            height=0.7,
            source=self.nodes,
            color=["#1f77b4", "#c6dbef", "#bbbbbb"],
        )
        _legend_above(nodes, bars, ["busy", "free", "offline"])
        for fig in (users, nodes):
            fig.ygrid.grid_line_color = None

        node_table = _table(
            self.nodes,
            "nodes_table",
            [
                ("name", "node"),
                ("online", "online"),
                ("last_seen", "last seen"),
                ("busy", "busy"),
                ("slots", "slots"),
                ("load", "load (1 min)"),
                ("speed", "speed"),
                ("host", "host"),
                ("tasks", "tasks"),
            ],
            120,
        )
        time_table = _table(
            self.times,
            "times_table",
            [
                ("name", "task"),
                ("queued", "queued"),
                ("running", "running"),
                ("done", "done"),
                ("failed", "failed"),
                ("wait_p50", "wait p50 ms"),
                ("wait_p95", "p95"),
                ("wait_p99", "p99"),
                ("run_p50", "run p50 ms"),
                ("run_p95", "p95"),
                ("run_p99", "p99"),
                ("waiting", "why waiting"),
            ],
            180,
        )
        task_table = _table(
            self.tasks,
            "tasks_table",
            [
                ("status", "state"),
                ("progress", "progress"),
                ("name", "task"),
                ("user", "user"),
                ("node", "node"),
                ("priority", "priority"),
                ("wait_ms", "wait ms"),
                ("run_ms", "run ms"),
                ("id", "id"),
            ],
            300,
            progress="progress",
        )
        doc.title = "lbmqtt dashboard"
        w: Final = "stretch_width"
        doc.add_root(
            column(
                self.summary,
                self.warnings,
                row(
                    column(self.select, queue, sizing_mode=w),
                    column(tasks, sizing_mode=w),
                    sizing_mode=w,
                ),
                row(workers, rate, sizing_mode=w),
                row(users, nodes, sizing_mode=w),
                Div(text="<b>Nodes</b>"),
                node_table,
                Div(text="<b>Task names</b>: wait (submit to start) and run times of recent tasks"),
                time_table,
                Div(text="<b>Tasks</b>: running, then recently finished"),
                task_table,
                sizing_mode=w,
            )
        )
        self._doc = doc
        # Bokeh's stubs only know plain callbacks; coroutine functions are supported.
        self._callback = doc.add_periodic_callback(cast(Callable[[], None], self.update), UPDATE_MS)

    @staticmethod
    def _name_options(stats: BalancerStats | None) -> list[str | None]:
        names = sorted(n.name for n in stats.names) if stats is not None else []
        return [ALL_TASKS, *names]

    @staticmethod
    def _warnings_html(snap: Snapshot) -> str:
        items = warnings_of(snap)
        if not items:
            return ""
        lis = "".join(f"<li>{html.escape(w)}</li>" for w in items)
        return f'<ul style="color:#b35900;margin:0">{lis}</ul>'

    def _show_bands(self) -> None:
        labels = _band_slots(self._band_labels)
        for i, item in enumerate(self.band_items):
            text = f"priority {labels[i]}" if i < len(labels) else ""
            if item.label != value(text):
                item.label = value(text)
            item.visible = i < len(labels)

    def _redraw_queue(self) -> None:
        # up to the last sample this page has shown: the next update streams the rest
        shown = tuple(s for s in self.state.samples() if s.seq <= self._last_seq)
        self.queue.data = _queue_columns(shown[-ROLLOVER:], self._band_labels, self._name)

    def _on_select(self, attr: str, old: Any, new: Any) -> None:
        self._name = new if isinstance(new, str) else ALL_TASKS
        self._redraw_queue()

    async def update(self) -> None:
        """Stream the samples this page has not shown yet and refresh the rest.

        Runs as the session's periodic callback on the event loop (``async def``: Bokeh
        3.10 would run a plain function in a worker thread). Whatever goes wrong is logged
        (once per page) and the next update tries again: a page never stops updating.
        """
        try:
            await self._update()
        except Exception:
            if not self._failed:
                log.exception("dashboard page update failed (logged once per page)")
            self._failed = True

    async def _update(self) -> None:
        snap = self.state.snapshot(self._last_seq, self._epoch)
        if snap.closed:
            with contextlib.suppress(ValueError):
                self._doc.remove_periodic_callback(self._callback)
            return
        stats = snap.stats
        bands = _bands_seen(self._band_labels, stats, snap.samples)
        redraw = snap.epoch != self._epoch or bands != self._band_labels
        self._band_labels = bands
        if snap.epoch != self._epoch:
            self._epoch = snap.epoch
            self.samples.data = _sample_columns(snap.samples[-ROLLOVER:])
        elif snap.samples:
            self.samples.stream(_sample_columns(snap.samples), rollover=ROLLOVER)
        if snap.samples:
            self._last_seq = snap.samples[-1].seq
        if redraw:
            self._show_bands()
            self._redraw_queue()
        elif snap.samples:
            self.queue.stream(_queue_columns(snap.samples, bands, self._name), rollover=ROLLOVER)
        if stats is not self._last_stats:
            self._last_stats = stats
            self.nodes.data = _node_columns(stats)
            self.users.data = _user_columns(stats)
            self.times.data = _time_columns(stats)
            self.tasks.data = _task_columns(stats)
            if list(self.user_range.factors) != self.users.data["user"]:
                self.user_range.factors = list(self.users.data["user"])
            if list(self.node_range.factors) != self.nodes.data["name"]:
                self.node_range.factors = list(self.nodes.data["name"])
            options = self._name_options(stats)
            if self._name not in options:
                options.append(self._name)
            if options != self.select.options:
                self.select.options = options
            self.summary.text = _summary_html(snap)
        text = self._warnings_html(snap)
        if text != self.warnings.text:
            self.warnings.text = text


def make_document(doc: Document, state: DashboardState) -> DashboardPage:
    """Build the dashboard page on ``doc`` (one per session) and start its updates."""
    return DashboardPage(doc, state)


# ---------------------------------------------------------------------------- the server


def _url_host(ip: str) -> str:
    host = socket.gethostname() if ip in _WILDCARD_HOSTS else ip
    return f"[{host}]" if ":" in host else host


def _origins(ip: str, port: int) -> list[str]:
    """``host:port`` origins allowed to open the page's websocket."""
    hosts = {ip, "localhost", "127.0.0.1", _url_host(ip)}
    if ip in _WILDCARD_HOSTS:
        hosts |= {socket.getfqdn()}
        with contextlib.suppress(OSError):
            hosts |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    return sorted(
        {
            f"[{h}]:{port}" if ":" in h and not h.startswith("[") else f"{h}:{port}"
            for h in hosts
            if h not in _WILDCARD_HOSTS
        }
    )


class DashboardServer:
    """The Bokeh server of the dashboard, listening; build it with :func:`start_server`."""

    def __init__(self, server: BaseServer, http_server: HTTPServer, port: int, url: str):
        self._server = server
        self._http = http_server
        self.port = port
        self.url = url

    async def stop(self) -> None:
        """Stop listening, end the sessions and close the HTTP connections."""
        stop_async = getattr(self._server, "stop_async", None)
        if stop_async is not None:  # Bokeh >= 3.10
            await stop_async()
        else:  # Bokeh 3.9: stop() does not end the sessions
            self._server.stop()
            for session in self._server.get_sessions():
                if not session.destroyed and session.connection_count == 0:
                    session.destroy()
        await self._http.close_all_connections()


def _bind_sockets(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Listening sockets on every address of ``host``, all on one port (0: a free one).

    Like ``tornado.netutil.bind_sockets`` (what Bokeh's ``Server`` uses), except that a
    failed bind closes the sockets instead of leaking them.
    """
    socks: list[socket.socket] = []
    bound = port
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setblocking(False)
            sock.bind((addr[0], bound, *addr[2:]))
            sock.listen(128)
            bound = sock.getsockname()[1]
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise OSError(
            exc.errno,
            f"cannot listen on {host}:{port}: {exc.strerror} (is another "
            f"dashboard running there? --monitor-port 0 picks a free "
            f"port)",
        ) from exc
    return socks, bound


def start_server(state: DashboardState, host: str = "127.0.0.1", port: int = 0) -> DashboardServer:
    """Start the dashboard's Bokeh server on the running loop; ``port`` 0 picks a free one.

    Raises:
        OSError: the address cannot be bound.
    """
    sockets, bound = _bind_sockets(host, port)
    url = f"http://{_url_host(host)}:{bound}/"
    try:

        def modify_doc(doc: Document) -> None:
            make_document(doc, state)

        app = Application(FunctionHandler(modify_doc))
        tornado_app = BokehTornado(
            {"/": app},
            absolute_url=url,
            extra_websocket_origins=_origins(host, bound),
            compress_response=True,
        )
        http_server = HTTPServer(tornado_app, xheaders=False)
        http_server.add_sockets(sockets)
    except Exception:
        for s in sockets:
            s.close()
        raise
    server = BaseServer(IOLoop.current(), tornado_app, http_server)
    server.start()
    return DashboardServer(server, http_server, bound, url)


async def serve(
    settings: Settings, *, ready_fd: int | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run the dashboard until SIGINT/SIGTERM (or ``stop`` is set).

    Prints ``lbmqtt dashboard: http://HOST:PORT/`` and, with ``ready_fd``, writes one JSON
    line ``{"url": ..., "port": ...}`` to that file descriptor once listening (it is closed
    in any case, so a reader sees EOF if the dashboard fails to start). Connects to the
    broker in the background: the page says so until it is up.

    Raises:
        OSError: ``MONITOR_IP:MONITOR_PORT`` cannot be bound.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    topics = Topics(settings.topic_prefix)
    state = DashboardState(stale_after_s=max(5.0, 10 * settings.stats_interval_s))
    transport: MqttTransport | None = None
    try:
        server = start_server(state, settings.monitor_ip, settings.monitor_port)
        try:
            settings = await resolve_broker(settings)
            transport = dashboard_transport(settings, state, server.url)
            await transport.start()
            print(f"lbmqtt dashboard: {server.url}", flush=True)
            if ready_fd is not None:
                fd, ready_fd = ready_fd, None
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps({"url": server.url, "port": server.port}) + "\n")
            await stop.wait()
        finally:
            if transport is not None and transport.connected:
                await transport.publish_confirmed(
                    topics.dashboard_status,
                    DashboardStatus(online=False).encode(),
                    retain=True,
                    timeout_s=2.0,
                )
            state.close()
            await server.stop()
            if transport is not None:
                await transport.close()
            log.info("dashboard stopped")
    finally:
        if ready_fd is not None:  # failed before ready: the reader sees EOF
            os.close(ready_fd)
        for sig in handled:
            loop.remove_signal_handler(sig)
