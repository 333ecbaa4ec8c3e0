"""A terminal progress bar for ``lbmqtt submit --wait`` and ``Client.map(progress=True)``.

On a terminal the bar redraws one line in place (``\\r``); elsewhere (a log file, a pipe)
it prints a line only when the figure shown changes, at most every ``min_interval_s``,
so a log stays short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Draws ``LABEL [#########...........]  45%  NOTE``.

    Args:
        label: what is running (a task name, "20 'ADD' tasks").
        stream: where to draw (default: stderr).
        width: characters of the bar itself.
        min_interval_s: redraw at most this often (the final state is always drawn).
    """

    def __init__(
        self, label: str, stream: TextIO | None = None, width: int = 30, min_interval_s: float = 0.1
    ):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.min_interval_s = min_interval_s
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._last_text = ""
        self._last_at = 0.0
        self._open = False

    def render(self, percent: float, note: str = "") -> str:
        """The line for ``percent`` (0..100) and ``note``."""
        p = min(100.0, max(0.0, percent))
        filled = round(self.width * p / 100)
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.label} [{bar}] {p:3.0f}%" + (f"  {note}" if note else "")

    def update(self, percent: float, note: str = "", *, final: bool = False) -> None:
        """Draw the bar at ``percent`` (throttled unless ``final``)."""
        text = self.render(percent, note)
        now = time.monotonic()
        if text == self._last_text or (not final and now - self._last_at < self.min_interval_s):
            return
        self._last_text, self._last_at = text, now
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self._open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (on a terminal)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
