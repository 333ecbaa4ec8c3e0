"""Logins and access rules of the embedded broker, with accounts (an
:class:`~lbmqtt.access.AccessGuard`); without one, amqtt's anonymous plugin decides.

``takeover`` (part of the guard, not optional)
    amqtt handles a CONNECT before it checks the login: a CONNECT with someone else's
    client id deletes (clean session) or rewrites (persistent session) that client's
    session, and a connected client is taken over even when the login then fails. We
    check the login first and refuse a client id held by another login (no upstream issue
    found).

Password hashes are checked in two threads of the broker's own (NOTES.md: verifying one
blocks the event loop ~150 ms); a login may hold at most :data:`MAX_SUBSCRIPTIONS`
subscriptions; every PUBLISH, SUBSCRIBE and retained message is checked against the
login's role (amqtt's ACL plugin drops a denied PUBLISH silently, as this does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from typing import Any, Literal

from amqtt.broker import Action, Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    SERVER_UNAVAILABLE,
    ConnackPacket,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from ..access import AccessGuard, Role
from ..ratelog import LogLimiter
from .streams import LimitedReader

log = logging.getLogger(__name__)

DENIED_LOG_INTERVAL_S = 10.0
HASH_THREADS = 2
"""Threads checking password hashes: a flood of logins costs the broker two cores, not all;
logins seen to succeed since the accounts file changed are not hashed again."""
HASH_QUEUE_MAX = 64
"""Logins waiting for a hash check, at most; more are refused (server unavailable) at
once, and their clients retry."""
MAX_SUBSCRIPTIONS = 100
"""Subscriptions one client (other than the balancer) may hold, with accounts."""


class GuardedBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker checking logins and topic rights against ``guard`` (None: amqtt's
    own anonymous access, no rules); the base of :class:`~lbmqtt.broker.PatchedBroker`.

    Args:
        config: amqtt's configuration (see :func:`~lbmqtt.broker.broker_config`).
        guard: accounts and topic rules; None: anonymous, no rules.
        max_packet_bytes: largest packet the balancer (without a guard: anyone) may send.
        client_max_packet_bytes: largest packet any other login may send.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        guard: AccessGuard | None = None,
        max_packet_bytes: int = 256 * 2**20,
        client_max_packet_bytes: int | None = None,
    ):
        super().__init__(config)
        self.guard = guard
        self.max_packet_bytes = max_packet_bytes
        """Largest packet the balancer (or, without accounts, anyone) may send."""
        self.client_max_packet_bytes = client_max_packet_bytes or max_packet_bytes
        """Largest packet any other login may send (and anyone before logging in)."""
        self.refused_logins = 0
        self.denied = 0
        self.revoked = 0
        self._denied_log = LogLimiter(log, DENIED_LOG_INTERVAL_S)
        self._hash_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=HASH_THREADS, thread_name_prefix="lbmqtt-login"
        )
        self._hashes_waiting = 0
        self._claims: dict[str, tuple[str, object]] = {}
        self._held: dict[str, set[str]] = {}

    # -- takeover: the login is checked before any session is touched -----------------

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Session]:
        if self.guard is None:
            result: tuple[Any, Session] = await super()._initialize_client_session(
                reader, writer, remote_address, remote_port
            )
            return result
        return await self._login(reader, writer, remote_address, remote_port)

    async def _login(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Session]:
        """amqtt's session set-up, with the login checked before any session is touched."""
        assert self.guard is not None
        try:
            handler, fresh = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except (MQTTError, NoDataError) as exc:
            raise AMQTTError(f"invalid CONNECT from {remote_address}:{remote_port}: {exc}") from exc
        if isinstance(reader, LimitedReader):
            reader.connect_deadline = None  # (the hashing below has no deadline)
        login = fresh.username
        role = self.guard.quick_check(login, fresh.password)
        why, code = "", 0
        if role is False:  # hashing takes ~90 ms: in the broker's own two threads
            assert login is not None and fresh.password is not None
            if self._hashes_waiting >= HASH_QUEUE_MAX:
                why, code = "too many logins being checked: try again", SERVER_UNAVAILABLE
                role = None
            else:
                self._hashes_waiting += 1
                try:
                    role = await asyncio.get_running_loop().run_in_executor(
                        self._hash_pool, self.guard.slow_check, login, fresh.password
                    )
                finally:
                    self._hashes_waiting -= 1
        if not code and not role:
            why, code = "unknown login or wrong password", BAD_USERNAME_PASSWORD
        elif role and not code:
            held = self._sessions.get(fresh.client_id)
            claim = self._claims.get(fresh.client_id)
            if (held is not None and held[0].username != login) or (
                claim is not None and claim[0] != login
            ):
                why, code = ("its client id belongs to another login", IDENTIFIER_REJECTED)
            elif fresh.will_flag and not self.guard.may(
                role, "publish", fresh.will_topic or "", login, fresh.client_id
            ):
                why, code = "may not publish its will there", NOT_AUTHORIZED
        if code:
            self.refused_logins += 1
            # (keyed by address, names cut short: both are the client's to choose)
            self._log_denied(
                f"login from {remote_address}",
                f"login {str(login)[:64]!r} from {remote_address} refused: {why}",
            )
            with contextlib.suppress(Exception):
                await ConnackPacket.build(0, code).to_stream(writer)
                await writer.close()
            raise AMQTTError(f"login {str(login)[:64]!r} refused: {why}")
        assert isinstance(role, str) and login is not None
        # the client id is this login's from here (no await since the check above), until
        # the connection ends: two logins racing for one new id cannot both get it
        claim = (login, object())
        self._claims[fresh.client_id] = claim
        fresh.lbmqtt_claim = claim
        if isinstance(reader, LimitedReader):
            reader.limit = (
                self.max_packet_bytes if role == "balancer" else self.client_max_packet_bytes
            )
            reader.no_qos2 = True
        # amqtt's own session handling from here (Broker._initialize_client_session)
        session = fresh
        account = self.guard.account_key(login)
        if (
            not session.clean_session
            and session.client_id in self._sessions
            and getattr(self._sessions[session.client_id][0], "lbmqtt_account", None) != account
        ):
            # a persistent session kept from before the login's role or password changed:
            # its subscriptions were granted under the old rights
            await self._delete_session(session.client_id)
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            old, _ = self._sessions[session.client_id]
            for attr in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "keep_alive",
                "username",
                "password",
                "lbmqtt_claim",
            ):
                setattr(old, attr, getattr(session, attr))
            session = old
            session.parent = 1
        else:
            session.parent = 0
        session.lbmqtt_role = role
        session.lbmqtt_account = account
        return handler, session

    async def _handle_client_session(  # noqa: PLR0917 (amqtt's signature)
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: Any,
        server: Any,
        listener_name: str,
    ) -> None:
        try:
            await super()._handle_client_session(
                reader, writer, client_session, handler, server, listener_name
            )
        finally:
            claim = getattr(client_session, "lbmqtt_claim", None)
            if claim is not None and self._claims.get(client_session.client_id) is claim:
                del self._claims[client_session.client_id]

    # -- subscriptions (with accounts: bounded) ------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        if self.guard is not None and getattr(session, "lbmqtt_role", None) != "balancer":
            held = self._held.setdefault(session.client_id, set())
            if subscription[0] not in held and len(held) >= MAX_SUBSCRIPTIONS:
                self.denied += 1
                self._log_denied(
                    f"subscriptions {session.username}",
                    f"{session.username!r} ({session.client_id}) holds "
                    f"{MAX_SUBSCRIPTIONS} subscriptions: no more",
                )
                return 0x80
            code: int = await super().add_subscription(subscription, session)
            if code != 0x80:
                held.add(subscription[0])
            return code
        code = await super().add_subscription(subscription, session)
        return code

    async def _handle_unsubscription(
        self, client_session: Session, handler: Any, unsubscribe_waiter: asyncio.Future[Any]
    ) -> None:
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)
        held = self._held.get(client_session.client_id)
        if held is not None:
            for topic in unsubscribe_waiter.result().topics:
                held.discard(topic)

    async def _del_all_subscriptions(self, session: Session) -> None:
        await super()._del_all_subscriptions(session)
        self._held.pop(session.client_id, None)

    # -- access rules (with accounts) -------------------------------------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if self.guard is None:
            ok: bool = await super()._topic_filtering(session, topic, action)
            return ok
        if action == Action.RECEIVE:
            return True  # every granted subscription is within the login's reading rights
        role: Role | None = getattr(session, "lbmqtt_role", None)
        verb: Literal["publish", "subscribe"] = (
            "publish" if action == Action.PUBLISH else "subscribe"
        )
        if role is not None and self.guard.may(
            role, verb, topic, session.username or "", session.client_id or ""
        ):
            return True
        self.denied += 1
        self._log_denied(
            f"denied {session.username}",
            f"{session.username!r} ({session.client_id}) may not {verb} {topic[:200]!r}",
        )
        return False

    def _log_denied(self, key: str, what: str) -> None:
        """Log ``what`` at most once per DENIED_LOG_INTERVAL_S per ``key`` (a kind and
        a login or an address: never free text a client chose)."""
        self._denied_log.warning(key, "%s", what)

    async def _handle_message_delivery(
        self, client_session: Session, handler: Any, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        if self.guard is not None:  # a retained message needs the right to retain
            message = wait_deliver.result()
            packet = getattr(message, "publish_packet", None)
            role = getattr(client_session, "lbmqtt_role", None)
            if (
                message is not None
                and packet is not None
                and packet.retain_flag
                and role is not None
                and not self.guard.may(
                    role,
                    "retain",
                    message.topic,
                    client_session.username or "",
                    client_session.client_id or "",
                )
            ):
                self.denied += 1
                self._log_denied(
                    f"retain {client_session.username}",
                    f"{client_session.username!r} may not retain on "
                    f"{message.topic[:200]!r}: dropped",
                )
                return True
        result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return result

    def close_connection(self, handler: Any) -> None:
        """End a client's connection as if it had dropped (its will fires)."""
        writer = handler.writer
        transport = getattr(getattr(writer, "_writer", None), "transport", None)
        if transport is not None:
            # abort, not close: a frozen peer may never drain our buffer. The reader then
            # sees EOF, the session ends abnormally and the broker publishes the will.
            transport.abort()
        elif writer is not None:
            self._closing = asyncio.ensure_future(writer.close())
