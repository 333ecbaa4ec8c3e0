"""The messages between a node and its worker processes, and their framing.

The node side of the wire is ``protocol``'s; this is the other wire a node speaks, on the
socketpair to each of its worker processes. It lives beside ``protocol`` rather than in it
because a worker process must start fast on the standard library alone (no pydantic:
``tests/test_api.py`` pins it), and importing any module of the ``protocol`` package runs
the package's ``__init__``, which loads the wire models.

A frame is a header (the body's length, 4 bytes big-endian, and a byte for the message's
kind) and a body, the message's fields as a pickled tuple: pickle stays between a node and
its own children (it never goes on the MQTT wire), and a plain tuple pickles three times
faster than a named one (which pickles a reference to its class).

node -> worker: :class:`Run`, :class:`Skip`.
worker -> node: :class:`Hello`, :class:`TaskProgress`, :class:`Done`, :class:`Failed`.

Also here: what a worker is told at start-up about the task functions registered on a
``Node`` object (:class:`TaskReference`, a ``--ref`` argument of its command line), and
the JSON of a task's result (:func:`encode_result` in the worker, :func:`decode_json` in
the node, which also reads a task's arguments in the worker).
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = [
    "HEADER",
    "Done",
    "Failed",
    "Hello",
    "Message",
    "Run",
    "Skip",
    "TaskProgress",
    "TaskReference",
    "WorkerMessageError",
    "decode",
    "decode_json",
    "decode_task_reference",
    "encode",
    "encode_result",
    "encode_task_reference",
    "take",
]

HEADER = struct.Struct("!IB")
"""A frame's header: the length of its body, and its kind (which message class)."""


class Run(NamedTuple):
    """node -> worker: run this task attempt after those handed over before it."""

    id: str
    attempt: int
    name: str
    args_json: bytes
    user: str
    priority: int


class Skip(NamedTuple):
    """node -> worker: the attempt was withdrawn; do not start it (no-op if it ran)."""

    id: str
    attempt: int


class Hello(NamedTuple):
    """worker -> node: started, with these tasks loaded; ready for work."""

    pid: int
    tasks: list[str]


class TaskProgress(NamedTuple):
    """worker -> node: the running attempt's progress, 0..100."""

    id: str
    attempt: int
    percent: int


class Done(NamedTuple):
    """worker -> node: the attempt returned ``result_json`` after ``runtime_s``."""

    id: str
    attempt: int
    result_json: bytes
    runtime_s: float


class Failed(NamedTuple):
    """worker -> node: the attempt raised (``id`` is empty when the task modules could not
    be loaded at all)."""

    id: str
    attempt: int
    type: str
    message: str
    traceback: str
    runtime_s: float


Message = Run | Skip | Hello | TaskProgress | Done | Failed

_KINDS: tuple[type[Message], ...] = (Run, Skip, Hello, TaskProgress, Done, Failed)
_KIND_OF: dict[type[Message], int] = {cls: i for i, cls in enumerate(_KINDS)}
_ARITY: tuple[int, ...] = tuple(len(cls._fields) for cls in _KINDS)
# (bound once: these run for every task handed over and every result)
_new = tuple.__new__
_dumps = pickle.dumps
_loads = pickle.loads
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_pack = HEADER.pack


class WorkerMessageError(ValueError):
    """A frame that is not a message of this module (``raw`` holds its body)."""

    def __init__(self, message: str, raw: bytes):
        super().__init__(message)
        self.raw = raw


def encode(*msgs: Message) -> bytes:
    """The frames of ``msgs``, in order, as one write."""
    if len(msgs) == 1:
        m = msgs[0]
        data = _dumps(tuple(m), protocol=_PROTOCOL)
        return _pack(len(data), _KIND_OF[type(m)]) + data
    out = []
    for m in msgs:
        data = _dumps(tuple(m), protocol=_PROTOCOL)
        out.append(_pack(len(data), _KIND_OF[type(m)]))
        out.append(data)
    return b"".join(out)


def decode(kind: int, body: bytes) -> Message:
    """The message of a frame: its ``kind`` (from the header) and its body.

    Raises:
        WorkerMessageError: the kind is unknown, or the body is not a pickled tuple of that
            kind's fields.
    """
    try:
        t = _loads(body)  # only ever from our own parent or child process
    except Exception as exc:
        raise WorkerMessageError(
            f"malformed frame ({len(body)} bytes): {type(exc).__name__}: {exc}", body
        ) from exc
    if kind < len(_KINDS) and type(t) is tuple and len(t) == _ARITY[kind]:
        msg: Message = _new(_KINDS[kind], t)
        return msg
    if kind >= len(_KINDS):
        raise WorkerMessageError(f"a frame of unknown kind {kind}", body)
    cls = _KINDS[kind]
    raise WorkerMessageError(
        f"a {cls.__name__} frame holds {str(t)[:80]}, not its {len(cls._fields)} fields", body
    )


def take(buf: bytearray) -> Message | None:
    """Cut the first whole frame off ``buf`` and decode it; None if none is whole yet.

    Raises:
        WorkerMessageError: the frame is malformed (it is cut off all the same).
    """
    if len(buf) < HEADER.size:
        return None
    n, kind = HEADER.unpack_from(buf)
    end = HEADER.size + n
    if len(buf) < end:
        return None
    body = bytes(buf[HEADER.size : end])
    del buf[:end]
    return decode(kind, body)


class TaskReference(NamedTuple):
    """A task function registered on a ``Node`` object, as its workers import it."""

    name: str
    ref: str
    """``module:qualname`` (:func:`lbmqtt.registry.function_reference`)."""
    style: str = "auto"
    arguments: Mapping[str, Any] | None = None


def encode_task_reference(r: TaskReference) -> str:
    """One ``--ref`` argument of a worker's command line.

    Raises:
        TypeError: the entry's ``arguments`` are not JSON values.
    """
    return json.dumps({"name": r.name, "ref": r.ref, "style": r.style, "arguments": r.arguments})


def decode_task_reference(text: str) -> TaskReference:
    """The reference of a ``--ref`` argument (:func:`encode_task_reference`)."""
    d = json.loads(text)
    return TaskReference(d["name"], d["ref"], d.get("style", "auto"), d.get("arguments"))


_RESULT_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
_DECODER = json.JSONDecoder()
# (json.dumps with options builds an encoder at each call, and json.loads of bytes detects
# their encoding first: each doubled the cost of a small value, once per task)


def encode_result(value: Any) -> bytes:
    """A task's result as the JSON :class:`Done` carries (strict: no NaN): what
    ``json.dumps(value, allow_nan=False, separators=(",", ":"))`` gives.

    Raises:
        TypeError, ValueError: the value is not JSON-serializable.
    """
    return _RESULT_ENCODER.encode(value).encode()


def decode_json(data: bytes) -> Any:
    """The value of a task's arguments (:class:`Run`), in the worker, as
    ``json.loads(data)`` gives it (which decides whatever is not plain UTF-8 JSON). The
    node reads results with :func:`lbmqtt.protocol.codec.decode_json`, quicker still, but
    through pydantic-core, which a worker does not import (30-40 ms more at each start)."""
    try:
        return _DECODER.decode(data.decode())
    except ValueError:  # (UnicodeDecodeError too: a BOM, UTF-16, an escaped surrogate)
        pass
    return json.loads(data)  # (outside the except: its error alone, not chained to ours)
