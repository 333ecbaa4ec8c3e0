"""The assignment set both ways, fast: the balancer's encoders, the node's decoder; and the
balancer's probe payload.

An assignment set is republished whole whenever a task joins or leaves a node's set, so a
busy node's set goes out often. Its tasks' JSON is built once per attempt, from the
argument bytes the balancer stored at submit (:func:`encode_assignment`), and a set is the
splice of those parts (:func:`encode_assignment_set`): nothing is re-encoded. The bytes
decode to the :class:`Assignment` / :class:`AssignmentSet` models next to which they live
(tests/test_wire_assign.py holds them equal).

A busy node's set comes again at every change, mostly with the tasks it holds already;
:func:`decode_assignment_set` validates only the ones it does not hold, and must agree with
full validation (``decode(AssignmentSet, payload)``) on what it returns
(tests/test_node_api.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from pydantic import TypeAdapter

from . import Assignment, AssignmentSet, decode, encode_json
from .codec import decode_json

__all__ = [
    "Assignment",
    "AssignmentSet",
    "decode_assignment_set",
    "encode_assignment",
    "encode_assignment_set",
    "encode_probe",
    "parse_probe",
]


def encode_assignment(
    *,
    task_id: str,
    attempt: int,
    user: str,
    name: str,
    priority: int,
    group: int | None,
    timeout_s: float | None,
    requires: Iterable[tuple[str, float]] | Mapping[str, float] = (),
    tags: Iterable[str] = (),
    cost: float | None = None,
    speculate: bool = True,
    args_json: bytes,
) -> bytes:
    """One :class:`Assignment` as JSON, with ``args_json`` (already encoded) spliced in."""
    fields: dict[str, Any] = {
        "id": task_id,
        "attempt": attempt,
        "user": user,
        "name": name,
        "priority": priority,
        "group": group,
        "timeout_s": timeout_s,
    }
    if requires:  # kept in the set so that a successor balancer can reserve them
        fields["requires"] = dict(requires)
    if tags:
        fields["tags"] = sorted(tags)
    if cost is not None:
        fields["cost"] = cost
    if not speculate:
        fields["speculate"] = False
    head = encode_json(fields)
    return head[:-1] + b',"args":' + args_json + b"}"


def encode_assignment_set(node: str, balancer: str, seq: int, parts: list[bytes]) -> bytes:
    """An :class:`AssignmentSet` of the already encoded ``parts`` (from
    :func:`encode_assignment`). No parts: the empty payload, which clears a retained set."""
    if not parts:
        return b""
    head = encode_json({"v": 1, "node": node, "balancer": balancer, "seq": seq})
    return head[:-1] + b',"tasks":[' + b",".join(parts) + b"]}"


def encode_probe(instance: str, seq: int) -> bytes:
    """The payload of the balancer's probe to itself (on ``balancer/probe``)."""
    return f"{instance} {seq}".encode()


def parse_probe(payload: bytes) -> tuple[str, int] | None:
    """``(instance, seq)`` of a probe payload, or None if it is not one."""
    instance, _, seq = payload.decode("ascii", "replace").partition(" ")
    if not (seq.isascii() and seq.isdigit() and len(seq) < 20):
        return None
    return instance, int(seq)


_ASSIGNMENTS: Final = TypeAdapter(list[Assignment])


def decode_assignment_set(
    payload: bytes, held: Callable[[str], Assignment | None]
) -> tuple[str, list[Assignment]]:
    """The addressee and the tasks of an assignment set.

    Args:
        payload: the set as received (not empty: an empty retained payload clears the set).
        held: the assignment the node holds under a task id, or None. A task in the set
            with the id and attempt of one held is that one (an attempt's assignment never
            changes), not validated again: that costs a third of validating all.

    Raises:
        DecodeError: not JSON, or not an assignment set (with the reason).
        pydantic.ValidationError: a task not held yet is not a valid assignment.
    """
    try:
        data = decode_json(payload)  # (pydantic-core: 516 tasks in 0.31 ms, json.loads 0.45)
    except (ValueError, RecursionError):
        data = None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list):
        aset = decode(AssignmentSet, payload)  # the error, with its reason
        return aset.node, aset.tasks
    head = AssignmentSet.model_validate({**data, "tasks": []})
    known: list[Assignment | None] = []  # (None: a new one, validated below)
    new: list[Any] = []
    for item in tasks:
        tid = item.get("id") if isinstance(item, dict) else None
        a = held(tid) if isinstance(tid, str) else None
        if a is not None and type(item.get("attempt")) is int and item["attempt"] == a.attempt:
            known.append(a)
        else:
            known.append(None)
            new.append(item)
    made: Iterator[Assignment] = iter(())
    if new:
        try:
            # (the new ones in one call: 516 of them took 1.04 ms one by one, 0.77 so)
            made = iter(_ASSIGNMENTS.validate_python(new))
        except ValueError:
            for item in new:
                Assignment.model_validate(item)  # raises the first bad one's own error
            raise
    return head.node, [a if a is not None else next(made) for a in known]
