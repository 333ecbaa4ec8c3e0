"""Small things of the ``lbmqtt`` command a user runs into (issue 20): a task module in the
current folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from lbmqtt.client import Client

from .conftest import System

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
