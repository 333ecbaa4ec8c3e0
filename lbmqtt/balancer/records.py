"""What the balancer keeps about tasks and nodes: plain records, no behaviour.

Every other module of the balancer acts on these: :class:`TaskRecord` is one task (its
submit, its current attempt and its outcome), :class:`NodeInfo` the balancer's view of one
node. Both are slotted dataclasses: a balancer holds up to millions of task records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..protocol import ErrorInfo, NodeStatus, Status, TaskSpec
from ..scheduler import NO_TAGS, Requires, Shape, queue_order, requires_of

QueueKey = tuple[str, int, Requires, frozenset[str]]
"""(name, priority, requires, tags): the tasks that wait in one queue of the scheduler."""

PLACED = frozenset({Status.ASSIGNED, Status.RUNNING})
"""The statuses of a task that holds a place on a node."""


@dataclass(slots=True)
class TaskRecord:
    """Everything the balancer keeps about one task."""

    id: str
    user: str
    name: str
    args_json: bytes
    priority: int
    seq: int
    submitted_at: float
    notify: str = "retained"
    timeout_s: float | None = None
    ref: str | None = None
    status: Status = Status.QUEUED
    attempt: int = 0
    node: str | None = None
    group: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    progress: int = 0
    result: Any = None
    error: ErrorInfo | None = None
    collected_at: float | None = None
    assignment_json: bytes = b""
    assigned_at: float = 0.0
    """When its node's set carrying this attempt was first published (0: not yet)."""
    missing_since: float | None = None
    requires: Requires = ()
    tags: frozenset[str] = NO_TAGS
    cost: float | None = None
    """Its relative work (a size hint for the scheduler's estimates)."""
    speculate: bool = True
    """A speculative copy may run (False: never; side effects)."""
    prefetched: bool = False
    """Placed in its node's pipelining window (no idle slot was waiting for it)."""
    waived: int = 0
    """Attempts that do not count against TASK_MAX_ATTEMPTS (lost before they started)."""
    journaled: bool = False
    """Its row is in the journal (a change then updates only the columns that change)."""
    copy: CopyAttempt | None = None
    """Its speculative copy in flight, on another node (never journaled: a restarted
    balancer keeps the original attempt, and the copy's node drops it)."""
    top_attempt: int = 0
    """The highest attempt number given, copies included (two runs never share one)."""
    by_copy: bool = False
    """Its current attempt began as a speculative copy."""
    announced: bool = False
    """A state of it has been published (since this balancer started): the submit is
    acknowledged, so its assigned and running states may wait (``outbox.STATE_HOLD_S``)."""

    @property
    def queue_key(self) -> QueueKey:
        return (self.name, self.priority, self.requires, self.tags)

    # the record is what the scheduler queues and places (scheduler.Queued: its fields
    # above, unchanged while it is queued or placed; the shape; the order in a heap)

    @property
    def shape(self) -> Shape:
        return (self.requires, self.tags)

    def __lt__(self, other: TaskRecord) -> bool:
        return queue_order(self, other)

    def same_submit(self, spec: TaskSpec, args_json: bytes) -> bool:
        """True if ``spec`` is a resend of this task's submit (idempotent)."""
        return (
            spec.name == self.name
            and spec.priority == self.priority
            and args_json == self.args_json
            and spec.timeout_s == self.timeout_s
            and requires_of(spec.requires) == self.requires
            and (frozenset(spec.tags) if spec.tags else NO_TAGS) == self.tags
            and spec.cost == self.cost
            and (spec.speculate is not False) == self.speculate
        )


@dataclass(slots=True)
class CopyAttempt:
    """A speculative copy of a placed task: a second attempt on another node. The first
    of the two to succeed gives the task's result; the other is withdrawn."""

    node: str
    group: int
    attempt: int
    assignment_json: bytes
    assigned_at: float = 0.0
    """When its node's set carrying it was first published (0: not yet)."""
    started: bool = False
    started_at: float | None = None
    """When its node reported it started (wall clock)."""
    missing_since: float | None = None


def copy_on(rec: TaskRecord, node: str) -> CopyAttempt | None:
    """``rec``'s speculative copy if it is the attempt ``node`` holds (None: ``node``
    holds the original, or ``rec`` has no copy)."""
    c = rec.copy
    return c if c is not None and c.node == node else None


@dataclass(slots=True)
class NodeInfo:
    """The balancer's view of one node."""

    name: str
    instance: str = ""
    online: bool = False
    status: NodeStatus | None = None
    last_seen: float = 0.0
    load: list[float] = field(default_factory=list)
    assigned: dict[str, None] = field(default_factory=dict)
    seq: int = 0
    offline_since: float | None = None
    offline_reason: str = ""
    fresh: bool = True
    """Seen for the first time: its set is (re)published by the next health check."""
    workers: dict[int, int] = field(default_factory=dict)
    runtime_s: float | None = None
    """Moving average of its short tasks' runtimes (sizes its pipelining window)."""
    rtt_s: float | None = None
    """Moving average of the dispatch round trip: set published -> "started" received,
    for tasks that went to an idle slot."""
    refill_s: float | None = None
    """Moving average of the balancer's own part of a refill: a report with results
    received -> the set that gives the node new tasks published."""
    freed_at: float = 0.0
    """When the first report with results since its last set was received (0: none)."""
    task_bytes: int = 0
    """Mean size of a task in its assignment set (bounds its window: SET_BYTES_MAX)."""
    window: int = 0


REFILL_ALPHA = 0.2
MAX_REFILL_SAMPLE_S = 0.5  # a longer refill was a stall (a journal outage, a lost link)
REFILL_JUMP = 4.0
REFILL_STALL_MIN_S = 0.05
"""A refill over REFILL_STALL_MIN_S and over REFILL_JUMP times the average is a stall too
(a short outage of the link or the journal): not averaged in."""


def refilled(info: NodeInfo, sample: float) -> None:
    """Fold one measured refill (report with results received -> set with new tasks
    published, in seconds) into ``info.refill_s``."""
    r = info.refill_s
    if not 0.0 <= sample < MAX_REFILL_SAMPLE_S:
        return
    if r is None:
        info.refill_s = sample
    elif sample <= max(REFILL_STALL_MIN_S, REFILL_JUMP * r):
        info.refill_s = r + REFILL_ALPHA * (sample - r)


def node_info(nodes: dict[str, NodeInfo], name: str) -> NodeInfo:
    """The node's record in ``nodes``, made (offline, seen now) if it has none yet."""
    info = nodes.get(name)
    if info is None:
        info = nodes[name] = NodeInfo(name=name, last_seen=time.monotonic())
    return info
