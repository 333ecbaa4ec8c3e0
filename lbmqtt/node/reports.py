"""The node's report batcher: "started", progress and results coalesced into reports.

A report (``nodes/{n}/reports``, a :class:`~lbmqtt.protocol.NodeReport`) carries every
"started" notice, the latest progress of each running task, and every result gathered since
the last one. Results leave at once unless the node has more coming (see
:meth:`ReportBatcher.schedule`); progress at most every ``PROGRESS_FLUSH_S``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

from ..protocol import NodeReport, Progress, Result, Started
from ..protocol.topics import TASK_QOS

if TYPE_CHECKING:
    from ..mqtt import MqttTransport
    from .supervisor import HeldTask

__all__ = ["PROGRESS_FLUSH_S", "REPORT_GAP_S", "STARTED_HOLD_S", "ReportBatcher"]

PROGRESS_FLUSH_S = 0.1
REPORT_GAP_S = 0.002
"""Reports go out at most this often: a lone result leaves at once, a busy node's results
share a report (fewer messages for the broker and fewer rounds for the balancer)."""
STARTED_HOLD_S = 0.02
"""How long the "started" notices of tasks known to be short (``Supervisor._is_short``) wait
for their results to carry them: one report and one change of state per task at the
balancer, not two. (Handing 130 tasks to the workers takes a busy node longer than
REPORT_GAP_S: the notices went out alone, and the balancer spent ~5 ms of each ~33 ms
cycle on them.)"""


class ReportBatcher:
    """What the node has to report, and when it goes.

    Args:
        node: the node's name.
        instance: the node's instance id.
        topic: where reports go.
        held: the tasks the node holds, by id (a result sent is stamped on its task).
        on_flush: called after a report went out.
    """

    def __init__(
        self,
        node: str,
        instance: str,
        topic: str,
        held: Mapping[str, HeldTask],
        on_flush: Callable[[], None],
    ):
        self.node = node
        self.instance = instance
        self.topic = topic
        self.transport: MqttTransport | None = None
        self.busy: Callable[[], bool] = lambda: False
        """Whether other tasks run or wait here (their results may share the next report)."""
        self.started: list[tuple[str, int, float]] = []
        """(task id, attempt, time) of the tasks started since the last report: a
        :class:`Started` is made only for those that go out (most short tasks' notices are
        left out: their results carry them)."""
        self.progress: dict[str, Progress] = {}
        self.results: dict[str, Result] = {}
        self._held = held
        self._on_flush = on_flush
        self._soon = False
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._last = 0.0
        self._progress_timer: asyncio.TimerHandle | None = None

    def forget(self, task_ids: Collection[str]) -> None:
        """Drop what is pending about tasks the node no longer holds (all of a set's at
        once: one pass over the started notices, not one per task)."""
        for tid in task_ids:
            self.results.pop(tid, None)
            self.progress.pop(tid, None)
        if self.started and task_ids:  # (a short task's may wait STARTED_HOLD_S)
            self.started = [s for s in self.started if s[0] not in task_ids]

    def schedule(self, *, urgent: bool = True, short: bool = False) -> None:
        """Send a report soon: results (``urgent``) at once unless a report left less than
        REPORT_GAP_S ago while other tasks run or wait here (their results are due to share
        the next report: as in Nagle's algorithm, only a sender with more coming waits),
        then when that gap is over; started notices alone wait a gap, so that a short
        task's result carries them (STARTED_HOLD_S if they are all of ``short`` tasks)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._soon and self._due <= now:
            return  # (a report is due at once: this rides along, whatever its kind)
        if not urgent:
            due = now + (STARTED_HOLD_S if short else REPORT_GAP_S)
        elif self.busy():
            due = max(now, self._last + REPORT_GAP_S)
        else:
            due = now  # nothing else would ride along: a lone task is not held back
        if self._soon:
            if self._due <= due:
                return
            if self._handle is not None:
                self._handle.cancel()
        self._soon = True
        self._due = due
        if due > now:
            self._handle = loop.call_at(due, self.flush)
        else:
            self._handle = None
            loop.call_soon(self.flush)

    def schedule_progress(self) -> None:
        """Send the progress gathered within PROGRESS_FLUSH_S."""
        if self._progress_timer is None:
            self._progress_timer = asyncio.get_running_loop().call_later(
                PROGRESS_FLUSH_S, self.flush
            )

    def flush(self) -> None:
        """Send what is gathered now (kept if disconnected: results are resent on
        reconnect, progress is superseded)."""
        self._soon = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        t = self.transport
        if t is None or not (self.started or self.progress or self.results):
            return
        if not t.connected:
            return
        now = time.monotonic()
        started = self.started
        if started and self.results:
            # (a task whose result goes in this report has started: the result says so)
            results = self.results
            started = [s for s in started if (r := results.get(s[0])) is None or r.attempt != s[1]]
        report = NodeReport(
            node=self.node,
            instance=self.instance,
            started=[Started(id=tid, attempt=attempt, time=at) for tid, attempt, at in started],
            progress=list(self.progress.values()),
            results=list(self.results.values()),
        )
        t.publish(self.topic, report.encode(), qos=TASK_QOS)
        self._last = asyncio.get_running_loop().time()
        for tid in self.results:
            lt = self._held.get(tid)
            if lt is not None:
                lt.result_sent_at = now
        self.started = []
        self.progress = {}
        self.results = {}
        self._on_flush()
