"""The client's submit and id-list messages, as the balancer reads them."""

from __future__ import annotations

import pytest

from lbmqtt.errors import InvalidTask
from lbmqtt.protocol import IdList, TaskSpec, decode, decode_submit
from lbmqtt.protocol.submit import encode_id_lists, encode_submit, validate_specs


def _specs() -> list[TaskSpec]:
    return validate_specs(
        [
            {"id": "t1", "name": "HELLO", "args": {"firstName": "A"}, "notify": "events"},
            {
                "id": "t2",
                "name": "SQUARE",
                "args": [1, 2.5, None, "x"],
                "priority": 7,
                "timeout_s": 3.5,
                "ref": "mine",
                "requires": {"gpu": 1, "memory_mb": 4000},
                "tags": ["avx2"],
                "notify": "events",
            },
            {"id": "t3", "name": "NOOP", "requires": None, "tags": None},
        ]
    )


def test_a_submitted_batch_decodes_to_the_same_specs_at_the_balancer() -> None:
    specs = _specs()
    assert decode_submit(encode_submit(specs)) == specs


def test_a_single_task_is_sent_as_an_object_and_decodes_to_the_same_spec() -> None:
    spec = _specs()[1]
    raw = encode_submit([spec])
    assert raw.startswith(b"{") and b'"tasks"' not in raw and b'"v"' not in raw
    assert decode_submit(raw) == [spec]


def test_the_first_bad_task_of_a_batch_is_named() -> None:
    with pytest.raises(InvalidTask, match="'bad name'") as info:
        validate_specs([{"id": "ok", "name": "HELLO"}, {"id": "no", "name": "bad name"}])
    assert info.value.task_id == "no"


def test_ids_are_sent_in_messages_of_at_most_5000() -> None:
    ids = [f"t{i}" for i in range(12_001)]
    messages = [decode(IdList, raw).all_ids() for raw in encode_id_lists(ids)]
    assert [len(m) for m in messages] == [5000, 5000, 2001]
    assert [i for m in messages for i in m] == ids


def test_the_client_gives_each_task_without_an_id_its_own_random_one() -> None:
    from lbmqtt.client import AsyncClient

    c = AsyncClient(user="u")  # (not connected: building specs needs no broker)
    given = TaskSpec(name="HELLO", id="mine-2")
    specs = c._specs(
        [{"name": "HELLO"}, {"name": "HELLO", "id": "mine-1"}, given, TaskSpec(name="HELLO")]
        + [{"name": "NOOP", "args": i} for i in range(1000)]
    )
    ids = [s.id or "" for s in specs]
    assert ids[1:3] == ["mine-1", "mine-2"]
    made = [ids[0], ids[3], *ids[4:]]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in made)
    assert len(set(made)) == len(made)  # (a slice off by one would repeat or cut ids)
    assert [s.args for s in specs[4:]] == list(range(1000))
    assert {s.notify for s in specs} == {"events"}
