"""The Python client helper: submit, get, wait, cancel, map (sync and async).

It speaks the same documented topics as any MQTT client. It submits with
``notify: "events"``: task states come batched on ``users/{u}/events`` rather than one
retained message per task. Every request is acknowledged by the balancer and resent until
it is (submits carry a client-chosen id, so a resend never runs a task twice); after a
reconnect the client asks again about every task it still waits for.

Example::

    from lbmqtt import Client

    with Client(user="alice") as client:
        task_id = client.submit("HELLO", {"firstName": "John", "lastName": "Doe"})
        print(client.wait(task_id, timeout=30))        # Hello John Doe !
        print(client.map("HELLO", [{"firstName": "A", "lastName": str(i)} for i in range(3)]))
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import getpass
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from pydantic import TypeAdapter

from .config import Settings, coerce_settings
from .discovery import resolve as resolve_broker
from .errors import (
    BalancerUnavailable,
    ConfigError,
    LbmqttError,
    QuotaExceeded,
    RateLimited,
    SubmitRefused,
    TaskCancelled,
    TaskFailed,
    UnknownTask,
    WaitTimeout,
    error_from_code,
)
from .mqtt import MqttTransport, client_id, connection_options
from .protocol import (
    Errors,
    Events,
    IdList,
    Status,
    TaskSpec,
    TaskState,
    Topics,
    decode,
    is_valid_name,
)
from .ratelog import LogLimiter

log = logging.getLogger(__name__)

_SPECS: Final = TypeAdapter(list[TaskSpec])
"""Validates and encodes a batch of specs in one call (each on its own cost ~2x)."""
_NOT_SENT: Final = {"__all__": {"v"}}  # (the batch's fields a submit leaves out)

T = TypeVar("T")

RESEND_S = 2.0
REQUERY_S = 10.0
ACK_FLUSH_S = 0.05
DEFAULT_BATCH = 500
LOG_EVERY_S = 10.0
"""The client logs the balancer's unsolicited errors at most this often per code (anyone
may publish on a user's topics without logins)."""
RATE_PAUSE_MIN_S = 0.05
RATE_PAUSE_MAX_S = 2.0
"""How long `map` pauses before sending again what the balancer refused for SUBMIT_RATE."""
COLLECTED_CACHE = 10_000


def default_user() -> str:
    """The login name, reduced to a valid lbmqtt user name."""
    try:
        raw = getpass.getuser()
    except (KeyError, OSError):
        raw = "user"
    name = "".join(c if c.isalnum() or c in "_.-" else "_" for c in raw)[:64]
    return name if is_valid_name(name) else "user"


@dataclass
class _Tracked:
    state: TaskState | None = None
    next: list[asyncio.Future[TaskState]] = field(default_factory=list)
    final: asyncio.Future[TaskState] | None = None


class _MapProgress:
    """Counts a map's finished tasks (a done-callback of each one's final future) and
    reports them to a function or a :class:`~lbmqtt.progress.ProgressBar`."""

    def __init__(self, total: int, report: Callable[[int, int], None] | None, label: str):
        self.total = total
        self.finished = 0
        self.failed = 0
        self._report = report
        self._bar = None
        if report is None:
            from .progress import ProgressBar

            self._bar = ProgressBar(label)
            self._draw(final=False)
        else:
            report(0, total)  # (so that a caller can show the total before the first one)

    def __call__(self, fut: asyncio.Future[TaskState]) -> None:
        self.finished += 1
        if not fut.cancelled() and fut.exception() is None and fut.result().status != Status.DONE:
            self.failed += 1
        if self._report is not None:
            self._report(self.finished, self.total)
        else:
            self._draw(final=self.finished == self.total)

    def _draw(self, final: bool) -> None:
        assert self._bar is not None
        note = f"{self.finished}/{self.total} finished" + (
            f", {self.failed} failed" if self.failed else ""
        )
        self._bar.update(100.0 * self.finished / max(1, self.total), note, final=final)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _map_progress(
    progress: bool | Callable[[int, int], None], total: int, label: str
) -> _MapProgress | None:
    if progress is False:
        return None
    return _MapProgress(total, None if progress is True else progress, label)


def outcome(state: TaskState) -> Any:
    """The result of a finished task, or the exception its end means.

    Raises:
        TaskFailed: the task failed (or expired).
        TaskCancelled: the task was cancelled.
    """
    if state.status == Status.DONE:
        return state.result
    if state.status == Status.CANCELLED:
        raise TaskCancelled(f"task {state.id} ({state.name}) was cancelled", state)
    err = state.error
    etype = err.type if err else "Failed"
    msg = err.message if err else state.status.value
    raise TaskFailed(
        f"task {state.id} ({state.name}) failed: {etype}: {msg}",
        state,
        error_type=etype,
        traceback=err.traceback if err else "",
    )


class AsyncClient:
    """Asyncio client. Use ``async with AsyncClient(...) as client:``.

    Args:
        parameters: settings, a parameters.json path, or None (``./parameters.json`` or
            defaults).
        user: the user to submit as (default ``CLIENT_USER``, else ``BROKER_USERNAME``,
            else the login name). With accounts, it must be the broker login.
        ack_timeout_s: how long to wait for the balancer to acknowledge a request (default
            ``CLIENT_ACK_TIMEOUT_S``) before raising :class:`BalancerUnavailable`.
    """

    def __init__(
        self,
        parameters: Settings | str | os.PathLike[str] | None = None,
        *,
        user: str | None = None,
        ack_timeout_s: float | None = None,
    ):
        self.settings = coerce_settings(parameters)
        self.user = (
            user or self.settings.client_user or self.settings.broker_username or default_user()
        )
        if not is_valid_name(self.user):
            raise ConfigError(f"invalid user name {self.user!r}: 1-64 letters, digits, _.-")
        self.topics = Topics(self.settings.topic_prefix)
        self.ack_timeout_s = ack_timeout_s or self.settings.client_ack_timeout_s
        self._tracked: dict[str, _Tracked] = {}
        self._log_limited = LogLimiter(log, LOG_EVERY_S).warning
        # final states already handed to the caller (and acknowledged to the balancer) ...
        self._collected: collections.OrderedDict[str, TaskState] = collections.OrderedDict()
        # ... and final states that arrived while nobody waited for them
        self._finished: collections.OrderedDict[str, TaskState] = collections.OrderedDict()
        self._to_ack: set[str] = set()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._transport: MqttTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the broker and subscribe to this user's events and errors.

        Raises:
            BrokerUnavailable: the broker is not reachable within ``CONNECT_TIMEOUT_S``.
        """
        self.settings = await resolve_broker(self.settings)
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._transport = MqttTransport(
            **connection_options(s),
            client_id=client_id("client", self.user),
            on_message=self._on_message,
            subscriptions=[(self.topics.events(self.user), 1), (self.topics.errors(self.user), 1)],
            on_connect=self._on_connect,
        )
        try:
            await self._transport.start(wait=True, timeout_s=s.connect_timeout_s)
        except BaseException:
            await self._transport.close()
            raise

    async def close(self) -> None:
        """Send pending acknowledgements and disconnect."""
        if self._transport is None:
            return
        self._flush_acks()
        await self._transport.close()
        self._transport = None

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _t(self) -> MqttTransport:
        if self._transport is None:
            raise LbmqttError("the client is not started (use `async with AsyncClient()`)")
        return self._transport

    # ------------------------------------------------------------------ API

    async def submit(
        self,
        name: str,
        args: Any = None,
        *,
        priority: int = 0,
        task_id: str | None = None,
        timeout_s: float | None = None,
        requires: Mapping[str, float] | None = None,
        tags: Iterable[str] | None = None,
    ) -> str:
        """Submit one task and wait for the balancer to accept it.

        Args:
            name: task name (a node must implement it).
            args: any JSON value, passed to the task function.
            priority: runs only on slots whose band contains it.
            task_id: your own id (then submitting again is idempotent); default: random.
            timeout_s: kill the task's worker if an attempt runs longer.
            requires: counted resources its node must have free, reserved while it runs
                (``{"gpu": 1, "memory_mb": 4000}``).
            tags: tags its node must carry (``["avx2"]``).

        Returns:
            The task id.

        Raises:
            QuotaExceeded: you already have ``LB_QUEING_MAXPERUSER`` queued tasks.
            InvalidTask: the task is malformed (bad name, id, arguments...).
            BalancerUnavailable: no acknowledgement within ``ack_timeout_s``.
        """
        ids = await self.submit_many(
            [
                {
                    "name": name,
                    "args": args,
                    "priority": priority,
                    "id": task_id,
                    "timeout_s": timeout_s,
                    "requires": dict(requires) if requires else None,
                    "tags": list(tags) if tags else None,
                }
            ]
        )
        return ids[0]

    async def submit_many(
        self, tasks: Iterable[Mapping[str, Any] | TaskSpec], *, batch_size: int = DEFAULT_BATCH
    ) -> list[str]:
        """Submit many tasks in batches (one message per ``batch_size`` tasks).

        Each item is a :class:`TaskSpec` or a mapping with its fields (``name``, ``args``,
        ``priority``, ``id``, ``timeout_s``). Returns the ids in order once every task is
        accepted.

        Raises:
            SubmitRefused: (the first) refused task; the accepted ones stay submitted.
            BalancerUnavailable: some task was not acknowledged within ``ack_timeout_s``.
        """
        specs = self._specs(tasks)
        errors = await self._submit_specs(specs, batch_size)
        for err in errors:
            if err is not None:
                raise err
        return [s.id or "" for s in specs]

    def _specs(self, tasks: Iterable[Mapping[str, Any] | TaskSpec]) -> list[TaskSpec]:
        items: list[dict[str, Any]] = []
        for item in tasks:
            data = item.model_dump() if isinstance(item, TaskSpec) else dict(item)
            data["id"] = data.get("id") or os.urandom(16).hex()  # (as random as a uuid4)
            data["notify"] = "events"
            items.append(data)
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
                    "invalid", f"invalid task {data.get('name')!r}: {exc}", data["id"]
                ) from exc
        return specs

    async def _submit_specs(
        self, specs: list[TaskSpec], batch_size: int = DEFAULT_BATCH
    ) -> list[BaseException | None]:
        """Publish in batches, resend until each is acknowledged; per spec: None (accepted)
        or the refusal."""
        t = self._t()
        acks = [self._watch_next(spec.id or "") for spec in specs]
        for start in range(0, len(specs), batch_size):
            self._publish_submit(t, specs[start : start + batch_size])
        await self._await_acks(specs, acks)
        out: list[BaseException | None] = []
        for spec, f in zip(specs, acks, strict=True):
            exc = f.exception()
            if exc is not None:
                tr = self._tracked.get(spec.id or "")
                if tr is not None and tr.state is None and not tr.next and tr.final is None:
                    del self._tracked[spec.id or ""]
            out.append(exc)
        return out

    def _publish_submit(self, t: MqttTransport, specs: list[TaskSpec]) -> None:
        if len(specs) == 1:
            payload = specs[0].model_dump_json(exclude_none=True, exclude={"v"}).encode()
        else:
            payload = (
                b'{"tasks":' + _SPECS.dump_json(specs, exclude_none=True, exclude=_NOT_SENT) + b"}"
            )
        t.publish(self.topics.submit(self.user), payload, qos=1)

    async def _await_acks(
        self, specs: list[TaskSpec], acks: list[asyncio.Future[TaskState]]
    ) -> None:
        deadline = time.monotonic() + self.ack_timeout_s
        while True:
            pending = [f for f in acks if not f.done()]
            if not pending:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for f in pending:
                    f.cancel()
                for spec in specs:
                    tr = self._tracked.get(spec.id or "")
                    if tr is not None:
                        tr.next = [f for f in tr.next if not f.done()]
                        self._forget(spec.id or "")
                raise BalancerUnavailable(
                    f"{len(pending)} of {len(specs)} submits not acknowledged within "
                    f"{self.ack_timeout_s:g} s: is `lbmqtt balancer` (or `lbmqtt up`) running "
                    f"on prefix {self.topics.prefix!r}?"
                )
            await asyncio.wait(pending, timeout=min(RESEND_S, remaining))
            unacked = [s for s, f in zip(specs, acks, strict=True) if not f.done()]
            if unacked and time.monotonic() < deadline:
                for start in range(0, len(unacked), DEFAULT_BATCH):
                    self._publish_submit(self._t(), unacked[start : start + DEFAULT_BATCH])

    async def get(self, task_id: str) -> TaskState:
        """The current state of a task (status, progress, result, error, node, times).

        A finished state returned here counts as collected: the balancer forgets the task
        ``RESULT_COLLECTED_TTL_S`` later.

        Raises:
            UnknownTask: no such task for this user (or it expired).
            BalancerUnavailable: no answer within ``ack_timeout_s``.
        """
        tr = self._tracked.get(task_id)
        if tr is not None and tr.state is not None and self._t().connected:
            state = tr.state
        elif task_id in self._collected or task_id in self._finished:
            state = self._collected.get(task_id) or self._finished[task_id]
        else:
            state = await self._query(task_id)
        if state.status.final:
            self._collect(state)
        return state

    async def wait(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait for a task to finish and return its result.

        Raises:
            TaskFailed: the task raised (``.traceback`` has the worker's traceback), timed
                out, or ran out of attempts.
            TaskCancelled: it was cancelled.
            WaitTimeout: not finished within ``timeout`` seconds (also a TimeoutError).
            UnknownTask: no such task for this user.
        """
        state = await self.wait_state(task_id, timeout)
        return outcome(state)

    async def wait_state(
        self,
        task_id: str,
        timeout: float | None = None,
        *,
        on_state: Callable[[TaskState], None] | None = None,
    ) -> TaskState:
        """Like :meth:`wait`, but return the final :class:`TaskState` instead of raising.

        Args:
            on_state: called with each state of the task as it arrives (progress, the node
                it runs on), the current one first; e.g. to draw a progress bar.
        """
        done = self._collected.get(task_id) or self._finished.get(task_id)
        tr = self._tracked.get(task_id)
        if done is None and (tr is None or tr.state is None):
            answer = await self._query(task_id)
            tr = self._tracked.get(task_id)
            if tr is None:  # (a final answer nobody else waits for is filed as finished)
                done = answer
        if done is not None:  # finished before the wait began: its final state is its only one
            if on_state is not None:
                on_state(done)
            self._collect(done)
            return done
        assert tr is not None
        final = self._final_future(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        nxt: asyncio.Future[TaskState] | None = None
        seen: asyncio.Future[TaskState] | None = None
        if on_state is not None and tr.state is not None:
            on_state(tr.state)
        # ask the balancer again only every REQUERY_S without news (was an event lost?),
        # never in answer to an answer: a query per state event would loop
        query_at = time.monotonic() + REQUERY_S
        while not final.done():
            if nxt is not None and nxt.done():
                if nxt.exception() is not None:
                    raise nxt.exception()  # type: ignore[misc]  # e.g. UnknownTask: expired
                nxt = None
            if on_state is not None:
                if seen is not None and seen.done() and seen.exception() is None:
                    on_state(seen.result())
                if seen is None or seen.done():
                    seen = self._watch_next(task_id)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                st = tr.state.status.value if tr.state else "unknown"
                why = f": {tr.state.waiting}" if tr.state and tr.state.waiting else ""
                raise WaitTimeout(
                    f"task {task_id} did not finish within {timeout:g} s (status: {st}{why})"
                )
            if now >= query_at:
                query_at = now + REQUERY_S
                if self._t().connected:
                    nxt = self._watch_next(task_id)
                    self._publish_ids(self.topics.query(self.user), [task_id])
            wait_for = query_at - now if deadline is None else min(query_at, deadline) - now
            await asyncio.wait(
                [f for f in (final, nxt, seen) if f is not None and not f.done()] or [final],
                timeout=max(0.0, wait_for),
                return_when=asyncio.FIRST_COMPLETED,
            )
        state = final.result()
        if on_state is not None:
            on_state(state)
        self._collect(state)
        return state

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task: a queued one leaves the queue, a running one's worker is killed.

        Returns:
            True if the task is now cancelled; False if it had already finished.

        Raises:
            UnknownTask: no such task for this user.
            BalancerUnavailable: no answer within ``ack_timeout_s``.
        """
        tr = self._tracked.setdefault(task_id, _Tracked())
        if tr.state is not None and tr.state.status.final:
            return tr.state.status == Status.CANCELLED
        final = self._final_future(task_id)
        deadline = time.monotonic() + self.ack_timeout_s
        while not final.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BalancerUnavailable(
                    f"cancel of {task_id} not acknowledged within {self.ack_timeout_s:g} s"
                )
            nxt = self._watch_next(task_id)
            self._publish_ids(self.topics.cancel(self.user), [task_id])
            # the answer is the task's final state; any other state (progress) means the
            # cancel is still on its way, so wait for the final one until the resend
            resend_at = time.monotonic() + min(RESEND_S, remaining)
            while not final.done() and time.monotonic() < resend_at:
                await asyncio.wait(
                    [final, nxt],
                    timeout=resend_at - time.monotonic(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if nxt.done():
                    if nxt.exception() is not None:
                        self._forget(task_id)
                        raise nxt.exception()  # type: ignore[misc]
                    nxt = self._watch_next(task_id)
        state = final.result()
        self._collect(state)
        return state.status == Status.CANCELLED

    async def map(
        self,
        name: str,
        iterable: Iterable[Any],
        *,
        priority: int = 0,
        timeout: float | None = None,
        return_exceptions: bool = False,
        batch_size: int = DEFAULT_BATCH,
        requires: Mapping[str, float] | None = None,
        tags: Iterable[str] | None = None,
        progress: bool | Callable[[int, int], None] = False,
    ) -> list[Any]:
        """Run task ``name`` once per argument, in batches; results in input order.

        More tasks than your queue cap (``LB_QUEING_MAXPERUSER``) are fine: the ones the
        balancer refuses for the cap are submitted again as earlier ones finish.

        Args:
            timeout: overall deadline in seconds for all results.
            return_exceptions: put TaskFailed / TaskCancelled in the list instead of
                raising the first one.
            progress: True draws a progress bar on stderr (tasks finished of all); a
                function is called as ``progress(finished, total)`` instead, first with
                ``(0, total)``, then once per finished task.

        Raises:
            TaskFailed, TaskCancelled: the first failed task (unless return_exceptions).
            WaitTimeout: not all finished within ``timeout``.
            SubmitRefused: a task was refused for another reason than the queue cap.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        extra: dict[str, Any] = {
            "requires": dict(requires) if requires else None,
            "tags": list(tags) if tags else None,
        }
        specs = self._specs(
            {"name": name, "args": a, "priority": priority, **extra} for a in iterable
        )
        ids = [s.id or "" for s in specs]
        what = f"{len(ids)} {name!r} tasks" + (f" (timeout {timeout:g} s)" if timeout else "")
        finals = {i: self._final_future(i) for i in ids}
        bar = _map_progress(progress, len(ids), f"{len(ids)} {name!r} tasks")
        if bar is not None:
            for f in finals.values():
                f.add_done_callback(bar)
        try:
            return await self._map(
                name,
                ids,
                specs,
                finals,
                batch_size=batch_size,
                deadline=deadline,
                what=what,
                return_exceptions=return_exceptions,
            )
        finally:
            if bar is not None:
                bar.close()

    async def _map(
        self,
        name: str,
        ids: list[str],
        specs: list[TaskSpec],
        finals: dict[str, asyncio.Future[TaskState]],
        *,
        batch_size: int,
        deadline: float | None,
        what: str,
        return_exceptions: bool,
    ) -> list[Any]:
        todo = specs
        pause = RATE_PAUSE_MIN_S
        while todo:
            errors = await self._submit_specs(todo, batch_size)
            refused, limited = [], []
            for spec, err in zip(todo, errors, strict=True):
                if isinstance(err, QuotaExceeded):
                    refused.append(spec)
                elif isinstance(err, RateLimited):
                    limited.append(spec)
                elif err is not None:
                    raise err
            if limited and not refused:
                # over the balancer's SUBMIT_RATE: the rest goes again after a pause that
                # grows while nothing gets through
                pause = (
                    RATE_PAUSE_MIN_S
                    if len(limited) < len(todo)
                    else min(RATE_PAUSE_MAX_S, pause * 2)
                )
                await asyncio.sleep(pause)
                todo = limited
                continue
            refused += limited
            if not refused:
                break
            refused_ids = {s.id for s in refused}
            in_flight = [f for i, f in finals.items() if i not in refused_ids and not f.done()]
            if not in_flight:
                if len(refused) < len(todo):
                    todo = refused  # what the cap let in has finished already: room again
                    continue
                raise QuotaExceeded(
                    f"the balancer refuses every {name!r} task for the "
                    "queue cap, with none of yours in flight",
                    code="quota",
                )
            # wait for a good part of what is in flight to finish, then try again
            need = max(1, min(len(refused), len(in_flight) // 2))
            await self._wait_some(in_flight, need, deadline=deadline, what=what)
            todo = refused
        pending = [f for f in finals.values() if not f.done()]
        if pending:
            await self._wait_some(
                pending, len(pending), deadline=deadline, what=f"{len(pending)} of {what}"
            )
        out: list[Any] = []
        for i in ids:
            state = finals[i].result()
            self._collect(state)
            try:
                out.append(outcome(state))
            except LbmqttError as exc:
                if not return_exceptions:
                    raise
                out.append(exc)
        return out

    @staticmethod
    async def _wait_some(
        futures: list[asyncio.Future[TaskState]], count: int, *, deadline: float | None, what: str
    ) -> None:
        """Wait until ``count`` of ``futures`` are done, or raise WaitTimeout at ``deadline``."""
        pending = set(futures)
        done_count = 0
        while done_count < count:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(f"{what} did not finish in time")
            done, pending = await asyncio.wait(
                pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            done_count += len(done)

    # ------------------------------------------------------------------ internals

    def _watch_next(self, task_id: str) -> asyncio.Future[TaskState]:
        assert self._loop is not None
        fut: asyncio.Future[TaskState] = self._loop.create_future()
        self._tracked.setdefault(task_id, _Tracked()).next.append(fut)
        return fut

    def _final_future(self, task_id: str) -> asyncio.Future[TaskState]:
        assert self._loop is not None
        tr = self._tracked.setdefault(task_id, _Tracked())
        if tr.final is None:
            tr.final = self._loop.create_future()
            if tr.state is not None and tr.state.status.final:
                tr.final.set_result(tr.state)
        return tr.final

    async def _query(self, task_id: str) -> TaskState:
        fut = self._watch_next(task_id)
        deadline = time.monotonic() + self.ack_timeout_s
        while not fut.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                fut.cancel()
                raise BalancerUnavailable(
                    f"no answer about task {task_id} within "
                    f"{self.ack_timeout_s:g} s: is the balancer running?"
                )
            self._publish_ids(self.topics.query(self.user), [task_id])
            await asyncio.wait([fut], timeout=min(RESEND_S, remaining))
        try:
            return fut.result()
        except UnknownTask:
            self._forget(task_id)
            raise

    def _publish_ids(self, topic: str, ids: list[str]) -> None:
        self._t().publish(topic, IdList(ids=ids).encode(), qos=1)

    @staticmethod
    def _remember(cache: collections.OrderedDict[str, TaskState], state: TaskState) -> None:
        cache[state.id] = state
        cache.move_to_end(state.id)
        while len(cache) > COLLECTED_CACHE:
            cache.popitem(last=False)

    def _forget(self, task_id: str) -> None:
        tr = self._tracked.get(task_id)
        if tr is not None and not tr.next and (tr.final is None or tr.final.done()):
            del self._tracked[task_id]

    def _collect(self, state: TaskState) -> None:
        """A final state reached the caller: remember it a while, tell the balancer."""
        self._tracked.pop(state.id, None)
        self._finished.pop(state.id, None)
        self._remember(self._collected, state)
        self._to_ack.add(state.id)
        if self._ack_timer is None and self._loop is not None:
            self._ack_timer = self._loop.call_later(ACK_FLUSH_S, self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_timer = None
        if not self._to_ack or self._transport is None:
            return
        ids = sorted(self._to_ack)
        self._to_ack.clear()
        for start in range(0, len(ids), 5000):
            self._publish_ids(self.topics.ack(self.user), ids[start : start + 5000])

    def _on_connect(self) -> None:
        # Events may have been missed while disconnected: ask again about what we await.
        waiting = [
            tid for tid, tr in self._tracked.items() if tr.final is not None and not tr.final.done()
        ]
        if waiting and self._transport is not None:
            for start in range(0, len(waiting), 5000):
                self._transport.publish(
                    self.topics.query(self.user),
                    IdList(ids=waiting[start : start + 5000]).encode(),
                    qos=1,
                )

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self.topics.events(self.user):
            try:
                events = decode(Events, payload)
            except LbmqttError as exc:
                self._log_limited(
                    "malformed-events", "ignoring a malformed events message: %s", exc
                )
                return
            for st in events.states:
                tr = self._tracked.get(st.id)
                if tr is None:
                    continue  # another client's task of the same user
                tr.state = st
                for fut in tr.next:
                    if not fut.done():
                        fut.set_result(st)
                tr.next.clear()
                if st.status.final:
                    if tr.final is not None and not tr.final.done():
                        tr.final.set_result(st)
                    elif tr.final is None and not tr.next:
                        # nobody waits for it now: keep it (bounded) for a later get/wait
                        self._tracked.pop(st.id, None)
                        self._remember(self._finished, st)
        elif topic == self.topics.errors(self.user):
            try:
                errors = decode(Errors, payload)
            except LbmqttError as exc:
                self._log_limited("malformed", "ignoring a malformed errors message: %s", exc)
                return
            for e in errors.errors:
                tr = self._tracked.get(e.id) if e.id else None
                if tr is None:
                    self._log_limited(str(e.code), "the balancer says: %s (%s)", e.message, e.code)
                    continue
                for fut in tr.next:
                    if not fut.done():
                        fut.set_exception(error_from_code(e.code, e.message, e.id))
                tr.next.clear()


class Client:
    """Blocking client: the same API as :class:`AsyncClient`, for plain scripts.

    It runs an :class:`AsyncClient` on a private event loop in a background thread.
    Use it as a context manager, or call :meth:`close`.

    Args:
        parameters: settings, a parameters.json path, or None.
        user: the user to submit as (default ``CLIENT_USER``, else ``BROKER_USERNAME``,
            else the login name).
        ack_timeout_s: see :class:`AsyncClient`.

    Raises:
        BrokerUnavailable: the broker is not reachable.
    """

    def __init__(
        self,
        parameters: Settings | str | os.PathLike[str] | None = None,
        *,
        user: str | None = None,
        ack_timeout_s: float | None = None,
    ):
        self._async = AsyncClient(parameters, user=user, ack_timeout_s=ack_timeout_s)
        self.user = self._async.user
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="lbmqtt-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self._call(self._async.start())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def settings(self) -> Settings:
        """The settings in use (with the broker address found, if BROKER_HOST was auto)."""
        return self._async.settings

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise LbmqttError("the client is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            if fut.done():
                raise  # the call's own timeout error (e.g. WaitTimeout), not ours
            fut.cancel()
            raise WaitTimeout(f"no answer within {timeout:g} s") from None
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def submit(
        self,
        name: str,
        args: Any = None,
        *,
        priority: int = 0,
        task_id: str | None = None,
        timeout_s: float | None = None,
        requires: Mapping[str, float] | None = None,
        tags: Iterable[str] | None = None,
    ) -> str:
        """See :meth:`AsyncClient.submit`."""
        return self._call(
            self._async.submit(
                name,
                args,
                priority=priority,
                task_id=task_id,
                timeout_s=timeout_s,
                requires=requires,
                tags=tags,
            )
        )

    def submit_many(
        self, tasks: Iterable[Mapping[str, Any] | TaskSpec], *, batch_size: int = DEFAULT_BATCH
    ) -> list[str]:
        """See :meth:`AsyncClient.submit_many`."""
        return self._call(self._async.submit_many(list(tasks), batch_size=batch_size))

    def get(self, task_id: str) -> TaskState:
        """See :meth:`AsyncClient.get`."""
        return self._call(self._async.get(task_id))

    def wait(self, task_id: str, timeout: float | None = None) -> Any:
        """See :meth:`AsyncClient.wait`."""
        return self._call(self._async.wait(task_id, timeout))

    def wait_state(
        self,
        task_id: str,
        timeout: float | None = None,
        *,
        on_state: Callable[[TaskState], None] | None = None,
    ) -> TaskState:
        """See :meth:`AsyncClient.wait_state` (``on_state`` runs in the client's thread)."""
        return self._call(self._async.wait_state(task_id, timeout, on_state=on_state))

    def cancel(self, task_id: str) -> bool:
        """See :meth:`AsyncClient.cancel`."""
        return self._call(self._async.cancel(task_id))

    def map(
        self,
        name: str,
        iterable: Iterable[Any],
        *,
        priority: int = 0,
        timeout: float | None = None,
        return_exceptions: bool = False,
        batch_size: int = DEFAULT_BATCH,
        requires: Mapping[str, float] | None = None,
        tags: Iterable[str] | None = None,
        progress: bool | Callable[[int, int], None] = False,
    ) -> list[Any]:
        """See :meth:`AsyncClient.map` (a ``progress`` function runs in the client's
        thread)."""
        return self._call(
            self._async.map(
                name,
                list(iterable),
                priority=priority,
                timeout=timeout,
                return_exceptions=return_exceptions,
                batch_size=batch_size,
                requires=requires,
                tags=tags,
                progress=progress,
            )
        )

    def close(self) -> None:
        """Disconnect and stop the background thread."""
        if self._closed:
            return
        try:
            self._call(self._async.close(), timeout=10)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncClient", "Client", "SubmitRefused", "outcome"]
