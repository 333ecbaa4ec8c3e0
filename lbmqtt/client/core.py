"""The asyncio client: its connection, its public API, the acknowledgements of collected
results and the messages it receives (requests resent until answered are in ``resend``,
what it knows of its tasks in ``tracking``; see the package's docstring)."""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..config import Settings, coerce_settings
from ..discovery import resolve as resolve_broker
from ..errors import ConfigError, LbmqttError, WaitTimeout
from ..mqtt import MqttTransport, client_id, connection_options
from ..protocol import (
    Errors,
    Events,
    Status,
    TaskSpec,
    TaskState,
    Topics,
    decode,
    is_valid_name,
)
from ..protocol.submit import encode_id_lists, validate_specs
from ..protocol.topics import TASK_QOS
from ..ratelog import LogLimiter
from .mapping import run_map
from .resend import DEFAULT_BATCH, cancel_until_final, query, requery_unfinished, submit_specs
from .tracking import TaskBook, Tracked
from .waiting import map_progress, outcome

log = logging.getLogger(__name__)

__all__ = ["AsyncClient", "default_user"]

REQUERY_S = 10.0
ACK_FLUSH_S = 0.05
LOG_EVERY_S = 10.0
"""The client logs the balancer's unsolicited errors at most this often per code (anyone
may publish on a user's topics without logins)."""


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("asking about unfinished tasks after a reconnect failed: %r", exc)


def default_user() -> str:
    """The login name, reduced to a valid lbmqtt user name."""
    try:
        raw = getpass.getuser()
    except (KeyError, OSError):
        raw = "user"
    name = "".join(c if c.isalnum() or c in "_.-" else "_" for c in raw)[:64]
    return name if is_valid_name(name) else "user"


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
        self._book = TaskBook()
        self._log_limited = LogLimiter(log, LOG_EVERY_S).warning
        self._to_ack: set[str] = set()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._requery: asyncio.Task[None] | None = None
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
        self._loop = self._book.loop = asyncio.get_running_loop()
        self._transport = MqttTransport(
            **connection_options(s),
            client_id=client_id("client", self.user),
            on_message=self._on_message,
            subscriptions=self.topics.inbound("user", self.user),
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
        if self._requery is not None:
            self._requery.cancel()
            self._requery = None
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
        cost: float | None = None,
        speculate: bool = True,
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
            cost: its relative work (a size hint): runtime estimates scale with it.
            speculate: False: never run a speculative copy of it (side effects).

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
                    "cost": cost,
                    "speculate": None if speculate else False,
                }
            ]
        )
        return ids[0]

    async def submit_many(
        self, tasks: Iterable[Mapping[str, Any] | TaskSpec], *, batch_size: int = DEFAULT_BATCH
    ) -> list[str]:
        """Submit many tasks in batches (one message per ``batch_size`` tasks).

        Each item is a :class:`TaskSpec` or a mapping with its fields (``name``, ``args``,
        ``priority``, ``id``, ``timeout_s``, ``cost``, ``speculate``...). Returns the ids in
        order once every task is accepted.

        Raises:
            SubmitRefused: (the first) refused task; the accepted ones stay submitted.
            BalancerUnavailable: some task was not acknowledged within ``ack_timeout_s``.
        """
        specs = self._specs(tasks)
        errors = await submit_specs(self, specs, batch_size)
        for err in errors:
            if err is not None:
                raise err
        return [s.id or "" for s in specs]

    def _specs(self, tasks: Iterable[Mapping[str, Any] | TaskSpec]) -> list[TaskSpec]:
        items: list[dict[str, Any]] = []
        for item in tasks:
            data = item.model_dump() if isinstance(item, TaskSpec) else dict(item)
            data["notify"] = "events"
            items.append(data)
        # the ids not given: 128 random bits each (as random as a uuid4), from one read of
        # the system's random source for all (one read each cost a third of this loop)
        missing = [data for data in items if not data.get("id")]
        if missing:
            pool = os.urandom(16 * len(missing)).hex()
            for i, data in enumerate(missing):
                data["id"] = pool[32 * i : 32 * i + 32]
        return validate_specs(items)

    async def get(self, task_id: str) -> TaskState:
        """The current state of a task (status, progress, result, error, node, times).

        A finished state returned here counts as collected: the balancer forgets the task
        ``RESULT_COLLECTED_TTL_S`` later.

        Raises:
            UnknownTask: no such task for this user (or it expired).
            BalancerUnavailable: no answer within ``ack_timeout_s``.
        """
        tr = self._book.tracked.get(task_id)
        if tr is not None and tr.state is not None and self._t().connected:
            state = tr.state
        elif (known := self._book.known_final(task_id)) is not None:
            state = known
        else:
            state = await query(self, task_id)
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
        done = self._book.known_final(task_id)
        tr = self._book.tracked.get(task_id)
        if done is None and (tr is None or tr.state is None):
            answer = await query(self, task_id)
            tr = self._book.tracked.get(task_id)
            if tr is None:  # (a final answer nobody else waits for is filed as finished)
                done = answer
        if done is not None:  # finished before the wait began: its final state is its only one
            if on_state is not None:
                on_state(done)
            self._collect(done)
            return done
        assert tr is not None
        final = self._book.final_future(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        nxt: asyncio.Future[TaskState] | None = None
        seen: asyncio.Future[TaskState] | None = None
        if on_state is not None and tr.state is not None:
            on_state(tr.state)
        # ask the balancer again only every REQUERY_S without news (was an event lost?),
        # never in answer to an answer: a query per state event would loop
        query_at = time.monotonic() + REQUERY_S
        try:
            while not final.done():
                if nxt is not None and nxt.done():
                    if nxt.exception() is not None:
                        raise nxt.exception()  # type: ignore[misc]  # e.g. UnknownTask: expired
                    nxt = None
                if on_state is not None:
                    if seen is not None and seen.done() and seen.exception() is None:
                        on_state(seen.result())
                    if seen is None or seen.done():
                        seen = self._book.watch_next(task_id)
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
                        nxt = self._book.watch_next(task_id)
                        self._publish_ids(self.topics.query(self.user), [task_id])
                wait_for = query_at - now if deadline is None else min(query_at, deadline) - now
                await asyncio.wait(
                    [f for f in (final, nxt, seen) if f is not None and not f.done()] or [final],
                    timeout=max(0.0, wait_for),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:  # (the watches it no longer waits on)
            self._book.drop_watch(task_id, nxt)
            self._book.drop_watch(task_id, seen)
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
        tr = self._book.tracked.setdefault(task_id, Tracked())
        if tr.state is not None and tr.state.status.final:
            return tr.state.status == Status.CANCELLED
        final = self._book.final_future(task_id)
        await cancel_until_final(self, task_id, final)
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
        speculate: bool = True,
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
            speculate: False: never run speculative copies of these tasks.

        Raises:
            TaskFailed, TaskCancelled: the first failed task (unless return_exceptions).
            WaitTimeout: not all finished within ``timeout``.
            SubmitRefused: a task was refused for another reason than the queue cap.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        extra: dict[str, Any] = {
            "requires": dict(requires) if requires else None,
            "tags": list(tags) if tags else None,
            "speculate": None if speculate else False,
        }
        specs = self._specs(
            {"name": name, "args": a, "priority": priority, **extra} for a in iterable
        )
        ids = [s.id or "" for s in specs]
        what = f"{len(ids)} {name!r} tasks" + (f" (timeout {timeout:g} s)" if timeout else "")
        finals = {i: self._book.final_future(i) for i in ids}
        bar = map_progress(progress, len(ids), f"{len(ids)} {name!r} tasks")
        if bar is not None:
            for f in finals.values():
                f.add_done_callback(bar)
        try:
            return await run_map(
                self,
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

    # ------------------------------------------------------------------ internals

    def _publish_ids(self, topic: str, ids: list[str]) -> None:
        t = self._t()
        for payload in encode_id_lists(ids):
            t.publish(topic, payload, qos=TASK_QOS)

    def _collect(self, state: TaskState) -> None:
        """A final state reached the caller: remember it a while, tell the balancer."""
        self._book.collected_now(state)
        self._to_ack.add(state.id)
        if self._ack_timer is None and self._loop is not None:
            self._ack_timer = self._loop.call_later(ACK_FLUSH_S, self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_timer = None
        if not self._to_ack or self._transport is None:
            return
        ids = sorted(self._to_ack)
        self._to_ack.clear()
        self._publish_ids(self.topics.ack(self.user), ids)

    def _on_connect(self) -> None:
        # Events may have been missed while disconnected: ask again about what we await
        # (until answered: see requery_unfinished).
        if self._requery is not None:
            self._requery.cancel()
            self._requery = None
        if self._book.unfinished() and self._transport is not None and self._loop is not None:
            self._requery = self._loop.create_task(requery_unfinished(self))
            self._requery.add_done_callback(_log_failure)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self.topics.events(self.user):
            try:
                events = decode(Events, payload)
            except LbmqttError as exc:
                self._log_limited(
                    "malformed-events", "ignoring a malformed events message: %s", exc
                )
                return
            self._book.on_states(events.states)
        elif topic == self.topics.errors(self.user):
            try:
                errors = decode(Errors, payload)
            except LbmqttError as exc:
                self._log_limited("malformed", "ignoring a malformed errors message: %s", exc)
                return
            for e in errors.errors:
                if not self._book.on_error(e):
                    self._log_limited(str(e.code), "the balancer says: %s (%s)", e.message, e.code)
