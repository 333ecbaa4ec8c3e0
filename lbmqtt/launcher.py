"""``lbmqtt up``: the whole system on one machine, as child processes.

Starts the embedded broker (unless ``BROKER_EMBEDDED`` is false), the balancer, the
dashboard and a local node, each as ``python -m lbmqtt <command>`` in its own process and
session, and waits for each to say it is ready (one JSON line on an inherited pipe).
Ctrl-C or SIGTERM stops them in reverse order (SIGTERM, then SIGKILL after a grace
period). If one of them dies it is started again, on the ports it got the first time (even
those given as 0: the broker's, the dashboard's and the balancer's metrics port, so the
printed URLs stay true); a restarted balancer resumes every task from its journal. One
that dies 5 times within a minute stops them all. Each child also asks the kernel to
signal it if this supervisor dies, so none is left behind even after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backoff import Backoff
from .config import Settings

log = logging.getLogger(__name__)

SUPERVISOR_ENV = "LBMQTT_SUPERVISOR_PID"
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
LOGIN_REFUSED = 6
"""A part's exit status when the broker refused its login (``lbmqtt.cli.Exit``): it is not
started again (it would be refused again), and ``up`` stops with that status."""
RESTART_RETRY_S = 1.0
"""How often a start that failed is tried again (see :func:`_respawn`)."""


class LaunchError(Exception):
    """A component failed to start; the message says which and why.

    Args:
        message: what failed.
        status: the exit status of a component that exited before it was ready.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Child:
    """One supervised component."""

    name: str
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    args: list[str] = field(default_factory=list)
    """The ``lbmqtt`` arguments it was started with (to start it again)."""
    env: dict[str, str] | None = None
    """Its environment, if not ours (to start it again)."""


def spawn(
    name: str,
    args: list[str],
    timeout_s: float = READY_TIMEOUT_S,
    *,
    env: dict[str, str] | None = None,
    wrap: tuple[str, ...] = (),
    stdout: Any = None,
) -> Child:
    """Start ``python -m lbmqtt ARGS`` and wait for its ready line.

    ``env``: the whole environment (default: ours); ``wrap``: a command to run it under
    (e.g. ``ip netns exec NS``); ``stdout``: where its output goes (default: ours).
    """
    r, w = os.pipe()
    given = env
    env = dict(os.environ if env is None else env)
    env[SUPERVISOR_ENV] = str(os.getpid())
    cmd = [*wrap, sys.executable, "-m", "lbmqtt", *args, "--ready-fd", str(w)]
    try:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(w,),
            env=env,
            start_new_session=True,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout else None,
        )
    finally:
        os.close(w)
    deadline = time.monotonic() + timeout_s
    buf = b""
    try:
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                proc.kill()
                proc.wait()
                raise LaunchError(f"{name} did not become ready within {timeout_s:g} s")
            ready, _, _ = select.select([r], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    rc = proc.wait()
                    raise LaunchError(
                        f"{name} exited with status {rc} before it was ready "
                        f"(see its messages above)",
                        rc,
                    )
                buf += chunk
    finally:
        os.close(r)
    return Child(name, proc, json.loads(buf.split(b"\n", 1)[0]), list(args), given)


_spawn = spawn  # the name compat and older code use


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``name`` in ``args``, or None."""
    return args[args.index(name) + 1] if name in args[:-1] else None


def _with_flag(args: list[str], name: str, value: str) -> list[str]:
    """``args`` with ``name VALUE`` (replacing any value it had)."""
    out = list(args)
    if name in out[:-1]:
        i = out.index(name)
        del out[i : i + 2]
    return [*out, name, value]


def _info(children: list[Child], name: str, key: str) -> Any:
    """``key`` of the ready line of child ``name``, or None."""
    return next((c.info.get(key) for c in children if c.name == name), None)


def _respawn(
    name: str,
    args: list[str],
    stopping: Any,
    timeout_s: float = READY_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> Child:
    """Start a part again; retried for a while (a restarted balancer may first see its dead
    predecessor still "online" until the broker has fired that one's will)."""
    deadline = time.monotonic() + timeout_s
    retry = Backoff(min_s=RESTART_RETRY_S, max_s=RESTART_RETRY_S, jitter=False)
    while True:
        try:
            return spawn(name, args, env=env)
        except LaunchError as exc:
            if exc.status == LOGIN_REFUSED or stopping() or time.monotonic() > deadline:
                raise  # (a refused login is refused again: no retry)
            time.sleep(retry.next())  # a supervisor's back-off


class Restarts:
    """The supervisor's rule for its children (by name), times from ``time.monotonic``: one
    that died is started again at once, unless it died more than ``MAX_RESTARTS`` times
    within ``RESTART_WINDOW_S``."""

    def __init__(self) -> None:
        self._restarts: dict[str, list[float]] = {}  # (within the window)

    def died(self, name: str, now: float) -> int | None:
        """``name`` has died: how many times within the window, this one included, or None
        when that is too many (give up)."""
        recent = [t for t in self._restarts.get(name, []) if now - t < RESTART_WINDOW_S]
        if len(recent) >= MAX_RESTARTS:
            return None
        self._restarts[name] = [*recent, now]
        return len(recent) + 1


def stop_children(
    children: list[Child], grace_s: float = STOP_GRACE_S, node_grace_s: float | None = None
) -> None:
    """SIGTERM each child in reverse start order, SIGKILL what outlives the grace period
    (``node_grace_s`` for a node, which drains first: NODE_DRAIN_S + 5 s in ``up``)."""
    if node_grace_s is None:
        node_grace_s = grace_s
    for child in reversed(children):
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(node_grace_s if child.name == "node" else grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s: killing it", child.name, grace_s)
                child.proc.kill()
                child.proc.wait()


def service_logins(settings: Settings) -> dict[str, dict[str, str]]:
    """With accounts (AUTH_FILE), the environments of the parts ``up`` starts: each gets
    a random password for its own login (the balancer, a monitor for the dashboard, the
    node under its node name), which the broker learns from its own environment. None of
    them needs an entry in the accounts file, and the passwords die with ``up``."""
    if not settings.auth_file:
        return {}
    from .access import new_password
    from .config import SERVICE_ACCOUNTS_ENV
    from .node import default_node_name

    logins = {
        "balancer": ("lbmqtt-up-balancer", "balancer"),
        "dashboard": ("lbmqtt-up-dashboard", "monitor"),
        "node": (settings.node_name or default_node_name(), "node"),
    }
    accounts: dict[str, list[str]] = {}
    envs: dict[str, dict[str, str]] = {}
    for part, (login, role) in logins.items():
        password = new_password()
        accounts[login] = [role, password]
        envs[part] = {
            **os.environ,
            "LBMQTT_BROKER_USERNAME": login,
            "LBMQTT_BROKER_PASSWORD": password,
            "LBMQTT_BROKER_TLS": "false",
        }
        envs[part].pop(SERVICE_ACCOUNTS_ENV, None)
    envs["broker"] = {**os.environ, SERVICE_ACCOUNTS_ENV: json.dumps(accounts)}
    return envs


def reset_journal(common: list[str], env: dict[str, str] | None) -> None:
    """``lbmqtt journal reset`` with the arguments and environment of the balancer about to
    start, so that it removes the very journal that balancer would open; prints what it
    says.

    Raises:
        LaunchError: it refused (a balancer is online on that broker and prefix) or failed.
    """
    r = subprocess.run(
        [sys.executable, "-m", "lbmqtt", "journal", "reset", *common],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    said = r.stdout.strip().removeprefix("lbmqtt: ")
    if r.returncode != 0:
        raise LaunchError(f"--fresh: {said or f'journal reset exited with {r.returncode}'}")
    print(said, flush=True)


def lbmqtt_command() -> str:
    """How another shell of this user runs this lbmqtt: ``lbmqtt`` when that is on PATH
    and is this one, else the full path of this venv's script (a venv not activated)."""
    import shutil

    script = Path(sys.executable).parent / "lbmqtt"
    found = shutil.which("lbmqtt")
    if found and os.path.realpath(found) == os.path.realpath(script):
        return "lbmqtt"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m lbmqtt"


def try_lines(settings: Settings, host: str, port: int, parameters: str | None) -> list[str]:
    """The ``Try:`` lines of the summary: commands that work when copied. They carry the
    flags a client needs to find this broker (those not at their defaults) and, with
    accounts, a user's login in the variables a user sets; the password is not ours to
    print (the file holds only its hash): the line says to fill it in."""
    default = {k: f.default for k, f in Settings.model_fields.items()}
    flags = f" --parameters {shlex.quote(parameters)}" if parameters else ""
    if host != default["broker_host"]:
        flags += f" --broker-host {host}"
    if port != default["broker_port"]:
        flags += f" --broker-port {port}"
    if settings.topic_prefix != default["topic_prefix"]:
        flags += f" --prefix {settings.topic_prefix}"
    if settings.broker_tls and not settings.broker_embedded:  # (an external broker's TLS)
        ca = settings.broker_ca_file
        flags += f" --tls-ca {shlex.quote(os.path.abspath(ca))}" if ca else " --tls"
    lb = lbmqtt_command()
    lines = ["Try:"]
    if settings.auth_file:
        from .access import read_accounts
        from .errors import ConfigError

        auth = os.path.abspath(settings.auth_file)
        try:
            accounts = list(read_accounts(auth).values())
        except ConfigError:
            accounts = []  # (the broker said why)
        users = sorted(a.name for a in accounts if a.role == "user")
        login = users[0] if users else "alice"
        if users:
            others = f"; or {', '.join(users[1:])}" if users[1:] else ""
            lines = [f"Try (as {login}, a user of {auth}{others}):"]
        else:
            lines = [
                f"Try (first give a user a login in {auth}; it asks for a password):",
                f"  {lb} user add {login} --role user --file {shlex.quote(auth)}",
            ]
        lines.append(
            f"  export LBMQTT_BROKER_USERNAME={login} LBMQTT_BROKER_PASSWORD='PASSWORD'"
            f"  # {login}'s password in place of PASSWORD"
        )
    elif settings.broker_username:  # (an external broker with logins lbmqtt does not keep)
        lines = [
            "Try (with a user's login on this broker):",
            "  export LBMQTT_BROKER_USERNAME='USER' LBMQTT_BROKER_PASSWORD='PASSWORD'"
            "  # a user's login and password in place of USER and PASSWORD",
        ]
    hello = """'{"firstName": "John", "lastName": "Doe"}'"""
    return [*lines, f"  {lb} submit HELLO {hello} --wait{flags}", f"  {lb} status{flags}"]


def up(
    settings: Settings,
    common: list[str],
    *,
    tasks: list[str],
    dashboard: bool = True,
    node: bool = True,
    fresh: bool = False,
) -> int:
    """Run the whole system until Ctrl-C / SIGTERM. Returns the exit status.

    Args:
        settings: the loaded settings (for ports and the prefix).
        common: command-line arguments every child gets (``--parameters`` and overrides).
        tasks: task sources for the local node (empty: ``NODE_TASKS``).
        dashboard, node: start those components.
        fresh: remove the balancer's journal before it starts (``lbmqtt journal reset``).
    """
    children: list[Child] = []
    node_grace = max(STOP_GRACE_S, settings.node_drain_s + 5.0)
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        common = list(common)
        scheme = "mqtts" if settings.broker_tls and not settings.broker_embedded else "mqtt"
        broker_url = f"{scheme}://{settings.broker_host}:{settings.broker_port}"
        host, port = settings.broker_host, settings.broker_port  # (clients connect there)
        envs = service_logins(settings) if settings.broker_embedded else {}
        if settings.broker_embedded:
            c = _spawn("broker", ["broker", *common], env=envs.get("broker"))
            children.append(c)
            port = int(c.info["port"])
            # e.g. 0 ("pick one"): the children need the real one
            common = _with_flag(common, "--broker-port", str(port))
            host = settings.broker_host
            if host == "auto" or settings.tls_listener:
                # the broker is ours: the local parts need no discovery (and, with TLS,
                # plain MQTT is on 127.0.0.1 only)
                if "--broker-host" in common:
                    i = common.index("--broker-host")
                    del common[i : i + 2]
                host = "127.0.0.1"
                common += ["--broker-host", host]
            # what the broker bound, each listener with its scheme (not what was asked)
            bound = c.info.get("listeners") or [f"mqtt://{host}:{port}"]
            broker_url = f"{', '.join(bound)} (embedded amqtt)"
        if fresh:
            reset_journal(common, envs.get("balancer"))
        children.append(_spawn("balancer", ["balancer", *common], env=envs.get("balancer")))
        if dashboard:
            children.append(_spawn("dashboard", ["dashboard", *common], env=envs.get("dashboard")))
        if node:
            node_args = ["node", *common]
            for t in tasks:
                node_args += ["--tasks", t]
            children.append(_spawn("node", node_args, env=envs.get("node")))
        lines = [
            "",
            "lbmqtt is up:",
            f"  broker     {broker_url}",
            f"  balancer   topics under {settings.topic_prefix}/",
        ]
        for c in children:
            if c.name == "balancer" and c.info.get("metrics"):
                lines.append(f"  metrics    {c.info['metrics']}")
            if c.name == "dashboard":
                lines.append(f"  dashboard  {c.info.get('url')}")
            if c.name == "node":
                lines.append(
                    f"  node       {c.info.get('name')}: {c.info.get('slots')} worker "
                    f"slots, tasks {', '.join(c.info.get('tasks', []))}"
                )
        lines += [
            "",
            *try_lines(settings, host, port, _flag(common, "--parameters")),
            "Ctrl-C stops everything.",
            "",
        ]
        print("\n".join(lines), flush=True)
        # how to start each part again: on the ports it got the first time (a port given as
        # 0 is picked once per `up`: the printed URLs stay true across restarts)
        specs = {c.name: c.args for c in children}
        kept = {
            "broker": ("--broker-port", _flag(common, "--broker-port")),
            "dashboard": ("--monitor-port", _info(children, "dashboard", "port")),
            "balancer": ("--metrics-port", _info(children, "balancer", "metrics_port")),
        }
        for name, (flag, value) in kept.items():
            if name in specs and value is not None:
                specs[name] = _with_flag(specs[name], flag, str(value))
        restarts = Restarts()
        while not stopping:
            for i, c in enumerate(children):
                rc = c.proc.poll()
                if rc is None:
                    continue
                if restarts.died(c.name, time.monotonic()) is None:
                    log.error(
                        "%s exited unexpectedly (status %s) %d times within %g s: "
                        "stopping the others",
                        c.name,
                        rc,
                        MAX_RESTARTS + 1,
                        RESTART_WINDOW_S,
                    )
                    stop_children(children, node_grace_s=node_grace)
                    return 1
                log.warning("%s exited unexpectedly (status %s): starting it again", c.name, rc)
                children[i] = _respawn(c.name, specs[c.name], lambda: stopping, env=c.env)
                print(f"lbmqtt: {c.name} is back", flush=True)
            time.sleep(0.2)  # a supervisor's poll, not a test wait
        print("lbmqtt: stopping...", flush=True)
        stop_children(children, node_grace_s=node_grace)
        print("lbmqtt: stopped", flush=True)
        return 0
    except LaunchError as exc:
        print(f"lbmqtt up: {exc}", file=sys.stderr, flush=True)
        stop_children(children, node_grace_s=node_grace)
        return LOGIN_REFUSED if exc.status == LOGIN_REFUSED else 1
    except BaseException:
        stop_children(children, node_grace_s=node_grace)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
