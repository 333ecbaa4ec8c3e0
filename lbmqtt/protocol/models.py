"""The messages of clients and nodes: tasks, their states, commands, node status,
heartbeats, assignment sets and reports (the fast paths next to the model they match)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import Field

from .codec import _Lenient, _Model
from .names import Amount, Priority, ResourceName, TaskId, TaskName


class Status(StrEnum):
    """Life of a task: ``queued -> assigned -> running -> done | failed | cancelled | expired``."""

    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        """True for states a task never leaves."""
        return self in _FINAL


_FINAL = frozenset({Status.DONE, Status.FAILED, Status.CANCELLED, Status.EXPIRED})


# --------------------------------------------------------------------------- client side


class TaskSpec(_Model):
    """One task as a client submits it."""

    v: Literal[1] = 1
    id: TaskId | None = None
    """Client-chosen id (then submitting again is idempotent); else the balancer picks one."""
    name: TaskName
    """The task name a node implements, e.g. ``HELLO``."""
    args: Any = None
    """Any JSON value; handed to the task function as its first argument."""
    priority: Priority = 0
    """Runs only on slots whose band ``minP <= priority <= maxP``."""
    timeout_s: Annotated[float, Field(gt=0, le=10**7)] | None = None
    """Wall-clock limit per attempt; the worker process is killed when it passes."""
    notify: Literal["retained", "events"] = "retained"
    """``retained``: the state is also kept on ``users/{u}/tasks/{id}`` and, once final, on
    ``users/{u}/results/{id}`` (for any MQTT client);
    ``events``: batched on ``users/{u}/events`` only (the Python client's fast path)."""
    ref: Annotated[str, Field(max_length=128)] | None = None
    """Opaque client reference echoed in the task's states (useful without a client id)."""
    requires: Annotated[dict[ResourceName, Amount], Field(max_length=32)] | None = None
    """Counted resources the task needs on its node, reserved while it runs:
    ``{"gpu": 1, "memory_mb": 4000}``."""
    tags: Annotated[list[ResourceName], Field(max_length=32)] | None = None
    """Tags its node must carry: ``["avx2", "linux"]``."""
    cost: Annotated[float, Field(gt=0, le=1e12)] | None = None
    """Relative work (a size hint, any unit used consistently within a task name): the
    scheduler's runtime estimates scale with it."""
    speculate: bool | None = None
    """``false``: never start a speculative copy of this task (work with side effects);
    unset or ``true``: a copy may run on a faster idle slot, the first result wins."""


class SubmitBatch(_Model):
    """Many tasks in one message: ``{"tasks": [TaskSpec, ...]}``."""

    v: Literal[1] = 1
    tasks: list[Any]


MAX_IDS: Final = 10_000
"""Most ids in one cancel, ack or query message (the Python client sends 5,000 at most)."""


class IdList(_Model):
    """A list of task ids (cancel, ack, query). ``{"id": "x"}`` is accepted for one."""

    v: Literal[1] = 1
    ids: Annotated[list[TaskId], Field(max_length=MAX_IDS)] = []
    id: TaskId | None = None

    def all_ids(self) -> list[str]:
        """The ids, single ``id`` included."""
        return [*self.ids, self.id] if self.id else list(self.ids)


class ErrorInfo(_Lenient):
    """Why a task failed: exception type, message and the worker's traceback text."""

    type: str
    message: str
    traceback: str = ""


class TaskState(_Lenient):
    """Everything known about a task, as the balancer publishes it."""

    v: Literal[1] = 1
    id: str
    user: str
    name: str
    status: Status
    priority: int = 0
    progress: Annotated[int, Field(ge=0, le=100)] = 0
    attempt: int = 0
    node: str | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: ErrorInfo | None = None
    waiting: str | None = None
    """Why a queued task is not running yet, e.g. ``no online node offers task 'X'``."""
    ref: str | None = None

    @property
    def wait_s(self) -> float | None:
        """Seconds from submit to start (None until it started)."""
        if self.submitted_at is None or self.started_at is None:
            return None
        return max(0.0, self.started_at - self.submitted_at)

    @property
    def run_s(self) -> float | None:
        """Seconds from start to finish (None until it finished)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)


_STATE_OPTIONAL: Final = (
    "node",
    "submitted_at",
    "started_at",
    "finished_at",
    "result",
    "error",
    "waiting",
    "ref",
)
assert tuple(TaskState.model_fields) == (
    "v",
    "id",
    "user",
    "name",
    "status",
    "priority",
    "progress",
    "attempt",
    *_STATE_OPTIONAL,
)


def task_state_dict(values: tuple[Any, ...]) -> dict[str, Any]:
    """The JSON of a :class:`TaskState` as a plain dict, from trusted ``values`` in field
    order: id, user, name, status, priority, progress, attempt, then the optional ones
    (node, submitted_at, started_at, finished_at, result, error, waiting, ref), which are
    left out when None, as :meth:`TaskState.encode` does.

    The balancer's hot path: a task's states (queued, assigned, done) are all published,
    and building the model cost 4 us per state against 1.8 us for the dict
    (``test_state_dict_encodes_as_the_model_does`` holds the two equal)."""
    (
        id_,
        user,
        name,
        status,
        priority,
        progress,
        attempt,
        node,
        submitted_at,
        started_at,
        finished_at,
        result,
        error,
        waiting,
        ref,
    ) = values
    d: dict[str, Any] = {
        "v": 1,
        "id": id_,
        "user": user,
        "name": name,
        "status": status.value,
        "priority": priority,
        "progress": progress,
        "attempt": attempt,
    }
    # (in _STATE_OPTIONAL's order, spelled out: a loop over it cost a third more)
    if node is not None:
        d["node"] = node
    if submitted_at is not None:
        d["submitted_at"] = submitted_at
    if started_at is not None:
        d["started_at"] = started_at
    if finished_at is not None:
        d["finished_at"] = finished_at
    if result is not None:
        d["result"] = result
    if error is not None:
        d["error"] = error
    if waiting is not None:
        d["waiting"] = waiting
    if ref is not None:
        d["ref"] = ref
    return d


class Events(_Lenient):
    """Batched task states for one user: ``users/{u}/events``."""

    v: Literal[1] = 1
    states: list[TaskState] = []


class ErrorItem(_Lenient):
    """One refusal or bad message, answered on the sender's ``errors`` topic."""

    code: str
    message: str
    id: str | None = None
    ref: str | None = None
    topic: str | None = None


class Errors(_Lenient):
    """Batched errors for one user: ``users/{u}/errors``."""

    v: Literal[1] = 1
    errors: list[ErrorItem] = []


# ---------------------------------------------------------------------------- node side


class GroupInfo(_Lenient):
    """A node's group of worker slots sharing a priority band."""

    index: int
    workers: int
    min_p: int
    max_p: int
    nice: int = 0


class NodeStatus(_Lenient):
    """Retained on ``nodes/{n}/status``; the will sets ``online: false`` on the same topic."""

    v: Literal[1] = 1
    node: str
    instance: str
    """Random id of this run of the node daemon: a restart is a new instance."""
    online: bool
    host: str = ""
    pid: int = 0
    version: str = ""
    started_at: float = 0.0
    groups: list[GroupInfo] = []
    tasks: list[str] = []
    cores: int = 0
    memory_mb: int = 0
    speed: Annotated[float, Field(gt=0, le=1e6)] = 1.0
    heartbeat_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    resources: dict[str, Annotated[float, Field(ge=0, le=1e12)]] = {}
    """Counted resources and their capacity (``cores``, ``memory_mb``, ``gpu``...)."""
    tags: list[str] = []
    draining: bool = False
    """Shutting down gracefully: give it no more work, take back ``pending``."""
    pending: list[TaskRef] = []
    """When draining: the tasks it holds and will not start (the balancer takes them back)."""


class TaskRef(_Lenient):
    """A task attempt: the same task id may run again with a higher attempt."""

    id: str
    attempt: int


class Heartbeat(_Lenient):
    """Sent by a node every ``HEARTBEAT_S``: proves it is alive and says what it runs."""

    v: Literal[1] = 1
    node: str
    instance: str
    seq: int
    time: float
    load: list[float] = []
    running: list[TaskRef] = []
    pending: int = 0
    held: list[TaskRef] = []
    """Every task attempt the node holds (pending, running, or finished and unacknowledged):
    the balancer reconciles its assignment set against it."""


class Assignment(_Lenient):
    """One task attempt given to a node, for a slot of group ``group``."""

    id: str
    attempt: int
    user: str
    name: str
    args: Any = None
    priority: int = 0
    group: int = 0
    timeout_s: float | None = None
    # (factories, not ``{}`` and ``[]``: pydantic deep-copies a mutable default for each
    # instance, and that was half of validating a task at the node)
    requires: dict[str, float] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    cost: float | None = None
    """(kept in the set, as ``speculate``, so that a successor balancer adopting the task
    knows them; the node does not use them)"""
    speculate: bool = True


class AssignmentSet(_Lenient):
    """Retained on ``nodes/{n}/assign``: every task the node should hold right now."""

    v: Literal[1] = 1
    node: str
    balancer: str
    seq: int
    tasks: list[Assignment] = []


class Started(_Lenient):
    id: str
    attempt: int
    time: float


class Progress(_Lenient):
    id: str
    attempt: int
    progress: Annotated[int, Field(ge=0, le=100)]


ResultStatus = Literal["done", "failed", "lost", "timeout", "cancelled"]


class Result(_Lenient):
    """How an attempt ended on a node.

    ``lost``: the worker process died under the task (retried up to TASK_MAX_ATTEMPTS);
    ``timeout``: the task passed its ``timeout_s`` and its worker was killed (not retried).
    """

    id: str
    attempt: int
    status: ResultStatus
    result: Any = None
    error: ErrorInfo | None = None
    runtime_s: float = 0.0
    finished_at: float = 0.0


class NodeReport(_Lenient):
    """Batched news from a node: ``nodes/{n}/reports``."""

    v: Literal[1] = 1
    node: str
    instance: str
    started: list[Started] = []
    progress: list[Progress] = []
    results: list[Result] = []
