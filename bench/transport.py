"""lbmqtt's own cost per MQTT message: ``python bench/transport.py [--broker embedded|mosquitto]
[--round-trips N] [--rounds R]``

Two :class:`~lbmqtt.mqtt.MqttTransport` s in this one process bounce a 100-byte QoS 0
message through the broker (each answers what the other sent), ``--round-trips`` times a
round: the CPU time of this process per round trip (two publishes, two messages read and
handled) and the wall time per round trip, the medians of ``--rounds`` rounds. This is the
share of every hop of the task path that lbmqtt's transport (and paho under it) costs,
apart from the broker's. To compare two checkouts, run this script from each in turn,
alternating (ABBA), on the same broker kind: the figures of this shared machine move by
±20 % from one minute to the next. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import bench_broker  # noqa: E402

from lbmqtt.mqtt import MqttTransport  # noqa: E402

PAYLOAD = b"x" * 100
TIMEOUT_S = 120.0


async def bounce(port: int, round_trips: int) -> dict[str, float]:
    """One round: ``round_trips`` messages there and back; CPU and wall time per trip."""
    done = asyncio.Event()
    count = 0

    def on_ping(topic: str, payload: bytes, retained: bool) -> None:
        pong.publish("bench/transport/pong", payload)

    def on_pong(topic: str, payload: bytes, retained: bool) -> None:
        nonlocal count
        count += 1
        if count >= round_trips:
            done.set()
        else:
            ping.publish("bench/transport/ping", PAYLOAD)

    def transport(name: str, reads: str, handler: Callable[[str, bytes, bool], None]) -> Any:
        return MqttTransport(
            host="127.0.0.1",
            port=port,
            client_id=f"bench-{name}",
            on_message=handler,
            subscriptions=[(f"bench/transport/{reads}", 0)],
        )

    ping = transport("ping", "pong", on_pong)
    pong = transport("pong", "ping", on_ping)
    await ping.start(wait=True)
    await pong.start(wait=True)
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        ping.publish("bench/transport/ping", PAYLOAD)
        await asyncio.wait_for(done.wait(), TIMEOUT_S)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    finally:
        await ping.close()
        await pong.close()
    return {
        "cpu_us_per_round_trip": 1e6 * cpu / round_trips,
        "wall_us_per_round_trip": 1e6 * wall / round_trips,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--broker", choices=["embedded", "mosquitto"], default="mosquitto")
    ap.add_argument("--round-trips", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rounds: list[dict[str, float]] = []
    with bench_broker(args.broker) as (port, _pid, _children):
        for i in range(args.rounds):
            r = asyncio.run(bounce(port, args.round_trips))
            rounds.append(r)
            print(
                f"round {i + 1}/{args.rounds}: {r['cpu_us_per_round_trip']:.1f} us CPU, "
                f"{r['wall_us_per_round_trip']:.1f} us wall per round trip",
                file=sys.stderr,
            )
    out = {
        "scenario": "transport",
        "broker": args.broker,
        "round_trips": args.round_trips,
        "rounds": args.rounds,
        **{k: round(statistics.median(r[k] for r in rounds), 1) for k in rounds[0]},
        "per_round": rounds,
        "machine": f"{platform.machine()} {platform.python_version()}",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
