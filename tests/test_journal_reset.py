"""``lbmqtt journal reset``: starting clean keeps crash recovery on (issue 20, point 5).

Through real processes: a broker and balancers started as ``lbmqtt`` commands, the reset,
submits and reads by the CLI, as a user types them.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbmqtt.balancer.journal import default_path
from lbmqtt.cli import Exit

from .cluster import Cluster, free_port
from .conftest import finish, run_cli, start_up, wait_until


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    # JOURNAL_PATH auto: the reset must find the very file the balancer opens by default
    c = Cluster(tmp_path, overrides={"JOURNAL_PATH": "auto"})
    c.start_broker()
    c.start_balancer()
    yield c
    c.close()


def _journal(c: Cluster) -> Path:
    return default_path(c.host, c.port, c.prefix)


def _submit(c: Cluster, *ids: str) -> None:
    for task_id in ids:
        r = run_cli("submit", "ECHO", '{"x": 1}', "--id", task_id, env=c.env())
        assert r.returncode == Exit.OK, r.stderr


def _state(c: Cluster, task_id: str) -> tuple[int, str]:
    """The exit status of ``lbmqtt get ID --json``, and the task's status if it has one."""
    r = run_cli("get", task_id, "--json", env=c.env())
    return r.returncode, json.loads(r.stdout)["status"] if r.returncode == Exit.OK else ""


def test_journal_reset_starts_clean_and_a_killed_balancer_still_recovers_after_it(
    cluster: Cluster,
) -> None:
    journal = _journal(cluster)
    # Given a journal holding queued tasks (no node runs them), its balancer stopped
    _submit(cluster, "old-1", "old-2", "old-3")
    cluster.kill("balancer", signal.SIGTERM)
    assert journal.is_file()
    # When the user resets the journal of that broker and prefix
    r = run_cli("journal", "reset", env=cluster.env())
    # Then it says what it removed, and the files are gone
    assert r.returncode == Exit.OK, r.stderr
    assert str(journal) in r.stdout and "(3 tasks)" in r.stdout, r.stdout
    assert not any(Path(f"{journal}{end}").exists() for end in ("", "-wal", "-shm"))
    # And a balancer started after it knows none of the old tasks
    cluster.start_balancer()
    for task_id in ("old-1", "old-2", "old-3"):
        assert _state(cluster, task_id)[0] == Exit.UNKNOWN_TASK
    # And recovery is on: tasks queued since survive a SIGKILL of the balancer...
    _submit(cluster, "new-1", "new-2")
    cluster.kill("balancer", signal.SIGKILL)
    cluster.start_balancer()
    assert [_state(cluster, t) for t in ("new-1", "new-2")] == [(Exit.OK, "queued")] * 2
    # ...and run once a node comes
    cluster.start_node("n1")
    for task_id in ("new-1", "new-2"):
        wait_until(lambda t=task_id: _state(cluster, t)[1] == "done", 30, f"{task_id} done")


def test_journal_reset_refuses_while_a_balancer_is_online_and_removes_nothing(
    cluster: Cluster,
) -> None:
    journal = _journal(cluster)
    # Given a balancer online with a queued task in its journal
    _submit(cluster, "kept")
    # When the user tries to reset its journal
    r = run_cli("journal", "reset", env=cluster.env())
    # Then it refuses with its own exit status and one line saying why
    assert r.returncode == Exit.BALANCER_ONLINE, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "a balancer is online" in lines[0], r.stderr
    assert "stop it first" in lines[0] and r.stdout == ""
    # And nothing is removed: the balancer still has its task
    assert journal.is_file()
    assert _state(cluster, "kept") == (Exit.OK, "queued")


def test_journal_reset_without_a_journal_or_of_a_foreign_file_removes_nothing(
    tmp_path: Path,
) -> None:
    # (no broker: the reset must not wait for one)
    env = {"LBMQTT_BROKER_PORT": "1", "LBMQTT_JOURNAL_PATH": "none"}
    r = run_cli("journal", "reset", env=env)
    assert r.returncode == Exit.OK and "nothing to reset" in r.stdout, r.stderr
    other = tmp_path / "notes.txt"
    other.write_text("not a journal\n")
    r = run_cli("journal", "reset", env={**env, "LBMQTT_JOURNAL_PATH": str(other)})
    assert r.returncode == Exit.USAGE and "not an lbmqtt journal" in r.stderr
    assert other.read_text() == "not a journal\n"
    r = run_cli("journal", "reset", env={**env, "LBMQTT_JOURNAL_PATH": str(tmp_path / "j")})
    assert r.returncode == Exit.OK and "nothing to remove" in r.stdout, r.stderr


def test_up_fresh_starts_with_an_empty_journal() -> None:
    port = free_port()
    env = {"LBMQTT_BROKER_PORT": str(port)}
    journal = default_path("127.0.0.1", port, "lbmqtt/v1")
    # Given `lbmqtt up` stopped with a queued task in its journal (no node ran it)
    first = start_up("--no-node", "--no-dashboard", port=port)
    try:
        r = run_cli("submit", "HELLO", "{}", "--id", "before", env=env)
        assert r.returncode == Exit.OK, r.stderr
        first.proc.send_signal(signal.SIGINT)
        assert first.proc.wait(30) == 0, first.text()
    finally:
        finish(first)
    assert journal.is_file()
    # When it starts again with --fresh
    second = start_up("--no-node", "--no-dashboard", "--fresh", port=port)
    try:
        # Then it says what it removed, and its balancer does not know the old task
        assert f"removed the journal of 127.0.0.1:{port}" in second.text(), second.text()
        assert "(1 task)" in second.text()
        r = run_cli("get", "before", env=env)
        assert r.returncode == Exit.UNKNOWN_TASK, (r.stdout, r.stderr)
        # And it journals again: recovery is on
        assert journal.is_file()
    finally:
        finish(second)
