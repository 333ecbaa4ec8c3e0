"""`lbmqtt up`'s restart back-off (the restarts themselves are in test_cli)."""

from __future__ import annotations

from lbmqtt.launcher import (
    MAX_RESTARTS,
    RESTART_MAX_S,
    RESTART_WINDOW_S,
    restart_delay,
)


def test_a_child_that_died_once_starts_again_at_once_and_waits_longer_each_time_after() -> None:
    delays = [restart_delay(n) for n in range(1, 8)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert max(delays) == RESTART_MAX_S


def test_the_delays_leave_the_give_up_rule_its_window() -> None:
    # a child that keeps dying at once still dies MAX_RESTARTS + 1 times within the window
    assert sum(restart_delay(n) for n in range(1, MAX_RESTARTS + 1)) < RESTART_WINDOW_S / 2
