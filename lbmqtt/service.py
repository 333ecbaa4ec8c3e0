"""The lifecycle the long-running components share: supervised loops and ``run()``.

:class:`Loops` runs a component's named background loops under one
:class:`asyncio.TaskGroup`. A loop that raises has its traceback logged, the others are
cancelled and the component's :func:`run` ends with :class:`LoopFailed`: the process exits
non-zero (``lbmqtt balancer`` / ``lbmqtt node`` return status 1), so ``lbmqtt up`` or
systemd starts it again. Nothing dies silently, and :meth:`Loops.stop` does not swallow a
loop's error: a component raises it from its ``stop()`` once it has shut down.

:func:`run` is what ``Balancer.run`` and ``Node.run`` share: signal handlers, start, wait
until ready (then ``on_ready``), wait for ``stop`` (or a dead loop), optionally drain, stop.

A component adopts both with a few lines (the balancer and the node do)::

    class Node:
        def __init__(self, ...):
            self.loops = Loops("node")
            self.ready = asyncio.Event()

        async def start(self) -> None:
            ...
            await self.loops.start({"node-heartbeat": self._heartbeat_loop, ...})

        async def stop(self) -> None:
            await self.loops.stop()        # cancels them, keeps a loop's error
            ...                            # the rest of the shutdown
            self.loops.raise_if_failed()   # last: LoopFailed if a loop died

        async def run(self, stop=None, *, on_ready=None) -> None:
            await service.run(self, stop, on_ready=on_ready, drain=self._drain_on_stop)

        async def _drain_on_stop(self, urgent: asyncio.Event) -> None:
            await self.drain(urgent=urgent)  # ``urgent`` is set by a second signal
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from .errors import LbmqttError, LoginRefused

log = logging.getLogger(__name__)

LoopFn = Callable[[], Coroutine[Any, Any, None]]


def freeze_heap() -> None:
    """Keep what a daemon holds once it is ready out of the cyclic garbage collector's
    full collections (:func:`gc.freeze`); ``lbmqtt balancer`` and ``lbmqtt node`` call it
    when they are ready, ``lbmqtt broker`` before it serves; a program that embeds one keeps
    its own collector settings.

    pydantic-core's validators are traversed by every full collection, and that is what
    makes one slow: ~8-10 ms for the ~35,000 objects ``lbmqtt.client`` imports, against
    ~1.5 ms for as many plain objects. In a throughput run each process met one or two
    such collections (the balancer's took 53 ms, the node's 18-25 ms: NOTES.md), and a
    pipeline stalls while one of its stages does. Frozen objects are still freed when
    their last reference goes (task records too); only cycles among them would stay.
    """
    gc.collect()
    gc.freeze()


class LoopFailed(LbmqttError):
    """A component's background loop raised: the component cannot go on."""


class Loops:
    """Named background loops of one component, under one :class:`asyncio.TaskGroup`.

    Args:
        owner: the component's name, for messages.
    """

    def __init__(self, owner: str):
        self.owner = owner
        self.error: LoopFailed | None = None
        """Set when a loop died (the first one)."""
        self.dead = asyncio.Event()
        """Set when a loop died."""
        self._runner: asyncio.Task[None] | None = None
        self.tasks: dict[str, asyncio.Task[None]] = {}
        """The running loops by name (a loop cancelled alone just ends: fault injection)."""
        self.closing = False
        """Set by the component when it starts to stop: a loop may then return."""
        self._once: frozenset[str] = frozenset()

    async def start(self, loops: Mapping[str, LoopFn], *, once: Iterable[str] = ()) -> None:
        """Start the loops (named by the keys of ``loops``).

        Args:
            loops: name -> the loop's coroutine function.
            once: the names of loops that end by returning (e.g. one that waits until the
                component is ready). Any other loop that returns before :attr:`closing` is
                set has stopped by mistake: it counts as dead.
        """
        self._once = frozenset(once)
        started = asyncio.Event()
        self._runner = asyncio.create_task(
            self._supervise(loops, started), name=f"{self.owner}-loops"
        )
        await started.wait()

    async def _supervise(self, loops: Mapping[str, LoopFn], started: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for name, fn in loops.items():
                    self.tasks[name] = tg.create_task(self._guarded(name, fn), name=name)
                started.set()
        except BaseExceptionGroup:
            pass  # (logged by _guarded; the error is in self.error)
        finally:
            started.set()

    async def _guarded(self, name: str, fn: LoopFn) -> None:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if isinstance(exc, LoginRefused):  # a user's mistake, said in one line (cli)
                log.debug("%s: the %s loop ended: %s", self.owner, name, exc)
            else:
                log.exception("%s: the %s loop died", self.owner, name)
            self._died(f"{self.owner}: the {name} loop died: {exc!r}", exc)
            raise
        if name not in self._once and not self.closing:
            log.error("%s: the %s loop returned: it should run until the end", self.owner, name)
            self._died(f"{self.owner}: the {name} loop returned", None)

    def _died(self, message: str, cause: BaseException | None) -> None:
        if self.error is None:
            self.error = LoopFailed(message)
            self.error.__cause__ = cause
        self.dead.set()

    @property
    def running(self) -> bool:
        return self._runner is not None and not self._runner.done()

    async def stop(self) -> None:
        """Cancel the loops and wait for them. A loop's error is kept (see
        :meth:`raise_if_failed`), not swallowed; a cancellation of the caller is not
        swallowed either."""
        self.closing = True
        runner, self._runner = self._runner, None
        if runner is None:
            return
        runner.cancel()
        await asyncio.wait([runner])

    def raise_if_failed(self) -> None:
        """Raises:
        LoopFailed: a loop died (its exception is the cause)."""
        if self.error is not None:
            raise self.error


class Changes:
    """A component's "my state may have changed", for whoever waits for a condition on it
    (tests, as with dramatiq's ``broker.join()`` or arq's ``burst``): the component calls
    :meth:`notify` after each change, a waiter awaits :meth:`until`. No polling.

    Args:
        owner: the component, for messages (``"balancer"``, ``"node n1"``).
    """

    def __init__(self, owner: str):
        self.owner = owner
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        """The state may have changed: wake every waiter (they check once the caller's
        step is done)."""
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for f in waiters:
                if not f.done():
                    f.set_result(None)

    def next(self) -> asyncio.Future[None]:
        """A future that is done at the next :meth:`notify`."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    async def until(self, check: Callable[[], object], timeout_s: float, what: str) -> None:
        """Return once ``check()`` is true: checked now, then after every notify.

        Raises:
            TimeoutError: it was not true within ``timeout_s`` (the message says ``what``).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not check():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.owner}: timed out after {timeout_s:g} s waiting for {what}"
                )
            fut = self.next()
            await asyncio.wait([fut], timeout=remaining)
            if not fut.done():
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)


class Component(Protocol):
    """What :func:`run` runs: a long-lived part with supervised loops."""

    @property
    def ready(self) -> asyncio.Event: ...

    @property
    def loops(self) -> Loops: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


C = TypeVar("C", bound=Component)


def _on_signals(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, fn)


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def run(
    component: C,
    stop: asyncio.Event | None = None,
    *,
    on_ready: Callable[[C], None] | None = None,
    drain: Callable[[asyncio.Event], Awaitable[None]] | None = None,
) -> None:
    """Run ``component`` until ``stop`` is set or SIGINT/SIGTERM arrives.

    Args:
        component: started, then stopped however this ends.
        stop: set it to stop (None: only a signal stops it).
        on_ready: called once the component is ready (not if it stops before).
        drain: awaited after ``stop``, before the component stops, with an event that a
            second signal sets (stop now).

    Raises:
        LoopFailed: one of the component's loops died (from ``component.stop()``).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    _on_signals(loop, stop.set)
    await component.start()
    dead = component.loops.dead
    try:
        if on_ready is not None:
            await _first(component.ready, stop, dead)
            if component.ready.is_set() and not dead.is_set():
                on_ready(component)
        await _first(stop, dead)
        if drain is not None and not dead.is_set():
            urgent = asyncio.Event()  # a second signal: stop now
            _on_signals(loop, urgent.set)
            await drain(urgent)
    finally:
        await component.stop()
