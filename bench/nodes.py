"""Many nodes: ``python bench/nodes.py [--nodes 200] [--slots 2] [--tasks 5000]
[--broker embedded|mosquitto] [--rest-s 10]``

The broker and the balancer run as their own processes (as ``lbmqtt up`` runs them); this
process simulates ``--nodes`` node daemons - each a real MQTT connection with its retained
status, last will and a heartbeat every ``HEARTBEAT_S`` (1 s), which "runs" a no-op task the
moment it is assigned (started + result in one report) - so the figures are the balancer's
and the broker's, not the workers'.

Measured in one run, against a baseline in the same run:
- CPU of the balancer and of the broker at rest (% of one core over ``--rest-s``) with no
  node connected, then with every node connected and heartbeating;
- the dispatch rate: ``--tasks`` no-op tasks from one client, submit to last result
  (tasks/s), with the balancer's CPU meanwhile.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.procstat import cpu_seconds  # noqa: E402
from bench.run import MACHINE, bench_broker  # noqa: E402
from lbmqtt.client import AsyncClient  # noqa: E402
from lbmqtt.config import load_settings  # noqa: E402
from lbmqtt.launcher import spawn  # noqa: E402
from lbmqtt.mqtt import MqttTransport, Will  # noqa: E402
from lbmqtt.protocol import (  # noqa: E402
    AssignmentSet,
    GroupInfo,
    Heartbeat,
    NodeReport,
    NodeStatus,
    Result,
    Started,
    TaskRef,
    Topics,
    decode,
)


class SimNode:
    """A node daemon without workers: it finishes every assigned no-op task at once."""

    def __init__(self, name: str, port: int, topics: Topics, slots: int, heartbeat_s: float):
        self.name, self.topics, self.heartbeat_s = name, topics, heartbeat_s
        self.instance = uuid.uuid4().hex[:12]
        self.slots = slots
        self.held: dict[str, int] = {}  # task id -> attempt (finished, awaiting the ack)
        self.done = 0
        self.status = NodeStatus(
            node=name,
            instance=self.instance,
            online=True,
            host="sim",
            pid=os.getpid(),
            groups=[GroupInfo(index=0, workers=slots, min_p=-1000, max_p=1000)],
            tasks=["NOOP"],
            cores=slots,
            heartbeat_s=heartbeat_s,
            speed=1.0,
        ).encode()
        self.t = MqttTransport(
            host="127.0.0.1",
            port=port,
            client_id=f"sim-{name}-{self.instance[:6]}",
            on_message=self.on_message,
            subscriptions=[(topics.assign(name), 1)],
            on_connect=self.on_connect,
            keepalive_s=10,
            will=Will(
                topics.node_status(name),
                NodeStatus(node=name, instance=self.instance, online=False).encode(),
            ),
        )

    def on_connect(self) -> None:
        self.t.publish(self.topics.node_status(self.name), self.status, qos=1, retain=True)

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        tasks = decode(AssignmentSet, payload).tasks if payload else []
        wanted = {a.id: a.attempt for a in tasks}
        self.held = {t: a for t, a in self.held.items() if wanted.get(t) == a}  # acked: gone
        new = [a for a in tasks if a.id not in self.held]
        if not new:
            return
        now = time.time()
        for a in new:
            self.held[a.id] = a.attempt
        self.done += len(new)
        rep = NodeReport(
            node=self.name,
            instance=self.instance,
            started=[Started(id=a.id, attempt=a.attempt, time=now) for a in new],
            results=[
                Result(id=a.id, attempt=a.attempt, status="done", result=None, runtime_s=0.0)
                for a in new
            ],
        )
        self.t.publish(self.topics.reports(self.name), rep.encode(), qos=1)

    async def heartbeats(self) -> None:
        seq = 0
        while True:
            await asyncio.sleep(self.heartbeat_s)
            seq += 1
            hb = Heartbeat(
                node=self.name,
                instance=self.instance,
                seq=seq,
                time=time.time(),
                load=[0.0, 0.0, 0.0],
                held=[TaskRef(id=t, attempt=a) for t, a in self.held.items()],
            )
            self.t.publish(self.topics.heartbeat(self.name), hb.encode(), qos=0)


async def measure_rest(pids: dict[str, int], seconds: float) -> dict[str, float]:
    t0 = {k: cpu_seconds(p) for k, p in pids.items()}
    w0 = time.monotonic()
    await asyncio.sleep(seconds)
    wall = time.monotonic() - w0
    return {k: round(100 * (cpu_seconds(p) - t0[k]) / wall, 2) for k, p in pids.items()}


async def run(
    args: argparse.Namespace, port: int, prefix: str, pids: dict[str, int]
) -> dict[str, Any]:
    topics = Topics(prefix)
    out: dict[str, Any] = {}
    rest0 = await measure_rest(pids, args.rest_s)
    out["rest_cpu_pct_no_nodes"] = rest0
    nodes = [SimNode(f"sim{i:03d}", port, topics, args.slots, 1.0) for i in range(args.nodes)]
    t0 = time.monotonic()
    for n in nodes:
        await n.t.start()
    for n in nodes:
        await n.t.wait_ready(60)
    hb = [asyncio.create_task(n.heartbeats()) for n in nodes]
    s = load_settings(
        None,
        env={},
        overrides={"BROKER_PORT": port, "TOPIC_PREFIX": prefix, "CLIENT_ACK_TIMEOUT_S": 120},
    )
    try:
        async with AsyncClient(s, user="bench") as c:
            # every node known to the balancer before we measure
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                from lbmqtt.status import fetch_stats

                st = await fetch_stats(s, timeout_s=10)
                if sum(1 for n in st.nodes if n.online) >= args.nodes:
                    break
                await asyncio.sleep(0.5)
            out["connect_s"] = round(time.monotonic() - t0, 2)
            out["rest_cpu_pct_with_nodes"] = await measure_rest(pids, args.rest_s)
            c0 = {k: cpu_seconds(p) for k, p in pids.items()}
            w0 = time.perf_counter()
            ids = await c.submit_many({"name": "NOOP", "args": i} for i in range(args.tasks))
            for tid in ids:
                await c.wait_state(tid, timeout=600)
            wall = time.perf_counter() - w0
            out["dispatch_tasks_per_s"] = round(args.tasks / wall, 1)
            out["dispatch_cpu_pct"] = {
                k: round(100 * (cpu_seconds(p) - c0[k]) / wall, 1) for k, p in pids.items()
            }
            out["nodes_used"] = sum(1 for n in nodes if n.done)
    finally:
        for t in hb:
            t.cancel()
        for n in nodes:
            await n.t.close(timeout_s=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--rest-s", type=float, default=10.0)
    ap.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    args = ap.parse_args()
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="lbmqtt-bench-nodes-"))
    os.environ.update(
        {
            "LBMQTT_LOG_LEVEL": "WARNING",
            "LBMQTT_LB_QUEING_MAXPERUSER": "0",
            "LBMQTT_METRICS_PORT": "0",
            "LBMQTT_JOURNAL_PATH": str(workdir / "journal"),
        }
    )
    try:
        with bench_broker(args.broker) as (port, broker_pid, children):
            children.append(
                spawn("balancer", ["balancer", "--broker-port", str(port), "--prefix", prefix])
            )
            pids = {"broker": broker_pid, "balancer": children[-1].proc.pid}
            result = asyncio.run(run(args, port, prefix, pids))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "nodes",
                "broker": args.broker,
                "nodes": args.nodes,
                "slots_per_node": args.slots,
                "tasks": args.tasks,
                **result,
                "machine": MACHINE,
            }
        )
    )


if __name__ == "__main__":
    main()
