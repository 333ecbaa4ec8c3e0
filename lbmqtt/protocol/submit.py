"""The submit message both ways, and the id lists: the client validates a batch of tasks in
one call and encodes it (:func:`encode_submit`) as the balancer's :func:`decode_submit`
reads it, task by task.

Validating and dumping a whole batch through one ``TypeAdapter(list[TaskSpec])`` costs about
half of doing it task by task (~3 us a task for validate + encode), which is why the batch
is spliced into ``{"tasks": [...]}`` here rather than built as a :class:`SubmitBatch` model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from ..errors import DecodeError, ErrorCode, error_from_code
from . import IdList, SubmitBatch, TaskSpec, _decode_error, is_valid_task_id

__all__ = [
    "IDS_PER_MESSAGE",
    "decode_submit",
    "encode_id_lists",
    "encode_submit",
    "validate_specs",
]

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


_SPEC_ADAPTER: Final = TypeAdapter(TaskSpec)


def decode_submit(raw: bytes | bytearray) -> list[TaskSpec | DecodeError]:
    """Decode a submit payload: a single task object or ``{"tasks": [...]}``.

    Each element of a batch is validated on its own, so one bad task does not refuse the
    others. Returns a list holding a :class:`TaskSpec` or a :class:`DecodeError` per task.

    Raises:
        DecodeError: the payload as a whole is not JSON or not an object / batch.
    """
    raw = bytes(raw)
    try:
        data = pydantic_core.from_json(raw)
    except ValueError as exc:
        raise DecodeError(f"not valid UTF-8 JSON: {exc}", raw, ErrorCode.BAD_JSON) from exc
    if not isinstance(data, dict):
        raise DecodeError('a submit is a JSON object (one task) or {"tasks": [...]}', raw)
    if "tasks" in data:
        try:
            batch = SubmitBatch.model_validate(data)
        except ValidationError as exc:
            raise _decode_error(exc, raw) from exc
        items = batch.tasks
    else:
        items = [data]
    out: list[TaskSpec | DecodeError] = []
    for item in items:
        try:
            out.append(_SPEC_ADAPTER.validate_python(item))
        except ValidationError as exc:
            err = _decode_error(exc, raw)
            if isinstance(item, dict):
                tid, ref = item.get("id"), item.get("ref")
                err.task_id = tid if isinstance(tid, str) and is_valid_task_id(tid) else None
                err.ref = ref if isinstance(ref, str) else None
            out.append(err)
    return out
