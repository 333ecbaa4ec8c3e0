"""``lbmqtt status``: the balancer's stats snapshot, fetched over MQTT and formatted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from .config import Settings
from .discovery import resolve as resolve_broker
from .errors import BalancerUnavailable, LbmqttError
from .mqtt import MqttTransport, client_id, connection_options
from .protocol import BalancerStats, BalancerStatus, Status, Topics, decode, plausible_time


class StatsWatcher:
    """Follows the balancer's stats over MQTT (an async context manager).

    ``latest`` is the newest snapshot; :meth:`next` waits for one newer than a given one.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)  # (resolving the broker keeps the prefix)
        self.latest: BalancerStats | None = None
        self.offline = False
        self._changed = asyncio.Event()
        self._t: MqttTransport | None = None

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        topics = self.topics
        try:
            if topic == topics.balancer_stats and payload:
                stats = decode(BalancerStats, payload)
                if plausible_time(stats.time, time.time()):
                    self.latest = stats
                    self._changed.set()
            elif topic == topics.balancer_status and payload:
                self.offline = not decode(BalancerStatus, payload).online
                self._changed.set()
        except LbmqttError:
            pass

    async def __aenter__(self) -> StatsWatcher:
        self.settings = s = await resolve_broker(self.settings)
        topics = self.topics
        self._t = MqttTransport(
            **connection_options(s),
            client_id=client_id("status"),
            on_message=self._on_message,
            subscriptions=[(topics.balancer_status, 0), (topics.balancer_stats, 0)],
        )
        await self._t.start(wait=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._t is not None:
            await self._t.close()

    async def next(self, after: BalancerStats | None, timeout_s: float) -> BalancerStats:
        """The first snapshot newer than ``after`` (the current one if ``after`` is None).

        Raises:
            BalancerUnavailable: none within ``timeout_s``, or the balancer is offline.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.latest
            if s is not None and (
                after is None or s.instance != after.instance or s.time > after.time
            ):
                if self.offline:
                    raise BalancerUnavailable(
                        "the balancer is offline (its last stats are "
                        f"{time.time() - s.time:.0f} s old)"
                    )
                return s
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                cfg = self.settings
                if self.offline:
                    raise BalancerUnavailable("the balancer is offline")
                raise BalancerUnavailable(
                    f"no stats from a balancer on {cfg.broker_host}:{cfg.broker_port} "
                    f"(topics under {cfg.topic_prefix}/) within {timeout_s:g} s: is "
                    f"`lbmqtt balancer` (or `lbmqtt up`) running?"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


async def fetch_stats(settings: Settings, timeout_s: float = 5.0) -> BalancerStats:
    """Read the balancer's retained stats (or wait for the next one).

    Raises:
        BrokerUnavailable: the broker is not reachable.
        BalancerUnavailable: no stats within ``timeout_s`` or the balancer is offline.
    """
    async with StatsWatcher(settings) as w:
        return await w.next(None, timeout_s)


async def watch_stats(
    settings: Settings,
    show: Callable[[BalancerStats], None],
    *,
    interval_s: float = 1.0,
    count: int | None = None,
    timeout_s: float = 5.0,
    on_wait: Callable[[str], None] | None = None,
) -> int:
    """Call ``show`` with a fresh snapshot every ``interval_s`` seconds, ``count`` times (or
    until cancelled / Ctrl-C). Returns how many were shown.

    Args:
        on_wait: called with the reason when no new stats came within ``timeout_s`` (the
            balancer restarts, say); the watch goes on. Without it, that raises.

    Raises:
        BalancerUnavailable: no new stats within ``timeout_s`` and no ``on_wait``.
    """
    shown = 0
    async with StatsWatcher(settings) as w:
        last: BalancerStats | None = None
        while count is None or shown < count:
            t0 = time.monotonic()
            try:
                last = await w.next(last, timeout_s)
            except BalancerUnavailable as exc:
                if on_wait is None:
                    raise
                on_wait(str(exc))
                continue
            show(last)
            shown += 1
            if count is not None and shown >= count:
                break
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - t0)))
    return shown


def format_stats(stats: BalancerStats) -> str:
    """A terminal picture of a stats snapshot: totals, nodes, users, task names, warnings."""
    lines = [
        time.strftime("%H:%M:%S", time.localtime(stats.time))
        + f"  balancer {stats.instance}, up {_seconds(stats.time - stats.started_at)}"
        if stats.started_at
        else time.strftime("%H:%M:%S", time.localtime(stats.time)),
        f"queued {stats.queued}   running {stats.running}   slots {stats.busy}/{stats.slots} "
        f"busy   done {stats.done_total}   failed {stats.failed_total}   "
        f"cancelled {stats.cancelled_total}   refused {stats.refused_total}"
        + (
            " ("
            + ", ".join(f"{code} {n}" for code, n in sorted(stats.refused_by_code.items()))
            + ")"
            if stats.refused_by_code
            else ""
        ),
        *(
            [
                f"copies started {stats.copies_started_total}   won {stats.copies_won_total}"
                f"   wasted {stats.copies_wasted_total}   taken back {stats.taken_back_total}"
            ]
            if stats.copies_started_total or stats.taken_back_total
            else []
        ),
        *(
            [
                (
                    "broker refused: "
                    + ", ".join(f"{k} {n}" for k, n in sorted(stats.broker_refused.items()) if n)
                )
            ]
            if any(stats.broker_refused.values())
            else []
        ),
        "",
        f"{'NODE':<20} {'STATE':<8} {'BUSY':>9} {'SPEED':>6} {'LEARNT':>6} {'LOAD':>6} "
        f"{'SEEN':>6}  TASKS",
    ]
    for n in stats.nodes:
        load = f"{n.load[0]:.2f}" if n.load else "-"
        state = "online" if n.online else "offline"
        seen = _seconds(max(0.0, stats.time - n.last_seen)) if n.last_seen else "never"
        learnt = f"{n.speed_learned:.2f}" if n.speed_learned is not None else "-"
        lines.append(
            f"{n.name:<20} {state:<8} {n.busy:>4}/{n.slots:<4} {n.speed:>6g} {learnt:>6} "
            f"{load:>6} {seen:>6}  {', '.join(n.tasks)}"
        )
    if not stats.nodes:
        lines.append("(no nodes)")
    if stats.users:
        lines += ["", f"{'USER':<20} {'QUEUED':>8} {'RUNNING':>8}"]
        lines += [f"{u.user:<20} {u.queued:>8} {u.running:>8}" for u in stats.users]
    if stats.names:
        lines += [
            "",
            f"{'TASK':<20} {'QUEUED':>7} {'RUNNING':>7} {'DONE':>7} {'FAILED':>7}"
            f"  {'WAIT mean/p95':>15}  {'RUN mean/p95':>15}",
        ]
        for t in stats.names:
            wait, run = _pair(t.wait_mean_s, t.wait_p95_s), _pair(t.run_mean_s, t.run_p95_s)
            lines.append(
                f"{t.name:<20} {t.queued:>7} {t.running:>7} {t.done:>7} "
                f"{t.failed:>7}  {wait:>15}  {run:>15}"
            )
    if stats.queued_by_band:
        lines += [
            "",
            "queued by priority band: "
            + ", ".join(
                f"{b} {stats.queued_by_band[b]}"
                for b in [*stats.bands, *sorted(set(stats.queued_by_band) - set(stats.bands))]
                if b in stats.queued_by_band
            ),
        ]
    running = [t for t in stats.tasks if not _final(t.status)]
    if running:
        lines += ["", f"{'RUNNING':<20} {'USER':<12} {'NODE':<16} {'PROGRESS':>8} {'FOR':>7}"]
        lines += [
            f"{t.name:<20} {t.user:<12} {t.node or '-':<16} {t.progress:>7}% "
            f"{_seconds(t.run_s if t.run_s is not None else t.wait_s):>7}"
            for t in running[:20]
        ]
        if len(running) > 20:
            lines.append(f"... and {len(running) - 20} more")
    if stats.warnings:
        lines += ["", "warnings:"] + [f"  ! {w}" for w in stats.warnings]
    return "\n".join(lines)


def _final(status: str) -> bool:
    try:
        return Status(status).final
    except ValueError:
        return False


def _seconds(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f}ms" if v < 1 else f"{v:.1f}s"


def _pair(mean: float | None, p95: float | None) -> str:
    return f"{_seconds(mean)}/{_seconds(p95)}"
