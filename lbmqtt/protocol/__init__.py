"""The wire: every topic name and every message model of lbmqtt, and nothing else.

All payloads (the probes' aside) are UTF-8 JSON objects with a schema version ``"v": 1``.
Identity comes from the topic: a user's messages live under ``{prefix}/users/{user}/...``
and a node's under ``{prefix}/nodes/{node}/...``, so a broker ACL keyed on the login can
enforce who sees what. The default prefix is ``lbmqtt/v1``.

==================================  ========  ==========  ======================================
topic (after the prefix)            retained  direction   payload
==================================  ========  ==========  ======================================
``users/{user}/submit``             no        client->LB  :class:`TaskSpec` or ``{"tasks": []}``
``users/{user}/cancel``             no        client->LB  :class:`IdList` (``{"ids": [...]}``)
``users/{user}/ack``                no        client->LB  :class:`IdList`: results collected
``users/{user}/query``              no        client->LB  :class:`IdList`: answer on ``events``
``users/{user}/tasks/{id}``         yes       LB->client  :class:`TaskState`: latest state
``users/{user}/results/{id}``       yes       LB->client  :class:`TaskState`: final only (idem)
``users/{user}/events``             no        LB->client  :class:`Events`: batched states
``users/{user}/errors``             no        LB->client  :class:`Errors`: refusals, bad input
``nodes/{node}/status``             yes       node->LB    :class:`NodeStatus` (will: offline)
``nodes/{node}/assign``             yes       LB->node    :class:`AssignmentSet` (full desired set)
``nodes/{node}/reports``            no        node->LB    :class:`NodeReport`: started, results
``nodes/{node}/heartbeat``          no        node->LB    :class:`Heartbeat`
``dashboard/status``                yes       dashboard   :class:`DashboardStatus` (will offline)
``broker/status``                   yes       broker      :class:`BrokerStatus` (embedded only)
``balancer/stats``                  yes       LB->all     :class:`BalancerStats` (about 2 Hz)
``balancer/status``                 yes       LB->all     :class:`BalancerStatus` (will: offline)
``balancer/history``                no        LB->dash.   :class:`BalancerHistory` (on request)
``balancer/probe``                  no        LB->LB      ``INSTANCE SEQ``: its inbound delay
``probe/{client}``                  no        any->self   empty: retained messages all came
==================================  ========  ==========  ======================================

The same table, with who may publish and read each topic, is :data:`topics.TOPICS`: the
topic names, inbound routing and the broker's access rules are all derived from it.

An assignment set is the whole truth for a node: the tasks it should be running (or
holding, finished, until the balancer has recorded the result). A task that disappears
from the set has been acknowledged (its result recorded), cancelled or moved; an empty
retained payload is an empty set.

The package is laid out by concern, and everything is importable from ``lbmqtt.protocol``:
``names`` (the name patterns, once), ``codec`` (the model bases, :func:`decode`, the JSON
encoders), ``models`` (client and node messages), ``stats`` (status and statistics) and
``topics`` (the topic table, :class:`Topics`, routing; :mod:`lbmqtt.access` derives the
broker's rules from the table), ``assign`` (the assignment set both ways, fast, and the
balancer's probe) and ``submit`` (the submit message both ways, the id lists). The messages
between a node and its worker processes are in the sibling :mod:`lbmqtt.protocol_worker`
(standard library only: a worker must start fast).
A submodule imports what it shares from its siblings, never from this ``__init__``, except
those added after the re-exports below, which may import from the package itself.
"""

from __future__ import annotations

from .codec import _decode_error as _decode_error
from .codec import _Lenient as _Lenient
from .codec import _Model as _Model
from .codec import decode, encode_json, encode_model_json
from .models import (
    MAX_IDS,
    Assignment,
    AssignmentSet,
    ErrorInfo,
    ErrorItem,
    Errors,
    Events,
    GroupInfo,
    Heartbeat,
    IdList,
    NodeReport,
    NodeStatus,
    Progress,
    Result,
    ResultStatus,
    Started,
    Status,
    SubmitBatch,
    TaskRef,
    TaskSpec,
    TaskState,
    task_state_dict,
)
from .names import (
    NAME_PATTERN,
    NAME_RE,
    RESOURCE_PATTERN,
    TASK_ID_PATTERN,
    TASK_NAME_PATTERN,
    VERSION,
    Amount,
    Name,
    Priority,
    ResourceName,
    TaskId,
    TaskName,
    is_valid_name,
    is_valid_task_id,
)
from .stats import (
    HISTORY_NAMES,
    MAX_CLOCK_AHEAD_S,
    BalancerHistory,
    BalancerStats,
    BalancerStatus,
    BrokerStatus,
    DashboardStatus,
    HistorySample,
    NameSummary,
    NodeSummary,
    StreamBar,
    TaskRow,
    UserSummary,
    band_label,
    band_order,
    plausible_time,
)
from .topics import ROLES, TOPICS, Role, Route, Topics, TopicSpec, validate_topic_for_publish

__all__ = [
    "HISTORY_NAMES",
    "MAX_CLOCK_AHEAD_S",
    "MAX_IDS",
    "NAME_PATTERN",
    "NAME_RE",
    "RESOURCE_PATTERN",
    "ROLES",
    "TASK_ID_PATTERN",
    "TASK_NAME_PATTERN",
    "TOPICS",
    "VERSION",
    "Amount",
    "Assignment",
    "AssignmentSet",
    "BalancerHistory",
    "BalancerStats",
    "BalancerStatus",
    "BrokerStatus",
    "DashboardStatus",
    "ErrorInfo",
    "ErrorItem",
    "Errors",
    "Events",
    "GroupInfo",
    "Heartbeat",
    "HistorySample",
    "IdList",
    "Name",
    "NameSummary",
    "NodeReport",
    "NodeStatus",
    "NodeSummary",
    "Priority",
    "Progress",
    "ResourceName",
    "Result",
    "ResultStatus",
    "Role",
    "Route",
    "Started",
    "Status",
    "StreamBar",
    "SubmitBatch",
    "TaskId",
    "TaskName",
    "TaskRef",
    "TaskRow",
    "TaskSpec",
    "TaskState",
    "TopicSpec",
    "Topics",
    "UserSummary",
    "band_label",
    "band_order",
    "decode",
    "decode_submit",
    "encode_json",
    "encode_model_json",
    "is_valid_name",
    "is_valid_task_id",
    "plausible_time",
    "task_state_dict",
    "validate_topic_for_publish",
]
# (also importable, for the package's own submodules: the model bases _Model and _Lenient,
# and _decode_error)

# Submodules that build on the names above (they import them from the package) are
# imported below this line, and their public names added to __all__.
from .assign import (
    decode_assignment_set,
    encode_assignment,
    encode_assignment_set,
    encode_probe,
    parse_probe,
)
from .submit import (
    IDS_PER_MESSAGE,
    decode_submit,
    encode_id_lists,
    encode_submit,
    validate_specs,
)

__all__ += [
    "IDS_PER_MESSAGE",
    "decode_assignment_set",
    "encode_assignment",
    "encode_assignment_set",
    "encode_id_lists",
    "encode_probe",
    "encode_submit",
    "parse_probe",
    "validate_specs",
]
