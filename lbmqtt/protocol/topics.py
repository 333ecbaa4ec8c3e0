"""Every topic of lbmqtt: the table, the names built from it, and inbound routing."""

from __future__ import annotations

from .names import is_valid_name


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
