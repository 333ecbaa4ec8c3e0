"""The topic table: names, routing and subscriptions are derived from it and agree with it."""

from __future__ import annotations

import re

import pytest

import lbmqtt.protocol as protocol
from lbmqtt.protocol import TOPICS, Route, Topics
from lbmqtt.protocol.topics import ROUTE_CACHE, SPECS

P = "lbmqtt/v1"
SAMPLE = {"user": "alice", "node": "gpu-box", "id": "t-1", "client": "lbmqtt-probe-0a1b"}


def test_every_topic_of_the_table_is_built_by_its_method_and_routed_to_its_key() -> None:
    t = Topics(P)
    built = {
        "submit": t.submit("alice"),
        "cancel": t.cancel("alice"),
        "ack": t.ack("alice"),
        "query": t.query("alice"),
        "task": t.task("alice", "t-1"),
        "result": t.result("alice", "t-1"),
        "events": t.events("alice"),
        "errors": t.errors("alice"),
        "node_status": t.node_status("gpu-box"),
        "heartbeat": t.heartbeat("gpu-box"),
        "assign": t.assign("gpu-box"),
        "reports": t.reports("gpu-box"),
        "balancer_status": t.balancer_status,
        "balancer_stats": t.balancer_stats,
        "balancer_history": t.balancer_history,
        "balancer_probe": t.balancer_probe,
        "broker_status": t.broker_status,
        "dashboard_status": t.dashboard_status,
        "probe": t.probe("lbmqtt-probe-0a1b"),
    }
    assert set(built) == set(SPECS)
    for key, topic in built.items():
        assert topic == t.of(key, **SAMPLE)
        route = t.route(topic)
        assert route is not None and route.key == key
        pattern = SPECS[key].pattern
        name = next((SAMPLE[p] for p in ("user", "node", "client") if f"{{{p}}}" in pattern), "")
        assert route.name == name
        assert SPECS[key].named == next((p for p in SAMPLE if SAMPLE[p] == name), "")
        parsed = t.parse(topic)
        assert route.rest == (parsed[2] if parsed is not None else "")


def test_the_topic_names_keep_their_values() -> None:
    t = Topics("lbmqtt/v1/")
    assert t.prefix == P
    assert t.submit("alice") == "lbmqtt/v1/users/alice/submit"
    assert t.task("alice", "t1") == "lbmqtt/v1/users/alice/tasks/t1"
    assert t.result("alice", "t1") == "lbmqtt/v1/users/alice/results/t1"
    assert t.user_tasks("alice") == "lbmqtt/v1/users/alice/tasks/+"
    assert t.node_status("n1") == "lbmqtt/v1/nodes/n1/status"
    assert t.probe("c1") == "lbmqtt/v1/probe/c1"
    assert (t.balancer_status, t.balancer_stats, t.balancer_history, t.balancer_probe) == (
        "lbmqtt/v1/balancer/status",
        "lbmqtt/v1/balancer/stats",
        "lbmqtt/v1/balancer/history",
        "lbmqtt/v1/balancer/probe",
    )
    assert (t.broker_status, t.dashboard_status) == (
        "lbmqtt/v1/broker/status",
        "lbmqtt/v1/dashboard/status",
    )
    assert (t.all_submits, t.all_cancels, t.all_acks, t.all_queries) == (
        "lbmqtt/v1/users/+/submit",
        "lbmqtt/v1/users/+/cancel",
        "lbmqtt/v1/users/+/ack",
        "lbmqtt/v1/users/+/query",
    )
    assert (t.all_node_status, t.all_heartbeats, t.all_reports, t.all_assign) == (
        "lbmqtt/v1/nodes/+/status",
        "lbmqtt/v1/nodes/+/heartbeat",
        "lbmqtt/v1/nodes/+/reports",
        "lbmqtt/v1/nodes/+/assign",
    )
    assert t.all_user_tasks == "lbmqtt/v1/users/+/tasks/+"


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/users/alice/submit",
        "lbmqtt/v1/users/$bad/submit",
        "lbmqtt/v1/users/alice",
        "lbmqtt/v1/users/alice/",
        "lbmqtt/v1/users/alice/nonsense",
        "lbmqtt/v1/users/alice/tasks",
        "lbmqtt/v1/users/alice/tasks/",
        "lbmqtt/v1/users/alice/tasks/t1/more",
        "lbmqtt/v1/users//submit",
        "lbmqtt/v1/nodes/n1/submit",
        "lbmqtt/v1/balancer/status/x",
        "lbmqtt/v1/probe/",
        "lbmqtt/v1/probe/c1/x",
        "lbmqtt/v1",
        "",
    ],
)
def test_a_topic_outside_the_table_has_no_route(topic: str) -> None:
    assert Topics(P).route(topic) is None


def test_route_names_the_user_or_node_and_what_follows_as_parse_did() -> None:
    t = Topics(P)
    assert t.route("lbmqtt/v1/users/alice/submit") == Route("submit", "alice", "submit")
    assert t.route("lbmqtt/v1/users/alice/tasks/t1") == Route("task", "alice", "tasks/t1")
    assert t.route("lbmqtt/v1/nodes/n1/status") == Route("node_status", "n1", "status")
    assert t.route("lbmqtt/v1/balancer/probe") == Route("balancer_probe", "", "")
    # parse is unchanged (it takes any rest)
    assert t.parse("lbmqtt/v1/users/alice/nonsense") == ("user", "alice", "nonsense")


def test_routes_are_remembered_up_to_a_bound() -> None:
    t = Topics(P)
    first = t.route("lbmqtt/v1/users/u0/submit")
    assert first is t.route("lbmqtt/v1/users/u0/submit")
    for i in range(ROUTE_CACHE + 5):
        assert t.route(f"lbmqtt/v1/users/u{i}/submit") == Route("submit", f"u{i}", "submit")
    assert len(t._routes) <= ROUTE_CACHE
    assert t.route("lbmqtt/v1/users/$x/submit") is None and len(t._routes) <= ROUTE_CACHE


def test_each_component_subscribes_to_what_it_did_before_the_table() -> None:
    t = Topics(P)
    # the balancer's list as it was written out by hand (the retained sets it left first),
    # and its own status (it replaces a foreign one: issue 20)
    assert t.inbound("balancer") == [
        (t.all_assign, 0),
        (t.balancer_status, 0),
        (t.all_submits, 0),
        (t.all_cancels, 0),
        (t.all_acks, 0),
        (t.all_queries, 0),
        (t.all_node_status, 0),
        (t.all_reports, 0),
        (t.all_heartbeats, 0),
        (t.dashboard_status, 0),
        (t.broker_status, 0),
        (t.balancer_probe, 0),
    ]
    # (QoS 0 on the task path since issue 19: every hand-over is acknowledged by lbmqtt
    # itself, sessions are clean, and QoS 1 delivery costs amqtt a task and a PUBACK each)
    assert t.inbound("node", "n1") == [(t.assign("n1"), 0)]
    assert t.inbound("user", "alice") == [(t.events("alice"), 0), (t.errors("alice"), 0)]
    assert t.inbound("monitor") == [
        (t.balancer_stats, 0),
        (t.balancer_status, 0),
        (t.balancer_history, 1),
    ]


def test_the_table_is_consistent() -> None:
    assert len(SPECS) == len(TOPICS)
    for spec in TOPICS:
        # a component subscribes only where its role may read
        assert set(spec.inbound) <= spec.subscribers, spec.key
        assert spec.publishers and spec.subscribers and spec.doc, spec.key
        for name in re.findall(r"[A-Z][A-Za-z]+", spec.payload):
            if name not in ("INSTANCE", "SEQ"):
                assert name in protocol.__all__, (spec.key, name)


def test_the_package_docstring_documents_every_topic_of_the_table_in_order() -> None:
    doc = protocol.__doc__ or ""
    rows = re.findall(r"^``([^`]+)``\s+(yes|no)\s", doc, re.M)
    assert rows == [(s.pattern, "yes" if s.retained else "no") for s in TOPICS]


def test_no_module_outside_protocol_writes_a_topic() -> None:
    # every string of the package's code (docstrings aside) outside protocol/ is searched
    # for a piece of a topic of the table ("balancer/", "/status"...): topics are built by
    # Topics, routed by Topics.route and ruled by access from the table
    import ast
    from pathlib import Path

    import lbmqtt

    pieces = {
        f"{level}/" if i == 0 else f"/{level}"
        for spec in TOPICS
        for i, level in enumerate(spec.pattern.split("/"))
        if not level.startswith("{")
    }
    root = Path(lbmqtt.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] == "protocol":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and "nodes/demo_tasks.py" not in node.value  # (a file of the repository)
                and any(piece in node.value for piece in pieces)
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value[:60]!r}")
    assert found == []
