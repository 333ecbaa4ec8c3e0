"""The broker process (``lbmqtt broker``, ``python -m lbmqtt broker``): :func:`serve` runs
the embedded broker until a signal, and :func:`quiet_amqtt_logs` keeps amqtt's logging in
bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal

from ..config import Settings
from ..ratelog import ForeignLogFilter
from .embedded import embedded_broker
from .listeners import AMQTT_VERSION, bound_urls

log = logging.getLogger(__name__)


def quiet_amqtt_logs(level: int) -> None:
    """amqtt logs every connection at INFO; keep it at WARNING unless debugging, and let
    through at most one line per kind every 10 s (it logs one per refused or broken
    connection, so a client could flood the log)."""
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(
            logging.DEBUG if level <= logging.DEBUG else logging.WARNING
        )
    if level > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, ForeignLogFilter) for f in handler.filters):
                handler.addFilter(ForeignLogFilter())


async def serve(
    settings: Settings, *, ready_fd: int | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run the embedded broker until SIGINT/SIGTERM (or ``stop`` is set).

    Prints ``lbmqtt broker: listening on HOST:PORT`` and, with ``ready_fd``, writes one
    JSON line ``{"host": ..., "port": ..., "tls_port": ..., "listeners": [URL, ...]}`` to
    that file descriptor once listening (``listeners``: what each listener is bound to,
    ``mqtt://HOST:PORT`` and ``mqtts://HOST:PORT``).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    broker = embedded_broker(settings)
    host = broker.host
    amqtt_log = logging.getLogger("amqtt.broker")
    level = amqtt_log.level
    amqtt_log.setLevel(logging.CRITICAL)  # it logs a traceback; we say it in one line
    try:
        await broker.start()
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise OSError(
            f"cannot listen on {host}:{settings.broker_port} ({cause}): is another broker "
            f"or `lbmqtt up` running there? --broker-port 0 picks a free port"
        ) from exc
    finally:
        amqtt_log.setLevel(level)
    print(f"lbmqtt broker: listening on {host}:{broker.port} ({AMQTT_VERSION})", flush=True)
    if broker.tls is not None:
        print(f"lbmqtt broker: TLS on {broker.tls.host}:{broker.tls_port}", flush=True)
    if broker.guard is not None:
        print(
            "lbmqtt broker: logins required"
            + (f" (accounts: {settings.auth_file})" if settings.auth_file else ""),
            flush=True,
        )
    advertiser = None
    if settings.broker_advertise:
        from ..discovery import Advertiser

        advertiser = (
            Advertiser(broker.tls.host, broker.tls_port or 0, settings.topic_prefix)
            if broker.tls is not None
            else Advertiser(host, broker.port, settings.topic_prefix)
        )
        try:
            addresses = await asyncio.to_thread(advertiser.start)
        except Exception as exc:  # no multicast here: the broker serves all the same
            log.warning("could not advertise the broker by mDNS: %s", exc)
            advertiser = None
        else:
            if addresses:
                print(
                    f"lbmqtt broker: advertised by mDNS on {', '.join(addresses)} "
                    f'(BROKER_HOST "auto" finds it)',
                    flush=True,
                )
    if ready_fd is not None:
        with os.fdopen(ready_fd, "w") as f:
            info = {
                "host": host,
                "port": broker.port,
                "tls_port": broker.tls_port,
                "listeners": bound_urls(broker.broker) if broker.broker is not None else [],
            }
            f.write(json.dumps(info) + "\n")
    try:
        await stop.wait()
    finally:
        if advertiser is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(advertiser.close)
        await broker.stop()
        print("lbmqtt broker: stopped", flush=True)
