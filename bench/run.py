"""Benchmarks: ``python bench/run.py SCENARIO [--broker embedded|mosquitto] [--workers N]
[--tasks N]``.

Scenarios (this file grows with the performance issue):

``throughput``  N no-op tasks from one client (``submit_many``, then ``wait_state`` for
                each in turn): tasks/s, p50/p99 submit->result,
                each process's CPU per task in µs (``cpu_us_per_task``), the share of
                the run it was ready to run but waited for a CPU (``runqueue_wait_pct``),
                and its CPU (% of a core) while the client submits and after
                (``cpu_pct_by_phase``: ``submit``, ``drain``; ``all`` summed): which
                process bounds each phase, and whether both cores are kept busy.
``latency``     one task at a time: p50/p99 submit->result. With ``--stages``, a second
                pass of as many tasks with a listener on every topic (its own process):
                the median time from submit to each message of a task (the submit, the
                node's assignment set, the node's report, the first and the last events
                message), to show which hop the time goes to.
``sleep``       N tasks of ``--sleep-ms`` on the workers: makespan and efficiency against
                the ideal (N x sleep / workers).
``journal``     the throughput scenario with the balancer's journal off, on (``normal``)
                and ``full`` (fsync per group commit), alternating over ``--rounds``
                rounds, each with a fresh balancer: medians and ratios to "off".

``lan``         the throughput scenario with the node in its own network namespace, its
                link to the broker without and with 2 ms of added round trip (``tc netem``,
                1 ms each way), alternating over ``--rounds``: medians and the ratio
                (needs root and iproute2; the namespace is made and removed here).
``idle``        the whole ``lbmqtt up`` (broker, balancer, dashboard, a node with
                ``--workers`` slots) at rest for ``--seconds``: CPU of every process, summed,
                in % of one core (no tasks, no browser).
``scale``       the balancer with ``--tasks`` (default 1,000,000) no-op tasks queued by
                ``--users`` users in batches of 1,000, and ``--nodes`` simulated nodes
                (``bench/nodes.py``'s SimNode, 2 slots each) connected afterwards: the
                accept rate, the balancer's CPU and RSS at rest before, while accepting,
                with everything queued, and while dispatching to the nodes for
                ``--seconds`` (tasks/s); the journal is on, as in production.

``seed``        lbmqtt against pyLoadBalancer 0.2.0 and Celery 5 (Redis) in the same run
                (each installed in a venv of its own when missing): throughput, latency
                and sleep, the order turning over ``--rounds``, medians and same-round
                ratios (``bench/seed.py``).
``unequal``     machines of unequal speed on loopback: ``--nodes`` nodes (default 4) of 2
                slots, the last ``--slowdown`` times (default 8) slower, speeds not
                declared; each node runs the demo task ``WORK``, whose duration is its
                ``seconds`` times the node's factor (``DEMO_SLOWDOWN``). A batch of
                ``--tasks`` short tasks (default 200, 0.1 s) then ``--long`` tasks
                (default 4, 2.6 s) of a name the cluster has never seen (``WORK_LONG``),
                with speculative copies on and off (``SPECULATE``), alternating over
                ``--rounds`` rounds, each with a fresh balancer and fresh nodes (learning
                from zero): makespan over the lower bound (total work over total capacity,
                or the longest task on a fast machine), medians and the same-run ratio.

``--journal on|off|full`` sets the journal of the other scenarios (default on, as in
production; the file is a temporary one).

Every component runs in its own process, as ``lbmqtt up`` runs them: the broker, the
balancer and one node with ``--workers`` slots; the client runs here. In the same run, the
broker's raw message round trip and rate are measured, so the figures can be read against
what the broker itself allows. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.procstat import cpu_seconds, oncpu_by_role, process_times  # noqa: E402
from lbmqtt.broker import loopback_mosquitto_conf  # noqa: E402
from lbmqtt.client import AsyncClient  # noqa: E402
from lbmqtt.config import load_settings  # noqa: E402
from lbmqtt.launcher import Child, _spawn, stop_children  # noqa: E402
from lbmqtt.mqtt import MqttTransport  # noqa: E402
from tests.cluster import children_of, free_port  # noqa: E402

DEMO = str(ROOT / "nodes" / "demo_tasks.py")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


SNIFFER = r"""
import socket, sys, time
import paho.mqtt.client as mqtt
host, port, prefix, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
out = open(path, "wb")
def on_message(c, u, m):
    out.write(b"%.6f %s %s\n" % (time.perf_counter(), m.topic.encode(),
                                 m.payload.replace(b"\n", b" ")))
def on_socket_open(c, u, sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
c.on_message, c.on_socket_open = on_message, on_socket_open
c.on_connect = lambda c, *a: c.subscribe(prefix + "/#", 0)
c.on_subscribe = lambda *a: print("ready", flush=True)
c.connect(host, port)
try:
    c.loop_forever()
finally:
    out.close()
"""
"""A listener on every topic under a prefix, in its own process: one line per message,
``perf_counter topic payload`` (perf_counter is CLOCK_MONOTONIC: the same clock in every
process of the machine)."""


def start_sniffer(host: str, port: int, prefix: str) -> tuple[subprocess.Popen[bytes], Path]:
    path = Path(tempfile.mkstemp(prefix="lbmqtt-stages-")[1])
    sniffer = subprocess.Popen(
        [sys.executable, "-c", SNIFFER, host, str(port), prefix, str(path)], stdout=subprocess.PIPE
    )
    assert sniffer.stdout is not None
    ready = sniffer.stdout.readline()
    assert ready.strip() == b"ready", ready
    return sniffer, path


def stage_offsets(path: Path, marks: list[tuple[str, float, float]]) -> dict[str, float]:
    """The median ms from each task's submit to the first message about it (found by its
    id in the payload) on each kind of topic, and to its last events message."""
    seen: list[tuple[float, str, bytes]] = []
    for line in path.read_bytes().splitlines():
        t, topic, payload = [*line.split(b" ", 2), b""][:3]
        seen.append((float(t), topic.decode().rsplit("/", 1)[-1], payload))
    path.unlink()
    offsets: dict[str, list[float]] = {}
    j = 0
    for tid, t0, t1 in marks:
        key = tid.encode()
        while j < len(seen) and seen[j][0] < t0:
            j += 1
        first: dict[str, float] = {}
        last_events = None
        k = j
        while k < len(seen) and seen[k][0] <= t1 + 0.05:
            t, kind, payload = seen[k]
            if key in payload:
                first.setdefault(kind, t - t0)
                if kind == "events":
                    last_events = t - t0
            k += 1
        got = {
            "submit": first.get("submit"),
            "assign": first.get("assign"),
            "report": first.get("reports"),
            "events_first": first.get("events"),
            "events_last": last_events,
            "client_done": t1 - t0,
        }
        for name, v in got.items():
            if v is not None:
                offsets.setdefault(name, []).append(v)
    return {name: round(1000 * statistics.median(v), 3) for name, v in offsets.items()}


async def stage_times(
    c: AsyncClient, host: str, port: int, prefix: str, n: int
) -> dict[str, float]:
    """Run ``n`` lone tasks with SNIFFER listening; see stage_offsets."""
    sniffer, path = await asyncio.to_thread(start_sniffer, host, port, prefix)
    marks: list[tuple[str, float, float]] = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            tid = await c.submit("NOOP", i)
            await c.wait(tid, timeout=60)
            marks.append((tid, t0, time.perf_counter()))
        await asyncio.sleep(0.2)  # (the last messages reach the listener)
    finally:
        sniffer.terminate()
        await asyncio.to_thread(sniffer.wait, 10)
    return await asyncio.to_thread(stage_offsets, path, marks)


def start_mosquitto() -> tuple[subprocess.Popen[bytes], int, Path]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = loopback_mosquitto_conf((ROOT / "broker" / "mosquitto.conf").read_text(), port)
    d = Path(tempfile.mkdtemp(prefix="lbmqtt-bench-"))
    try:
        (d / "m.conf").write_text(conf)
        proc = subprocess.Popen(
            [exe, "-c", str(d / "m.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_listening(proc, port, "mosquitto")
    except BaseException:  # (SystemExit from wait_listening too: no directory left behind)
        shutil.rmtree(d, ignore_errors=True)
        raise
    return proc, port, d


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    """Return once ``proc`` (a server of the bench's own) listens on loopback ``port``;
    kill it and end the bench if it exits first or takes more than 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    proc.kill()
    proc.wait(10)
    raise SystemExit(f"{what} did not start")


MACHINE = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
"""What every figure was measured on (printed in each JSON line)."""


@contextlib.contextmanager
def bench_broker(
    kind: str, env: dict[str, str] | None = None
) -> Iterator[tuple[int, int, list[Child]]]:
    """The broker under test in its own process (``kind`` embedded or mosquitto). Yields
    (port, broker pid, children): what the caller spawns into ``children`` is stopped on
    exit, with the broker."""
    children: list[Child] = []
    mosq: subprocess.Popen[bytes] | None = None
    conf_dir: Path | None = None
    try:
        if kind == "embedded":
            children.append(_spawn("broker", ["broker", "--broker-port", "0"], env=env))
            port, pid = int(children[0].info["port"]), children[0].proc.pid
        else:
            mosq, port, conf_dir = start_mosquitto()
            pid = mosq.pid
        yield port, pid, children
    finally:
        stop_children(children)
        try:
            if mosq is not None:
                mosq.terminate()
                mosq.wait(10)
        finally:
            if conf_dir is not None:
                shutil.rmtree(conf_dir, ignore_errors=True)


async def broker_baseline(port: int, n: int = 2000) -> dict[str, float]:
    """Raw broker figures: request/response round trip (p50) and one-way QoS 0 rate."""
    got: asyncio.Queue[bytes] = asyncio.Queue()
    count = 0
    done = asyncio.Event()

    def on_msg(topic: str, payload: bytes, retained: bool) -> None:
        nonlocal count
        if topic == "bench/rate":
            count += 1
            if count >= n:
                done.set()
        else:
            got.put_nowait(payload)

    a = MqttTransport(
        host="127.0.0.1",
        port=port,
        client_id=f"bench-a-{uuid.uuid4().hex[:6]}",
        on_message=on_msg,
        subscriptions=[("bench/pong", 0), ("bench/rate", 0)],
    )
    b_ref: list[MqttTransport] = []

    def echo(topic: str, payload: bytes, retained: bool) -> None:
        b_ref[0].publish("bench/pong", payload, qos=0)

    b = MqttTransport(
        host="127.0.0.1",
        port=port,
        client_id=f"bench-b-{uuid.uuid4().hex[:6]}",
        on_message=echo,
        subscriptions=[("bench/ping", 0)],
    )
    b_ref.append(b)
    await a.start(wait=True)
    await b.start(wait=True)
    rtts = []
    for i in range(300):
        t0 = time.perf_counter()
        a.publish("bench/ping", str(i).encode(), qos=0)
        await asyncio.wait_for(got.get(), 5)
        rtts.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(n):
        a.publish("bench/rate", b"x" * 100, qos=0)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 60)
    rate = count / (time.perf_counter() - t0)
    await a.close()
    await b.close()
    return {"broker_rtt_p50_ms": 1000 * pct(rtts, 0.5), "broker_msgs_per_s": rate}


PHASES = (("submit", "start", "submitted"), ("drain", "submitted", "end"))
"""A throughput run's phases, between the points ``scenario`` marks: the client submitting
(the balancer accepts and dispatches at once), then the rest of the results coming in."""


class PhaseMarks:
    """``scenario``'s ``mark``: the time and each process's on-CPU seconds (by role) at each
    point it marks (the node's workers are found at the first, before the run is timed)."""

    def __init__(self, pids: dict[str, int], node_pid: int):
        self.pids = pids
        self.node_pid = node_pid
        self.workers: list[int] | None = None
        self.marks: dict[str, tuple[float, dict[str, float]]] = {}

    def __call__(self, point: str) -> None:
        if self.workers is None:
            self.workers = children_of(self.node_pid)
        self.marks[point] = (time.perf_counter(), oncpu_by_role(self.pids, self.workers))


def cpu_by_phase(
    marks: dict[str, tuple[float, dict[str, float]]],
) -> dict[str, dict[str, float]]:
    """Each process's CPU in each phase of a run, % of one core, and all of them summed
    (``all``): from the (time, on-CPU seconds by role) taken at each marked point."""
    out: dict[str, dict[str, float]] = {}
    for phase, a, b in PHASES:
        if a not in marks or b not in marks:
            continue
        (ta, ca), (tb, cb) = marks[a], marks[b]
        if tb <= ta:
            continue
        pct = {k: 100 * (cb[k] - ca[k]) / (tb - ta) for k in ca}
        pct["all"] = sum(pct.values())
        out[phase] = {k: round(v, 1) for k, v in pct.items()}
    return out


async def scenario(
    args: argparse.Namespace,
    port: int,
    prefix: str,
    host: str = "127.0.0.1",
    mark: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one scenario's client side; ``mark(point)``, if given, is called at the points
    of a throughput run that split it into phases: ``start``, ``submitted``, ``end``."""
    note = mark or (lambda point: None)
    if args.scenario in ("journal", "lan"):
        args = argparse.Namespace(**{**vars(args), "scenario": "throughput"})
    s = load_settings(
        None,
        env={},
        overrides={
            "BROKER_HOST": host,
            "BROKER_PORT": port,
            "TOPIC_PREFIX": prefix,
            "CLIENT_ACK_TIMEOUT_S": 120,
        },
    )
    out: dict[str, Any] = {}
    async with AsyncClient(s, user="bench") as c:
        await c.map("NOOP", [None] * min(50, args.tasks))  # warm-up
        if args.scenario == "throughput":
            n = args.tasks
            note("start")
            t0 = time.perf_counter()
            ids = await c.submit_many({"name": "NOOP", "args": i} for i in range(n))
            submitted = time.perf_counter()
            note("submitted")
            lat = []
            for tid in ids:
                st = await c.wait_state(tid, timeout=600)
                if st.finished_at and st.submitted_at:
                    lat.append(st.finished_at - st.submitted_at)
            elapsed = time.perf_counter() - t0
            note("end")
            out.update(
                tasks=n,
                seconds=elapsed,
                tasks_per_s=n / elapsed,
                submit_s=submitted - t0,
                p50_ms=1000 * pct(lat, 0.5),
                p99_ms=1000 * pct(lat, 0.99),
            )
        elif args.scenario == "latency":
            lat = []
            for i in range(args.tasks):
                t0 = time.perf_counter()
                await c.wait(await c.submit("NOOP", i), timeout=60)
                lat.append(time.perf_counter() - t0)
            out.update(
                tasks=args.tasks,
                p50_ms=1000 * pct(lat, 0.5),
                p99_ms=1000 * pct(lat, 0.99),
                mean_ms=1000 * statistics.mean(lat),
            )
            if args.stages:
                out["stages_ms"] = await stage_times(c, host, port, prefix, args.tasks)
        elif args.scenario == "sleep":
            n, ms = args.tasks, args.sleep_ms
            t0 = time.perf_counter()
            await c.map("SLEEP", [{"seconds": ms / 1000, "steps": 1}] * n)
            elapsed = time.perf_counter() - t0
            ideal = n * ms / 1000 / args.workers
            out.update(
                tasks=n, sleep_ms=ms, makespan_s=elapsed, ideal_s=ideal, efficiency=ideal / elapsed
            )
    return out


def _netem_available() -> bool:
    """Whether ``tc netem`` works here (it needs the kernel's sch_netem)."""
    from tests.cluster import NetNs

    if NetNs.available():
        return False
    with NetNs() as ns:
        run = subprocess.run(
            ["tc", "qdisc", "add", "dev", ns.host_if, "root", "netem", "delay", "1ms"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return run.returncode == 0


def lan(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput with the node 2 ms (round trip) away from the broker, against 0 ms.

    With ``tc netem`` (root, a kernel with sch_netem): the node runs in its own network
    namespace and both ends of its link delay 1 ms. Without it: the node reaches the broker
    through ``bench/delayproxy.py`` on loopback (1 ms each way; 0 ms for the baseline).
    """
    from tests.cluster import NetNs

    method = "netem" if _netem_available() else "proxy"
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="lbmqtt-bench-lan-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")}
    env.update(
        {
            "LBMQTT_LOG_LEVEL": "WARNING",
            "LBMQTT_LB_QUEING_MAXPERUSER": "0",
            "LBMQTT_METRICS_PORT": "0",
            "LBMQTT_BROKER_ADVERTISE": "false",
            "LBMQTT_JOURNAL_PATH": str(workdir / "journal"),
        }
    )
    if args.pipeline_window is not None:
        env["LBMQTT_PIPELINE_WINDOW_MAX"] = str(args.pipeline_window)
    runs: dict[str, list[dict[str, Any]]] = {"0ms": [], "2ms": []}

    def run_rounds(host: str, port: int, node_for: Any) -> None:
        for _ in range(args.rounds):
            for delay in ("0ms", "2ms"):
                node = node_for(delay)
                try:
                    runs[delay].append(asyncio.run(scenario(args, port, prefix, host)))
                finally:
                    node()

    children: list[Child] = []
    try:
        if method == "netem":
            with NetNs() as ns:
                children.append(
                    _spawn(
                        "broker", ["broker", "--bind", ns.host_ip, "--broker-port", "0"], env=env
                    )
                )
                port = int(children[0].info["port"])
                common = [
                    "--broker-host",
                    ns.host_ip,
                    "--broker-port",
                    str(port),
                    "--prefix",
                    prefix,
                ]
                children.append(_spawn("balancer", ["balancer", *common], env=env))
                children.append(
                    _spawn(
                        "node",
                        [
                            "node",
                            *common,
                            "--tasks",
                            DEMO,
                            "--name",
                            "bench",
                            "--workers",
                            str(args.workers),
                        ],
                        env=env,
                        wrap=ns.wrap,
                    )
                )

                def netem_for(delay: str) -> Any:
                    def set_(on: bool) -> None:
                        for where, dev in (((), ns.host_if), (ns.wrap, ns.ns_if)):
                            cmd = [
                                *where,
                                "tc",
                                "qdisc",
                                "add" if on else "del",
                                "dev",
                                dev,
                                "root",
                            ]
                            subprocess.run(
                                [*cmd, "netem", "delay", "1ms"] if on else cmd,
                                check=True,
                                capture_output=True,
                                timeout=10,
                            )

                    if delay == "2ms":
                        set_(True)
                        return lambda: set_(False)
                    return lambda: None

                run_rounds(ns.host_ip, port, netem_for)
        else:
            children.append(_spawn("broker", ["broker", "--broker-port", "0"], env=env))
            port = int(children[0].info["port"])
            common = ["--broker-port", str(port), "--prefix", prefix]
            children.append(_spawn("balancer", ["balancer", *common], env=env))

            def proxied_node(delay: str) -> Any:
                ms = 1.0 if delay == "2ms" else 0.0
                pport = free_port()
                proxy = subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "bench" / "delayproxy.py"),
                        str(pport),
                        "127.0.0.1",
                        str(port),
                        str(ms),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
                node = _spawn(
                    "node",
                    [
                        "node",
                        "--broker-port",
                        str(pport),
                        "--prefix",
                        prefix,
                        "--tasks",
                        DEMO,
                        "--name",
                        f"bench{delay}",
                        "--workers",
                        str(args.workers),
                    ],
                    env=env,
                )

                def stop() -> None:
                    stop_children([node])
                    proxy.terminate()
                    proxy.wait(10)

                return stop

            run_rounds("127.0.0.1", port, proxied_node)
    finally:
        stop_children(children)
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {
        "scenario": "lan",
        "delay_method": method,
        "workers": args.workers,
        "tasks": args.tasks,
        "rounds": args.rounds,
    }
    for delay, rs in runs.items():
        out[f"tasks_per_s_{delay}"] = round(statistics.median(r["tasks_per_s"] for r in rs), 1)
        out[f"p50_ms_{delay}"] = round(statistics.median(r["p50_ms"] for r in rs), 1)
    out["ratio_2ms_to_0ms"] = round(out["tasks_per_s_2ms"] / out["tasks_per_s_0ms"], 3)
    out["machine"] = MACHINE
    return out


def idle(args: argparse.Namespace) -> dict[str, Any]:
    """CPU of a whole ``lbmqtt up`` at rest."""
    workdir = Path(tempfile.mkdtemp(prefix="lbmqtt-bench-idle-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")}
    env.update({"XDG_STATE_HOME": str(workdir), "LBMQTT_LOG_LEVEL": "WARNING"})
    env["LBMQTT_WKHUB_WORKERS"] = json.dumps(
        [{"nWorkers": args.workers, "minP": -1000, "maxP": 1000}]
    )
    cmd = [
        sys.executable,
        "-m",
        "lbmqtt",
        "up",
        "--broker-port",
        "0",
        "--monitor-port",
        "0",
        "--metrics-port",
        "0",
        "--prefix",
        f"bench/{uuid.uuid4().hex[:8]}",
    ]
    log = workdir / "up.log"
    with open(log, "wb") as err:
        up = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        assert up.stdout is not None
        ready = False
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line or "Ctrl-C stops everything" in line:
                ready = bool(line)
                break
        if not ready or up.poll() is not None:
            raise SystemExit(f"lbmqtt up did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(3)  # let start-up work (imports, first stats) pass: a bench, not a test
        pids = [up.pid, *children_of(up.pid)]
        names = {}
        for p in pids:
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                joined = b" ".join(argv)
                names[p] = (
                    "worker"
                    if b"lbmqtt.worker" in joined
                    else next((a.decode() for a in argv[3:4]), "?")
                    if b"lbmqtt" in joined
                    else "?"
                )
            except OSError:
                names[p] = "?"
        c0 = {p: cpu_seconds(p) for p in pids}
        w0 = time.monotonic()
        time.sleep(args.seconds)
        wall = time.monotonic() - w0
        per: dict[str, float] = {}
        for p in pids:
            role = names.get(p, "?")
            per[role] = per.get(role, 0.0) + 100 * (cpu_seconds(p) - c0[p]) / wall
        total = sum(per.values())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "scenario": "idle",
        "seconds": args.seconds,
        "workers": args.workers,
        "cpu_pct_total": round(total, 2),
        "cpu_pct": {k: round(v, 2) for k, v in sorted(per.items())},
        "processes": len(pids),
        "machine": MACHINE,
    }


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


async def _scale(
    args: argparse.Namespace, port: int, prefix: str, pids: dict[str, int]
) -> dict[str, Any]:
    from bench.nodes import SimNode, measure_rest
    from lbmqtt.protocol import BalancerStats, Topics
    from lbmqtt.status import StatsWatcher

    topics = Topics(prefix)
    bal = pids["balancer"]
    out: dict[str, Any] = {"rss_mb_start": rss_mb(bal)}
    out["rest_cpu_pct_empty"] = await measure_rest(pids, 3.0)
    s = load_settings(None, env={}, overrides={"BROKER_PORT": port, "TOPIC_PREFIX": prefix})
    pub = MqttTransport(
        host="127.0.0.1",
        port=port,
        client_id=f"scale-{uuid.uuid4().hex[:6]}",
        on_message=lambda topic, payload, retained: None,
    )
    await pub.start(wait=True, timeout_s=30)
    async with StatsWatcher(s) as w:
        last: BalancerStats | None = await w.next(None, 30)
        # submit: batches of 1,000 per message, "events" (no retained state per task),
        # round-robin over the users; at most 20 batches in flight, so the broker's queue
        # toward the balancer stays bounded
        c0, w0 = cpu_seconds(bal), time.perf_counter()
        batch = 1000
        sent = 0
        users = [f"user{u:02d}" for u in range(args.users)]
        deadline = time.monotonic() + args.timeout
        while sent < args.tasks and time.monotonic() < deadline:
            n = min(batch, args.tasks - sent)
            body = json.dumps(
                {
                    "tasks": [
                        {"name": "NOOP", "args": sent + i, "notify": "events"} for i in range(n)
                    ]
                }
            ).encode()
            user = users[(sent // batch) % len(users)]
            await pub.publish_confirmed(topics.submit(user), body, timeout_s=60)
            sent += n
            if (sent // batch) % 20 == 0:  # let the balancer keep up: wait on its stats
                while last.queued < sent - 20 * batch and time.monotonic() < deadline:
                    last = await w.next(last, 60)
        while last.queued < sent and time.monotonic() < deadline:
            last = await w.next(last, 60)
        wall = time.perf_counter() - w0
        out["queued"] = last.queued
        out["accept_tasks_per_s"] = round(last.queued / wall, 1)
        out["accept_cpu_pct_balancer"] = round(100 * (cpu_seconds(bal) - c0) / wall, 1)
        out["rss_mb_queued"] = rss_mb(bal)
        out["rest_cpu_pct_queued"] = await measure_rest(pids, 5.0)
        out["stats_bytes_queued"] = len(last.encode())
        # nodes join: the balancer places from a full queue
        nodes = [SimNode(f"sim{i:03d}", port, topics, 2, 1.0) for i in range(args.nodes)]
        for nd in nodes:
            await nd.t.start()
        for nd in nodes:
            await nd.t.wait_ready(60)
        hb = [asyncio.create_task(nd.heartbeats()) for nd in nodes]
        try:
            while sum(1 for n in last.nodes if n.online) < args.nodes:
                last = await w.next(last, 60)
            first = last
            c0, w0 = cpu_seconds(bal), time.perf_counter()
            cb0 = cpu_seconds(pids["broker"])
            await asyncio.sleep(args.seconds)
            last = await w.next(last, 60)
            wall = time.perf_counter() - w0
            out["dispatch_tasks_per_s"] = round(
                (last.done_total - first.done_total) / (last.time - first.time), 1
            )
            out["dispatch_cpu_pct"] = {
                "balancer": round(100 * (cpu_seconds(bal) - c0) / wall, 1),
                "broker": round(100 * (cpu_seconds(pids["broker"]) - cb0) / wall, 1),
            }
            out["rss_mb_dispatching"] = rss_mb(bal)
            out["still_queued"] = last.queued
            out["done_total"] = last.done_total
        finally:
            for t in hb:
                t.cancel()
            for nd in nodes:
                await nd.t.close(timeout_s=1)
    await pub.close()
    return out


def scale(args: argparse.Namespace) -> dict[str, Any]:
    """The balancer with a million queued tasks and many nodes: CPU and RSS."""
    args.tasks = args.tasks or 1_000_000
    workdir = Path(tempfile.mkdtemp(prefix="lbmqtt-bench-scale-"))
    env = {
        **os.environ,
        "LBMQTT_LOG_LEVEL": "WARNING",
        "LBMQTT_LB_QUEING_MAXPERUSER": "0",
        "LBMQTT_METRICS_PORT": "0",
        "LBMQTT_JOURNAL_PATH": str(workdir / "journal"),
    }
    try:
        with bench_broker(args.broker, env) as (port, broker_pid, children):
            base = asyncio.run(broker_baseline(port))
            prefix = f"bench/{uuid.uuid4().hex[:8]}"
            children.append(
                _spawn(
                    "balancer",
                    ["balancer", "--broker-port", str(port), "--prefix", prefix],
                    env=env,
                )
            )
            pids = {"broker": broker_pid, "balancer": children[-1].proc.pid}
            result = asyncio.run(_scale(args, port, prefix, pids))
        result["journal_mb"] = round(
            sum(f.stat().st_size for f in workdir.glob("journal*")) / 1e6, 1
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "scenario": "scale",
        "broker": args.broker,
        "tasks": args.tasks,
        "users": args.users,
        "nodes": args.nodes,
        "seconds": args.seconds,
        **result,
        **base,
        "machine": MACHINE,
    }


def unequal(args: argparse.Namespace) -> dict[str, Any]:
    """See the module docstring (``unequal``)."""
    n_nodes, slow, slots = args.nodes, args.slowdown, 2
    factors = [1.0] * (n_nodes - 1) + [slow]
    short_s, long_s = 0.1, 2.6
    work = [short_s] * args.tasks + [long_s] * args.long
    capacity = sum(slots / f for f in factors)
    bound = max(sum(work) / capacity, long_s)
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    base_env = {
        **os.environ,
        "LBMQTT_LOG_LEVEL": "WARNING",
        "LBMQTT_LB_QUEING_MAXPERUSER": "0",
        "LBMQTT_METRICS_PORT": "0",
        "LBMQTT_JOURNAL_PATH": "none",
    }
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    with bench_broker(args.broker) as (port, _broker_pid, _children):
        common = ["--broker-port", str(port), "--prefix", prefix]
        s = load_settings(
            None,
            env={},
            overrides={
                "BROKER_PORT": port,
                "TOPIC_PREFIX": prefix,
                "CLIENT_ACK_TIMEOUT_S": 120,
                "LB_QUEING_MAXPERUSER": 0,
            },
        )
        for _ in range(args.rounds):
            for mode in ("on", "off"):
                env = {**base_env, "LBMQTT_SPECULATE": "true" if mode == "on" else "false"}
                procs = [_spawn("balancer", ["balancer", *common], env=env)]
                try:
                    for i, f in enumerate(factors):
                        node_env = {**base_env, "DEMO_SLOWDOWN": str(f)}
                        node_args = ["--tasks", DEMO, "--name", f"m{i}", "--workers", str(slots)]
                        procs.append(_spawn(f"m{i}", ["node", *common, *node_args], env=node_env))
                    runs[mode].append(asyncio.run(_unequal_batch(s, args, short_s, long_s)))
                finally:
                    stop_children(procs)
    out: dict[str, Any] = {
        "nodes": n_nodes,
        "slowdown": slow,
        "slots_per_node": slots,
        "short_tasks": args.tasks,
        "long_tasks": args.long,
        "rounds": args.rounds,
        "bound_s": bound,
    }
    for mode, rs in runs.items():
        makespan = statistics.median(r["makespan_s"] for r in rs)
        out[f"makespan_s_speculate_{mode}"] = makespan
        out[f"over_bound_speculate_{mode}"] = makespan / bound
        out[f"worst_over_bound_speculate_{mode}"] = max(r["makespan_s"] for r in rs) / bound
        out[f"long_on_slow_node_speculate_{mode}"] = statistics.median(
            r["long_on_slow"] for r in rs
        )
        out[f"copies_won_speculate_{mode}"] = statistics.median(r["copies_won"] for r in rs)
    out["on_vs_off"] = out["makespan_s_speculate_on"] / out["makespan_s_speculate_off"]
    return out


def _wait_nodes_online(port: int, prefix: str, n: int, timeout: float = 60.0) -> None:
    import paho.mqtt.client as mqtt

    from lbmqtt.protocol import BalancerStats, Topics, decode

    online = [0]

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        online[0] = sum(1 for x in decode(BalancerStats, m.payload).nodes if x.online)

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_message = on_message
    c.on_connect = lambda c, *a: c.subscribe(Topics(prefix).balancer_stats, 0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while online[0] < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{online[0]} of {n} nodes online after {timeout:g} s")
            time.sleep(0.05)
    finally:
        c.loop_stop()
        c.disconnect()


async def _unequal_batch(
    s: Any, args: argparse.Namespace, short_s: float, long_s: float
) -> dict[str, Any]:
    # every node online, as the balancer sees it, before the clock starts
    await asyncio.to_thread(_wait_nodes_online, s.broker_port, s.topic_prefix, args.nodes)
    async with AsyncClient(s, user="bench") as c:
        t0 = time.time()
        specs = [{"name": "WORK", "args": {"seconds": short_s, "steps": 1}}] * args.tasks
        specs += [{"name": "WORK_LONG", "args": {"seconds": long_s, "steps": 20}}] * args.long
        ids = await c.submit_many(specs)
        states = [await c.wait_state(tid, timeout=600) for tid in ids]
    ends = [st.finished_at or t0 for st in states]
    slow = f"m{args.nodes - 1}"
    return {
        "makespan_s": max(ends) - t0,
        "long_on_slow": sum(1 for st in states[args.tasks :] if st.node == slow),
        "copies_won": sum(1 for st in states if st.attempt > 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "scenario",
        choices=[
            "throughput",
            "latency",
            "sleep",
            "journal",
            "idle",
            "lan",
            "scale",
            "seed",
            "unequal",
        ],
    )
    ap.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--sleep-ms", type=float, default=50.0)
    ap.add_argument("--journal", choices=["on", "off", "full"], default="on")
    ap.add_argument(
        "--pipeline-window",
        type=int,
        default=None,
        metavar="N",
        help="PIPELINE_WINDOW_MAX for the balancer (0: no pipelining)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="journal scenario: rounds")
    ap.add_argument(
        "--stages",
        action="store_true",
        help="latency: also time each hop of a task (a second pass)",
    )
    ap.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="idle: how long at rest (30); scale: how long dispatching (10)",
    )
    ap.add_argument(
        "--nodes", type=int, default=None, help="scale: simulated nodes (200); unequal: 4"
    )
    ap.add_argument("--slowdown", type=float, default=8.0, help="unequal: the slow node's factor")
    ap.add_argument("--long", type=int, default=4, help="unequal: long tasks at the end")
    ap.add_argument("--users", type=int, default=10, help="scale: users submitting")
    ap.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="scale: give up submitting after this many seconds",
    )
    ap.add_argument(
        "--latency-tasks", type=int, default=50, help="seed: lone tasks per latency round"
    )
    ap.add_argument("--sleep-tasks", type=int, default=200, help="seed: tasks per sleep round")
    ap.add_argument(
        "--seed-venv", default=None, help="seed: pyLoadBalancer's venv (default: in ~/.cache)"
    )
    ap.add_argument(
        "--no-celery",
        dest="celery",
        action="store_false",
        help="seed: leave Celery out (it runs when redis-server is installed)",
    )
    args = ap.parse_args()
    if args.scenario == "seed":
        from seed import seed

        args.tasks = args.tasks or 2000
        print(json.dumps({"scenario": "seed", "broker": args.broker, "workers": args.workers,
                          **_rounded(seed(args)), "machine": MACHINE}))  # fmt: skip
        return
    if args.scenario == "unequal":
        args.nodes = args.nodes or 4
        args.tasks = 200 if args.tasks is None else args.tasks
        out = {"scenario": "unequal", **unequal(args), "machine": MACHINE}
        print(json.dumps(_rounded(out)))
        return
    args.nodes = args.nodes or 200
    if args.scenario == "scale":
        args.seconds = 10.0 if args.seconds is None else args.seconds
        print(json.dumps(scale(args)))
        return
    args.seconds = 30.0 if args.seconds is None else args.seconds
    if args.scenario == "idle":
        print(json.dumps(idle(args)))
        return
    if args.scenario == "lan":
        args.tasks = args.tasks or 2000
        print(json.dumps(lan(args)))
        return
    args.tasks = (
        args.tasks
        or {"throughput": 2000, "latency": 200, "sleep": 200, "journal": 2000}[args.scenario]
    )
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="lbmqtt-bench-"))
    os.environ.update(
        {
            "LBMQTT_LOG_LEVEL": "WARNING",
            "LBMQTT_LB_QUEING_MAXPERUSER": "0",
            "LBMQTT_METRICS_PORT": "0",
        }
    )

    def journal_env(mode: str, run: int) -> dict[str, str]:
        env = dict(os.environ)
        env["LBMQTT_JOURNAL_PATH"] = "none" if mode == "off" else str(workdir / f"journal-{run}")
        env["LBMQTT_JOURNAL_SYNC"] = "full" if mode == "full" else "normal"
        if args.pipeline_window is not None:
            env["LBMQTT_PIPELINE_WINDOW_MAX"] = str(args.pipeline_window)
        return env

    result: dict[str, Any] = {}
    try:
        with bench_broker(args.broker) as (port, broker_pid, children):
            common = ["--broker-port", str(port), "--prefix", prefix]
            modes = (
                ["off", "on", "full"] * args.rounds
                if args.scenario == "journal"
                else [args.journal]
            )
            node_child = _spawn(
                "node",
                [
                    "node",
                    *common,
                    "--tasks",
                    DEMO,
                    "--name",
                    "bench",
                    "--workers",
                    str(args.workers),
                ],
            )
            children.append(node_child)
            base = asyncio.run(broker_baseline(port))
            runs: dict[str, list[dict[str, Any]]] = {}
            for i, mode in enumerate(modes):
                balancer = _spawn("balancer", ["balancer", *common], env=journal_env(mode, i))
                pids = {
                    "balancer": balancer.proc.pid,
                    "node": node_child.proc.pid,
                    "broker": broker_pid,
                }
                try:
                    mark = PhaseMarks(pids, node_child.proc.pid)
                    c0, q0 = process_times(pids, node_child.proc.pid)
                    w0 = time.perf_counter()
                    r = asyncio.run(scenario(args, port, prefix, mark=mark))
                    wall = time.perf_counter() - w0
                    c1, q1 = process_times(pids, node_child.proc.pid)
                    if phases := cpu_by_phase(mark.marks):
                        r["cpu_pct_by_phase"] = phases
                    # CPU of each process over the whole run (warm-up included), % of one core
                    r["cpu_pct"] = {k: round(100 * (c1[k] - c0[k]) / wall, 1) for k in c0}
                    # and per task, in µs: what a change to the CPU a task costs shows in
                    # (steadier than tasks/s on a shared machine; summed in "all"; the
                    # warm-up's 50 tasks and the client's start are in it, as above)
                    per_task = {k: round(1e6 * (c1[k] - c0[k]) / args.tasks, 1) for k in c0}
                    per_task["all"] = round(sum(per_task.values()), 1)
                    r["cpu_us_per_task"] = per_task
                    # how long each was ready to run but had no CPU, % of the run: the
                    # contention for the cores (all processes share the machine's 2)
                    r["runqueue_wait_pct"] = {k: round(100 * (q1[k] - q0[k]) / wall, 1) for k in q0}
                    runs.setdefault(mode, []).append(r)
                finally:
                    stop_children([balancer])
        if args.scenario == "journal":
            for mode, rs in runs.items():
                rate = statistics.median(r["tasks_per_s"] for r in rs)
                result[f"{mode}_tasks_per_s"] = rate
                result[f"{mode}_p50_ms"] = statistics.median(r["p50_ms"] for r in rs)
                result[f"{mode}_p99_ms"] = statistics.median(r["p99_ms"] for r in rs)
            for mode in ("on", "full"):
                result[f"{mode}_vs_off"] = result[f"{mode}_tasks_per_s"] / result["off_tasks_per_s"]
            result.update(tasks=args.tasks, rounds=args.rounds)
        else:
            result = {
                **runs[args.journal][0],
                "journal": args.journal,
                "pipeline_window": args.pipeline_window,
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figures: dict[str, Any] = {
        "scenario": args.scenario,
        "broker": args.broker,
        "workers": args.workers,
        **result,
        **base,
        "machine": MACHINE,
    }
    if "tasks_per_s" in result:
        figures["tasks_per_broker_msg_rate"] = result["tasks_per_s"] / base["broker_msgs_per_s"]
    print(json.dumps(_rounded(figures)))


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


if __name__ == "__main__":
    main()
