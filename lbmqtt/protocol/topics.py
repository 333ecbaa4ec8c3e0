"""Every topic of lbmqtt: the table (:data:`TOPICS`), the names built from it
(:class:`Topics`) and inbound routing (:meth:`Topics.route`).

The table says, for every topic, who publishes it and who may read it, by role (the roles
of :mod:`lbmqtt.access`, whose broker rules are derived from this table), whether it is
retained, which component subscribes to it and what it carries. Patterns are relative to
the prefix; ``{user}`` and ``{node}`` are a user's or node's name (the broker login),
``{id}`` a task id and ``{client}`` an MQTT client id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, NamedTuple

from .names import is_valid_name

Role = Literal["user", "node", "monitor", "balancer"]
"""Who a broker login is (see :mod:`lbmqtt.access`)."""
ROLES: Final[tuple[Role, ...]] = ("user", "node", "monitor", "balancer")
Party = Literal["user", "node", "monitor", "balancer", "broker"]
"""A role, or the embedded broker itself (it publishes without a login)."""

OWNER: Final[Role] = "balancer"
"""The role that owns the prefix: it may publish, read and retain anything under it (it
clears what others left retained, and reads its own will)."""

TASK_QOS: Final = 0
"""The QoS of what the components publish on the task path (submits, cancels, queries and
result acknowledgements; task states, errors and assignment sets; node reports). Every
hand-over there is acknowledged by lbmqtt itself and sent again until it is (DESIGN.md:
the client resends submits and asks again for what it waits on, the node resends its
results, the balancer its sets), and it is delivered at the subscriptions' QoS 0 anyway:
a broker PUBACK per message would only add a packet each way (amqtt: a task and a future
per message, 2x its CPU per message at QoS 1, NOTES.md), and paho's decoding of it
(~10 % of the balancer's time in a lone-task run). Status and will topics keep QoS 1."""

OWN_PARAM: Final[Mapping[Role, str]] = MappingProxyType({"user": "user", "node": "node"})
"""The topic parameter a role's own login fills: a user is ``{user}``, a node ``{node}``
(a role reads only its own; the others' are any name to it)."""


NAMESPACES: Final = ("users/{user}", "nodes/{node}", "balancer")
"""Subtrees of the table. A role that may read every topic of one may read the subtree as
a whole (a ``#`` filter, as ``mosquitto_sub -t 'lbmqtt/v1/users/alice/#'``)."""


def _levels(pattern: str) -> tuple[str, str | None, tuple[str, ...]]:
    """``users/{user}/tasks/{id}`` -> (``"users/"``, ``"user"``, ``("tasks", "{id}")``):
    the literal part up to the first parameter, that parameter, and the levels after it."""
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if level.startswith("{"):
            return "".join(x + "/" for x in levels[:i]), level[1:-1], tuple(levels[i + 1 :])
    return pattern, None, ()


@dataclass(frozen=True)
class TopicSpec:
    """One topic of the wire (a row of :data:`TOPICS`)."""

    key: str
    """Its name in code: :meth:`Topics.route` answers it, :class:`Topics` builds it."""
    pattern: str
    """Relative to the prefix: ``users/{user}/submit``."""
    retained: bool
    publishers: frozenset[Party]
    subscribers: frozenset[Role]
    """The roles that may read it (a role reads only its own ``{user}``/``{node}``)."""
    payload: str
    """The model it carries (a name in :mod:`lbmqtt.protocol`), or what else it holds."""
    doc: str
    inbound: Mapping[Role, int] = field(default_factory=dict)
    """The roles whose component subscribes to it when it starts, with the QoS."""
    named: str = ""
    """Whose topic it is: ``"user"``, ``"node"`` or ``"client"`` (the parameter that
    :attr:`Route.name` holds); ``""`` for the topics of no one."""


def _spec(
    key: str,
    pattern: str,
    payload: str,
    doc: str,
    *,
    pub: tuple[Party, ...],
    sub: tuple[Role, ...],
    retained: bool = False,
    inbound: Mapping[Role, int] | None = None,
) -> TopicSpec:
    return TopicSpec(
        key,
        pattern,
        retained,
        frozenset(pub),
        frozenset(sub),
        payload,
        doc,
        MappingProxyType(dict(inbound or {})),
        _levels(pattern)[1] or "",
    )


_EVERYONE: Final = ROLES
# (order matters where a component subscribes: see Topics.inbound)
TOPICS: Final[tuple[TopicSpec, ...]] = (
    # a user may read its whole subtree, its own commands too
    _spec(
        "submit",
        "users/{user}/submit",
        "TaskSpec | SubmitBatch",
        "tasks to run, one or a batch",
        pub=("user",),
        sub=("balancer", "user"),
        inbound={"balancer": 0},
    ),
    _spec(
        "cancel",
        "users/{user}/cancel",
        "IdList",
        "tasks to cancel",
        pub=("user",),
        sub=("balancer", "user"),
        inbound={"balancer": 0},
    ),
    _spec(
        "ack",
        "users/{user}/ack",
        "IdList",
        "results collected: their retained states may go",
        pub=("user",),
        sub=("balancer", "user"),
        inbound={"balancer": 0},
    ),
    _spec(
        "query",
        "users/{user}/query",
        "IdList",
        "tasks whose state to send again, on events",
        pub=("user",),
        sub=("balancer", "user"),
        inbound={"balancer": 0},
    ),
    _spec(
        "task",
        "users/{user}/tasks/{id}",
        "TaskState",
        "a task's latest state (notify: retained)",
        pub=("balancer",),
        sub=("user",),
        retained=True,
    ),
    _spec(
        "result",
        "users/{user}/results/{id}",
        "TaskState",
        "a task's final state only (notify: retained)",
        pub=("balancer",),
        sub=("user",),
        retained=True,
    ),
    _spec(
        "events",
        "users/{user}/events",
        "Events",
        "batched task states",
        pub=("balancer",),
        sub=("user",),
        inbound={"user": 0},
    ),
    _spec(
        "errors",
        "users/{user}/errors",
        "Errors",
        "refusals and bad input",
        pub=("balancer",),
        sub=("user",),
        inbound={"user": 0},
    ),
    _spec(
        "node_status",
        "nodes/{node}/status",
        "NodeStatus",
        "a node's capabilities (its will: offline)",
        pub=("node",),
        sub=("balancer", "monitor", "node"),
        retained=True,
        inbound={"balancer": 0},
    ),
    _spec(
        "assign",
        "nodes/{node}/assign",
        "AssignmentSet",
        "every task the node should hold (an empty payload: none)",
        pub=("balancer",),
        sub=("node", "balancer"),
        retained=True,
        inbound={"node": 0, "balancer": 0},
    ),
    _spec(
        "reports",
        "nodes/{node}/reports",
        "NodeReport",
        "started, progress and results",
        pub=("node",),
        sub=("balancer",),
        inbound={"balancer": 0},
    ),
    _spec(
        "heartbeat",
        "nodes/{node}/heartbeat",
        "Heartbeat",
        "alive, its load and what it holds",
        pub=("node",),
        sub=("balancer",),
        inbound={"balancer": 0},
    ),
    _spec(
        "dashboard_status",
        "dashboard/status",
        "DashboardStatus",
        "the dashboard's URL (its will: offline); asks the balancer for its history",
        pub=("monitor",),
        sub=("monitor", "balancer"),
        retained=True,
        inbound={"balancer": 0},
    ),
    _spec(
        "broker_status",
        "broker/status",
        "BrokerStatus",
        "the embedded broker: where it listens, what it refused",
        pub=("broker",),
        sub=_EVERYONE,
        retained=True,
        inbound={"balancer": 0},
    ),
    # a monitor may read the balancer's whole subtree
    _spec(
        "balancer_stats",
        "balancer/stats",
        "BalancerStats",
        "a stats snapshot, about twice a second",
        pub=("balancer",),
        sub=("user", "monitor"),
        retained=True,
        inbound={"monitor": 0},
    ),
    _spec(
        "balancer_status",
        "balancer/status",
        "BalancerStatus",
        "the balancer's presence (its will: offline)",
        pub=("balancer",),
        sub=_EVERYONE,
        retained=True,
        # the balancer reads its own: a foreign status retained there is replaced by its own
        inbound={"monitor": 0, "balancer": 0},
    ),
    _spec(
        "balancer_history",
        "balancer/history",
        "BalancerHistory",
        "recent stats, sent when a dashboard comes online",
        pub=("balancer",),
        sub=("monitor",),
        inbound={"monitor": 1},
    ),
    _spec(
        "balancer_probe",
        "balancer/probe",
        "text: INSTANCE SEQ",
        "the balancer's messages to itself: how far behind its inbound queue is",
        pub=("balancer",),
        sub=("balancer", "monitor"),
        inbound={"balancer": 0},
    ),
    _spec(
        "probe",
        "probe/{client}",
        "empty",
        "a client's own echo: the retained messages it subscribed to have all come",
        pub=_EVERYONE,
        sub=_EVERYONE,
    ),
)
"""Every topic of lbmqtt (the table of the package docstring)."""

SPECS: Final[Mapping[str, TopicSpec]] = MappingProxyType({s.key: s for s in TOPICS})
""":data:`TOPICS` by key."""


ROUTE_CACHE: Final = 10_000
"""Inbound topics whose :class:`Route` a :class:`Topics` keeps (then it starts again)."""


class Route(NamedTuple):
    """What :meth:`Topics.route` makes of an inbound topic."""

    key: str
    """The :data:`TOPICS` key: ``"submit"``, ``"node_status"``..."""
    name: str
    """The user, node or client named in the topic; ``""`` if none."""
    rest: str
    """What follows a user's or node's name (``"submit"``, ``"tasks/ID"``); else ``""``."""


def _routing() -> tuple[dict[str, Route], list[tuple[str, dict[str, str], dict[str, str]]]]:
    """The routing tables of :data:`TOPICS`, relative to the prefix: the topics without a
    name by their full name; the others per namespace (its start, then what follows the
    name: exact, or a head before an ``{id}``)."""
    fixed: dict[str, Route] = {}
    named: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    for spec in TOPICS:
        start, param, rest = _levels(spec.pattern)
        if param is None:
            fixed[start] = Route(spec.key, "", "")
            continue
        exact, by_head = named.setdefault(start, ({}, {}))
        if rest and rest[-1].startswith("{"):
            by_head["/".join(rest[:-1])] = spec.key
        else:
            exact["/".join(rest)] = spec.key
    return fixed, [(start, *tables) for start, tables in named.items()]


_FIXED, _NAMED = _routing()
_SPLIT: Final = {s.key: tuple(s.pattern.split("/")) for s in TOPICS}


class Topics:
    """Every topic name, derived from one prefix and :data:`TOPICS`. No other module
    writes a topic literal."""

    def __init__(self, prefix: str = "lbmqtt/v1"):
        self.prefix = prefix.rstrip("/")
        p = self.prefix
        self._users = f"{p}/users/"
        self._nodes = f"{p}/nodes/"
        self.balancer_status = self.of("balancer_status")
        self.balancer_stats = self.of("balancer_stats")
        self.broker_status = self.of("broker_status")
        self.dashboard_status = self.of("dashboard_status")
        self.balancer_history = self.of("balancer_history")
        # the balancer's messages to itself, to know how far behind its inbound queue is
        self.balancer_probe = self.of("balancer_probe")
        # what the balancer subscribes to
        self.all_submits = self.of("submit")
        self.all_cancels = self.of("cancel")
        self.all_acks = self.of("ack")
        self.all_queries = self.of("query")
        self.all_node_status = self.of("node_status")
        self.all_heartbeats = self.of("heartbeat")
        self.all_reports = self.of("reports")
        self.all_user_tasks = self.of("task")
        self.all_assign = self.of("assign")
        self._probe = f"{p}/probe/"
        self._fixed = {f"{p}/{topic}": route for topic, route in _FIXED.items()}
        self._named = tuple((f"{p}/{s}", len(p) + 1 + len(s), e, h) for s, e, h in _NAMED)
        self._routes: dict[str, Route] = {}

    def of(self, key: str, **names: str) -> str:
        """The topic ``key`` of :data:`TOPICS` with its parameters filled in by name
        (``of("task", user="alice", id="t1")``); a parameter left out becomes ``+``, so
        ``of("submit")`` is the filter of every user's submits.

        Raises:
            KeyError: no such topic.
        """
        levels = [names.get(x[1:-1], "+") if x[:1] == "{" else x for x in _SPLIT[key]]
        return f"{self.prefix}/" + "/".join(levels)

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

    # -- clients
    def probe(self, client_id: str) -> str:
        """A client's own echo topic (the access rules grant every login ``probe/%c``)."""
        return f"{self._probe}{client_id}"

    # -- inbound
    def route(self, topic: str) -> Route | None:
        """Which topic of :data:`TOPICS` an inbound ``topic`` is, and the name in it.

        None if it is not under this prefix, not in the table, or its user, node or
        client name is not a valid name. It runs for every message the balancer
        receives: a topic seen before costs one dict lookup (the routes of up to
        :data:`ROUTE_CACHE` topics are kept), a new one a prefix test and one or two.
        """
        route = self._routes.get(topic)
        if route is None:
            route = self._route(topic)
            if route is not None:
                if len(self._routes) >= ROUTE_CACHE:
                    self._routes.clear()
                self._routes[topic] = route
        return route

    def _route(self, topic: str) -> Route | None:
        for start, n, exact, by_head in self._named:
            if topic.startswith(start):
                name, _, rest = topic[n:].partition("/")
                if not is_valid_name(name):
                    return None
                key = exact.get(rest)
                if key is None:
                    head, sep, last = rest.partition("/")
                    key = by_head.get(head) if sep and last and "/" not in last else None
                    if key is None:
                        return None
                return Route(key, name, rest)
        return self._fixed.get(topic)

    def inbound(self, role: Role, name: str = "+") -> list[tuple[str, int]]:
        """The subscriptions ``(filter, qos)`` the component of ``role`` makes, logged in
        as ``name`` (the user of a client, the node's name; ``+`` for the balancer, which
        reads every user's and node's), from :attr:`TopicSpec.inbound`.

        In table order, except that the retained topics the role publishes itself come
        first: a restarted balancer adopts the assignment sets it left before it obeys
        any command.
        """
        own = OWN_PARAM.get(role)
        names = {own: name} if own is not None else {}
        specs = [s for s in TOPICS if role in s.inbound]
        specs.sort(key=lambda s: not (s.retained and role in s.publishers))
        return [(self.of(s.key, **names), s.inbound[role]) for s in specs]

    def parse(self, topic: str) -> tuple[str, str, str] | None:
        """Split an inbound topic into ``(kind, name, rest)``.

        ``kind`` is ``"user"`` or ``"node"``, ``name`` the user or node name and ``rest``
        what follows (``"submit"``, ``"tasks/ID"``, ``"status"``...). None if the topic is
        not under this prefix or its name is not a valid name. (:meth:`route` also tells
        which topic of the table it is.)
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
