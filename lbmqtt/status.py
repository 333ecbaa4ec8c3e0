"""``lbmqtt status``: the balancer's stats snapshot, fetched over MQTT and formatted."""

from __future__ import annotations

import asyncio
import time
import uuid

from .config import Settings
from .discovery import resolve as resolve_broker
from .errors import BalancerUnavailable, LbmqttError
from .mqtt import MqttTransport
from .protocol import BalancerStats, BalancerStatus, Topics, decode


async def fetch_stats(settings: Settings, timeout_s: float = 5.0) -> BalancerStats:
    """Read the balancer's retained stats (or wait for the next one).

    Raises:
        BrokerUnavailable: the broker is not reachable.
        BalancerUnavailable: no stats within ``timeout_s`` or the balancer is offline.
    """
    settings = await resolve_broker(settings)
    topics = Topics(settings.topic_prefix)
    got: asyncio.Future[BalancerStats] = asyncio.get_running_loop().create_future()
    offline: list[bool] = []

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        try:
            if topic == topics.balancer_stats and payload and not got.done():
                got.set_result(decode(BalancerStats, payload))
            elif topic == topics.balancer_status and payload:
                offline.append(not decode(BalancerStatus, payload).online)
        except LbmqttError:
            pass

    t = MqttTransport(host=settings.broker_host, port=settings.broker_port,
                      client_id=f"lbmqtt-status-{uuid.uuid4().hex[:8]}", on_message=on_message,
                      subscriptions=[(topics.balancer_status, 0), (topics.balancer_stats, 0)],
                      username=settings.broker_username, password=settings.broker_password,
                      connect_timeout_s=settings.connect_timeout_s)
    try:
        await t.start(wait=True)
        try:
            stats = await asyncio.wait_for(got, timeout_s)
        except TimeoutError:
            raise BalancerUnavailable(
                f"no stats from a balancer on {settings.broker_host}:{settings.broker_port} "
                f"(topics under {settings.topic_prefix}/) within {timeout_s:g} s: is "
                f"`lbmqtt balancer` (or `lbmqtt up`) running?") from None
    finally:
        await t.close()
    if offline and offline[-1]:
        raise BalancerUnavailable("the balancer is offline (its last stats are "
                                  f"{time.time() - stats.time:.0f} s old)")
    return stats


def format_stats(stats: BalancerStats) -> str:
    """A terminal picture of a stats snapshot: totals, nodes, users, task names, warnings."""
    lines = [
        f"queued {stats.queued}   running {stats.running}   slots {stats.busy}/{stats.slots} "
        f"busy   done {stats.done_total}   failed {stats.failed_total}   "
        f"cancelled {stats.cancelled_total}   refused {stats.refused_total}",
        "",
        f"{'NODE':<20} {'STATE':<8} {'BUSY':>9} {'SPEED':>6} {'LOAD':>6}  TASKS",
    ]
    for n in stats.nodes:
        load = f"{n.load[0]:.2f}" if n.load else "-"
        state = "online" if n.online else "offline"
        lines.append(f"{n.name:<20} {state:<8} {n.busy:>4}/{n.slots:<4} {n.speed:>6g} "
                     f"{load:>6}  {', '.join(n.tasks)}")
    if not stats.nodes:
        lines.append("(no nodes)")
    if stats.users:
        lines += ["", f"{'USER':<20} {'QUEUED':>8} {'RUNNING':>8}"]
        lines += [f"{u.user:<20} {u.queued:>8} {u.running:>8}" for u in stats.users]
    if stats.names:
        lines += ["", f"{'TASK':<20} {'QUEUED':>7} {'RUNNING':>7} {'DONE':>7} {'FAILED':>7}"
                      f"  {'WAIT mean/p95':>15}  {'RUN mean/p95':>15}"]
        for t in stats.names:
            wait, run = _pair(t.wait_mean_s, t.wait_p95_s), _pair(t.run_mean_s, t.run_p95_s)
            lines.append(f"{t.name:<20} {t.queued:>7} {t.running:>7} {t.done:>7} "
                         f"{t.failed:>7}  {wait:>15}  {run:>15}")
    if stats.warnings:
        lines += ["", "warnings:"] + [f"  ! {w}" for w in stats.warnings]
    return "\n".join(lines)


def _seconds(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f}ms" if v < 1 else f"{v:.1f}s"


def _pair(mean: float | None, p95: float | None) -> str:
    return f"{_seconds(mean)}/{_seconds(p95)}"
