"""`lbmqtt up`'s rule for restarting its children (a real restart is in test_cli)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from lbmqtt.config import load_settings
from lbmqtt.launcher import MAX_RESTARTS, RESTART_WINDOW_S, Restarts, lbmqtt_command, try_lines


def test_a_child_that_keeps_dying_at_once_is_given_up_after_max_restarts() -> None:
    # Given a balancer that dies a second after each start
    restarts = Restarts()
    now, counts = 0.0, []
    # When it dies again and again
    while (n := restarts.died("balancer", now)) is not None:
        counts.append(n)
        now += 1.0
    # Then it was started again MAX_RESTARTS times, and then given up on
    assert counts == list(range(1, MAX_RESTARTS + 1))
    assert now < RESTART_WINDOW_S


def test_deaths_older_than_the_window_do_not_count_towards_giving_up() -> None:
    restarts = Restarts()
    for k in range(3 * MAX_RESTARTS):
        assert restarts.died("dashboard", k * RESTART_WINDOW_S / 2) is not None


def test_children_are_counted_apart() -> None:
    restarts = Restarts()
    for _ in range(MAX_RESTARTS):
        assert restarts.died("node", 0.0) is not None
    assert restarts.died("node", 0.0) is None
    assert restarts.died("broker", 0.0) == 1


def test_the_launcher_knows_the_refused_login_status_of_the_cli() -> None:
    from lbmqtt.cli import Exit
    from lbmqtt.launcher import LOGIN_REFUSED

    assert LOGIN_REFUSED == Exit.LOGIN_REFUSED


def test_try_lines_name_this_lbmqtt_and_the_login_an_external_broker_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a venv that is not activated: the lines give this venv's script by its full path
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    script = str(Path(sys.executable).parent / "lbmqtt")
    assert lbmqtt_command() == shlex.quote(script)
    s = load_settings(
        None,
        env={},
        overrides={"BROKER_EMBEDDED": False, "BROKER_USERNAME": "lb", "BROKER_HOST": "hub.lan"},
    )
    lines = try_lines(s, "hub.lan", 1883, None)
    assert lines[1].startswith("  export LBMQTT_BROKER_USERNAME='USER' LBMQTT_BROKER_PASSWORD="), (
        lines
    )
    assert (
        lines[2].startswith(f"  {shlex.quote(script)} submit HELLO")
        and "--broker-host hub.lan" in lines[2]
    )
    # on PATH (an activated venv): plain `lbmqtt`
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert lbmqtt_command() == "lbmqtt"
