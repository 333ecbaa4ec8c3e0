"""What a page shows, as plain data: the columns of its data sources, its summary line and
its warnings, built from a :class:`~lbmqtt.dashboard.state.Snapshot` (no Bokeh models here).
"""

from __future__ import annotations

import html
import zlib
from collections.abc import Iterable
from typing import Any, Final

from ..protocol import BalancerStats, StreamBar, band_order
from .state import Sample, Snapshot

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
    "speed_learned",
    "last_seen",
    "tasks",
)
STREAM_WINDOW_S: Final = 300.0
"""The task stream shows the attempts of the last five minutes."""
NAME_COLORS: Final = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
)
MAX_BANDS: Final = 6
"""Bands drawn in the queue chart; more are added up in the last one ("more")."""
BAND_COLORS: Final = ("#d62728", "#ff7f0e", "#bcbd22", "#2ca02c", "#17becf", "#9467bd")


def sample_columns(samples: tuple[Sample, ...]) -> dict[str, Any]:
    """Columns of the time-series charts, one row per sample."""
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


def bands_seen(
    labels: Iterable[str], stats: BalancerStats | None, samples: Iterable[Sample]
) -> list[str]:
    """Every band in ``labels``, ``stats`` and ``samples``, in priority order (a band no
    node serves now still has history to draw)."""
    seen = set(labels) | (set(stats.bands) if stats is not None else set())
    for s in samples:
        seen.update(b for b, _ in s.bands)
    return sorted(seen, key=band_order)


def band_slots(bands: list[str]) -> list[str]:
    """Up to MAX_BANDS labels: the bands in order, the last one adding up any beyond."""
    if len(bands) <= MAX_BANDS:
        return bands
    return [*bands[: MAX_BANDS - 1], f"{bands[MAX_BANDS - 1]} and more"]


def queue_columns(samples: tuple[Sample, ...], bands: list[str], name: str) -> dict[str, Any]:
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


def node_columns(stats: BalancerStats | None) -> dict[str, Any]:
    """Columns of the nodes chart and table, one row per node name."""
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
        "speed_learned": [
            f"{n.speed_learned:.2f}" if n.speed_learned is not None else "-" for n in nodes
        ],
        "load": [f"{n.load[0]:.2f}" if n.load else "-" for n in nodes],
        "last_seen": [_age(max(0.0, now - n.last_seen)) if n.last_seen else "never" for n in nodes],
        "tasks": [", ".join(n.tasks) for n in nodes],
    }


def user_columns(stats: BalancerStats | None) -> dict[str, Any]:
    """Columns of the users chart, one row per user."""
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


def time_columns(stats: BalancerStats | None) -> dict[str, Any]:
    """Columns of the task-name table: counts and wait and run time percentiles."""
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


def task_columns(stats: BalancerStats | None) -> dict[str, Any]:
    """Columns of the tasks table: running, then recently finished."""
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


def name_color(name: str) -> str:
    """A task name's colour in the task stream (the same on every page and every day)."""
    return NAME_COLORS[zlib.crc32(name.encode()) % len(NAME_COLORS)]


def stream_columns(
    bars: Iterable[StreamBar], now: float, window_s: float = STREAM_WINDOW_S
) -> tuple[dict[str, Any], list[str]]:
    """Columns of the task stream, and its rows (``"node #k"``, by node then k).

    One row per slot of a node: each attempt takes the first row of its node free when it
    started (as a node's slots run one task each, that is at most as many rows as it has
    slots, give or take the clocks). A bar per attempt, coloured by task name; copies are
    hatched; an attempt withdrawn (the other one won) or lost is faded; a running one
    reaches ``now``.
    """
    shown = sorted(
        (b for b in bars if (b.end if b.end is not None else now) >= now - window_s),
        key=lambda b: (b.start, b.node, b.id),
    )
    lanes: dict[str, list[float]] = {}
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "lane",
            "left",
            "right",
            "id",
            "name",
            "node",
            "status",
            "copy",
            "color",
            "alpha",
            "hatch",
        )
    }
    for b in shown:
        end = b.end if b.end is not None else max(now, b.start)
        ends = lanes.setdefault(b.node, [])
        k = next((i for i, e in enumerate(ends) if e <= b.start + 1e-3), len(ends))
        if k == len(ends):
            ends.append(end)
        else:
            ends[k] = end
        cols["lane"].append(f"{b.node} #{k + 1}")
        cols["left"].append(1000 * b.start)
        cols["right"].append(1000 * end)
        cols["id"].append(b.id)
        cols["name"].append(b.name)
        cols["node"].append(b.node)
        cols["status"].append(b.status)
        cols["copy"].append("copy" if b.speculative else "")
        cols["color"].append(name_color(b.name))
        cols["alpha"].append(0.35 if b.status in ("withdrawn", "lost") else 0.9)
        cols["hatch"].append("/" if b.speculative else " ")
    rows = [f"{node} #{k + 1}" for node in sorted(lanes) for k in range(len(lanes[node]))]
    return cols, rows


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


def summary_html(snap: Snapshot) -> str:
    """The summary line at the top of the page."""
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
