"""Liveness helpers shared by the components: who is online, by retained status and will.

A component announces itself with a retained status ``{"online": true, "instance": ...}``
and a retained last will ``{"online": false}`` on the same topic, so the retained status of
a name says whether something of that name is alive right now (a crash or a dropped link
turns it to offline at once, a frozen peer after 1.5 x its keep-alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel

from .config import Settings
from .errors import BrokerUnavailable, DecodeError, LoginRefused
from .mqtt import MqttTransport, client_id, tls_context
from .protocol import Topics, decode

log = logging.getLogger(__name__)


S = TypeVar("S", bound=BaseModel)


async def online_status(settings: Settings, topic: str, model: type[S], *, what: str) -> S | None:
    """The retained status on ``topic`` if it says online, else None.

    If the broker cannot be reached yet, logs that the check was skipped (``what`` names
    it) and returns None: daemons start anyway and wait for the broker.

    Raises:
        LoginRefused: the broker refused the login (the daemon cannot start with it).
    """
    try:
        return await read_online(settings, topic, model)
    except LoginRefused:
        raise  # (final: the daemon's own connection would be refused too)
    except BrokerUnavailable:
        log.warning(
            "the broker is not reachable yet: starting anyway (without checking that %s)", what
        )
        return None


async def read_online(settings: Settings, topic: str, model: type[S]) -> S | None:
    """The retained status on ``topic`` if it says online, else None (a missing, garbled or
    offline one: None).

    Raises:
        BrokerUnavailable: the broker is not reachable (LoginRefused: it refused us).
    """
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
    if topic not in retained:
        return None
    try:
        status = decode(model, retained[topic])
    except DecodeError:
        return None
    return status if getattr(status, "online", False) else None


async def read_retained(
    *,
    host: str,
    port: int,
    filters: Sequence[str],
    prefix: str,
    username: str | None = None,
    password: str | None = None,
    tls: ssl.SSLContext | None = None,
    timeout_s: float = 5.0,
) -> dict[str, bytes]:
    """The retained messages on ``filters`` right now, read by a short-lived connection.

    The broker sends the retained messages of a subscription before it handles the next
    packet of the same client, so a probe message published after subscribing comes back
    after all of them: no guessing how long to wait.

    Raises:
        BrokerUnavailable: the broker is not reachable within ``timeout_s``.
    """
    cid = client_id("probe")
    probe = Topics(prefix).probe(cid)  # (the access rules grant every login its own)
    got: dict[str, bytes] = {}
    echoed = asyncio.Event()

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        if topic == probe:
            echoed.set()
        elif retained and payload:
            got[topic] = payload

    t = MqttTransport(
        host=host,
        port=port,
        client_id=cid,
        on_message=on_message,
        username=username,
        password=password,
        tls=tls,
        subscriptions=[*((f, 1) for f in filters), (probe, 1)],
        connect_timeout_s=timeout_s,
    )
    try:
        await t.start(wait=True, timeout_s=timeout_s)
        t.publish(probe, b"", qos=1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(echoed.wait(), timeout_s)
    finally:
        await t.close()
    return got
