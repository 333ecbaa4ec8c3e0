"""The client's side of the submit and id-list messages: validate a batch of tasks in one
call and encode it as the balancer's :func:`~lbmqtt.protocol.decode_submit` reads it.

Validating and dumping a whole batch through one ``TypeAdapter(list[TaskSpec])`` costs about
half of doing it task by task (~3 us a task for validate + encode), which is why the batch
is spliced into ``{"tasks": [...]}`` here rather than built as a :class:`SubmitBatch` model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

from pydantic import TypeAdapter

from ..errors import ErrorCode, error_from_code
from . import IdList, TaskSpec

__all__ = ["IDS_PER_MESSAGE", "encode_id_lists", "encode_submit", "validate_specs"]

_SPECS: Final = TypeAdapter(list[TaskSpec])
"""Validates and encodes a batch of specs in one call (each on its own costs ~2x)."""
_NOT_SENT: Final = {"__all__": {"v"}}  # (the batch's fields a submit leaves out)

IDS_PER_MESSAGE: Final = 5000
"""Most ids the client puts in one cancel, ack or query message (the balancer takes up to
``MAX_IDS``)."""


def validate_specs(items: Sequence[Mapping[str, Any]]) -> list[TaskSpec]:
    """Validate tasks given as mappings of :class:`TaskSpec` fields, in one call.

    Raises:
        InvalidTask: the first task that is not valid, named with its id and the reason.
    """
    try:
        return _SPECS.validate_python(items)
    except ValueError:
        pass  # name the first bad one
    specs: list[TaskSpec] = []
    for data in items:
        try:
            specs.append(TaskSpec.model_validate(data))
        except ValueError as exc:
            raise error_from_code(
                ErrorCode.INVALID.value, f"invalid task {data.get('name')!r}: {exc}", data.get("id")
            ) from exc
    return specs


def encode_submit(specs: list[TaskSpec]) -> bytes:
    """A submit message: one task as an object, more as ``{"tasks": [...]}`` (fields left
    unset and the version are not sent)."""
    if len(specs) == 1:
        return specs[0].model_dump_json(exclude_none=True, exclude={"v"}).encode()
    return b'{"tasks":' + _SPECS.dump_json(specs, exclude_none=True, exclude=_NOT_SENT) + b"}"


def encode_id_lists(ids: Sequence[str], per_message: int = IDS_PER_MESSAGE) -> Iterator[bytes]:
    """``ids`` as cancel / ack / query messages of at most ``per_message`` ids each."""
    for start in range(0, len(ids), per_message):
        yield IdList(ids=list(ids[start : start + per_message])).encode()
