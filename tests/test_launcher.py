"""`lbmqtt up`'s rule for restarting its children (a real restart is in test_cli)."""

from __future__ import annotations

from lbmqtt.launcher import (
    MAX_RESTARTS,
    RESTART_MAX_S,
    RESTART_STABLE_S,
    RESTART_WINDOW_S,
    Restarts,
    restart_delay,
)


def test_a_child_that_died_once_starts_again_at_once_and_waits_longer_each_time_after() -> None:
    delays = [restart_delay(n) for n in range(1, 8)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert max(delays) == RESTART_MAX_S


def test_a_child_that_keeps_dying_at_once_is_given_up_after_max_restarts() -> None:
    # Given a balancer started at t=0
    restarts = Restarts()
    restarts.started("balancer", 0.0)
    # When it dies as soon as it is back, each time
    now, delays = 0.0, []
    while (delay := restarts.died("balancer", now)) is not None:
        delays.append(delay)
        now += delay + 1.0  # (it takes a second to start and dies at once)
        restarts.started("balancer", now)
    # Then it was started again MAX_RESTARTS times, later each time, and then given up on
    assert delays == [restart_delay(n) for n in range(1, MAX_RESTARTS + 1)]
    assert now < RESTART_WINDOW_S


def test_a_child_that_ran_well_starts_again_at_once() -> None:
    restarts = Restarts()
    restarts.started("node", 0.0)
    assert restarts.died("node", 1.0) == 0.0
    restarts.started("node", 2.0)
    assert restarts.died("node", 3.0) == restart_delay(2)
    restarts.started("node", 4.0)
    assert restarts.died("node", 4.0 + RESTART_STABLE_S) == 0.0


def test_deaths_older_than_the_window_do_not_count_towards_giving_up() -> None:
    restarts = Restarts()
    restarts.started("dashboard", 0.0)
    for k in range(3 * MAX_RESTARTS):
        now = k * RESTART_WINDOW_S / 2
        assert restarts.died("dashboard", now) == 0.0
        restarts.started("dashboard", now)
