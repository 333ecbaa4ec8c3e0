"""The wire: topics, models, decoding of what strangers send."""

from __future__ import annotations

import json
import traceback
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbmqtt.errors import DecodeError, ErrorCode
from lbmqtt.protocol import (
    AssignmentSet,
    IdList,
    NodeStatus,
    Status,
    TaskSpec,
    TaskState,
    Topics,
    decode,
    decode_submit,
    validate_topic_for_publish,
)


def test_topics_put_the_user_and_the_node_in_the_topic() -> None:
    t = Topics("lbmqtt/v1")
    assert t.submit("alice") == "lbmqtt/v1/users/alice/submit"
    assert t.result("alice", "t1") == "lbmqtt/v1/users/alice/results/t1"
    assert t.task("alice", "t1") == "lbmqtt/v1/users/alice/tasks/t1"
    assert t.assign("gpu-box") == "lbmqtt/v1/nodes/gpu-box/assign"
    assert t.parse("lbmqtt/v1/users/alice/submit") == ("user", "alice", "submit")
    assert t.parse("lbmqtt/v1/nodes/n1/status") == ("node", "n1", "status")
    assert t.parse("other/v1/users/alice/submit") is None
    assert t.parse("lbmqtt/v1/users/$bad/submit") is None


def test_a_single_task_and_a_batch_decode_alike() -> None:
    one = decode_submit(b'{"name": "HELLO", "args": {"firstName": "J"}}')
    assert isinstance(one[0], TaskSpec) and one[0].args == {"firstName": "J"}
    many = decode_submit(
        json.dumps({"tasks": [{"name": "A"}, {"name": "B", "priority": 5}]}).encode()
    )
    assert [s.name for s in many if isinstance(s, TaskSpec)] == ["A", "B"]


def test_one_bad_task_in_a_batch_does_not_spoil_the_others() -> None:
    out = decode_submit(b'{"tasks": [{"name": "A"}, {"id": "x1", "name": "B", "prio": 1}]}')
    assert isinstance(out[0], TaskSpec)
    assert isinstance(out[1], DecodeError) and out[1].task_id == "x1"
    assert "prio" in str(out[1])


@pytest.mark.parametrize(
    "raw, code",
    [
        (b"nope", ErrorCode.BAD_JSON),
        (b"\xff\xfe", ErrorCode.BAD_JSON),
        (b"[1]", ErrorCode.INVALID),
        (b'"x"', ErrorCode.INVALID),
        (b'{"tasks": 5}', ErrorCode.INVALID),
    ],
)
def test_malformed_submits_raise_decode_error_with_a_code(raw: bytes, code: ErrorCode) -> None:
    with pytest.raises(DecodeError) as info:
        decode_submit(raw)
    assert info.value.code == code and info.value.raw == raw


@pytest.mark.parametrize(
    "task",
    [
        {"name": "HELLO", "priority": "1"},
        {"name": "HELLO", "priority": 1.5},
        {"name": "HELLO", "priority": True},
        {"name": "HELLO", "priority": 2**40},
        {"name": "a b"},
        {"name": ""},
        {"name": "HELLO", "id": "a/b"},
        {"name": "HELLO", "id": "$x"},
        {"name": "HELLO", "timeout_s": -1},
        {"name": "HELLO", "notify": "email"},
    ],
)
def test_task_fields_are_validated_strictly(task: dict[str, object]) -> None:
    [item] = decode_submit(json.dumps(task).encode())
    assert isinstance(item, DecodeError)


def test_models_round_trip_and_ignore_fields_of_newer_peers() -> None:
    st_ = TaskState(id="t", user="u", name="N", status=Status.DONE, result=[1, {"a": 2}])
    assert decode(TaskState, st_.encode()) == st_
    newer = json.dumps(
        {"v": 1, "node": "n", "instance": "i", "online": True, "future_field": 1}
    ).encode()
    assert decode(NodeStatus, newer).online is True
    assert IdList(id="x").all_ids() == ["x"]
    assert decode(AssignmentSet, b'{"v":1,"node":"n","balancer":"b","seq":1}').tasks == []


def test_publish_topics_are_checked_before_they_reach_the_broker() -> None:
    for bad in ("", "$SYS/x", "a/+/b", "a/#", "a\x00b"):
        with pytest.raises(ValueError):
            validate_topic_for_publish(bad)
    validate_topic_for_publish("lbmqtt/v1/users/alice/submit")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_decode_submit_never_fails_with_anything_but_decode_error(raw: bytes) -> None:
    try:
        out = decode_submit(raw)
    except DecodeError:
        return
    assert all(isinstance(x, TaskSpec | DecodeError) for x in out)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8) | st.floats(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    status=st.sampled_from(list(Status)),
    result=JSONISH,
    node=st.none() | st.just("n1"),
    ref=st.none() | st.text(max_size=5),
    started=st.none() | st.floats(0, 2e9),
    failed=st.booleans(),
)
def test_state_dict_encodes_as_the_model_does(
    status: Status,
    result: object,
    node: str | None,
    ref: str | None,
    started: float | None,
    failed: bool,
) -> None:
    # the balancer publishes events from plain dicts (the hot path); the bytes must be the
    # ones the TaskState model would give, None fields left out but None inside a result kept
    from lbmqtt.balancer import Balancer, TaskRecord
    from lbmqtt.protocol import ErrorInfo, encode_model_json

    from .conftest import make_settings

    b = Balancer(make_settings(1883, "t/state"))
    rec = TaskRecord(
        id="t1",
        user="alice",
        name="ECHO",
        args_json=b"[]",
        priority=3,
        seq=1,
        submitted_at=1.5e9,
        ref=ref,
        status=status,
        attempt=2,
        node=node,
        started_at=started,
        progress=40,
        result=result,
        error=ErrorInfo(type="ValueError", message="no", traceback="tb") if failed else None,
    )
    expected = TaskState(
        id="t1",
        user="alice",
        name="ECHO",
        status=status,
        priority=3,
        progress=40,
        attempt=2,
        node=node,
        submitted_at=1.5e9,
        started_at=started,
        result=result,
        error=rec.error,
        waiting=b.table.waiting(rec),
        ref=ref,
    )
    assert (expected.waiting is not None) == (status == Status.QUEUED)  # (no node: a reason)
    # (NaN and infinities in a result are null in both: strict JSON for any MQTT client)
    assert encode_model_json(b.state_dict(rec)) == expected.encode() == b.state_of(rec).encode()


def test_the_public_names_of_protocol_are_pinned() -> None:
    # what other modules and MQTT clients' authors import; a change here is a change of the
    # package's API (the names are defined in its submodules, re-exported by __init__)
    import lbmqtt.protocol as protocol

    defined = """
        HISTORY_NAMES MAX_CLOCK_AHEAD_S MAX_IDS NAME_PATTERN NAME_RE RESOURCE_PATTERN ROLES
        TASK_ID_PATTERN TASK_NAME_PATTERN TOPICS VERSION Amount Assignment AssignmentSet
        BalancerHistory BalancerStats BalancerStatus BrokerStatus DashboardStatus ErrorInfo
        ErrorItem Errors Events GroupInfo Heartbeat HistorySample IdList Name NameSummary
        NodeReport NodeStatus NodeSummary Priority Progress ResourceName Result ResultStatus
        Role Route Started Status StreamBar SubmitBatch TaskId TaskName TaskRef TaskRow TaskSpec
        TaskState TopicSpec Topics UserSummary band_label band_order decode decode_submit
        encode_json encode_model_json is_valid_name is_valid_task_id plausible_time
        task_state_dict validate_topic_for_publish
    """.split()
    # added after them: the fast encoders and decoders of protocol.assign and .submit
    fast = """
        IDS_PER_MESSAGE decode_assignment_set encode_assignment encode_assignment_set
        encode_id_lists encode_probe encode_submit parse_probe validate_specs
    """.split()
    assert protocol.__all__ == defined + fast
    assert all(hasattr(protocol, name) for name in protocol.__all__)


def test_the_name_patterns_are_written_once() -> None:
    # config, access and the models use protocol.names; a second copy would drift
    from pathlib import Path

    import lbmqtt
    from lbmqtt.protocol import names

    root = Path(lbmqtt.__file__).parent
    for pattern in (names.NAME_PATTERN, names.RESOURCE_PATTERN, names.PREFIX_PATTERN):
        body = pattern.strip("^$")
        holders = [
            p.relative_to(root).as_posix() for p in root.rglob("*.py") if body in p.read_text()
        ]
        assert holders == ["protocol/names.py"], (pattern, holders)


_JSON_TEXTS = [
    b"null", b"7", b"-0", b"1E5", b"0.1", b"5e-324", b"1e400", b"NaN", b"-Infinity",
    b"10000000000000000000000000000000", b'{"a":1,"a":2}', b'"\\u0000"', b"[1, 2]  ",
    b'"\\ud800"', b"\xef\xbb\xbfnull", b"[" * 5000 + b"]" * 5000,
    b"", b"[1,]", b"01", b"1 2", b"nan", b"\xff", b'"\x01"', b"+1",
    '"\ud800"'.encode("utf-8", "surrogatepass"), "[1]".encode("utf-16"),
]  # fmt: skip


def _decoders() -> list[Any]:
    from lbmqtt import protocol_worker
    from lbmqtt.protocol import codec

    return [codec.decode_json, protocol_worker.decode_json]


@pytest.mark.parametrize("which", [0, 1], ids=["node", "worker"])
@pytest.mark.parametrize("raw", _JSON_TEXTS, ids=lambda r: repr(r[:12]))
def test_the_quicker_json_decoders_give_what_json_loads_gives(raw: bytes, which: int) -> None:
    """A result's JSON is parsed by pydantic-core at the node (20x quicker on small
    values), a task's arguments by a decoder of str in the worker (3x); what either
    refuses is left to ``json.loads``: the same values, the same errors, whatever a task
    got or returned."""
    decode_json = _decoders()[which]
    try:
        want: object = repr(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        want = type(exc)
    try:
        got: object = repr(decode_json(raw))
    except (ValueError, RecursionError) as exc:
        got = type(exc)
        # (json.loads's error alone: a failed task's traceback shows one, not two)
        assert "".join(traceback.format_exception(exc)).count("Traceback") == 1
    assert got == want


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
))  # fmt: skip
def test_any_value_a_worker_encodes_comes_back_as_json_loads_reads_it(value: object) -> None:
    from lbmqtt.protocol_worker import encode_result

    for raw in (json.dumps(value).encode(), json.dumps(value, ensure_ascii=False).encode()):
        for decode_json in _decoders():
            assert repr(decode_json(raw)) == repr(json.loads(raw))
    try:
        want = json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:
        with pytest.raises(ValueError):
            encode_result(value)
    else:
        assert encode_result(value) == want
