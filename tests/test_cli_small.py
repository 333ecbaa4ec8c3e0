"""Small things of the ``lbmqtt`` command a user runs into (issue 20): a task module in the
current folder, ``status --json | head``, and what ``cancel`` says of a task that has ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from lbmqtt.client import Client

from .conftest import System, lbmqtt_cmd, run_cli

MYMODULE = textwrap.dedent(
    """\
    import os

    import lbmqtt


    @lbmqtt.task("FROM_CWD")
    def from_cwd(args):
        return {"got": args, "cwd": os.getcwd()}
    """
)


def test_node_finds_a_dotted_task_module_in_the_current_folder(
    system: System, tmp_path: Path
) -> None:
    # Given a folder holding mymodule.py, a balancer, and the installed `lbmqtt` script (its
    # sys.path holds its own folder, not the current one; PYTHONSAFEPATH keeps the current
    # one off the `python -m` workers' path too: the module must be found by lbmqtt itself)
    (tmp_path / "mymodule.py").write_text(MYMODULE)
    script = Path(sys.executable).parent / "lbmqtt"
    assert script.exists(), "the lbmqtt script: pip install -e . makes it"
    system.start_balancer()
    s = system.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")}
    env["PYTHONSAFEPATH"] = "1"
    log = tmp_path / "node.log"
    with log.open("w") as err:
        # When `lbmqtt node --tasks mymodule` starts in that folder
        proc = subprocess.Popen(
            [
                str(script),
                "node",
                "--tasks",
                "mymodule",
                "--name",
                "cwd-node",
                "--workers",
                "1",
                "--broker-port",
                str(s.broker_port),
                "--prefix",
                s.topic_prefix,
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the ready line, or "" if it exits
        assert "lbmqtt node cwd-node: ready" in line, log.read_text()[-3000:]
        assert "FROM_CWD" in line
        # Then a task of it runs in its worker, end to end through broker and balancer
        system.until(lambda b: "cwd-node" in b.scheduler.nodes, 10, "balancer to see cwd-node")
        with Client(s, user="alice") as c:
            result = c.wait(c.submit("FROM_CWD", {"x": 1}), timeout=30)
        assert result == {"got": {"x": 1}, "cwd": str(tmp_path)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _against(running: System) -> list[str]:
    s = running.settings
    return ["--broker-port", str(s.broker_port), "--prefix", s.topic_prefix]


def _no_traceback(stderr: str) -> None:
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr
    assert "Broken pipe" not in stderr and "Exception ignored" not in stderr, stderr


def test_status_json_into_a_pipe_whose_reader_left_exits_quietly(running: System) -> None:
    # Given a pipe nobody reads any more (`| head` that has exited already)
    r, w = os.pipe()
    os.close(r)
    try:
        # When `lbmqtt status --json` writes its stats into it
        proc = subprocess.run(
            lbmqtt_cmd("status", "--json", *_against(running)),
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")},
            check=False,
        )
    finally:
        os.close(w)
    # Then it exits with the status for it, and nothing on stderr
    _no_traceback(proc.stderr)
    assert proc.returncode == 141, proc.stderr


def test_status_watch_json_piped_to_a_reader_of_one_line_exits_quietly(
    running: System,
) -> None:
    # Given `lbmqtt status --json --watch` (one line a refresh, until Ctrl-C)
    proc = subprocess.Popen(
        lbmqtt_cmd("status", "--json", "--watch", "0.2", *_against(running)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")},
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        # When its reader takes the first line and leaves (as `| head -n 1`)
        assert proc.stdout.readline().startswith("{")
        proc.stdout.close()
        # Then the next line ends it: the status for it, and nothing on stderr
        assert proc.wait(30) == 141
        _no_traceback(proc.stderr.read())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def test_cancel_says_the_same_of_every_task_that_had_ended(running: System) -> None:
    at = [*_against(running), "--user", "carol"]

    def cli(*args: str) -> Any:
        return run_cli(*args, *at)

    # Given a done, a failed and a running task
    r = cli("submit", "HELLO", '{"firstName": "A", "lastName": "B"}', "--id", "c-done", "--wait")
    assert r.returncode == 0, r.stderr
    r = cli("submit", "FAIL", '{"message": "boom"}', "--id", "c-failed", "--wait")
    assert r.returncode == 1, r.stderr
    r = cli("submit", "SLEEP", '{"seconds": 60}', "--id", "c-sleep")
    assert r.returncode == 0, r.stderr
    # When the running one is cancelled: 0, "cancelled"
    r = cli("cancel", "c-sleep")
    assert (r.returncode, r.stdout) == (0, "c-sleep: cancelled\n"), r.stderr
    # Then a cancel of any task that had ended, cancelled ones too, exits 1 and says its end
    for tid, status in (("c-sleep", "cancelled"), ("c-done", "done"), ("c-failed", "failed")):
        r = cli("cancel", tid)
        assert r.returncode == 1, (tid, r.stdout, r.stderr)
        assert f"{tid}: not cancelled: it had already ended ({status})" in r.stdout + r.stderr
        assert "Traceback" not in r.stderr
    # and an unknown id has a status of its own (7), over the others when several are given
    r = cli("cancel", "c-nope")
    assert r.returncode == 7 and "c-nope" in r.stderr, (r.stdout, r.stderr)
    r = cli("cancel", "c-done", "c-nope")
    assert r.returncode == 7, (r.stdout, r.stderr)
    r = cli("get", "c-nope")
    assert r.returncode == 7, (r.stdout, r.stderr)
