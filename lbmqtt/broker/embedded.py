"""The embedded broker on the running loop (:class:`EmbeddedBroker`): start and stop, its
bound ports, the accounts it watches and the status it retains; and
:func:`embedded_broker`, the one built from :class:`~lbmqtt.config.Settings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable

from ..access import AccessGuard, check_role
from ..config import Settings, is_loopback, service_accounts
from ..errors import ConfigError
from ..protocol import BrokerStatus, Topics
from .listeners import AMQTT_VERSION, TlsListener, bound_port, broker_config
from .patches import ALL_PATCHES, PatchedBroker

log = logging.getLogger(__name__)

STATUS_EVERY_S = 5.0
"""The broker republishes its status (with its refusal counts) at most this often."""
ACCOUNTS_CHECK_S = 2.0
"""How often the broker looks at the accounts file for removed logins and new roles."""
TOPIC_SLACK_BYTES = 65_536 + 16
"""What a packet may carry beyond its payload: the topic (at most 64 KiB) and headers."""


class EmbeddedBroker:
    """The embedded broker on the running loop, as an async context manager.

    Args:
        host: address to listen on.
        port: TCP port; 0 picks a free one (read it back from :attr:`port`).
        patches: which of :data:`ALL_PATCHES` to apply (all by default).
        prefix: topic prefix under which to retain ``broker/status`` (None: don't).
        guard: accounts and topic rules; None: anonymous, no rules (loopback only).
        tls: a second listener serving TLS (its port: :attr:`tls_port`).
        max_packet_bytes: largest packet from the balancer (without a guard: anyone).
        client_max_packet_bytes: largest packet from any other login.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        patches: Iterable[str] = ALL_PATCHES,
        prefix: str | None = None,
        guard: AccessGuard | None = None,
        tls: TlsListener | None = None,
        max_packet_bytes: int = 256 * 2**20,
        client_max_packet_bytes: int | None = None,
    ):
        self.host = host
        self.requested_port = port
        self.patches = frozenset(patches)
        self.prefix = prefix
        self.guard = guard
        self.tls = tls
        self.max_packet_bytes = max_packet_bytes
        self.client_max_packet_bytes = client_max_packet_bytes
        self.broker: PatchedBroker | None = None
        self.port = 0
        self.tls_port: int | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None

    async def _watch_accounts(self) -> None:
        """Every ACCOUNTS_CHECK_S: if the accounts file changed, end the connections of
        logins that were removed or whose role or password changed (they must log in
        again), and forget their persistent sessions (granted under the old rights)."""
        while True:
            await asyncio.sleep(ACCOUNTS_CHECK_S)
            broker, guard = self.broker, self.guard
            if broker is None or guard is None:
                return
            if not await asyncio.to_thread(guard.refresh):
                continue
            for client_id, (session, handler) in list(broker._sessions.items()):
                was = getattr(session, "lbmqtt_account", None)
                if was is None:
                    continue
                now = guard.account_key(session.username or "")
                if now == was:
                    continue
                what = (
                    "gone"
                    if now is None
                    else (f"a {now[0]}" if now[0] != was[0] else "given a new password")
                )
                broker.revoked += 1
                if session.transitions.state == "connected":
                    log.warning(
                        "login %r is %s now: closing its connection (%s)",
                        session.username,
                        what,
                        client_id,
                    )
                    session.lbmqtt_account = None  # (a resumed session starts afresh)
                    broker.close_connection(handler)
                else:
                    log.warning(
                        "login %r is %s now: forgetting its session %s",
                        session.username,
                        what,
                        client_id,
                    )
                    await broker._delete_session(client_id)

    async def start(self) -> None:
        """Start listening; afterwards :attr:`port` holds the bound port."""
        config = broker_config(
            self.host, self.requested_port, anonymous=self.guard is None, tls=self.tls
        )
        self.broker = PatchedBroker(
            config,
            patches=self.patches,
            guard=self.guard,
            max_packet_bytes=self.max_packet_bytes,
            client_max_packet_bytes=self.client_max_packet_bytes,
        )
        await self.broker.start()
        self.port = bound_port(self.broker)
        if self.guard is not None and self.guard.accounts_file is not None:
            self._watcher = asyncio.create_task(
                self._watch_accounts(), name="lbmqtt-broker-accounts"
            )
        if self.tls is not None:
            self.tls_port = bound_port(self.broker, "tls")
        if self.prefix is not None:
            await self._publish_status()
            self._reporter = asyncio.create_task(
                self._report_refusals(), name="lbmqtt-broker-status"
            )

    def refusals(self) -> dict[str, int]:
        """What the broker refused since it started, by kind (see BrokerStatus)."""
        b = self.broker
        if b is None:
            return {}
        return {
            "logins": b.refused_logins,
            "denied": b.denied,
            "too_large": b.too_large,
            "connect_timeouts": b.connect_timeouts,
            "revoked": b.revoked,
            "offline_dropped": b.offline_dropped,
            "dollar_publishes": b.dropped_dollar_publishes,
        }

    async def _publish_status(self) -> None:
        assert self.broker is not None and self.prefix is not None
        status = BrokerStatus(
            online=True,
            host=self.host,
            port=self.port,
            version=AMQTT_VERSION,
            refused=self.refusals(),
        )
        await self.broker.retain_message(
            None, Topics(self.prefix).broker_status, status.encode(), 1
        )
        # (retain_message stores it; subscribers hear of it at their next subscribe, so
        # tell the ones subscribed now too)
        await self.broker.internal_message_broadcast(
            Topics(self.prefix).broker_status, status.encode(), 1
        )

    async def _report_refusals(self) -> None:
        sent = self.refusals()
        while self.broker is not None:
            await asyncio.sleep(STATUS_EVERY_S)
            now = self.refusals()
            if now != sent:
                sent = now
                await self._publish_status()

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        if self.broker is not None:
            self.broker._hash_pool.shutdown(wait=False, cancel_futures=True)
        for task in (self._watcher, self._reporter):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._reporter = None
        if self.broker is not None:
            await self.broker.shutdown()
            self.broker.abort_all()
            await asyncio.sleep(0)  # (the aborted transports close on the next turn)
            self.broker = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def embedded_broker(settings: Settings) -> EmbeddedBroker:
    """The embedded broker these settings describe, refusing an unsafe one.

    Raises:
        ConfigError: it would listen beyond loopback without accounts (anyone on the LAN
            could then read and cancel every task), or the accounts file is bad.
    """
    extra = {name: (check_role(role), pw) for name, (role, pw) in service_accounts().items()}
    guard = None
    if settings.auth_file or extra:
        guard = AccessGuard(settings.topic_prefix, settings.auth_file, extra=extra)
        for name in extra:
            if guard.in_file(name):
                log.warning(
                    "account %r of the accounts file is taken by a part `lbmqtt up` "
                    "started (its node has that name): that account cannot log in "
                    "while `up` runs",
                    name,
                )
    host = settings.bind_host
    tls = None
    if settings.tls_listener:
        assert settings.broker_tls_cert and settings.broker_tls_key
        for path in (settings.broker_tls_cert, settings.broker_tls_key):
            if not os.path.isfile(path):
                raise ConfigError(f"BROKER_TLS_CERT / BROKER_TLS_KEY: no such file {path}")
        tls = TlsListener(
            settings.tls_bind_host,
            settings.broker_tls_port,
            settings.broker_tls_cert,
            settings.broker_tls_key,
        )
        host = "127.0.0.1"  # plain MQTT only for the parts on this machine
    if guard is None and not (is_loopback(host) and (tls is None or is_loopback(tls.host))):
        where = tls.host if tls is not None else host
        hint = ' (with TLS, which listens on 0.0.0.0 by default: "BROKER_BIND": "127.0.0.1")'
        hint = hint if tls is not None else ""
        raise ConfigError(
            f"refusing to listen on {where} without accounts: anyone on the network could "
            f"then read, submit and cancel every task. Create accounts and point AUTH_FILE "
            f"at them, e.g.\n  lbmqtt user add alice --role user --file accounts\n  lbmqtt "
            f'user add gpu-box --role node --file accounts\nthen set "AUTH_FILE": '
            f'"accounts" in parameters.json (or LBMQTT_AUTH_FILE=accounts); or listen on '
            f'127.0.0.1 only{hint} (see README, "Running on a shared LAN")'
        )
    return EmbeddedBroker(
        host,
        settings.broker_port,
        prefix=settings.topic_prefix,
        guard=guard,
        tls=tls,
        max_packet_bytes=settings.broker_max_packet_bytes,
        client_max_packet_bytes=settings.max_payload_bytes + TOPIC_SLACK_BYTES,
    )
