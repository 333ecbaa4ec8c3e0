"""The client's requests the balancer must answer, each sent again at a fixed period until
it does or ``ack_timeout_s`` passes: submits (answered by the task's first state or a
refusal), queries (by the task's state) and cancels (by its final state)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ..backoff import Backoff
from ..errors import BalancerUnavailable, LbmqttError, UnknownTask
from ..mqtt import MqttTransport
from ..protocol import TaskSpec, TaskState
from ..protocol.submit import encode_submit
from ..protocol.topics import TASK_QOS

if TYPE_CHECKING:
    from .core import AsyncClient

__all__ = [
    "DEFAULT_BATCH",
    "RESEND_S",
    "cancel_until_final",
    "query",
    "requery_unfinished",
    "submit_specs",
]

RESEND_S = 2.0
"""How often a request the balancer has not answered yet is sent again."""
DEFAULT_BATCH = 500
"""Tasks in one submit message."""


def _resends() -> Backoff:
    """The period of a resend until answered: fixed (a lost message is sent again, not a
    failure to back off from; the balancer answers a duplicate at no cost)."""
    return Backoff(min_s=RESEND_S, max_s=RESEND_S, jitter=False)


async def submit_specs(
    client: AsyncClient, specs: list[TaskSpec], batch_size: int = DEFAULT_BATCH
) -> list[BaseException | None]:
    """Publish in batches, resend until each is acknowledged; per spec: None (accepted)
    or the refusal."""
    t = client._t()
    acks: list[asyncio.Future[TaskState]] = []
    watch = client._book.watch_next
    for start in range(0, len(specs), batch_size):
        part = specs[start : start + batch_size]
        acks.extend([watch(spec.id or "") for spec in part])
        _publish_submit(client, t, part)
        # each batch on the wire as soon as it is encoded: the balancer starts on the first
        # while the others are encoded (10,000 tasks took ~15 ms to encode and publish,
        # all of it before the first byte went out)
        t.flush()
    await _await_acks(client, specs, acks)
    out: list[BaseException | None] = []
    for spec, f in zip(specs, acks, strict=True):
        exc = f.exception()
        if exc is not None:
            tr = client._book.tracked.get(spec.id or "")
            if tr is not None and tr.state is None and not tr.next and tr.final is None:
                del client._book.tracked[spec.id or ""]
        out.append(exc)
    return out


def _publish_submit(client: AsyncClient, t: MqttTransport, specs: list[TaskSpec]) -> None:
    t.publish(client.topics.submit(client.user), encode_submit(specs), qos=TASK_QOS)


async def _await_acks(
    client: AsyncClient, specs: list[TaskSpec], acks: list[asyncio.Future[TaskState]]
) -> None:
    deadline = time.monotonic() + client.ack_timeout_s
    resend = _resends()
    while True:
        pending = [f for f in acks if not f.done()]
        if not pending:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for f in pending:
                f.cancel()
            for spec in specs:
                tr = client._book.tracked.get(spec.id or "")
                if tr is not None:
                    tr.next = [f for f in tr.next if not f.done()]
                    client._book.forget(spec.id or "")
            raise BalancerUnavailable(
                f"{len(pending)} of {len(specs)} submits not acknowledged within "
                f"{client.ack_timeout_s:g} s: is `lbmqtt balancer` (or `lbmqtt up`) running "
                f"on prefix {client.topics.prefix!r}?"
            )
        await asyncio.wait(pending, timeout=min(resend.next(), remaining))
        unacked = [s for s, f in zip(specs, acks, strict=True) if not f.done()]
        if unacked and time.monotonic() < deadline:
            for start in range(0, len(unacked), DEFAULT_BATCH):
                _publish_submit(client, client._t(), unacked[start : start + DEFAULT_BATCH])


async def query(client: AsyncClient, task_id: str) -> TaskState:
    """Ask the balancer about a task until it answers (its state, or UnknownTask)."""
    fut = client._book.watch_next(task_id)
    deadline = time.monotonic() + client.ack_timeout_s
    resend = _resends()
    topic = client.topics.query(client.user)
    more = client._book.ask_ahead(task_id)  # (others let go unread, asked about with it)
    if more:
        client._publish_ids(topic, more)  # (their own message: an error about them is theirs)
    while not fut.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            fut.cancel()
            raise BalancerUnavailable(
                f"no answer about task {task_id} within "
                f"{client.ack_timeout_s:g} s: is the balancer running?"
            )
        if more is not None:  # (None: asked about already, its answer on the way)
            client._publish_ids(topic, [task_id])
        more = []
        await asyncio.wait([fut], timeout=min(resend.next(), remaining))
    try:
        return fut.result()
    except UnknownTask:
        client._book.forget(task_id)
        client._book.undrop(task_id)
        raise


async def requery_unfinished(client: AsyncClient) -> None:
    """After a reconnect: ask about every task the balancer acknowledged and we have not
    seen finish (:meth:`TaskBook.unfinished`), once the subscriptions are back, and again
    every RESEND_S about those it has not answered, for up to ``ack_timeout_s``.

    Their final states may have been sent while we were away (a later wait would only ask
    after ``REQUERY_S``); and one query is not enough: the balancer may be reconnecting too
    (after a broker restart), and a broker may take a subscription in after a publish sent
    behind it (amqtt does), so the answer to a query sent at once can be lost. Without
    this, each waiter learned its result only at its next ``REQUERY_S`` (10 s), one after
    another (a test's stream of 100 tasks took a minute more).
    """
    t = client._t()
    try:
        await t.wait_ready(client.ack_timeout_s)
    except LbmqttError:
        return  # not back: the next connect asks
    book = client._book
    asked = {tid: book.watch_next(tid) for tid in book.unfinished()}
    open_ = dict(asked)
    deadline = time.monotonic() + client.ack_timeout_s
    resend = _resends()
    try:
        while open_ and t.connected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            client._publish_ids(client.topics.query(client.user), list(open_))
            await asyncio.wait(open_.values(), timeout=min(resend.next(), remaining))
            open_ = {tid: f for tid, f in open_.items() if not f.done()}
    finally:
        for tid, f in asked.items():
            book.drop_watch(tid, f)
            if f.done() and not f.cancelled() and isinstance(f.exception(), UnknownTask):
                book.forget(tid)  # (unless somebody waits: their own query will raise it)


async def cancel_until_final(
    client: AsyncClient, task_id: str, final: asyncio.Future[TaskState]
) -> None:
    """Send a cancel of ``task_id`` until its final state arrives."""
    deadline = time.monotonic() + client.ack_timeout_s
    resend = _resends()
    book = client._book
    nxt: asyncio.Future[TaskState] | None = None
    try:
        while not final.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BalancerUnavailable(
                    f"cancel of {task_id} not acknowledged within {client.ack_timeout_s:g} s"
                )
            book.drop_watch(task_id, nxt)
            nxt = book.watch_next(task_id)
            client._publish_ids(client.topics.cancel(client.user), [task_id])
            # the answer is the task's final state; any other state (progress) means the
            # cancel is still on its way, so wait for the final one until the resend
            resend_at = time.monotonic() + min(resend.next(), remaining)
            while not final.done() and time.monotonic() < resend_at:
                await asyncio.wait(
                    [final, nxt],
                    timeout=resend_at - time.monotonic(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if nxt.done():
                    if nxt.exception() is not None:
                        book.forget(task_id)
                        raise nxt.exception()  # type: ignore[misc]
                    nxt = book.watch_next(task_id)
    finally:
        book.drop_watch(task_id, nxt)
