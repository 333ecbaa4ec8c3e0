"""Waiting helpers of the client: a finished state's outcome, waiting for some of many
futures, and a map's progress report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from ..errors import TaskCancelled, TaskFailed, WaitTimeout
from ..protocol import Status, TaskState

__all__ = ["MapProgress", "map_progress", "outcome", "wait_some"]


def outcome(state: TaskState) -> Any:
    """The result of a finished task, or the exception its end means.

    Raises:
        TaskFailed: the task failed (or expired).
        TaskCancelled: the task was cancelled.
    """
    if state.status == Status.DONE:
        return state.result
    if state.status == Status.CANCELLED:
        raise TaskCancelled(f"task {state.id} ({state.name}) was cancelled", state)
    err = state.error
    etype = err.type if err else "Failed"
    msg = err.message if err else state.status.value
    raise TaskFailed(
        f"task {state.id} ({state.name}) failed: {etype}: {msg}",
        state,
        error_type=etype,
        traceback=err.traceback if err else "",
    )


async def wait_some(
    futures: list[asyncio.Future[TaskState]], count: int, *, deadline: float | None, what: str
) -> None:
    """Wait until ``count`` of ``futures`` are done, or raise WaitTimeout at ``deadline``."""
    pending = set(futures)
    done_count = 0
    while done_count < count:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise WaitTimeout(f"{what} did not finish in time")
        done, pending = await asyncio.wait(
            pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )
        done_count += len(done)


class MapProgress:
    """Counts a map's finished tasks (a done-callback of each one's final future) and
    reports them to a function or a :class:`~lbmqtt.progress.ProgressBar`."""

    def __init__(self, total: int, report: Callable[[int, int], None] | None, label: str):
        self.total = total
        self.finished = 0
        self.failed = 0
        self._report = report
        self._bar = None
        if report is None:
            from ..progress import ProgressBar

            self._bar = ProgressBar(label)
            self._draw(final=False)
        else:
            report(0, total)  # (so that a caller can show the total before the first one)

    def __call__(self, fut: asyncio.Future[TaskState]) -> None:
        self.finished += 1
        if not fut.cancelled() and fut.exception() is None and fut.result().status != Status.DONE:
            self.failed += 1
        if self._report is not None:
            self._report(self.finished, self.total)
        else:
            self._draw(final=self.finished == self.total)

    def _draw(self, final: bool) -> None:
        assert self._bar is not None
        note = f"{self.finished}/{self.total} finished" + (
            f", {self.failed} failed" if self.failed else ""
        )
        self._bar.update(100.0 * self.finished / max(1, self.total), note, final=final)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def map_progress(
    progress: bool | Callable[[int, int], None], total: int, label: str
) -> MapProgress | None:
    """What reports a map's progress: nothing, a progress bar (True) or ``progress``."""
    if progress is False:
        return None
    return MapProgress(total, None if progress is True else progress, label)
