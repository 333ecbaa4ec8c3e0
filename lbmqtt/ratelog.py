"""Logging at a bounded rate: anything a stranger can make us log, we log at most once per
interval per kind, with a count of what was skipped (a flood of bad input must not become
a flood of log lines, nor cost the CPU that formatting them would)."""

from __future__ import annotations

import logging
import time
from typing import Any


class LogLimiter:
    """``limiter.warning(key, msg, *args)`` logs at most once per ``every_s`` per key.

    Keys must be few (a kind, a login, an address): at ``max_keys`` the memory is reset.
    """

    def __init__(self, logger: logging.Logger, every_s: float = 10.0, max_keys: int = 10_000):
        self.logger = logger
        self.every_s = every_s
        self.max_keys = max_keys
        self._seen: dict[str, tuple[float, int]] = {}

    def allow(self, key: str) -> int | None:
        """None if ``key`` was let through within ``every_s`` (counted as skipped), else
        how many were skipped since the last one let through."""
        now = time.monotonic()
        last, skipped = self._seen.get(key, (-1e18, 0))
        if now - last < self.every_s:
            self._seen[key] = (last, skipped + 1)
            return None
        if len(self._seen) >= self.max_keys:
            self._seen.clear()
        self._seen[key] = (now, 0)
        return skipped

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        """Log unless this key logged within ``every_s``; True if it logged."""
        skipped = self.allow(key)
        if skipped is None:
            return False
        more = f" (and {skipped} more like it in the last {self.every_s:g} s)" if skipped else ""
        self.logger.warning(msg + more, *args)
        return True


class ForeignLogFilter(logging.Filter):
    """A handler filter passing at most one record per ``every_s`` per kind from the
    loggers under ``prefixes`` (amqtt logs a line for every refused or broken connection,
    with text the client chose): the kind is the logger, the level and the message's
    first words."""

    def __init__(self, prefixes: tuple[str, ...] = ("amqtt", "transitions"), every_s: float = 10.0):
        super().__init__()
        self.prefixes = prefixes
        self._limiter = LogLimiter(logging.getLogger(__name__), every_s)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        first = " ".join(str(record.msg).split()[:3])[:40]
        skipped = self._limiter.allow(f"{record.name} {record.levelno} {first}")
        if skipped is None:
            return False
        if skipped:
            record.msg = f"{str(record.msg)[:500]} (and {skipped} more like it)"
        return True
