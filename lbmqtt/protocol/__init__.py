"""The wire: every topic name and every message model of lbmqtt, and nothing else.

All payloads are UTF-8 JSON objects with a schema version ``"v": 1``. Identity comes
from the topic: a user's messages live under ``{prefix}/users/{user}/...`` and a node's
under ``{prefix}/nodes/{node}/...``, so a broker ACL keyed on the login can enforce who
sees what. The default prefix is ``lbmqtt/v1``.

==================================  ========  ==========  ======================================
topic (after the prefix)            retained  direction   payload
==================================  ========  ==========  ======================================
``users/{u}/submit``                no        client->LB  :class:`TaskSpec` or ``{"tasks": []}``
``users/{u}/cancel``                no        client->LB  :class:`IdList` (``{"ids": [...]}``)
``users/{u}/ack``                   no        client->LB  :class:`IdList`: results collected
``users/{u}/query``                 no        client->LB  :class:`IdList`: answer on ``events``
``users/{u}/tasks/{id}``            yes       LB->client  :class:`TaskState`: latest state
``users/{u}/results/{id}``          yes       LB->client  :class:`TaskState`: final only (idem)
``users/{u}/events``                no        LB->client  :class:`Events`: batched states
``users/{u}/errors``                no        LB->client  :class:`Errors`: refusals, bad input
``nodes/{n}/status``                yes       node->LB    :class:`NodeStatus` (will: offline)
``nodes/{n}/heartbeat``             no        node->LB    :class:`Heartbeat`
``nodes/{n}/assign``                yes       LB->node    :class:`AssignmentSet` (full desired set)
``nodes/{n}/reports``               no        node->LB    :class:`NodeReport`: started, results
``balancer/status``                 yes       LB->all     :class:`BalancerStatus` (will: offline)
``balancer/stats``                  yes       LB->all     :class:`BalancerStats` (about 2 Hz)
``broker/status``                   yes       broker      :class:`BrokerStatus` (embedded only)
``dashboard/status``                yes       dashboard   :class:`DashboardStatus` (will offline)
==================================  ========  ==========  ======================================

An assignment set is the whole truth for a node: the tasks it should be running (or
holding, finished, until the balancer has recorded the result). A task that disappears
from the set has been acknowledged (its result recorded), cancelled or moved; an empty
retained payload is an empty set.
"""

from __future__ import annotations

import math
import re
import sys
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, TypeVar

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError

from ..errors import DecodeError, ErrorCode

VERSION: Final = 1

NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
"""User and node names: they appear in topics and in ACL patterns."""
TASK_ID_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,127}$"
"""Task ids: they appear in topics, so no ``/``, ``+``, ``#`` and no leading ``$``."""
TASK_NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$"

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
TaskId = Annotated[str, Field(pattern=TASK_ID_PATTERN)]
TaskName = Annotated[str, Field(pattern=TASK_NAME_PATTERN)]
Priority = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]
RESOURCE_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
"""Names of counted resources (``gpu``, ``memory_mb``, ``license.matlab``) and of tags."""
ResourceName = Annotated[str, Field(pattern=RESOURCE_PATTERN)]
Amount = Annotated[float, Field(gt=0, le=1e12, allow_inf_nan=False)]

_NAME_RE = re.compile(NAME_PATTERN)
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)


def is_valid_name(name: str) -> bool:
    """True if ``name`` can be a user or node name (a single topic level, ACL-safe)."""
    return bool(_NAME_RE.match(name))


def is_valid_task_id(task_id: str) -> bool:
    """True if ``task_id`` can be a task id."""
    return bool(_TASK_ID_RE.match(task_id))


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


class _Model(BaseModel):
    """Frozen wire model; unknown fields are refused (a typo must not pass silently)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def encode(self) -> bytes:
        """Serialize to compact UTF-8 JSON bytes."""
        return self.model_dump_json(exclude_none=True).encode()


class _Lenient(_Model):
    """Wire model that ignores unknown fields: messages lbmqtt components send each other,
    so a newer peer can add a field without breaking an older one."""

    model_config = ConfigDict(frozen=True, extra="ignore")


M = TypeVar("M", bound=BaseModel)


def decode(model: type[M], raw: bytes | bytearray | memoryview) -> M:
    """Validate ``raw`` JSON bytes as ``model``.

    Raises:
        DecodeError: not UTF-8 JSON (code ``bad_json``) or not matching the schema
            (code ``invalid``), with a one-line reason and the raw bytes.
    """
    raw = bytes(raw)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _decode_error(exc, raw) from exc


def _decode_error(exc: ValidationError, raw: bytes) -> DecodeError:
    errs = exc.errors(include_url=False)
    first = errs[0]
    if first["type"] == "json_invalid":
        return DecodeError(f"not valid UTF-8 JSON: {first['msg']}", raw, ErrorCode.BAD_JSON)
    loc = ".".join(str(p) for p in first["loc"]) or "message"
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return DecodeError(f"{loc}: {first['msg']}{more}", raw, ErrorCode.INVALID)


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


class SubmitBatch(_Model):
    """Many tasks in one message: ``{"tasks": [TaskSpec, ...]}``."""

    v: Literal[1] = 1
    tasks: list[Any]


_SPEC_ADAPTER: Final = TypeAdapter(TaskSpec)


def decode_submit(raw: bytes | bytearray) -> list[TaskSpec | DecodeError]:
    """Decode a submit payload: a single task object or ``{"tasks": [...]}``.

    Each element of a batch is validated on its own, so one bad task does not refuse the
    others. Returns a list holding a :class:`TaskSpec` or a :class:`DecodeError` per task.

    Raises:
        DecodeError: the payload as a whole is not JSON or not an object / batch.
    """
    raw = bytes(raw)
    try:
        data = pydantic_core.from_json(raw)
    except ValueError as exc:
        raise DecodeError(f"not valid UTF-8 JSON: {exc}", raw, ErrorCode.BAD_JSON) from exc
    if not isinstance(data, dict):
        raise DecodeError('a submit is a JSON object (one task) or {"tasks": [...]}', raw)
    if "tasks" in data:
        try:
            batch = SubmitBatch.model_validate(data)
        except ValidationError as exc:
            raise _decode_error(exc, raw) from exc
        items = batch.tasks
    else:
        items = [data]
    out: list[TaskSpec | DecodeError] = []
    for item in items:
        try:
            out.append(_SPEC_ADAPTER.validate_python(item))
        except ValidationError as exc:
            err = _decode_error(exc, raw)
            if isinstance(item, dict):
                tid, ref = item.get("id"), item.get("ref")
                err.task_id = tid if isinstance(tid, str) and is_valid_task_id(tid) else None
                err.ref = ref if isinstance(ref, str) else None
            out.append(err)
    return out


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
    id_, user, name, status, priority, progress, attempt = values[:7]
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
    for key, value in zip(_STATE_OPTIONAL, values[7:], strict=True):
        if value is not None:
            d[key] = value
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
    requires: dict[str, float] = {}
    tags: list[str] = []


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


# ------------------------------------------------------------------------- status, stats


class BalancerStatus(_Lenient):
    """Retained on ``balancer/status``; the will sets ``online: false``."""

    v: Literal[1] = 1
    online: bool
    instance: str = ""
    version: str = ""
    started_at: float = 0.0
    pid: int = 0
    host: str = ""


class BrokerStatus(_Lenient):
    """Retained on ``broker/status`` by the embedded broker: where it listens, and what
    it refused (counts since it started, republished when they change, at most every
    few seconds)."""

    v: Literal[1] = 1
    online: bool
    host: str = ""
    port: int = 0
    version: str = ""
    refused: dict[str, int] = {}
    """``logins``, ``denied`` (publish, subscribe or retain outside the login's rules),
    ``too_large`` (packets over their cap, QoS 2), ``connect_timeouts``, ``revoked``,
    ``offline_dropped`` (messages for an absent persistent session over its bound),
    ``dollar_publishes``."""


class DashboardStatus(_Lenient):
    """Retained on ``dashboard/status``: the URL of the live dashboard."""

    v: Literal[1] = 1
    online: bool
    url: str = ""


class NodeSummary(_Lenient):
    name: str
    online: bool
    host: str = ""
    slots: int = 0
    busy: int = 0
    speed: float = 1.0
    tasks: list[str] = []
    groups: list[GroupInfo] = []
    last_seen: float = 0.0
    load: list[float] = []
    resources: dict[str, float] = {}
    reserved: dict[str, float] = {}
    tags: list[str] = []


class UserSummary(_Lenient):
    user: str
    queued: int = 0
    running: int = 0


class NameSummary(_Lenient):
    """Per task name: counts, and wait (submit to start) and run times of recent tasks."""

    name: str
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    waiting: str | None = None
    count: int = 0
    """Finished tasks the times below are computed on (the most recent ones)."""
    wait_mean_s: float | None = None
    wait_p95_s: float | None = None
    run_mean_s: float | None = None
    run_p95_s: float | None = None
    wait_p50_s: float | None = None
    wait_p99_s: float | None = None
    run_p50_s: float | None = None
    run_p99_s: float | None = None
    queued_by_band: dict[str, int] = {}
    """Queued tasks of this name per priority band (see :attr:`BalancerStats.bands`)."""


class TaskRow(_Lenient):
    """One running or recently finished task, for the dashboard's task table."""

    id: str
    user: str
    name: str
    status: str
    priority: int = 0
    node: str | None = None
    progress: int = 0
    submitted_at: float = 0.0
    wait_s: float | None = None
    """Submit to start (so far, while it has not started)."""
    run_s: float | None = None
    """Start to finish (so far, while it runs)."""


class BalancerStats(_Lenient):
    """Retained snapshot on ``balancer/stats`` (about twice a second)."""

    v: Literal[1] = 1
    time: float
    instance: str = ""
    started_at: float = 0.0
    queued: int = 0
    running: int = 0
    submitted_total: int = 0
    done_total: int = 0
    failed_total: int = 0
    cancelled_total: int = 0
    refused_total: int = 0
    refused_by_code: dict[str, int] = {}
    """Refusals since the balancer started, by :class:`~lbmqtt.errors.ErrorCode`."""
    bad_messages_total: int = 0
    broker_refused: dict[str, int] = {}
    """The embedded broker's refusals (:attr:`BrokerStatus.refused`), as last heard."""
    slots: int = 0
    busy: int = 0
    nodes: list[NodeSummary] = []
    users: list[UserSummary] = []
    names: list[NameSummary] = []
    queued_by_priority: dict[str, int] = {}
    bands: list[str] = []
    """Priority bands, from the worker groups of the nodes online (``"0-9"``, ``"10-1000"``);
    ``"none"`` holds priorities no group serves."""
    queued_by_band: dict[str, int] = {}
    tasks: list[TaskRow] = []
    """Running tasks (up to 100), then the most recently finished (up to 50)."""
    warnings: list[str] = []


HISTORY_NAMES: Final = 20
"""Task names a history sample keeps queued counts of (the most queued)."""
MAX_CLOCK_AHEAD_S: Final = 300.0
"""Stats stamped further ahead of the reader's clock are refused (clock skew allowed)."""


def band_label(lo: int, hi: int) -> str:
    """The label of the priority band ``lo..hi`` (``"0-9"``)."""
    return f"{lo}-{hi}"


def band_order(label: str) -> tuple[int, int, str]:
    """Sort key of band labels: in priority order ("0-9" before "10-1000"), anything else
    ("none") last."""
    lo, sep, hi = label.rpartition("-")
    try:
        return (int(lo), int(hi), "") if sep else (sys.maxsize, 0, label)
    except ValueError:
        return (sys.maxsize, 0, label)


def plausible_time(t: float, now: float) -> bool:
    """Whether a stats time stamp can be a time of ``now``: finite and not far ahead (a
    "snapshot from the future" would make every real one after it look like a replay)."""
    return math.isfinite(t) and t <= now + MAX_CLOCK_AHEAD_S


class HistorySample(_Lenient):
    """One point of :class:`BalancerHistory`: the totals of one stats snapshot."""

    time: float
    queued: int = 0
    running: int = 0
    busy: int = 0
    slots: int = 0
    done_total: int = 0
    failed_total: int = 0
    refused: int = 0
    bands: dict[str, int] = {}
    names: dict[str, dict[str, int]] = {}
    """Queued per task name and band (the names with the most queued, up to 20)."""

    @classmethod
    def of(cls, stats: BalancerStats) -> HistorySample:
        """The sample of one stats snapshot."""
        top = sorted(stats.names, key=lambda n: -n.queued)[:HISTORY_NAMES]
        return cls(
            time=stats.time,
            queued=stats.queued,
            running=stats.running,
            busy=stats.busy,
            slots=stats.slots,
            done_total=stats.done_total,
            failed_total=stats.failed_total,
            refused=stats.refused_total,
            bands=stats.queued_by_band,
            names={n.name: n.queued_by_band for n in top if n.queued_by_band},
        )


class BalancerHistory(_Lenient):
    """The balancer's window of recent stats, sent on ``balancer/history`` when a dashboard
    comes online, so that its charts start with the last minutes instead of empty."""

    v: Literal[1] = 1
    instance: str = ""
    samples: list[HistorySample] = []


# -------------------------------------------------------------------------------- topics


class Topics:
    """Every topic name, derived from one prefix. No other module writes a topic literal."""

    def __init__(self, prefix: str = "lbmqtt/v1"):
        self.prefix = prefix.rstrip("/")
        p = self.prefix
        self._users = f"{p}/users/"
        self._nodes = f"{p}/nodes/"
        self.balancer_status = f"{p}/balancer/status"
        self.balancer_stats = f"{p}/balancer/stats"
        self.broker_status = f"{p}/broker/status"
        self.dashboard_status = f"{p}/dashboard/status"
        self.balancer_history = f"{p}/balancer/history"
        # the balancer's messages to itself, to know how far behind its inbound queue is
        self.balancer_probe = f"{p}/balancer/probe"
        # what the balancer subscribes to
        self.all_submits = f"{p}/users/+/submit"
        self.all_cancels = f"{p}/users/+/cancel"
        self.all_acks = f"{p}/users/+/ack"
        self.all_queries = f"{p}/users/+/query"
        self.all_node_status = f"{p}/nodes/+/status"
        self.all_heartbeats = f"{p}/nodes/+/heartbeat"
        self.all_reports = f"{p}/nodes/+/reports"
        self.all_user_tasks = f"{p}/users/+/tasks/+"
        self.all_assign = f"{p}/nodes/+/assign"

    # -- users
    def submit(self, user: str) -> str:
        return f"{self._users}{user}/submit"

    def cancel(self, user: str) -> str:
        return f"{self._users}{user}/cancel"

    def ack(self, user: str) -> str:
        return f"{self._users}{user}/ack"

    def query(self, user: str) -> str:
        return f"{self._users}{user}/query"

    def task(self, user: str, task_id: str) -> str:
        return f"{self._users}{user}/tasks/{task_id}"

    def result(self, user: str, task_id: str) -> str:
        """Retained final state of a task (``notify: retained``): one message, once done."""
        return f"{self._users}{user}/results/{task_id}"

    def user_tasks(self, user: str) -> str:
        """Filter matching every retained task state of ``user``."""
        return f"{self._users}{user}/tasks/+"

    def events(self, user: str) -> str:
        return f"{self._users}{user}/events"

    def errors(self, user: str) -> str:
        return f"{self._users}{user}/errors"

    # -- nodes
    def node_status(self, node: str) -> str:
        return f"{self._nodes}{node}/status"

    def heartbeat(self, node: str) -> str:
        return f"{self._nodes}{node}/heartbeat"

    def assign(self, node: str) -> str:
        return f"{self._nodes}{node}/assign"

    def reports(self, node: str) -> str:
        return f"{self._nodes}{node}/reports"

    def parse(self, topic: str) -> tuple[str, str, str] | None:
        """Split an inbound topic into ``(kind, name, rest)``.

        ``kind`` is ``"user"`` or ``"node"``, ``name`` the user or node name and ``rest``
        what follows (``"submit"``, ``"tasks/ID"``, ``"status"``...). None if the topic is
        not under this prefix or its name is not a valid name.
        """
        if topic.startswith(self._users):
            kind, tail = "user", topic[len(self._users) :]
        elif topic.startswith(self._nodes):
            kind, tail = "node", topic[len(self._nodes) :]
        else:
            return None
        name, sep, rest = tail.partition("/")
        if not sep or not is_valid_name(name):
            return None
        return kind, name, rest


def validate_topic_for_publish(topic: str) -> None:
    """Refuse topics no MQTT client should publish to.

    amqtt 0.12.1 turns a connection that publishes to a ``$`` topic into a zombie
    (NOTES.md, amqtt bug 5), and wildcards or empty topics are protocol errors.

    Raises:
        ValueError: the topic is empty, starts with ``$``, holds a wildcard or a NUL, or
            is longer than 65535 bytes of UTF-8.
    """
    if not topic:
        raise ValueError("empty topic")
    if topic.startswith("$"):
        raise ValueError(f"refusing to publish to a '$' topic: {topic!r}")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"a publish topic may not hold '+', '#' or NUL: {topic!r}")
    if len(topic.encode()) > 65535:
        raise ValueError("topic longer than 65535 bytes")


def encode_json(value: Any) -> bytes:
    """Compact JSON bytes of a plain Python value (the same encoder the models use)."""
    return pydantic_core.to_json(value)


def encode_model_json(value: Any) -> bytes:
    """:func:`encode_json` as the models encode: NaN and infinities become null (strict
    JSON, for any MQTT client), e.g. for :func:`task_state_dict` values."""
    return pydantic_core.to_json(value, inf_nan_mode="null")
