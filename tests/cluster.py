"""Real processes for fault injection: a broker, a balancer and nodes, each a
``python -m lbmqtt`` child (or a Mosquitto), a steady stream of ``CHAOS`` tasks from a
client, and the accounting at the end. Used by ``tests/test_faults.py`` and
``bench/chaos.py``.

Every child is ours (started here, ended here by its PID); every child asks the kernel to
signal it if this process dies, so none outlives a crashed test run. Only loopback
addresses and network namespaces this module creates are used.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lbmqtt.access import Account, Role, hash_password, new_password, read_accounts, write_accounts
from lbmqtt.client import Client
from lbmqtt.config import Settings, is_loopback, load_settings
from lbmqtt.errors import LbmqttError
from lbmqtt.launcher import LaunchError, spawn
from lbmqtt.protocol import Status, TaskState

from .ports import free_port

ROOT = Path(__file__).resolve().parent.parent
TEST_TASKS = str(ROOT / "tests" / "tasks_for_tests.py")


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.01,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def self_signed_cert(folder: Path, ip: str, name: str = "broker") -> tuple[Path, Path]:
    """A one-day self-signed certificate and its key for ``ip`` (CN and subjectAltName), as
    the README's openssl line makes one: ``(cert, key)`` in ``folder``."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN={ip}"),
            *("-addext", f"subjectAltName=IP:{ip}"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def varint(n: int) -> bytes:
    """MQTT's remaining-length encoding (1 to 4 bytes, 7 bits each, low first)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class Mosquitto:
    """A Mosquitto of the test's own (see :func:`start_mosquitto`)."""

    port: int
    proc: subprocess.Popen[str]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def start_mosquitto(folder: Path, conf: Callable[[int], str]) -> Mosquitto:
    """Mosquitto from the configuration ``conf(port)`` (its listener on that free loopback
    port), written in ``folder``, once it listens; skips the test without the Debian
    package. Started as root, Mosquitto reads its files as the user ``mosquitto``, who
    cannot enter pytest's private temporary directories: it stays root here."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(exe):
        import pytest

        pytest.skip("needs the Debian package mosquitto (.ci/run installs it)")
    port = free_port()
    path = folder / "mosquitto.conf"
    path.write_text(conf(port) + ("user root\n" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen(
        [exe, "-c", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )

    def up() -> bool:
        if proc.poll() is not None:
            assert proc.stderr is not None
            with proc.stderr:
                raise AssertionError(f"mosquitto exited: {proc.stderr.read()}")
        return listening("127.0.0.1", port)

    wait_until(up, 10, "mosquitto to listen")
    return Mosquitto(port, proc)


def children_of(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for c in kids.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes]


class NetNs:
    """A network namespace joined to this one by a veth pair: ``host_ip`` here,
    ``ns_ip`` inside. ``cut()``/``mend()`` take the link down and up again."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        n = (os.getpid() % 200) * 10 + next(self._ids) % 10
        self.name = f"lbq{os.getpid()}x{n}"
        self.host_if, self.ns_if = f"lbqh{n}", f"lbqn{n}"
        a, b = 10 + n // 250, n % 250
        self.host_ip, self.ns_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
        self._up = False

    @staticmethod
    def available() -> str | None:
        """None if namespaces can be made here, else why not."""
        if os.geteuid() != 0:
            return "needs root (CI runs as root)"
        if shutil.which("ip") is None:
            return "needs iproute2's ip"
        probe = f"lbqprobe{os.getpid()}"
        made = subprocess.run(
            ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10, check=False
        )
        if made.returncode != 0:
            return f"cannot create a network namespace here: {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10, check=False)
        return None

    def _ip(self, *args: str, ns: bool = False) -> None:
        cmd = ["ip", "netns", "exec", self.name, "ip", *args] if ns else ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def __enter__(self) -> NetNs:
        self._ip("netns", "add", self.name)
        self._up = True
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._ip("link", "set", self.ns_if, "netns", self.name)
        self._ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self._ip("addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if, ns=True)
        self._ip("link", "set", self.ns_if, "up", ns=True)
        self._ip("link", "set", "lo", "up", ns=True)
        return self

    @property
    def wrap(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        self._ip("link", "set", self.host_if, "down")

    def mend(self) -> None:
        self._ip("link", "set", self.host_if, "up")

    def __exit__(self, *exc: object) -> None:
        if self._up:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._ip("link", "del", self.host_if)
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._ip("netns", "del", self.name)
            self._up = False


class Cluster:
    """A broker, a balancer and nodes as separate processes, for fault injection.

    Args:
        workdir: logs, the journal and the run log of the CHAOS tasks go here.
        broker: ``"embedded"`` (``lbmqtt broker``) or ``"mosquitto"``.
        host: the address the broker listens on and everyone connects to.
        overrides: extra settings (parameters.json keys).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        broker: str = "embedded",
        host: str = "127.0.0.1",
        overrides: dict[str, Any] | None = None,
    ):
        self.workdir = workdir
        self.broker_kind = broker
        self.host = host
        self.port = free_port()
        self.prefix = f"chaos/{uuid.uuid4().hex[:8]}"
        self.runs_log = workdir / "runs.log"
        self.values: dict[str, Any] = {
            "BROKER_HOST": host,
            "BROKER_PORT": self.port,
            "TOPIC_PREFIX": self.prefix,
            "HEARTBEAT_S": 0.3,
            "NODE_TIMEOUT_S": 2.0,
            "BROKER_KEEPALIVE_S": 2,
            "JOURNAL_PATH": str(workdir / "journal"),
            "NODE_TASKS": [TEST_TASKS],
            "RESULT_RESEND_S": 1.0,
            "TASK_MAX_ATTEMPTS": 10,
            "CONNECT_TIMEOUT_S": 5.0,
            "CLIENT_ACK_TIMEOUT_S": 60.0,
            "LB_QUEING_MAXPERUSER": 0,
            "RESULT_COLLECTED_TTL_S": 600.0,
            "BROKER_ADVERTISE": False,
            "METRICS_PORT": 0,
        }
        self.values.update(overrides or {})
        # a broker beyond loopback needs accounts (lbmqtt refuses to run one without)
        self.accounts: Path | None = None
        self._passwords: dict[str, str] = {}
        if broker == "embedded" and not is_loopback(host):
            self.accounts = workdir / "accounts"
            self.values["AUTH_FILE"] = str(self.accounts)
        self.procs: dict[str, Proc] = {}
        self.restarts = Counter[str]()

    def journal_format(self) -> str:
        """``sqlite`` or ``log``: the format of the balancer's journal file, by its first
        bytes."""
        head = Path(self.values["JOURNAL_PATH"]).read_bytes()[:16]
        return "sqlite" if head.startswith(b"SQLite format 3") else "log"

    # ----------------------------------------------------------------- settings

    def login(self, name: str, role: Role) -> dict[str, Any]:
        """With accounts: the settings that log in as ``name`` (an account of ``role``,
        added to the accounts file, which the broker re-reads). Else nothing."""
        if self.accounts is None:
            return {}
        if name not in self._passwords:
            self._passwords[name] = new_password()
            accounts = read_accounts(self.accounts) if self.accounts.exists() else {}
            accounts[name] = Account(
                name, role, hash_password(self._passwords[name], iterations=1000)
            )
            write_accounts(self.accounts, accounts.values())
        return {"BROKER_USERNAME": name, "BROKER_PASSWORD": self._passwords[name]}

    def env(self, *, login: tuple[str, Role] | None = None, **changes: Any) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")}
        creds = self.login(*login) if login else {}
        for key, value in {**self.values, **creds, **changes}.items():
            env[f"LBMQTT_{key}"] = value if isinstance(value, str) else json.dumps(value)
        return env

    def settings(self, *, login: tuple[str, Role] | None = None, **changes: Any) -> Settings:
        creds = self.login(*login) if login else {}
        return load_settings(None, env={}, overrides={**self.values, **creds, **changes})

    # ----------------------------------------------------------------- processes

    def _log(self, name: str) -> IO[bytes]:
        return open(self.workdir / f"{name}.log", "ab")  # closed in _forget

    def _start(
        self,
        name: str,
        args: list[str],
        *,
        wrap: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
        role: Role | None = None,
    ) -> Proc:
        log = self._log(name)
        try:
            if env is None:
                env = self.env(login=(name, role) if role else None)
            child = spawn(name, args, timeout, env=env, wrap=wrap, stdout=log)
        except BaseException:
            log.close()
            raise
        p = self.procs[name] = Proc(name, child.proc, log)
        return p

    def start_broker(self, *, wrap: tuple[str, ...] = ()) -> None:
        if self.broker_kind == "mosquitto":
            exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} {self.host}\nallow_anonymous true\n"
                "persistence false\nmax_keepalive 60\n"
            )
            log = self._log("broker")
            popen = subprocess.Popen(
                [*wrap, exe, "-c", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs["broker"] = Proc("broker", popen, log)
            wait_until(lambda: listening(self.host, self.port), 15, "the broker to listen")
        else:  # (ready once listening: it says so on the ready pipe)
            self._start("broker", ["broker", "--bind", self.host], wrap=wrap)

    def start_balancer(
        self,
        timeout: float = 30.0,
        *,
        wrap: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        # After a SIGKILL the old balancer's will may not have fired yet ("another
        # balancer is online"): try again for a few seconds, as a supervisor would.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._start("balancer", ["balancer"], wrap=wrap, role="balancer", env=env)
                return
            except LaunchError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def start_node(
        self,
        name: str,
        workers: int = 2,
        *,
        wrap: tuple[str, ...] = (),
        speed: float | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        args = ["node", "--name", name, "--workers", str(workers)]
        if speed is not None:
            args += ["--speed", str(speed)]
        self._start(name, args, wrap=wrap, env=env, role="node")

    def start(self, **nodes: int) -> Cluster:
        """The broker, the balancer, and a node of that many worker slots per keyword."""
        self.start_broker()
        self.start_balancer()
        for name, workers in nodes.items():
            self.start_node(name, workers=workers)
        return self

    def pid(self, name: str) -> int:
        return self.procs[name].popen.pid

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.popen.poll() is None

    def send(self, name: str, sig: int) -> None:
        os.kill(self.pid(name), sig)

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 15.0) -> int | None:
        """Send ``sig`` to the component, wait until its process has ended; its status."""
        p = self.procs[name]
        if p.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(sig)
            try:
                p.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)
        self._forget(name)
        return p.popen.returncode

    def restart(self, name: str, start: Callable[[], None]) -> None:
        self.kill(name)
        self.restarts[name] += 1
        start()

    def workers_of(self, node: str) -> list[int]:
        """PIDs of the node's worker processes."""
        pids = []
        for pid in children_of(self.pid(node)):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"lbmqtt.worker" in f.read():
                        pids.append(pid)
            except OSError:
                continue
        return pids

    def _forget(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None:
            p.log.close()

    def close(self) -> None:
        """End every child we started (nodes first, the broker last), by PID."""
        order = sorted(self.procs, key=lambda n: {"broker": 2, "balancer": 1}.get(n, 0))
        for name in order:
            p = self.procs[name]
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.popen.pid, signal.SIGCONT)  # a stopped one cannot die of TERM
                    p.popen.terminate()
        for name in order:
            p = self.procs[name]
            try:
                p.popen.wait(10)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)
            self._forget(name)

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for path in sorted(self.workdir.glob("*.log")):
            if path.name == "runs.log":
                continue
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)


class Lan:
    """A LAN of our own: a switch (a bridge in its own network namespace) and hosts (one
    namespace each, joined to the switch by a veth pair) on ``10.X.Y.0/24``. Nothing of it
    touches the machine's own interfaces; leaving the ``with`` block deletes it all."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 10000}{next(self._ids) % 10}"
        n = int(self.tag) % 62000
        self.subnet = f"10.{200 + n // 250 % 50}.{n % 250}"
        self.switch = f"lbqsw{self.tag}"
        self.hosts: dict[str, LanHost] = {}
        self._made: list[str] = []

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    def __enter__(self) -> Lan:
        self._ip("netns", "add", self.switch)
        self._made.append(self.switch)
        self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def add_host(self, name: str) -> LanHost:
        k = len(self.hosts) + 1
        ns = f"lbq{self.tag}{name}"[:30]
        a, b = f"lq{self.tag}h{k}a", f"lq{self.tag}h{k}b"
        self._ip("netns", "add", ns)
        self._made.append(ns)
        self._ip("link", "add", a, "type", "veth", "peer", "name", b)
        self._ip("link", "set", a, "netns", ns)
        self._ip("link", "set", b, "netns", self.switch)
        self._ip("-n", self.switch, "link", "set", b, "master", "br0")
        self._ip("-n", self.switch, "link", "set", b, "up")
        ip = f"{self.subnet}.{k}"
        self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", a)
        self._ip("-n", ns, "link", "set", a, "up")
        self._ip("-n", ns, "link", "set", "lo", "up")
        host = self.hosts[name] = LanHost(name, ns, ip)
        return host

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self._made):  # deleting a namespace deletes its veth ends
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._ip("netns", "del", ns)
        self._made.clear()


@dataclass(frozen=True)
class LanHost:
    name: str
    netns: str
    ip: str

    @property
    def wrap(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.netns)


# --------------------------------------------------------------------- the stream


class Stream:
    """Submits ``CHAOS`` tasks at a steady pace from a thread, then collects every final
    state. Submits ride out balancer and broker restarts (the client resends them)."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        count: int,
        interval_s: float = 0.02,
        task_ms: float = 100.0,
        batch: int = 1,
        user: str = "chaos",
    ):
        self.cluster = cluster
        self.count, self.interval_s, self.task_ms, self.batch = count, interval_s, task_ms, batch
        self.client = Client(cluster.settings(login=(user, "user")), user=user)
        self.expected: dict[str, int] = {}
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="chaos-stream", daemon=True)
        self.started = threading.Event()
        self.finished = threading.Event()
        self.stop = threading.Event()
        """Set it to stop submitting early (a run bounded in time, not count)."""

    def start(self) -> Stream:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            sent = 0
            deadline = time.monotonic() + 600
            while sent < self.count and time.monotonic() < deadline and not self.stop.is_set():
                n = min(self.batch, self.count - sent)
                specs = [
                    {
                        "name": "CHAOS",
                        "id": uuid.uuid4().hex,
                        "args": {
                            "value": sent + k,
                            "ms": self.task_ms,
                            "log": str(self.cluster.runs_log),
                        },
                    }
                    for k in range(n)
                ]
                for s in specs:
                    self.expected[str(s["id"])] = int(s["args"]["value"])  # type: ignore[index]
                try:
                    self.client.submit_many(specs)
                except LbmqttError as exc:
                    self.errors.append(f"submit: {exc}")
                sent += n
                self.started.set()
                time.sleep(self.interval_s)
        finally:
            self.started.set()
            self.finished.set()

    def join(self, timeout: float = 120.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not finish submitting"

    def collect(self, timeout: float = 120.0) -> dict[str, TaskState | None]:
        """Every task's final state (None: lost - unknown to the balancer or never final),
        all within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.join(timeout)
        out: dict[str, TaskState | None] = {}
        for tid in self.expected:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                out[tid] = self.client.wait_state(tid, timeout=remaining)
            except (LbmqttError, TimeoutError) as exc:
                self.errors.append(f"{tid}: {exc}")
                out[tid] = None
        return out

    def close(self) -> None:
        self.client.close()


@dataclass
class Accounting:
    submitted: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    lost: int = 0
    wrong: int = 0
    duplicated: int = 0
    retried: int = 0
    """tasks that needed more than one attempt (a fault forced a retry)"""
    reruns: int = 0
    """completions beyond the first, each explained by a retry"""
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "problems"}

    def assert_clean(self) -> None:
        """Nothing lost, nothing wrong, no unexplained duplicate, every task done."""
        assert (self.lost, self.wrong, self.duplicated, self.failed) == (0, 0, 0, 0), (
            f"{self.summary()}\n" + "\n".join(self.problems[:20])
        )
        assert self.done == self.submitted, self.summary()


def account(
    expected: dict[str, int], states: dict[str, TaskState | None], runs_log: Path
) -> Accounting:
    """Each task: exactly one final state, the right result if done, and no more runs to
    completion than attempts (a run beyond the first must be a retry's)."""
    completions = Counter[str]()
    per_attempt = Counter[tuple[str, int]]()
    if runs_log.exists():
        for line in runs_log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                completions[parts[0]] += 1
                per_attempt[(parts[0], int(parts[1]))] += 1
    acc = Accounting(submitted=len(expected))
    for tid, value in expected.items():
        st = states.get(tid)
        if st is None:
            acc.lost += 1
            acc.problems.append(f"{tid} (value {value}): lost")
            continue
        if st.status == Status.DONE:
            acc.done += 1
            if st.result != {"value": value * 2}:
                acc.wrong += 1
                acc.problems.append(f"{tid}: result {st.result!r}, expected {value * 2}")
        elif st.status == Status.FAILED:
            acc.failed += 1
            acc.problems.append(f"{tid}: failed: {st.error}")
        elif st.status == Status.CANCELLED:
            acc.cancelled += 1
        else:
            acc.lost += 1
            acc.problems.append(f"{tid}: not final ({st.status})")
        if st.attempt > 1:
            acc.retried += 1
        runs = completions.get(tid, 0)
        if runs > 1:
            acc.reruns += runs - 1
        if runs > max(1, st.attempt) or any(
            per_attempt[(tid, a)] > 1 for a in range(1, st.attempt + 1)
        ):
            acc.duplicated += 1
            acc.problems.append(f"{tid}: ran to completion {runs} times in {st.attempt} attempt(s)")
        if st.status == Status.DONE and runs == 0:
            acc.problems.append(f"{tid}: done but never ran")
            acc.wrong += 1
    return acc


__all__ = [
    "Accounting",
    "Cluster",
    "Lan",
    "LanHost",
    "NetNs",
    "Stream",
    "account",
    "children_of",
    "free_port",
    "listening",
    "wait_until",
]
