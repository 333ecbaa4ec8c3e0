"""Status and statistics: what the balancer, the broker and the dashboard announce, the
stats snapshot and its history."""

from __future__ import annotations

import math
import sys
from typing import Final, Literal

from .codec import _Lenient
from .models import GroupInfo


class BalancerStatus(_Lenient):
    """Retained on ``balancer/status``; the will sets ``online: false``."""

    v: Literal[1] = 1
    online: bool
    instance: str = ""
    version: str = ""
    started_at: float = 0.0
    pid: int = 0
    host: str = ""


class BrokerStatus(_Lenient):
    """Retained on ``broker/status`` by the embedded broker: where it listens, and what
    it refused (counts since it started, republished when they change, at most every
    few seconds)."""

    v: Literal[1] = 1
    online: bool
    host: str = ""
    port: int = 0
    version: str = ""
    refused: dict[str, int] = {}
    """``logins``, ``denied`` (publish, subscribe or retain outside the login's rules),
    ``too_large`` (packets over their cap, QoS 2), ``connect_timeouts``, ``revoked``,
    ``offline_dropped`` (messages for an absent persistent session over its bound),
    ``dollar_publishes``."""


class DashboardStatus(_Lenient):
    """Retained on ``dashboard/status``: the URL of the live dashboard."""

    v: Literal[1] = 1
    online: bool
    url: str = ""


class NodeSummary(_Lenient):
    name: str
    online: bool
    host: str = ""
    slots: int = 0
    busy: int = 0
    speed: float = 1.0
    """As it declares it (NODE_SPEED)."""
    speed_learned: float | None = None
    """As learned from the tasks it ran, relative to the fastest node online (1.0); None
    before its first task ended."""
    tasks: list[str] = []
    groups: list[GroupInfo] = []
    last_seen: float = 0.0
    load: list[float] = []
    resources: dict[str, float] = {}
    reserved: dict[str, float] = {}
    tags: list[str] = []


class UserSummary(_Lenient):
    user: str
    queued: int = 0
    running: int = 0


class NameSummary(_Lenient):
    """Per task name: counts, and wait (submit to start) and run times of recent tasks."""

    name: str
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    waiting: str | None = None
    count: int = 0
    """Finished tasks the times below are computed on (the most recent ones)."""
    wait_mean_s: float | None = None
    wait_p95_s: float | None = None
    run_mean_s: float | None = None
    run_p95_s: float | None = None
    wait_p50_s: float | None = None
    wait_p99_s: float | None = None
    run_p50_s: float | None = None
    run_p99_s: float | None = None
    queued_by_band: dict[str, int] = {}
    """Queued tasks of this name per priority band (see :attr:`BalancerStats.bands`)."""


class TaskRow(_Lenient):
    """One running or recently finished task, for the dashboard's task table."""

    id: str
    user: str
    name: str
    status: str
    priority: int = 0
    node: str | None = None
    progress: int = 0
    submitted_at: float = 0.0
    wait_s: float | None = None
    """Submit to start (so far, while it has not started)."""
    run_s: float | None = None
    """Start to finish (so far, while it runs)."""


class StreamBar(_Lenient):
    """One attempt of a task on a node, for the dashboard's task stream."""

    id: str
    name: str
    node: str
    start: float
    """When it started (wall clock)."""
    end: float | None = None
    """When it ended (None: it runs)."""
    status: str = "running"
    """``running``, ``done``, ``failed``, ``cancelled``, ``lost`` (its worker or node), or
    ``withdrawn`` (the other attempt of a speculated task gave the result)."""
    speculative: bool = False
    """A speculative copy (or the copy that carries on for a lost original)."""


class BalancerStats(_Lenient):
    """Retained snapshot on ``balancer/stats`` (about twice a second)."""

    v: Literal[1] = 1
    time: float
    instance: str = ""
    started_at: float = 0.0
    queued: int = 0
    running: int = 0
    submitted_total: int = 0
    done_total: int = 0
    failed_total: int = 0
    cancelled_total: int = 0
    refused_total: int = 0
    refused_by_code: dict[str, int] = {}
    """Refusals since the balancer started, by :class:`~lbmqtt.errors.ErrorCode`."""
    bad_messages_total: int = 0
    copies_started_total: int = 0
    """Speculative copies started (a second attempt of a straggler on a faster slot)."""
    copies_won_total: int = 0
    """Copies whose result came first (the original was withdrawn)."""
    copies_wasted_total: int = 0
    """Copies withdrawn without giving the result (the original ended first, the copy
    failed or was lost, the task was cancelled)."""
    taken_back_total: int = 0
    """Tasks a node held and had not started, taken back for a slot elsewhere (a faster
    idle one, or a draining node's)."""
    broker_refused: dict[str, int] = {}
    """The embedded broker's refusals (:attr:`BrokerStatus.refused`), as last heard."""
    slots: int = 0
    busy: int = 0
    nodes: list[NodeSummary] = []
    users: list[UserSummary] = []
    names: list[NameSummary] = []
    queued_by_priority: dict[str, int] = {}
    bands: list[str] = []
    """Priority bands, from the worker groups of the nodes online (``"0-9"``, ``"10-1000"``);
    ``"none"`` holds priorities no group serves."""
    queued_by_band: dict[str, int] = {}
    tasks: list[TaskRow] = []
    """Running tasks (up to 100), then the most recently finished (up to 50)."""
    stream: list[StreamBar] = []
    """Attempts that ended most recently (up to 200), then those running (up to 100)."""
    warnings: list[str] = []


HISTORY_NAMES: Final = 20
"""Task names a history sample keeps queued counts of (the most queued)."""
MAX_CLOCK_AHEAD_S: Final = 300.0
"""Stats stamped further ahead of the reader's clock are refused (clock skew allowed)."""


def band_label(lo: int, hi: int) -> str:
    """The label of the priority band ``lo..hi`` (``"0-9"``)."""
    return f"{lo}-{hi}"


def band_order(label: str) -> tuple[int, int, str]:
    """Sort key of band labels: in priority order ("0-9" before "10-1000"), anything else
    ("none") last."""
    lo, sep, hi = label.rpartition("-")
    try:
        return (int(lo), int(hi), "") if sep else (sys.maxsize, 0, label)
    except ValueError:
        return (sys.maxsize, 0, label)


def plausible_time(t: float, now: float) -> bool:
    """Whether a stats time stamp can be a time of ``now``: finite and not far ahead (a
    "snapshot from the future" would make every real one after it look like a replay)."""
    return math.isfinite(t) and t <= now + MAX_CLOCK_AHEAD_S


class HistorySample(_Lenient):
    """One point of :class:`BalancerHistory`: the totals of one stats snapshot."""

    time: float
    queued: int = 0
    running: int = 0
    busy: int = 0
    slots: int = 0
    done_total: int = 0
    failed_total: int = 0
    refused: int = 0
    bands: dict[str, int] = {}
    names: dict[str, dict[str, int]] = {}
    """Queued per task name and band (the names with the most queued, up to 20)."""

    @classmethod
    def of(cls, stats: BalancerStats) -> HistorySample:
        """The sample of one stats snapshot."""
        top = sorted(stats.names, key=lambda n: -n.queued)[:HISTORY_NAMES]
        return cls(
            time=stats.time,
            queued=stats.queued,
            running=stats.running,
            busy=stats.busy,
            slots=stats.slots,
            done_total=stats.done_total,
            failed_total=stats.failed_total,
            refused=stats.refused_total,
            bands=stats.queued_by_band,
            names={n.name: n.queued_by_band for n in top if n.queued_by_band},
        )


class BalancerHistory(_Lenient):
    """The balancer's window of recent stats, sent on ``balancer/history`` when a dashboard
    comes online, so that its charts start with the last minutes instead of empty."""

    v: Literal[1] = 1
    instance: str = ""
    samples: list[HistorySample] = []
