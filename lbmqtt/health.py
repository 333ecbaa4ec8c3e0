"""Liveness helpers shared by the components: who is online, by retained status and will.

A component announces itself with a retained status ``{"online": true, "instance": ...}``
and a retained last will ``{"online": false}`` on the same topic, so the retained status of
a name says whether something of that name is alive right now (a crash or a dropped link
turns it to offline at once, a frozen peer after 1.5 x its keep-alive).
"""

from __future__ import annotations

import logging
from typing import TypeVar

from pydantic import BaseModel

from .config import Settings
from .errors import BrokerUnavailable, DecodeError
from .mqtt import read_retained, tls_context
from .protocol import decode

log = logging.getLogger(__name__)


S = TypeVar("S", bound=BaseModel)


async def online_status(settings: Settings, topic: str, model: type[S], *, what: str) -> S | None:
    """The retained status on ``topic`` if it says online, else None.

    If the broker cannot be reached yet, logs that the check was skipped (``what`` names
    it) and returns None: daemons start anyway and wait for the broker.
    """
    try:
        retained = await read_retained(
            host=settings.broker_host,
            port=settings.broker_port,
            filters=[topic],
            prefix=settings.topic_prefix,
            username=settings.broker_username,
            password=settings.password,
            tls=tls_context(settings),
            timeout_s=min(3.0, settings.connect_timeout_s),
        )
    except BrokerUnavailable:
        log.warning(
            "the broker is not reachable yet: starting anyway (without checking that %s)", what
        )
        return None
    if topic not in retained:
        return None
    try:
        status = decode(model, retained[topic])
    except DecodeError:
        return None
    return status if getattr(status, "online", False) else None
