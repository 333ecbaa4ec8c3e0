"""One error tree for lbmqtt, grouped by who must react.

::

    LbmqttError
    ├── ConfigError                 the operator: fix parameters.json / flags / environment
    ├── BrokerUnavailable           the operator: start or reach the MQTT broker
    │   └── LoginRefused            whoever set the login: the broker refused it (final)
    ├── BalancerUnavailable         the operator: start or reach the balancer
    ├── DecodeError                 whoever sent a malformed message (carries the raw bytes)
    ├── SubmitRefused               the caller: the balancer refused a submit
    │   ├── InvalidTask             the task itself is malformed
    │   └── QuotaExceeded           the user has too many queued tasks
    ├── TaskError                   the caller: a task ended without a result
    │   ├── TaskFailed              it raised, timed out, or ran out of attempts
    │   └── TaskCancelled           it was cancelled
    ├── UnknownTask                 the balancer does not know (or no longer keeps) this task id
    └── WaitTimeout (also TimeoutError)   the caller's own deadline passed

Errors sent back to MQTT clients carry a stable machine-readable ``code`` (see
:class:`ErrorCode`) and a human sentence; :func:`error_from_code` maps one back to an
exception on the client side. Foreign exceptions (paho, amqtt, OSError) are translated
where they enter lbmqtt, with ``raise ... from exc``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Stable machine-readable codes carried by error messages on the wire."""

    BAD_JSON = "bad_json"
    """The payload is not valid UTF-8 JSON."""
    INVALID = "invalid"
    """The payload is JSON but does not match the topic's schema."""
    QUOTA_EXCEEDED = "quota_exceeded"
    """The user already has ``LB_QUEING_MAXPERUSER`` queued tasks."""
    DUPLICATE_ID = "duplicate_id"
    """A task with this id exists with different content (same content is idempotent)."""
    UNKNOWN_TASK = "unknown_task"
    """No task with this id is known for this user."""
    TOO_LARGE = "too_large"
    """The payload or batch exceeds a configured limit."""
    RATE_LIMITED = "rate_limited"
    """The user submits faster than ``SUBMIT_RATE`` allows: send it again a little later."""
    INTERNAL = "internal"
    """The balancer failed to handle the message; it kept running."""


class LbmqttError(Exception):
    """Base class of every error raised by lbmqtt."""


class ConfigError(LbmqttError):
    """Bad settings: a parameters file, a flag or an environment override.

    The message is one line that names the file and the offending key.
    """


class BrokerUnavailable(LbmqttError):
    """The MQTT broker could not be reached or refused the connection."""


class LoginRefused(BrokerUnavailable):
    """The broker refused the login (MQTT 3.1.1 CONNACK 4 "bad user name or password" or 5
    "not authorized") of a connection that had never been accepted: trying again with the
    same login cannot help, so it is not retried.

    Attributes:
        code: ``"bad_login"`` (CONNACK 4) or ``"not_authorized"`` (5).
        login: the user name sent (None: anonymous).
    """

    CODES = {4: "bad_login", 5: "not_authorized"}
    """The CONNACK return codes this error stands for, and their codes."""

    def __init__(self, host: str, port: int, login: str | None, return_code: int):
        self.code = self.CODES[return_code]
        self.login = login
        where = f"the MQTT broker at {host}:{port}"
        if login is None:
            message = (
                f"{where} refused an anonymous connection: it requires a login; set "
                f"LBMQTT_BROKER_USERNAME and LBMQTT_BROKER_PASSWORD to an account of its "
                f"accounts file (`lbmqtt user list` on the broker's machine)"
            )
        else:
            reason = "bad user name or password" if return_code == 4 else "not authorized"
            message = (
                f"{where} refused the login {login!r} ({reason}): check "
                f"LBMQTT_BROKER_USERNAME and LBMQTT_BROKER_PASSWORD (or BROKER_PASSWORD_FILE) "
                f"against the accounts file on the broker's machine (`lbmqtt user list`)"
            )
            if return_code == 5:  # (Mosquitto's answer to a wrong password, too)
                message += ", and that the login's role fits this part"
        super().__init__(message)


class BalancerUnavailable(LbmqttError):
    """No balancer acknowledged a request within the deadline."""


class DecodeError(LbmqttError):
    """A message could not be decoded; ``raw`` holds the bytes as received."""

    def __init__(
        self,
        message: str,
        raw: bytes = b"",
        code: ErrorCode = ErrorCode.INVALID,
        *,
        task_id: str | None = None,
        ref: str | None = None,
    ):
        super().__init__(message)
        self.raw = raw
        self.code = code
        self.task_id = task_id
        self.ref = ref


class SubmitRefused(LbmqttError):
    """The balancer refused a submitted task.

    Attributes:
        code: the machine-readable :class:`ErrorCode`.
        task_id: the id of the refused task, when known.
    """

    def __init__(self, message: str, *, code: str = ErrorCode.INVALID, task_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.task_id = task_id


class InvalidTask(SubmitRefused):
    """The submitted task is malformed (bad name, id, priority, arguments...)."""


class QuotaExceeded(SubmitRefused):
    """The user has reached the per-user queue cap (``LB_QUEING_MAXPERUSER``)."""


class TaskError(LbmqttError):
    """A task ended without a result. ``state`` is the final :class:`~lbmqtt.protocol.TaskState`."""

    def __init__(self, message: str, state: Any = None):
        super().__init__(message)
        self.state = state


class TaskFailed(TaskError):
    """The task raised an exception, timed out, or exhausted its attempts.

    Attributes:
        error_type: the exception class name raised in the worker (or an lbmqtt reason
            such as ``"WorkerLost"``).
        traceback: the traceback text from the worker, when there is one.
    """

    def __init__(
        self, message: str, state: Any = None, *, error_type: str = "", traceback: str = ""
    ):
        super().__init__(message, state)
        self.error_type = error_type
        self.traceback = traceback


class TaskCancelled(TaskError):
    """The task was cancelled before it finished."""


class UnknownTask(LbmqttError):
    """The balancer does not know this task id for this user (never submitted, or expired)."""


class RateLimited(SubmitRefused):
    """The user submitted faster than the balancer's ``SUBMIT_RATE``; try again later."""


class WaitTimeout(LbmqttError, TimeoutError):
    """The caller's deadline passed before the awaited event happened."""


def error_from_code(code: str, message: str, task_id: str | None = None) -> LbmqttError:
    """Map an error received on the wire to the exception the client raises."""
    if code == ErrorCode.QUOTA_EXCEEDED:
        return QuotaExceeded(message, code=code, task_id=task_id)
    if code == ErrorCode.RATE_LIMITED:
        return RateLimited(message, code=code, task_id=task_id)
    if code == ErrorCode.UNKNOWN_TASK:
        return UnknownTask(message)
    if code in (ErrorCode.INVALID, ErrorCode.BAD_JSON, ErrorCode.DUPLICATE_ID, ErrorCode.TOO_LARGE):
        return InvalidTask(message, code=code, task_id=task_id)
    return SubmitRefused(message, code=code, task_id=task_id)
