"""The blocking client: an :class:`~lbmqtt.client.AsyncClient` on a private event loop in
a background thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from ..config import Settings
from ..errors import LbmqttError, WaitTimeout
from ..protocol import TaskSpec, TaskState
from .core import AsyncClient
from .resend import DEFAULT_BATCH

__all__ = ["Client"]

T = TypeVar("T")


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
        cost: float | None = None,
        speculate: bool = True,
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
                cost=cost,
                speculate=speculate,
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
        speculate: bool = True,
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
                speculate=speculate,
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
