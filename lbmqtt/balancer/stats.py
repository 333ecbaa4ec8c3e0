"""The balancer's numbers: the counters it keeps, and the stats it publishes.

:class:`Tally` holds every count the balancer keeps as tasks move (queued per queue,
running, done, failed and cancelled per name, wait and run times, refusals, the history of
samples); the task transitions (:mod:`.tasks`) update it. :func:`snapshot` turns it, with
the task and node tables and the scheduler, into the :class:`BalancerStats` published on
``balancer/stats`` about twice a second (and read by the dashboard and ``lbmqtt status``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import protocol
from ..config import Settings
from ..errors import ErrorCode
from ..metrics import Metrics
from ..scheduler import Scheduler
from .records import NodeInfo, QueueKey, TaskRecord, copy_on

log = logging.getLogger(__name__)

TIMES_KEPT = 1000  # per task name, for the mean and percentiles of wait and run times
HISTORY_KEPT = 720  # stats samples a new dashboard is sent: 6 minutes at 2 Hz
RECENT_KEPT = 50  # finished tasks in the stats' task table
RUNNING_ROWS = 100  # running tasks in the stats' task table
STREAM_ENDED = 200  # attempts that ended, in the stats' task stream

EndedAttempt = tuple[str, str, str, float, float, str, bool]
"""An ended attempt not shown yet: id, name, node, start, end, status, speculative."""
STREAM_RUNNING = 100  # attempts running, in the stats' task stream
REFUSALS_WARN_S = 60.0  # refusals within this long are a warning
RECENTLY_LOST_S = 300.0


@dataclass(slots=True)
class Tally:
    """The balancer's running counts (what :func:`snapshot` summarises)."""

    counters: Counter[str] = field(default_factory=Counter)
    queued_by: Counter[QueueKey] = field(default_factory=Counter)
    """(name, priority, requires, tags) -> tasks queued."""
    running_by_name: Counter[str] = field(default_factory=Counter)
    done_by_name: Counter[str] = field(default_factory=Counter)
    failed_by_name: Counter[str] = field(default_factory=Counter)
    cancelled_by_name: Counter[str] = field(default_factory=Counter)
    refused_by_code: Counter[str] = field(default_factory=Counter)
    broker_refused: dict[str, int] = field(default_factory=dict)
    """The embedded broker's refusals, as last heard."""
    times: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    """name -> (wait, run) of its last TIMES_KEPT finished tasks."""
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_KEPT))
    """Ids of the tasks finished last."""
    last_refusal: tuple[float, str] | None = None
    """(time, why) of the newest refusal."""
    history: deque[protocol.HistorySample] = field(
        default_factory=lambda: deque(maxlen=HISTORY_KEPT)
    )
    last_stats: protocol.BalancerStats | None = None
    ended: deque[protocol.StreamBar | EndedAttempt] = field(
        default_factory=lambda: deque(maxlen=STREAM_ENDED)
    )
    """The attempts that ended last (the dashboard's task stream): the fields of each
    :class:`~lbmqtt.protocol.StreamBar`, the model built once it is first shown
    (:meth:`ended_bars`). Thousands of tasks may end in a second; a snapshot shows 200."""

    def attempt_ended(
        self,
        rec: TaskRecord,
        node: str | None,
        start: float | None,
        status: str,
        *,
        copy: bool = False,
    ) -> None:
        """An attempt of ``rec`` on ``node``, started at ``start``, ended now."""
        if node is not None and start is not None:
            end = max(start, time.time())
            self.ended.append((rec.id, rec.name, node, start, end, status, copy))

    def ended_bars(self) -> list[protocol.StreamBar]:
        """The attempts that ended last, as the stats' stream bars."""
        ended = self.ended
        bars: list[protocol.StreamBar] = []
        for i, e in enumerate(list(ended)):
            if isinstance(e, tuple):
                bar = ended[i] = protocol.StreamBar(
                    id=e[0], name=e[1], node=e[2], start=e[3], end=e[4], status=e[5],
                    speculative=e[6],
                )  # fmt: skip
            else:
                bar = e
            bars.append(bar)
        return bars

    def refused(self, who: str, why: str, code: str = ErrorCode.INVALID) -> None:
        """Count a refused submission (or message) and remember it for the warning."""
        self.counters["refused"] += 1
        self.refused_by_code[str(code)] += 1
        self.last_refusal = (time.time(), f"{who}: {why}"[:300])

    def sample(self, stats: protocol.BalancerStats) -> None:
        """Keep ``stats`` as the latest, and in the history."""
        self.last_stats = stats
        self.history.append(protocol.HistorySample.of(stats))

    def finished(self, name: str, wait: float, run: float) -> None:
        """Record the wait and run times of a finished task."""
        times = self.times.get(name)
        if times is None:
            times = self.times[name] = deque(maxlen=TIMES_KEPT)
        times.append((wait, run))


def snapshot(
    tally: Tally,
    *,
    instance: str,
    started_at: float,
    tasks: dict[str, TaskRecord],
    nodes: dict[str, NodeInfo],
    scheduler: Scheduler,
) -> protocol.BalancerStats:
    """A snapshot of queues, nodes, users and warnings."""
    now_mono = time.monotonic()
    now = time.time()
    summaries: list[protocol.NodeSummary] = []
    slots = busy = 0
    learned = scheduler.learned_speeds()
    for info in sorted(nodes.values(), key=lambda i: i.name):
        st = info.status
        n_slots = sum(g.workers for g in st.groups) if st else 0
        n_busy = len(info.assigned)
        if info.online:
            slots += n_slots
            busy += n_busy
        summaries.append(
            protocol.NodeSummary(
                name=info.name,
                online=info.online,
                host=st.host if st else "",
                slots=n_slots,
                busy=n_busy,
                speed=st.speed if st else 1.0,
                speed_learned=learned.get(info.name),
                tasks=st.tasks if st else [],
                groups=st.groups if st else [],
                last_seen=now - (now_mono - info.last_seen) if info.last_seen else 0.0,
                load=info.load,
                resources=st.resources if st else {},
                reserved=dict(scheduler.reserved(info.name)),
                tags=st.tags if st else [],
            )
        )
    users = scheduler.users()
    user_rows = [
        protocol.UserSummary(
            user=u, queued=scheduler.queued_for(u), running=scheduler.running_for(u)
        )
        for u in sorted(users)
    ]
    queued_by_name = Counter[str]()
    by_prio = Counter[str]()
    band_of = _bands(summaries)
    by_band = Counter[str]()
    name_bands: dict[str, Counter[str]] = {}
    for (name, prio, _, _), n in tally.queued_by.items():
        if n <= 0:
            continue
        queued_by_name[name] += n
        by_prio[str(prio)] += n
        band = band_of(prio)
        by_band[band] += n
        name_bands.setdefault(name, Counter())[band] += n
    names = sorted(
        set(queued_by_name)
        | set(tally.running_by_name)
        | set(tally.done_by_name)
        | set(tally.failed_by_name)
        | set(tally.cancelled_by_name)
    )
    warnings: list[str] = []
    online = [i for i in nodes.values() if i.online]
    if not online:
        warnings.append(
            "no node is online: tasks wait until one joins (`lbmqtt node --tasks MODULE`)"
        )
    name_rows = []
    for name in names:
        why = {
            k: scheduler.why_waiting(*k)
            for k, c in tally.queued_by.items()
            if k[0] == name and c > 0
        }
        waiting = "; ".join(sorted({r for r in why.values() if r})) or None
        if waiting and online:  # (count only the tasks that have a reason to wait)
            stuck = sum(tally.queued_by[k] for k, r in why.items() if r)
            warnings.append(f"{stuck} queued {name!r} task(s) wait: {waiting}")
        times = tally.times.get(name, ())
        waits = sorted(w for w, _ in times)
        runs = sorted(r for _, r in times)
        name_rows.append(
            protocol.NameSummary(
                name=name,
                queued=queued_by_name[name],
                running=tally.running_by_name[name],
                done=tally.done_by_name[name],
                failed=tally.failed_by_name[name],
                cancelled=tally.cancelled_by_name[name],
                waiting=waiting,
                count=len(runs),
                wait_mean_s=sum(waits) / len(waits) if waits else None,
                wait_p95_s=_pct(waits, 0.95),
                run_mean_s=sum(runs) / len(runs) if runs else None,
                run_p95_s=_pct(runs, 0.95),
                wait_p50_s=_pct(waits, 0.5),
                wait_p99_s=_pct(waits, 0.99),
                run_p50_s=_pct(runs, 0.5),
                run_p99_s=_pct(runs, 0.99),
                queued_by_band=dict(name_bands.get(name, {})),
            )
        )
    for info in nodes.values():
        if (
            not info.online
            and info.offline_since is not None
            and now_mono - info.offline_since < RECENTLY_LOST_S
        ):
            warnings.append(
                f"node {info.name} {info.offline_reason} {now_mono - info.offline_since:.0f} s ago"
            )
    c = tally.counters
    # refusals since the newest sample older than the window (or since the start)
    full = len(tally.history) == tally.history.maxlen
    refused_before = tally.history[0].refused if full else 0
    for h in reversed(tally.history):
        if now - h.time > REFUSALS_WARN_S:
            refused_before = h.refused
            break
    if c["refused"] > refused_before and tally.last_refusal is not None:
        warnings.append(
            f"{c['refused'] - refused_before} submission(s) refused in the "
            f"last {REFUSALS_WARN_S:.0f} s; last: {tally.last_refusal[1]}"
        )
    return protocol.BalancerStats(
        time=now,
        instance=instance,
        started_at=started_at,
        queued=scheduler.queued,
        running=sum(tally.running_by_name.values()),
        submitted_total=c["submitted"],
        done_total=c["done"],
        failed_total=c["failed"],
        cancelled_total=c["cancelled"],
        refused_total=c["refused"],
        refused_by_code=dict(tally.refused_by_code),
        broker_refused=tally.broker_refused,
        bad_messages_total=c["bad_messages"],
        copies_started_total=c["copies_started"],
        copies_won_total=c["copies_won"],
        copies_wasted_total=c["copies_wasted"],
        taken_back_total=c["taken_back"],
        slots=slots,
        busy=busy,
        nodes=summaries,
        users=user_rows,
        names=name_rows,
        queued_by_priority=dict(by_prio),
        bands=sorted(
            set(by_band) | {protocol.band_label(*g) for g in band_of.groups},
            key=protocol.band_order,
        ),
        queued_by_band=dict(by_band),
        tasks=_task_rows(tasks, nodes, tally.recent, now),
        stream=[*tally.ended_bars(), *_running_bars(tasks, nodes)],
        warnings=warnings,
    )


def _running_bars(
    tasks: dict[str, TaskRecord], nodes: dict[str, NodeInfo]
) -> list[protocol.StreamBar]:
    """The attempts running now (up to STREAM_RUNNING): originals and copies."""
    bars: list[protocol.StreamBar] = []
    for info in nodes.values():
        for tid in info.assigned:
            if len(bars) >= STREAM_RUNNING:
                return bars
            rec = tasks.get(tid)
            if rec is None:
                continue
            c = copy_on(rec, info.name)
            if c is not None:  # the copy on this node
                start, speculative = c.started_at, True
            elif rec.status == protocol.Status.RUNNING:
                start, speculative = rec.started_at, rec.by_copy
            else:
                continue
            if start is not None:
                bars.append(
                    protocol.StreamBar(
                        id=rec.id,
                        name=rec.name,
                        node=info.name,
                        start=start,
                        speculative=speculative,
                    )
                )
    return bars


def _task_rows(
    tasks: dict[str, TaskRecord], nodes: dict[str, NodeInfo], recent: deque[str], now: float
) -> list[protocol.TaskRow]:
    """The placed tasks (up to RUNNING_ROWS), then the most recently finished."""
    rows: list[protocol.TaskRow] = []
    for info in nodes.values():
        for tid in info.assigned:
            if len(rows) >= RUNNING_ROWS:
                break
            rec = tasks.get(tid)
            if rec is not None:
                rows.append(_task_row(rec, now))
    rows.sort(key=lambda r: r.submitted_at)
    for tid in reversed(recent):
        rec = tasks.get(tid)
        if rec is not None and rec.status.final:
            rows.append(_task_row(rec, now))
    return rows


def _task_row(rec: TaskRecord, now: float) -> protocol.TaskRow:
    start, end = rec.started_at, rec.finished_at or now
    return protocol.TaskRow(
        id=rec.id,
        user=rec.user,
        name=rec.name,
        status=rec.status.value,
        priority=rec.priority,
        node=rec.node,
        progress=rec.progress,
        submitted_at=rec.submitted_at,
        wait_s=max(0.0, (start if start is not None else end) - rec.submitted_at),
        run_s=None if start is None else max(0.0, end - start),
    )


class _Bands:
    """Priority -> band label, the bands being the priority ranges of worker groups."""

    def __init__(self, groups: list[tuple[int, int]]):
        self.groups = sorted(set(groups))

    def __call__(self, priority: int) -> str:
        for lo, hi in self.groups:
            if lo <= priority <= hi:
                return protocol.band_label(lo, hi)
        return "none"


def _bands(nodes: list[protocol.NodeSummary]) -> _Bands:
    return _Bands([(g.min_p, g.max_p) for n in nodes if n.online for g in n.groups])


def _pct(sorted_values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of already sorted values."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


def start_metrics(
    settings: Settings, latest: Callable[[], protocol.BalancerStats | None]
) -> tuple[Metrics | None, str]:
    """The Prometheus endpoint (METRICS_PORT), serving the ``latest`` stats, and its URL;
    (None, "") if METRICS_PORT is null or its port cannot be had (logged: the balancer
    matters more than its metrics, it goes on without)."""
    s = settings
    if s.metrics_port is None:
        return None, ""
    metrics = Metrics(latest)
    try:
        port = metrics.serve(s.metrics_ip, s.metrics_port)
    except OSError as exc:
        log.error(
            "no metrics endpoint: cannot listen on %s:%s (%s); set METRICS_PORT "
            "to a free port, 0 for any, or null for none",
            s.metrics_ip,
            s.metrics_port,
            exc.strerror or exc,
        )
        return None, ""
    host = f"[{s.metrics_ip}]" if ":" in s.metrics_ip else s.metrics_ip
    url = f"http://{host}:{port}/metrics"
    log.info("metrics: %s", url)
    return metrics, url
