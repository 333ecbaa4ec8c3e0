"""The one back-off rule every retry loop uses."""

import pytest

from lbmqtt.backoff import Backoff, compute_backoff


def test_backoff_doubles_from_its_minimum_up_to_its_maximum_without_jitter():
    b = Backoff(min_s=0.5, max_s=4.0, jitter=False)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


def test_jitter_takes_at_most_half_off_and_never_adds():
    for attempt in range(0, 200, 7):
        d = compute_backoff(attempt, min_s=1.0, max_s=30.0)
        cap = min(30.0, 2.0**attempt)
        assert cap / 2 <= d <= cap


def test_a_huge_attempt_count_does_not_overflow():
    assert compute_backoff(10_000, min_s=1.0, max_s=60.0, jitter=False) == 60.0


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        compute_backoff(0, min_s=2.0, max_s=1.0)
