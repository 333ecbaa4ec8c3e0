"""One back-off rule for every retry loop: resends, reconnects, restarts.

As dramatiq's ``compute_backoff``: the delay doubles with each attempt from ``min_s`` up to
``max_s``, and with ``jitter`` a random part of it is taken off, so that many clients that
failed together (a broker restart, a LAN hiccup) do not all come back in the same instant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff", "compute_backoff"]


def compute_backoff(
    attempt: int, *, min_s: float, max_s: float, factor: float = 2.0, jitter: bool = True
) -> float:
    """The delay before retry number ``attempt`` (0 for the first retry).

    Args:
        attempt: how many retries came before this one (0, 1, 2, ...).
        min_s: the first delay.
        max_s: the largest delay.
        factor: how much each attempt multiplies the delay.
        jitter: take a random part, up to half, off the delay.

    Returns:
        Seconds to wait, between ``min_s / 2`` (with jitter) and ``max_s``.
    """
    if attempt < 0 or min_s < 0 or max_s < min_s:
        raise ValueError(f"bad back-off: attempt {attempt}, min {min_s}, max {max_s}")
    # (the exponent is capped: 2 ** 2000 overflows a float)
    delay = min(max_s, min_s * factor ** min(attempt, 64))
    if jitter:
        delay *= random.uniform(0.5, 1.0)
    return float(delay)


@dataclass
class Backoff:
    """A retry loop's back-off state: :meth:`next` after a failure, :meth:`reset` after a
    success.

    Args:
        min_s: the first delay.
        max_s: the largest delay.
        factor: how much each failure multiplies the delay.
        jitter: take a random part, up to half, off each delay.
    """

    min_s: float
    max_s: float
    factor: float = 2.0
    jitter: bool = True
    attempt: int = 0

    def next(self) -> float:
        """The delay to wait now, and one more attempt counted."""
        delay = compute_backoff(
            self.attempt,
            min_s=self.min_s,
            max_s=self.max_s,
            factor=self.factor,
            jitter=self.jitter,
        )
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """A success: the next failure starts again from ``min_s``."""
        self.attempt = 0
