"""Logging at a bounded rate: anything a stranger can make us log, we log at most once per
interval per kind, with a count of what was skipped (a flood of bad input must not become
a flood of log lines, nor cost the CPU that formatting them would)."""

from __future__ import annotations

import logging
import time
from typing import Any


class LogLimiter:
    """``limiter.warning(key, msg, *args)`` logs at most once per ``every_s`` per key."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0, max_keys: int = 10_000):
        self.logger = logger
        self.every_s = every_s
        self.max_keys = max_keys
        self._seen: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        """Log unless this key logged within ``every_s``; True if it logged."""
        now = time.monotonic()
        last, skipped = self._seen.get(key, (-1e18, 0))
        if now - last < self.every_s:
            self._seen[key] = (last, skipped + 1)
            return False
        if len(self._seen) >= self.max_keys:
            self._seen.clear()
        more = f" (and {skipped} more like it in the last {self.every_s:g} s)" if skipped else ""
        self.logger.warning(msg + more, *args)
        self._seen[key] = (now, 0)
        return True
