"""The Python client helper: submit, get, wait, cancel, map (sync and async).

It speaks the same documented topics as any MQTT client. It submits with
``notify: "events"``: task states come batched on ``users/{u}/events`` rather than one
retained message per task. Every request is acknowledged by the balancer and resent until
it is (submits carry a client-chosen id, so a resend never runs a task twice); after a
reconnect the client asks again about every task it still waits for.

Modules: ``core`` (:class:`AsyncClient`: the connection, requests resent until
acknowledged, task states tracked from the events), ``mapping`` (``map``: resubmits of
what the queue cap or the submit rate refused), ``waiting`` (:func:`outcome`, waiting for
some of many tasks, a map's progress), ``sync`` (:class:`Client`, the blocking client on a
loop thread). The messages themselves are encoded in :mod:`lbmqtt.protocol.submit`.

Example::

    from lbmqtt import Client

    with Client(user="alice") as client:
        task_id = client.submit("HELLO", {"firstName": "John", "lastName": "Doe"})
        print(client.wait(task_id, timeout=30))        # Hello John Doe !
        print(client.map("HELLO", [{"firstName": "A", "lastName": str(i)} for i in range(3)]))
"""

from __future__ import annotations

from ..errors import SubmitRefused
from .core import ACK_FLUSH_S as ACK_FLUSH_S
from .core import LOG_EVERY_S as LOG_EVERY_S
from .core import REQUERY_S as REQUERY_S
from .core import AsyncClient
from .core import default_user as default_user
from .mapping import RATE_PAUSE_MAX_S as RATE_PAUSE_MAX_S
from .mapping import RATE_PAUSE_MIN_S as RATE_PAUSE_MIN_S
from .resend import DEFAULT_BATCH as DEFAULT_BATCH
from .resend import RESEND_S as RESEND_S
from .sync import Client
from .tracking import COLLECTED_CACHE as COLLECTED_CACHE
from .waiting import outcome

__all__ = ["AsyncClient", "Client", "SubmitRefused", "outcome"]
