"""The live dashboard: a Bokeh server page fed by the balancer's retained stats over MQTT.

The dashboard is an MQTT client like any other: it subscribes to ``balancer/stats`` (a
:class:`~lbmqtt.protocol.BalancerStats` snapshot, about twice a second) and
``balancer/status``, and announces its URL on ``dashboard/status`` (retained; the will
says offline).

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
import html
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, DataRange1d
from bokeh.models.widgets.markups import Div
from bokeh.models.widgets.tables import DataTable, TableColumn
from bokeh.plotting import figure
from bokeh.server.server import BaseServer
from bokeh.server.tornado import BokehTornado
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from .config import Settings
from .discovery import resolve as resolve_broker
from .errors import DecodeError
from .mqtt import MessageHandler, MqttTransport, Will
from .protocol import BalancerStats, BalancerStatus, DashboardStatus, Topics, decode

log = logging.getLogger(__name__)

ROLLOVER: Final = 600
"""Points kept per chart (and samples kept in the ring buffer): 5 minutes at 2 Hz."""
UPDATE_MS: Final = 500
"""Period of each page's update callback."""
SAMPLE_COLUMNS: Final = ("t", "queued", "running", "busy", "slots", "done_total", "failed_total")
NODE_COLUMNS: Final = ("name", "online", "host", "slots", "busy", "speed", "tasks")
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 (compared, not bound)


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the time series, taken from one :class:`BalancerStats`."""

    seq: int
    """Position in the stream of samples (1, 2, ...): a page remembers the last it showed."""
    time: float
    queued: int
    running: int
    busy: int
    slots: int
    done_total: int
    failed_total: int


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
    """Samples newer than the ``since`` given to :meth:`DashboardState.snapshot`."""
    closed: bool


class DashboardState:
    """Shared by every page of one dashboard process: a ring buffer of samples and the latest
    stats. Written on the event loop thread, read from any thread.

    Args:
        capacity: samples kept (older ones are dropped).
        stale_after_s: stats older than this are reported as stale on the page.
    """

    def __init__(self, capacity: int = ROLLOVER, stale_after_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._samples: deque[Sample] = deque(maxlen=capacity)
        self._clock = clock
        self.stale_after_s = stale_after_s
        self._seq = 0
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
        with self._lock:
            self._received += 1
            last = self._stats
            if last is not None and last.instance == stats.instance and stats.time <= last.time:
                return False
            self._seq += 1
            self._samples.append(Sample(self._seq, stats.time, stats.queued, stats.running,
                                        stats.busy, stats.slots, stats.done_total,
                                        stats.failed_total))
            self._stats, self._stats_at = stats, self._clock()
            return True

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
        log.log(logging.WARNING if first else logging.DEBUG,
                "ignoring a malformed balancer %s message: %s", what, exc)

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

    def snapshot(self, since: int = 0) -> Snapshot:
        """Everything a page shows, with the samples whose ``seq`` is above ``since``."""
        with self._lock:
            new: tuple[Sample, ...] = ()
            if self._samples and self._seq > since:
                first = self._samples[0].seq
                start = max(0, since + 1 - first)
                new = tuple(itertools.islice(self._samples, start, None))
            age = None if self._stats_at is None else self._clock() - self._stats_at
            return Snapshot(
                stats=self._stats, balancer_online=self._balancer_online,
                mqtt_connected=self._mqtt_connected, received=self._received,
                bad_messages=self._bad, age_s=age,
                stale=age is not None and age > self.stale_after_s,
                samples=new, closed=self._closed)


def subscriptions(topics: Topics) -> list[tuple[str, int]]:
    """The dashboard's MQTT subscriptions (QoS 0: a later snapshot replaces a lost one)."""
    return [(topics.balancer_stats, 0), (topics.balancer_status, 0)]


def message_handler(state: DashboardState, topics: Topics) -> MessageHandler:
    """An MQTT message handler that feeds ``state``."""
    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        if topic == topics.balancer_stats:
            state.feed_stats(payload)
        elif topic == topics.balancer_status:
            state.feed_balancer_status(payload)
    return on_message


def dashboard_transport(settings: Settings, state: DashboardState, url: str) -> MqttTransport:
    """The dashboard's MQTT connection (not started): feeds ``state``, announces ``url``
    retained on ``dashboard/status`` on every connect, and leaves an offline will."""
    topics = Topics(settings.topic_prefix)
    online = DashboardStatus(online=True, url=url).encode()

    def on_connect() -> None:
        state.set_connected(True)
        transport.publish(topics.dashboard_status, online, qos=1, retain=True)

    transport = MqttTransport(
        host=settings.broker_host, port=settings.broker_port,
        client_id=f"lbmqtt-dashboard-{secrets.token_hex(4)}",
        on_message=message_handler(state, topics), subscriptions=subscriptions(topics),
        on_connect=on_connect, on_disconnect=lambda: state.set_connected(False),
        will=Will(topics.dashboard_status, DashboardStatus(online=False).encode()),
        keepalive_s=settings.broker_keepalive_s, username=settings.broker_username,
        password=settings.broker_password, connect_timeout_s=settings.connect_timeout_s)
    return transport


# ------------------------------------------------------------------------------ the page


def _sample_columns(samples: tuple[Sample, ...]) -> dict[str, Any]:
    columns = {c: [getattr(s, c) for s in samples] for c in SAMPLE_COLUMNS[1:]}
    # Bokeh datetimes are epoch milliseconds
    return {"t": [s.time * 1000.0 for s in samples], **columns}


def _node_columns(stats: BalancerStats | None) -> dict[str, Any]:
    nodes = sorted(stats.nodes, key=lambda n: n.name) if stats is not None else []
    return {
        "name": [n.name for n in nodes], "online": ["yes" if n.online else "no" for n in nodes],
        "host": [n.host for n in nodes], "slots": [n.slots for n in nodes],
        "busy": [n.busy for n in nodes], "speed": [n.speed for n in nodes],
        "tasks": [", ".join(n.tasks) for n in nodes],
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
    parts = [f"queued <b>{s.queued}</b>", f"running <b>{s.running}</b>",
             f"busy <b>{s.busy}</b> / {s.slots} slots", f"done {s.done_total}",
             f"failed {s.failed_total}", f"nodes {online} / {len(s.nodes)}"]
    return f"<b>lbmqtt</b> balancer {html.escape(s.instance)}: " + " &middot; ".join(parts)


class DashboardPage:
    """The models of one page (one per browser session) and its update coroutine."""

    def __init__(self, doc: Document, state: DashboardState):
        self.state = state
        snap = state.snapshot()
        self._last_seq = snap.samples[-1].seq if snap.samples else 0
        self._last_stats: BalancerStats | None = snap.stats
        self.samples = ColumnDataSource(_sample_columns(snap.samples), name="samples")
        self.nodes = ColumnDataSource(_node_columns(snap.stats), name="nodes")
        self.summary = Div(text=_summary_html(snap), name="summary")
        self.warnings = Div(text=self._warnings_html(snap), name="warnings")

        tools = "pan,xwheel_zoom,box_zoom,reset,save"
        tasks = figure(title="Tasks", x_axis_type="datetime", height=260, tools=tools,
                       sizing_mode="stretch_width", name="tasks_chart",
                       y_range=DataRange1d(start=0))
        tasks.line("t", "queued", source=self.samples, legend_label="queued", color="#d62728",
                   line_width=2)
        tasks.line("t", "running", source=self.samples, legend_label="running",
                   color="#2ca02c", line_width=2)
        workers = figure(title="Worker slots", x_axis_type="datetime", height=260, tools=tools,
                         sizing_mode="stretch_width", x_range=tasks.x_range,
                         name="slots_chart", y_range=DataRange1d(start=0))
        workers.step("t", "slots", source=self.samples, legend_label="slots", color="#7f7f7f",
                     mode="after", line_dash="dashed", line_width=2)
        workers.line("t", "busy", source=self.samples, legend_label="busy", color="#1f77b4",
                     line_width=2)
        for fig in (tasks, workers):
            fig.legend.location = "top_left"
            fig.legend.click_policy = "hide"
        table = DataTable(source=self.nodes, index_position=None, height=220,
                          sizing_mode="stretch_width", name="nodes_table",
                          columns=[TableColumn(field=c, title=c) for c in NODE_COLUMNS])
        doc.title = "lbmqtt dashboard"
        charts = row(tasks, workers, sizing_mode="stretch_width")
        doc.add_root(column(self.summary, self.warnings, charts, table,
                            sizing_mode="stretch_width"))
        self._doc = doc
        # Bokeh's stubs only know plain callbacks; coroutine functions are supported.
        self._callback = doc.add_periodic_callback(cast(Callable[[], None], self.update),
                                                   UPDATE_MS)

    @staticmethod
    def _warnings_html(snap: Snapshot) -> str:
        items = warnings_of(snap)
        if not items:
            return ""
        lis = "".join(f"<li>{html.escape(w)}</li>" for w in items)
        return f'<ul style="color:#b35900;margin:0">{lis}</ul>'

    async def update(self) -> None:
        """Stream the samples this page has not shown yet and refresh the rest.

        Runs as the session's periodic callback on the event loop (``async def``: Bokeh
        3.10 would run a plain function in a worker thread).
        """
        snap = self.state.snapshot(self._last_seq)
        if snap.closed:
            with contextlib.suppress(ValueError):
                self._doc.remove_periodic_callback(self._callback)
            return
        if snap.samples:
            self.samples.stream(_sample_columns(snap.samples), rollover=ROLLOVER)
            self._last_seq = snap.samples[-1].seq
        if snap.stats is not self._last_stats:
            self._last_stats = snap.stats
            self.nodes.data = _node_columns(snap.stats)
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
    return sorted({f"[{h}]:{port}" if ":" in h and not h.startswith("[") else f"{h}:{port}"
                   for h in hosts if h not in _WILDCARD_HOSTS})


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
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
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
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror} (is another "
                                 f"dashboard running there? --monitor-port 0 picks a free "
                                 f"port)") from exc
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
        tornado_app = BokehTornado({"/": app}, absolute_url=url,
                                   extra_websocket_origins=_origins(host, bound),
                                   compress_response=True)
        http_server = HTTPServer(tornado_app, xheaders=False)
        http_server.add_sockets(sockets)
    except Exception:
        for s in sockets:
            s.close()
        raise
    server = BaseServer(IOLoop.current(), tornado_app, http_server)
    server.start()
    return DashboardServer(server, http_server, bound, url)


async def serve(settings: Settings, *, ready_fd: int | None = None,
                stop: asyncio.Event | None = None) -> None:
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
                await transport.publish_confirmed(topics.dashboard_status,
                                                  DashboardStatus(online=False).encode(),
                                                  retain=True, timeout_s=2.0)
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
