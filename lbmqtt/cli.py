"""The ``lbmqtt`` command: parse, build settings, configure logging, call the library."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .protocol import BalancerStats, TaskState
from .config import Settings, load_settings
from .errors import (
    BalancerUnavailable,
    BrokerUnavailable,
    ConfigError,
    LbmqttError,
    LoginRefused,
    SubmitRefused,
    TaskCancelled,
    TaskFailed,
    UnknownTask,
    WaitTimeout,
)
from .service import LoopFailed, freeze_heap

log = logging.getLogger("lbmqtt")


class Exit(IntEnum):
    """Exit statuses of the ``lbmqtt`` command."""

    OK = 0
    FAILED = 1  # a task failed, was cancelled, or had ended before a cancel; a component failed
    USAGE = 2  # bad flags or parameters file
    UNAVAILABLE = 3  # broker or balancer not reachable
    TIMEOUT = 4  # --timeout passed
    REFUSED = 5  # the balancer refused the submit (quota, invalid task)
    LOGIN_REFUSED = 6  # the broker refused the login (CONNACK 4/5): not retried
    UNKNOWN_TASK = 7  # no such task for this user (never submitted, or expired)
    BALANCER_ONLINE = 8  # journal reset: a balancer is online on that broker and prefix
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
    BROKEN_PIPE = 141  # stdout's reader left (`| head`): 128 + SIGPIPE, as other tools


EXAMPLES = """\
examples:
  lbmqtt up                                   # broker, balancer, dashboard and a local node
  lbmqtt submit HELLO '{"firstName": "John", "lastName": "Doe"}' --wait
  lbmqtt submit SLEEP '{"seconds": 30}' --priority 10 --requires memory_mb=500
  lbmqtt status
  lbmqtt cancel TASK_ID
  lbmqtt node --tasks nodes/demo_tasks.py     # on another machine (set BROKER_HOST)
  lbmqtt broker --parameters parameters.json
  lbmqtt user add alice --role user --file accounts   # logins for a shared LAN
  lbmqtt journal reset                        # start clean (balancer stopped)
"""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("settings (override parameters.json and LBMQTT_* variables)")
    g.add_argument(
        "--parameters",
        metavar="FILE",
        help="parameters file (default: ./parameters.json if present)",
    )
    g.add_argument("--broker-host", metavar="HOST", help="BROKER_HOST")
    g.add_argument("--broker-port", metavar="PORT", type=int, help="BROKER_PORT")
    g.add_argument("--prefix", metavar="PREFIX", help="TOPIC_PREFIX")
    g.add_argument("--tls", action="store_true", default=None, help="BROKER_TLS: connect with TLS")
    g.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="BROKER_CA_FILE: the CA that signed the broker's certificate (implies --tls)",
    )
    g.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="LOG_LEVEL")


def _ready_fd(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ready-fd", type=int, metavar="FD", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lbmqtt`` command."""
    ap = argparse.ArgumentParser(
        prog="lbmqtt",
        description="A task load balancer for unequal machines on a LAN, over MQTT.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"lbmqtt {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, help_: str, epilog: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(p)
        return p

    p = cmd(
        "up",
        "run broker, balancer, dashboard and a local node (Ctrl-C stops all)",
        "example:\n  lbmqtt up --tasks nodes/demo_tasks.py",
    )
    p.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="MODULE",
        help="task module or .py file for the local node (default NODE_TASKS)",
    )
    p.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    p.add_argument("--no-node", action="store_true", help="do not start a local node")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start clean: remove the balancer's journal first (as `lbmqtt journal reset`); "
        "crash recovery stays on",
    )
    p.add_argument("--monitor-port", type=int, metavar="PORT", help="MONITOR_PORT")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="METRICS_PORT: the balancer's Prometheus endpoint (0: any free port)",
    )

    p = cmd(
        "broker",
        "run the embedded MQTT broker (amqtt)",
        "example:\n  lbmqtt broker --broker-port 1883",
    )
    p.add_argument("--bind", metavar="ADDR", help="BROKER_BIND: address to listen on")
    _ready_fd(p)

    p = cmd("balancer", "run the balancer", "example:\n  lbmqtt balancer --metrics-port 9110")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="METRICS_PORT: the Prometheus endpoint (0: any free port)",
    )
    _ready_fd(p)

    p = cmd(
        "node",
        "run a node daemon serving tasks in worker processes",
        "examples:\n  lbmqtt node --tasks nodes/demo_tasks.py\n"
        "  lbmqtt node --tasks mypackage.tasks --name gpu-box --workers 4",
    )
    p.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="MODULE",
        help="task module (dotted name, found in the current folder too) or .py file; "
        "repeatable (default NODE_TASKS)",
    )
    p.add_argument("--name", metavar="NAME", help="NODE_NAME (default: host name)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="one group of N slots for every priority (instead of WKHUB_WORKERS)",
    )
    p.add_argument("--speed", type=float, metavar="X", help="NODE_SPEED")
    _ready_fd(p)

    p = cmd(
        "dashboard",
        "run the live dashboard (Bokeh server)",
        "example:\n  lbmqtt dashboard --monitor-port 9000",
    )
    p.add_argument("--monitor-port", type=int, metavar="PORT", help="MONITOR_PORT")
    _ready_fd(p)

    p = cmd(
        "submit",
        "submit a task; print its id, or its result with --wait",
        'examples:\n  lbmqtt submit HELLO \'{"firstName": "John", "lastName": "Doe"}\' '
        "--wait\n  lbmqtt submit SLEEP '{\"seconds\": 3}' --priority 10 --id my-sleep",
    )
    p.add_argument("name", help="task name, e.g. HELLO")
    p.add_argument("args", nargs="?", default="null", help="task arguments as JSON")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--id", dest="task_id", metavar="ID", help="your own task id")
    p.add_argument("--timeout-s", type=float, metavar="S", help="per-attempt time limit")
    p.add_argument(
        "--requires",
        action="append",
        default=[],
        metavar="NAME=AMOUNT",
        help="a counted resource its node must have free, e.g. gpu=1 (repeatable)",
    )
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="TAG",
        help="a tag its node must carry (repeatable)",
    )
    p.add_argument(
        "--cost", type=float, metavar="WORK", help="its relative work (a size hint), e.g. 20"
    )
    p.add_argument(
        "--speculate",
        choices=["true", "false"],
        default="true",
        help="false: never run a speculative copy of it (work with side effects)",
    )
    p.add_argument("--wait", action="store_true", help="wait and print the result")
    p.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up after S s")
    p.add_argument("--user", help="CLIENT_USER (default: login name)")
    p.add_argument("--json", action="store_true", help="print the whole final state as JSON")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --wait: draw a progress bar on stderr (default: if a terminal)",
    )

    p = cmd("get", "print a task's state", "example:\n  lbmqtt get TASK_ID --json")
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--user", help="CLIENT_USER (default: login name)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = cmd(
        "cancel",
        "cancel tasks",
        "example:\n  lbmqtt cancel TASK_ID [TASK_ID...]\n\n"
        "exit status: 0 each task was cancelled by this call; 1 a task had already ended\n"
        "(done, failed, cancelled or expired: a line says which); 7 an id is unknown\n"
        "(with several ids: the highest of these)",
    )
    p.add_argument("task_ids", nargs="+", metavar="ID")
    p.add_argument("--user", help="CLIENT_USER (default: login name)")

    p = cmd(
        "status",
        "show queues, nodes and warnings",
        "examples:\n  lbmqtt status --json\n  lbmqtt status --watch 2",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the balancer's stats as JSON (with --watch: one line each)",
    )
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=1.0,
        metavar="S",
        help="refresh every S seconds (default 1) until Ctrl-C",
    )
    p.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="how long to wait for the balancer's stats",
    )

    from .cli_user import USER_EPILOG, USER_HELP, add_user_arguments

    add_user_arguments(cmd("user", USER_HELP, USER_EPILOG))
    p = cmd(
        "journal",
        "remove the balancer's task journal, to start clean (the balancer must be stopped)",
        "example:\n  lbmqtt journal reset --broker-port 1883 --prefix lbmqtt/v1\n\n"
        "removes the journal a balancer with the same settings would open (JOURNAL_PATH;\n"
        "auto: one file per broker and prefix); crash recovery stays on for what follows.\n"
        "exit status: 0 removed, or nothing to remove; 8 a balancer is online on that\n"
        "broker and prefix (nothing removed)",
    )
    p.add_argument(
        "action", choices=["reset"], help="reset: remove the journal (and its -wal, -shm)"
    )
    return ap


def _settings(ns: argparse.Namespace) -> Settings:
    overrides = {
        "BROKER_HOST": ns.broker_host,
        "BROKER_PORT": ns.broker_port,
        "TOPIC_PREFIX": ns.prefix,
        "BROKER_TLS": True if ns.tls or ns.tls_ca else None,
        "BROKER_CA_FILE": os.path.abspath(ns.tls_ca) if ns.tls_ca else None,
        "LOG_LEVEL": ns.log_level,
        "MONITOR_PORT": getattr(ns, "monitor_port", None),
        "METRICS_PORT": getattr(ns, "metrics_port", None),
        "NODE_NAME": getattr(ns, "name", None),
        "NODE_SPEED": getattr(ns, "speed", None),
        "BROKER_BIND": getattr(ns, "bind", None),
        "CLIENT_USER": getattr(ns, "user", None),
    }
    if getattr(ns, "workers", None) is not None:
        overrides["WKHUB_WORKERS"] = [
            {"nWorkers": ns.workers, "minP": -(2**31), "maxP": 2**31 - 1, "processP": 0}
        ]
    return load_settings(ns.parameters, overrides=overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    from .broker import quiet_amqtt_logs

    quiet_amqtt_logs(getattr(logging, level))
    if getattr(logging, level) > logging.DEBUG:  # one INFO line per dashboard request
        logging.getLogger("tornado.access").setLevel(logging.WARNING)


def _supervised() -> None:
    """When ``lbmqtt up`` started us, die with it (even if it is SIGKILLed)."""
    from .launcher import SUPERVISOR_ENV
    from .worker import die_with_parent

    pid = os.environ.get(SUPERVISOR_ENV)
    if pid and pid.isdigit():
        die_with_parent(int(pid), signal.SIGTERM)


def _write_ready(fd: int | None, info: dict[str, Any]) -> None:
    if fd is None:
        return
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info) + "\n")


def _common_args(ns: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for flag, value in (
        ("--parameters", ns.parameters),
        ("--broker-host", ns.broker_host),
        ("--broker-port", ns.broker_port),
        ("--prefix", ns.prefix),
        ("--tls-ca", os.path.abspath(ns.tls_ca) if ns.tls_ca else None),
        ("--log-level", ns.log_level),
    ):
        if value is not None:
            out += [flag, str(value)]
    if ns.tls and not ns.tls_ca:
        out.append("--tls")
    return out


# ----------------------------------------------------------------------------- commands


def cmd_up(ns: argparse.Namespace, s: Settings) -> int:
    from .launcher import up

    common = _common_args(ns)
    if ns.monitor_port is not None:
        # only the dashboard takes this flag: hand it down through the environment
        os.environ["LBMQTT_MONITOR_PORT"] = str(ns.monitor_port)
    if ns.metrics_port is not None:  # (the balancer's)
        os.environ["LBMQTT_METRICS_PORT"] = str(ns.metrics_port)
    return up(
        s,
        common,
        tasks=ns.tasks,
        dashboard=not ns.no_dashboard,
        node=not ns.no_node,
        fresh=ns.fresh,
    )


def cmd_broker(ns: argparse.Namespace, s: Settings) -> int:
    from .broker import serve

    _supervised()
    freeze_heap()  # (amqtt and the validators imported: what its collections would traverse)
    asyncio.run(serve(s, ready_fd=ns.ready_fd))
    return Exit.OK


def cmd_balancer(ns: argparse.Namespace, s: Settings) -> int:
    from .balancer import Balancer, tune_gc

    _supervised()

    def ready(b: Balancer) -> None:
        r = b.settings  # (with the broker found, if BROKER_HOST was auto)
        print(
            f"lbmqtt balancer: ready on {r.broker_host}:{r.broker_port}, topics under "
            f"{r.topic_prefix}/ (instance {b.instance})"
            + (f", metrics on {b.metrics_url}" if b.metrics_url else ""),
            flush=True,
        )
        port = b.metrics.port if b.metrics is not None else None
        _write_ready(
            ns.ready_fd, {"instance": b.instance, "metrics": b.metrics_url, "metrics_port": port}
        )
        freeze_heap()  # (with the journal recovered)

    tune_gc()
    asyncio.run(Balancer(s).run(on_ready=ready))
    return Exit.OK


def cmd_node(ns: argparse.Namespace, s: Settings) -> int:
    from .node import Node

    _supervised()
    # --tasks replaces NODE_TASKS (as documented), it does not add to it
    node = Node(s, tasks=ns.tasks or s.node_tasks)

    def ready(n: Node) -> None:
        r = n.settings
        print(
            f"lbmqtt node {n.name}: ready with {n.slots} worker slots on "
            f"{r.broker_host}:{r.broker_port}, tasks {', '.join(n.task_names)}",
            flush=True,
        )
        _write_ready(ns.ready_fd, {"name": n.name, "slots": n.slots, "tasks": n.task_names})
        freeze_heap()

    asyncio.run(node.run(on_ready=ready))
    return Exit.OK


def cmd_dashboard(ns: argparse.Namespace, s: Settings) -> int:
    from .dashboard import serve

    _supervised()
    asyncio.run(serve(s, ready_fd=ns.ready_fd))
    return Exit.OK


def _print_result(value: Any) -> None:
    print(value if isinstance(value, str) else json.dumps(value, indent=2))


def cmd_submit(ns: argparse.Namespace, s: Settings) -> int:
    from .client import Client

    try:
        args = json.loads(ns.args)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"ARGS is not valid JSON ({exc.msg} at column {exc.colno}): {ns.args!r}"
        ) from exc
    requires: dict[str, float] = {}
    for item in ns.requires:
        key, sep, amount = item.partition("=")
        try:
            requires[key] = float(amount)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--requires {item!r}: write NAME=AMOUNT, e.g. gpu=1")
    with Client(s) as client:
        tid = client.submit(
            ns.name,
            args,
            priority=ns.priority,
            task_id=ns.task_id,
            timeout_s=ns.timeout_s,
            requires=requires or None,
            tags=ns.tag or None,
            cost=ns.cost,
            speculate=ns.speculate == "true",
        )
        if not ns.wait:
            print(tid)
            return Exit.OK
        first = client.get(tid)
        if first.waiting:
            print(
                f"lbmqtt: task {tid} is queued: {first.waiting}; waiting for it "
                f"(Ctrl-C stops waiting, the task stays queued: `lbmqtt cancel {tid}`)",
                file=sys.stderr,
                flush=True,
            )
        from .progress import ProgressBar

        show = sys.stderr.isatty() if ns.progress is None else ns.progress
        bar = ProgressBar(ns.name) if show else None

        def on_state(st: TaskState) -> None:
            assert bar is not None
            where = f" on {st.node}" if st.node else ""
            why = f": {st.waiting}" if st.waiting and not st.node else ""
            bar.update(st.progress, f"{st.status.value}{where}{why}", final=st.status.final)

        try:
            state = client.wait_state(tid, ns.timeout, on_state=on_state if bar else None)
        except KeyboardInterrupt:
            print(
                f"lbmqtt: stopped waiting; task {tid} goes on (`lbmqtt get {tid}`, "
                f"`lbmqtt cancel {tid}`)",
                file=sys.stderr,
            )
            raise
        finally:
            if bar is not None:
                bar.close()
        if ns.json:
            print(state.model_dump_json(indent=2))
            return Exit.OK if state.status == "done" else Exit.FAILED
        from .client import outcome

        _print_result(outcome(state))
        return Exit.OK


def cmd_get(ns: argparse.Namespace, s: Settings) -> int:
    from .client import Client

    with Client(s) as client:
        state = client.get(ns.task_id)
    if ns.json:
        print(state.model_dump_json(indent=2))
        return Exit.OK
    print(
        f"{state.id}  {state.name}  {state.status.value}  progress {state.progress}%"
        + (f"  on {state.node}" if state.node else "")
        + (f"  ({state.waiting})" if state.waiting else "")
    )
    if state.status == "done":
        _print_result(state.result)
    elif state.error is not None:
        print(f"{state.error.type}: {state.error.message}")
    return Exit.OK


def cmd_cancel(ns: argparse.Namespace, s: Settings) -> int:
    from .client import Client

    rc = Exit.OK
    with Client(s) as client:
        for tid in ns.task_ids:
            try:
                # a task already final is not cancelled by this call, whatever its end
                if not client.get(tid).status.final and client.cancel(tid):
                    print(f"{tid}: cancelled")
                    continue
                state = client.get(tid)  # (it ended before the cancel reached it)
            except UnknownTask as exc:
                print(f"{tid}: {exc}", file=sys.stderr)
                rc = max(rc, Exit.UNKNOWN_TASK)
                continue
            print(f"{tid}: not cancelled: it had already ended ({state.status.value})")
            rc = max(rc, Exit.FAILED)
    return rc


def cmd_status(ns: argparse.Namespace, s: Settings) -> int:
    from .status import fetch_stats, format_stats, watch_stats

    if ns.watch is None:
        stats = asyncio.run(fetch_stats(s, ns.timeout))
        print(stats.model_dump_json(indent=2) if ns.json else format_stats(stats))
        return Exit.OK
    if ns.watch <= 0:
        raise ConfigError("--watch S: S must be more than 0 seconds")
    clear = sys.stdout.isatty() and not ns.json

    def show(stats: BalancerStats) -> None:
        if ns.json:
            print(stats.model_dump_json(), flush=True)
        else:
            print(("\x1b[H\x1b[2J" if clear else "\n") + format_stats(stats), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            watch_stats(
                s,
                show,
                interval_s=ns.watch,
                count=ns.count,
                timeout_s=max(ns.timeout, 3 * ns.watch),
                on_wait=lambda why: print(
                    f"lbmqtt: {why}; still watching (Ctrl-C stops)", file=sys.stderr, flush=True
                ),
            )
        )
    return Exit.OK


def cmd_user(ns: argparse.Namespace, s: Settings) -> int:
    from .cli_user import cmd_user as run

    return run(ns, s)


def cmd_journal(ns: argparse.Namespace, s: Settings) -> int:
    from .cli_journal import cmd_journal as run

    return run(ns, s)


def _stdout_gone() -> bool:
    """True if nobody reads our stdout any more (a pipe or socket whose reader closed)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no fd or no poll(): not a closed pipe
        return False


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "up": cmd_up,
    "broker": cmd_broker,
    "balancer": cmd_balancer,
    "node": cmd_node,
    "dashboard": cmd_dashboard,
    "submit": cmd_submit,
    "get": cmd_get,
    "cancel": cmd_cancel,
    "status": cmd_status,
    "user": cmd_user,
    "journal": cmd_journal,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lbmqtt`` command. Returns the exit status."""
    ns = build_parser().parse_args(argv)
    try:
        s = _settings(ns)
        _configure_logging(s.log_level)
        rc = int(COMMANDS[ns.command](ns, s))
        sys.stdout.flush()  # (a reader that left shows here, not as an error at exit)
        return rc
    except BrokenPipeError as exc:
        if _stdout_gone():  # `lbmqtt status --json | head`: it has what it wanted
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return Exit.BROKEN_PIPE
        print(f"lbmqtt: {exc}", file=sys.stderr)
        return Exit.FAILED
    except ConfigError as exc:
        print(f"lbmqtt: {exc}", file=sys.stderr)
        return Exit.USAGE
    except LoopFailed as exc:
        if isinstance(exc.__cause__, LoginRefused):  # (a daemon refused after its start-up)
            print(f"lbmqtt: {exc.__cause__}", file=sys.stderr)
            return Exit.LOGIN_REFUSED
        print(f"lbmqtt: {exc}", file=sys.stderr)
        return Exit.FAILED
    except (BrokerUnavailable, BalancerUnavailable) as exc:
        print(f"lbmqtt: {exc}", file=sys.stderr)
        return Exit.LOGIN_REFUSED if isinstance(exc, LoginRefused) else Exit.UNAVAILABLE
    except WaitTimeout as exc:
        print(f"lbmqtt: {exc}", file=sys.stderr)
        return Exit.TIMEOUT
    except SubmitRefused as exc:
        print(f"lbmqtt: refused ({exc.code}): {exc}", file=sys.stderr)
        return Exit.REFUSED
    except (TaskFailed, TaskCancelled) as exc:
        print(f"lbmqtt: {exc}", file=sys.stderr)
        tb = getattr(exc, "traceback", "")
        if tb:
            print(textwrap.indent(tb.rstrip(), "  | "), file=sys.stderr)
        return Exit.FAILED
    except UnknownTask as exc:
        print(f"lbmqtt: {exc}", file=sys.stderr)
        return Exit.UNKNOWN_TASK
    except OSError as exc:
        print(f"lbmqtt: {exc}", file=sys.stderr)
        return Exit.FAILED
    except LbmqttError as exc:
        print(f"lbmqtt: {exc}", file=sys.stderr)
        return Exit.FAILED
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("lbmqtt: interrupted", file=sys.stderr)
        return Exit.INTERRUPTED
