"""The assignment set's fast encoders (lbmqtt.protocol.assign): their bytes are what the
Assignment / AssignmentSet models decode them to and encode them as."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from lbmqtt.balancer import TaskRecord
from lbmqtt.balancer.tasks import assignment_json
from lbmqtt.protocol import Assignment, AssignmentSet, encode_json
from lbmqtt.protocol.assign import (
    encode_assignment,
    encode_assignment_set,
    encode_probe,
    parse_probe,
)
from lbmqtt.scheduler import NO_TAGS, requires_of

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    args=json_values,
    group=st.integers(0, 5),
    timeout=st.none() | st.floats(0.1, 1e6),
    requires=st.dictionaries(st.sampled_from(["gpu", "memory_mb"]), st.floats(0.5, 64), max_size=2),
    tags=st.frozensets(st.sampled_from(["linux", "fast", "big"]), max_size=3),
    cost=st.none() | st.floats(0.01, 1e6),
    speculate=st.booleans(),
)
def test_an_assignment_encodes_as_its_model_with_the_stored_args_bytes(
    args: Any,
    group: int,
    timeout: float | None,
    requires: dict[str, float],
    tags: frozenset[str],
    cost: float | None,
    speculate: bool,
) -> None:
    rec = TaskRecord(
        id="t-1",
        user="alice",
        name="ECHO",
        args_json=encode_json(args),
        priority=7,
        seq=1,
        submitted_at=1.0,
        timeout_s=timeout,
        attempt=2,
        group=group,
        requires=requires_of(requires),
        tags=tags or NO_TAGS,
        cost=cost,
        speculate=speculate,
    )
    raw = assignment_json(rec)
    model = Assignment(
        id="t-1",
        attempt=2,
        user="alice",
        name="ECHO",
        args=args,
        priority=7,
        group=group,
        timeout_s=timeout,
        requires=dict(requires_of(requires)),
        tags=sorted(tags),
        cost=cost,
        speculate=speculate,
    )
    assert Assignment.model_validate_json(raw) == model
    # field by field the model's JSON; only empty requires and tags are left out
    spliced, dumped = json.loads(raw), json.loads(model.model_dump_json())
    assert spliced == {k: v for k, v in dumped.items() if k in spliced}
    defaults = {"requires": {}, "tags": [], "cost": None, "speculate": True}
    assert {k: dumped[k] for k in set(dumped) - set(spliced)}.items() <= defaults.items()


def test_an_assignment_set_round_trips_through_its_model() -> None:
    parts = [
        encode_assignment(
            task_id=f"t{i}",
            attempt=1,
            user="bob",
            name="HELLO",
            priority=i,
            group=0,
            timeout_s=None,
            requires={"gpu": 1.0} if i else {},
            tags=["fast"] if i == 2 else [],
            args_json=encode_json({"i": i, "s": 'x\u00e9"]}'}),
        )
        for i in range(3)
    ]
    raw = encode_assignment_set("n1", "b0", 42, parts)
    aset = AssignmentSet.model_validate_json(raw)
    assert (aset.v, aset.node, aset.balancer, aset.seq) == (1, "n1", "b0", 42)
    assert [a.id for a in aset.tasks] == ["t0", "t1", "t2"]
    assert aset.tasks[2].args == {"i": 2, "s": 'x\u00e9"]}'} and aset.tasks[2].tags == ["fast"]
    assert aset.tasks[1].requires == {"gpu": 1.0} and aset.tasks[0].requires == {}
    # the spliced set is the set of its spliced parts, and round-trips through the model
    parts_decoded = [Assignment.model_validate_json(p) for p in parts]
    assert aset == AssignmentSet(node="n1", balancer="b0", seq=42, tasks=parts_decoded)
    assert AssignmentSet.model_validate_json(aset.encode()) == aset


def test_an_empty_set_is_the_empty_payload_that_clears_it() -> None:
    assert encode_assignment_set("n1", "b0", 1, []) == b""


def test_a_probe_payload_round_trips_and_junk_is_not_a_probe() -> None:
    assert parse_probe(encode_probe("abc123", 17)) == ("abc123", 17)
    for junk in (b"", b"abc", b"abc x", b"abc -1", b"abc " + b"9" * 25, b"\xff\xfe 1 2"):
        assert parse_probe(junk) is None
