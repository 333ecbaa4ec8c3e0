"""The client's ``map`` after its tasks are built: submit them all, send again what the
balancer refused for the queue cap (as earlier ones finish) or for the submit rate (after a
pause that grows while nothing gets through), then gather the results in input order."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..backoff import Backoff
from ..errors import LbmqttError, QuotaExceeded, RateLimited
from ..protocol import TaskSpec, TaskState
from .resend import submit_specs
from .waiting import outcome, wait_some

if TYPE_CHECKING:
    from .core import AsyncClient

__all__ = ["RATE_PAUSE_MAX_S", "RATE_PAUSE_MIN_S", "run_map"]

RATE_PAUSE_MIN_S = 0.05
RATE_PAUSE_MAX_S = 2.0
"""How long `map` pauses before sending again what the balancer refused for SUBMIT_RATE."""


async def run_map(
    client: AsyncClient,
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
    """Submit ``specs`` until all are accepted, wait for ``finals``; results in the order
    of ``ids`` (see :meth:`AsyncClient.map`)."""
    todo = specs
    # over the balancer's SUBMIT_RATE: the rest goes again after a pause that grows while
    # nothing gets through (a first round refused whole waits twice the minimum: attempt 1,
    # as the pause did before it used Backoff)
    rate_pause = Backoff(min_s=RATE_PAUSE_MIN_S, max_s=RATE_PAUSE_MAX_S, jitter=False, attempt=1)
    while todo:
        errors = await submit_specs(client, todo, batch_size)
        refused, limited = [], []
        for spec, err in zip(todo, errors, strict=True):
            if isinstance(err, QuotaExceeded):
                refused.append(spec)
            elif isinstance(err, RateLimited):
                limited.append(spec)
            elif err is not None:
                raise err
        if limited and not refused:
            if len(limited) < len(todo):
                rate_pause.reset()  # some got through: the shortest pause again
            await asyncio.sleep(rate_pause.next())
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
        await wait_some(in_flight, need, deadline=deadline, what=what)
        todo = refused
    pending = [f for f in finals.values() if not f.done()]
    if pending:
        await wait_some(pending, len(pending), deadline=deadline, what=f"{len(pending)} of {what}")
    out: list[Any] = []
    for i in ids:
        state = finals[i].result()
        client._collect(state)
        try:
            out.append(outcome(state))
        except LbmqttError as exc:
            if not return_exceptions:
                raise
            out.append(exc)
    return out
