"""Prometheus metrics of the balancer: a text endpoint at ``http://METRICS_IP:METRICS_PORT/metrics``.

Gauges and counters are read at scrape time from the balancer's latest stats snapshot (an
immutable :class:`~lbmqtt.protocol.BalancerStats`, so the scrape thread never touches the
balancer's live state); wait and run times are histograms observed as tasks finish
(:class:`_Histograms`: a list per task name, copied whole by the scrape thread).

Names follow Prometheus conventions: ``lbmqtt_`` prefix, ``_total`` counters, seconds.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .protocol import BalancerStats

log = logging.getLogger(__name__)

BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    float("inf"),
)
"""Seconds: from no-op tasks (milliseconds) to long jobs (an hour)."""
_LE = {b: "+Inf" if b == float("inf") else repr(b) for b in BUCKETS}
"""Each bound as exposition text writes it (``le="0.001"``, ``le="+Inf"``)."""


class _Histograms(Collector):
    """A histogram of seconds per task name, as prometheus_client's ``Histogram`` with a
    ``name`` label exposes one, observed in ~0.4 µs on the balancer's loop.

    ``Histogram.labels(name).observe(v)`` cost ~3 µs with its locks (100,000 of each, same
    run), twice per finished task. Here each name has one list,
    its bucket counts then the sum; only the loop thread writes it, and the scrape thread
    copies it whole (one C-level copy: the GIL is not let go within it), so a scrape sees
    each name's counts and sum as of one moment."""

    def __init__(self, metric: str, doc: str):
        self.metric = metric
        self.doc = doc
        self.by_name: dict[str, list[float]] = {}

    def observe(self, name: str, seconds: float) -> None:
        counts = self.by_name.get(name)
        if counts is None:
            counts = self.by_name[name] = [0] * len(BUCKETS) + [0.0]
        if not math.isnan(seconds):
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1  # (the first bound >= it)
            counts[-1] += seconds

    def collect(self) -> Iterator[Any]:
        family = HistogramMetricFamily(self.metric, self.doc, labels=["name"])
        for name, live in list(self.by_name.items()):
            counts = list(live)
            cumulative, total = [], 0.0
            for bound, n in zip(BUCKETS, counts[:-1], strict=True):
                total += n
                cumulative.append((_LE[bound], total))
            family.add_metric([name], cumulative, sum_value=counts[-1])
        yield family


class _StatsCollector(Collector):
    def __init__(self, latest: Callable[[], BalancerStats | None]):
        self._latest = latest

    def collect(self) -> Iterator[Any]:
        s = self._latest()
        if s is None:
            return
        for name, value, doc in (
            ("submitted", s.submitted_total, "Tasks accepted"),
            ("done", s.done_total, "Tasks finished successfully"),
            ("failed", s.failed_total, "Tasks failed (after their last attempt)"),
            ("cancelled", s.cancelled_total, "Tasks cancelled"),
            ("refused", s.refused_total, "Submissions refused (cap, duplicate id, bad)"),
            ("bad_messages", s.bad_messages_total, "Malformed inbound messages"),
            ("copies_started", s.copies_started_total, "Speculative copies started"),
            ("copies_won", s.copies_won_total, "Speculative copies whose result came first"),
            (
                "copies_wasted",
                s.copies_wasted_total,
                "Speculative copies withdrawn without giving the result",
            ),
            ("taken_back", s.taken_back_total, "Tasks taken back from a node before they started"),
        ):
            yield CounterMetricFamily(f"lbmqtt_{name}", doc, value=value)
        by_code = CounterMetricFamily(
            "lbmqtt_refused_by_code",
            "Refusals by error code (too_large, rate_limited, ...)",
            labels=["code"],
        )
        for code, n in sorted(s.refused_by_code.items()):
            by_code.add_metric([code], n)
        yield by_code
        broker = CounterMetricFamily(
            "lbmqtt_broker_refused",
            "The embedded broker's refusals by kind (logins, denied, too_large, ...)",
            labels=["kind"],
        )
        for kind, n in sorted(s.broker_refused.items()):
            broker.add_metric([kind], n)
        yield broker
        for name, value, doc in (
            ("queued", s.queued, "Tasks queued"),
            ("running", s.running, "Tasks placed on a node (assigned or running)"),
            ("slots", s.slots, "Worker slots of the nodes online"),
            ("slots_busy", s.busy, "Worker slots busy"),
        ):
            yield GaugeMetricFamily(f"lbmqtt_{name}", doc, value=value)
        g = GaugeMetricFamily(
            "lbmqtt_queued_by_band", "Tasks queued per priority band", labels=["band"]
        )
        for band, n in sorted(s.queued_by_band.items()):
            g.add_metric([band], n)
        yield g
        queued = GaugeMetricFamily("lbmqtt_user_queued", "Tasks queued per user", labels=["user"])
        running = GaugeMetricFamily("lbmqtt_user_running", "Tasks placed per user", labels=["user"])
        for u in s.users:
            queued.add_metric([u.user], u.queued)
            running.add_metric([u.user], u.running)
        yield queued
        yield running
        by_name = {
            k: GaugeMetricFamily(f"lbmqtt_task_{k}", f"Tasks {k} per task name", labels=["name"])
            for k in ("queued", "running")
        }
        finished = CounterMetricFamily(
            "lbmqtt_task_finished",
            "Tasks finished per task name and outcome",
            labels=["name", "outcome"],
        )
        for t in s.names:
            by_name["queued"].add_metric([t.name], t.queued)
            by_name["running"].add_metric([t.name], t.running)
            finished.add_metric([t.name, "done"], t.done)
            finished.add_metric([t.name, "failed"], t.failed)
            finished.add_metric([t.name, "cancelled"], t.cancelled)
        yield from by_name.values()
        yield finished
        node = {
            k: GaugeMetricFamily(f"lbmqtt_node_{k}", doc, labels=["node"])
            for k, doc in (
                ("online", "1 if the node is online"),
                ("slots", "Worker slots of the node"),
                ("slots_busy", "Worker slots busy on the node"),
                ("speed", "The node's speed"),
                ("load1", "The node's 1-minute load average"),
                ("last_seen_timestamp_seconds", "When the node was last heard from"),
            )
        }
        for ns in s.nodes:
            node["online"].add_metric([ns.name], 1.0 if ns.online else 0.0)
            node["slots"].add_metric([ns.name], ns.slots)
            node["slots_busy"].add_metric([ns.name], ns.busy)
            node["speed"].add_metric([ns.name], ns.speed)
            if ns.load:
                node["load1"].add_metric([ns.name], ns.load[0])
            node["last_seen_timestamp_seconds"].add_metric([ns.name], ns.last_seen)
        yield from node.values()
        yield GaugeMetricFamily(
            "lbmqtt_stats_timestamp_seconds", "When these figures were taken", value=s.time
        )


class Metrics:
    """The balancer's metrics registry and, once :meth:`serve` is called, its endpoint.

    Args:
        latest: returns the balancer's latest stats snapshot (None before the first).
    """

    def __init__(self, latest: Callable[[], BalancerStats | None]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StatsCollector(latest))
        self.wait = _Histograms("lbmqtt_task_wait_seconds", "Submit to start, per task name")
        self.run = _Histograms("lbmqtt_task_run_seconds", "Start to finish, per task name")
        self.registry.register(self.wait)
        self.registry.register(self.run)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def observe(self, name: str, wait_s: float, run_s: float) -> None:
        """Record one finished task's wait and run times."""
        self.wait.observe(name, wait_s)
        self.run.observe(name, run_s)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) in a thread; returns the port.

        Raises:
            OSError: the address cannot be bound.
        """
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        self.port = int(self._server.server_address[1])
        return self.port

    def close(self) -> None:
        """Stop the endpoint (if serving)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
