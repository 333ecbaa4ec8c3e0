"""The node's side of the MQTT wire: decoding the assignment set it is sent.

A busy node's assignment set comes again at every change, mostly with the tasks it holds
already; :func:`decode_assignment_set` validates only the ones it does not hold, and must
agree with full validation (``decode(AssignmentSet, payload)``) on what it returns.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from . import Assignment, AssignmentSet, decode

__all__ = ["decode_assignment_set"]


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
        data = json.loads(payload)
    except (ValueError, RecursionError):
        data = None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list):
        aset = decode(AssignmentSet, payload)  # the error, with its reason
        return aset.node, aset.tasks
    head = AssignmentSet.model_validate({**data, "tasks": []})
    out: list[Assignment] = []
    for item in tasks:
        tid = item.get("id") if isinstance(item, dict) else None
        a = held(tid) if isinstance(tid, str) else None
        if a is not None and type(item.get("attempt")) is int and item["attempt"] == a.attempt:
            out.append(a)
        else:
            out.append(Assignment.model_validate(item))
    return head.node, out
