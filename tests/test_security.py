"""Logins and topic rules, on the embedded broker and on Mosquitto with the generated files.

Each broker gets one accounts file (users alice and bob, nodes n1 and n2, a monitor, the
balancer), a real balancer and node ``n1`` logged in as themselves, and real clients. A
forbidden publish is shown not to pass the broker by a watcher with the balancer's rights
subscribed to the whole prefix: the offender then publishes something it may, on the
same connection; once that arrives, anything before it would have arrived too.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from lbmqtt import access
from lbmqtt.access import AccessGuard, Account
from lbmqtt.broker import embedded_broker
from lbmqtt.client import Client
from lbmqtt.errors import BrokerUnavailable, UnknownTask
from lbmqtt.protocol import Status

from .cluster import Mosquitto, self_signed_cert, start_mosquitto
from .conftest import (
    PASSWORDS,
    TEST_TASKS,
    BrokerThread,
    System,
    finish,
    lbmqtt_cmd,
    make_settings,
    run_cli,
    start_up,
    stop_paho,
    wait_until,
    write_accounts,
)


@dataclass
class Secure:
    kind: str
    port: int
    prefix: str
    system: System
    stop: Any
    made: list[Login] = field(default_factory=list)

    def settings(self, login: str, **extra: Any) -> Any:
        return make_settings(
            self.port,
            self.prefix,
            BROKER_USERNAME=login,
            BROKER_PASSWORD=PASSWORDS[login],
            NODE_TASKS=[TEST_TASKS],
            **extra,
        )

    def login(self, user: str | None, password: str | None = None, **kw: Any) -> Login:
        c = Login(
            self.port, user, PASSWORDS.get(user or "") if password is None else password, **kw
        )
        self.made.append(c)
        return c

    def t(self, rest: str) -> str:
        return f"{self.prefix}/{rest}"


class Login:
    """A foreign MQTT client with a login: records its CONNACK and what it receives."""

    def __init__(
        self,
        port: int,
        user: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
        clean_session: bool = True,
    ):
        self.client_id = client_id or f"raw-{uuid.uuid4().hex[:8]}"
        self.c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
            clean_session=clean_session,
        )
        if user is not None:
            self.c.username_pw_set(user, password)
        if will is not None:
            self.c.will_set(will[0], will[1], qos=1)
        self.connack: list[Any] = []
        self.closed = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: dict[int, list[Any]] = {}
        self.lock = threading.Lock()
        self.c.on_connect = lambda c, u, f, rc, p: self.connack.append(rc)
        self.c.on_disconnect = lambda c, u, f, rc, p: self.closed.set()
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.__setitem__(mid, rcs)
        self.port = port

    def _on_message(self, c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload))

    def connect(self) -> bool:
        """True if the broker accepted the login."""
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        self.c.loop_start()
        wait_until(lambda: self.connack or self.closed.is_set(), 10, "a CONNACK")
        return bool(self.connack) and not self.connack[0].is_failure

    def subscribe(self, topic: str) -> bool:
        """True if granted."""
        _, mid = self.c.subscribe(topic, 1)
        wait_until(lambda: mid in self.subacks, 5, f"SUBACK for {topic}")
        return not self.subacks[mid][0].is_failure

    def publish(self, topic: str, payload: bytes | str = b"{}") -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def topics(self) -> set[str]:
        with self.lock:
            return {t for t, _ in self.messages}

    def got(self, topic: str) -> bool:
        return topic in self.topics()

    def close(self) -> None:
        stop_paho(self.c)


def logged_in(port: int, name: str, **kw: Any) -> Login:
    """One of the test accounts, connected (asserted)."""
    c = Login(port, name, PASSWORDS[name], **kw)
    assert c.connect(), f"{name} could not log in"
    return c


def mosquitto_lines(accounts: Path, prefix: str) -> str:
    """What ``lbmqtt user mosquitto --plugin`` prints for mosquitto.conf, verbatim: it
    writes the ACL next to the accounts file and builds lbmqtt's plugin there."""
    if not all(os.path.exists(f"/usr/include/{h}") for h in ("mosquitto_broker.h", "mosquitto.h")):
        pytest.skip(
            "needs the Debian packages gcc, mosquitto-dev and libmosquitto-dev (.ci/run "
            "installs them)"
        )
    r = run_cli(
        "user", "mosquitto", "--file", str(accounts), "--plugin",
        env={"LBMQTT_TOPIC_PREFIX": prefix},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("in mosquitto.conf:\n", 1)[1]
    assert f"plugin {accounts.parent / 'lbmqtt_mosquitto.so'}" in lines
    return lines


def secured_mosquitto(workdir: Path, accounts: Path, prefix: str) -> Mosquitto:
    """Mosquitto with the generated password and ACL files and lbmqtt's plugin, as
    broker/mosquitto.conf has them (on a loopback port)."""
    lines = mosquitto_lines(accounts, prefix)
    return start_mosquitto(
        workdir,
        lambda port: (
            f"listener {port} 127.0.0.1\n{lines}persistence false\n"
            "max_queued_messages 100000\nset_tcp_nodelay true\n"
        ),
    )


@pytest.fixture(scope="module", params=["embedded", "mosquitto"])
def secure(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secure]:
    workdir = tmp_path_factory.mktemp(f"secure-{request.param}")
    accounts = workdir / "accounts"
    write_accounts(accounts)
    prefix = f"sec/{uuid.uuid4().hex[:8]}"
    if request.param == "embedded":
        bt = BrokerThread(guard=AccessGuard(prefix, accounts))
        port, stop = bt.port, bt.stop
    else:
        m = secured_mosquitto(workdir, accounts, prefix)
        port, stop = m.port, m.stop
    sec = Secure(request.param, port, prefix, System(make_settings(port, prefix)), stop)
    sec.system.start_balancer(sec.settings("lb"))
    sec.system.start_node("n1", sec.settings("n1"))
    yield sec
    for c in sec.made:
        c.close()
    sec.system.close()
    stop()


@pytest.fixture
def watcher(secure: Secure) -> Login:
    """Sees every message under the prefix that passes the broker (the balancer's rights,
    its own client id)."""
    w = secure.login("lb")
    assert w.connect()
    assert w.subscribe(secure.t("#"))
    return w


def probe(c: Login, secure: Secure) -> None:
    """Publish on the client's own probe topic and wait for it to come back: the broker
    has handled (and delivered) everything this client caused before."""
    topic = secure.t(f"probe/{c.client_id}")
    if topic not in c.topics():
        assert c.subscribe(topic)
    with c.lock:
        c.messages = [m for m in c.messages if m[0] != topic]
    c.publish(topic, b"probe")
    wait_until(lambda: c.got(topic), 10, "the probe to come back")


# ----------------------------------------------------------------------------- logins


def test_anonymous_wrong_password_and_unknown_logins_are_refused(secure: Secure) -> None:
    assert not secure.login(None).connect()
    assert not secure.login("alice", "not-her-password").connect()
    assert not secure.login("mallory", "pw-alice").connect()
    assert not secure.login("alice", "").connect()
    assert secure.login("alice").connect()  # (and the right password is let in)


def break_connection(c: Login) -> None:
    """Send a reserved packet type: the broker must close the connection as a protocol
    error and publish the will (if it may) before it reads anything else."""
    sock = c.c.socket()
    assert sock is not None
    sock.send(b"\xf0\x00")
    assert c.closed.wait(10), "the broker kept a connection that sent a reserved packet"


def test_a_will_outside_the_logins_rights_is_never_published(
    secure: Secure, watcher: Login
) -> None:
    own = secure.t("users/alice/ack")
    ok = secure.login("alice", will=(own, b'{"v": 1, "ids": []}'))
    assert ok.connect()
    break_connection(ok)
    wait_until(lambda: watcher.got(own), 10, "alice's own will")  # (the control)

    forged = secure.t("users/bob/submit")
    c = secure.login("alice", will=(forged, b'{"v": 1, "name": "ECHO"}'))
    if c.connect():  # Mosquitto takes the CONNECT and must drop the will when it fires
        assert secure.kind == "mosquitto", "the embedded broker refuses it at CONNECT"
        break_connection(c)
    probe(watcher, secure)
    assert not watcher.got(forged)


def test_a_client_id_cannot_be_taken_from_another_login(secure: Secure, watcher: Login) -> None:
    # (Mosquitto alone hands a connection over to whoever presents its client id: lbmqtt's
    # plugin refuses another login's, as the embedded broker does)
    b = secure.system.balancer
    assert b is not None and b._transport is not None
    victim = b._transport.client_id
    connects = b._transport.connects
    assert not secure.login("alice", client_id=victim).connect()
    assert not secure.login("alice", "wrong", client_id=victim).connect()
    assert b._transport.connected
    assert b._transport.connects == connects  # never thrown out
    assert secure.system.stats().nodes  # the balancer still talks to its node
    # the same login may take its own id over (a reconnect after a half-open connection)
    mine = secure.login("alice")
    assert mine.connect()
    again = secure.login("alice", client_id=mine.client_id)
    assert again.connect()
    assert mine.closed.wait(10), "the older connection of the same id was kept"
    # once both are gone, the id is free again (clean sessions)
    again.close()
    mine.close()
    wait_until(
        lambda: secure.login("bob", client_id=mine.client_id).connect(),
        10,
        "a released client id to be free",
    )


# ----------------------------------------------------------------------------- users


def test_a_user_reads_and_cancels_only_their_own_tasks(
    secure: Secure, watcher: Login, tmp_path: Path
) -> None:
    with (
        Client(secure.settings("bob"), user="bob") as bob,
        Client(secure.settings("alice"), user="alice") as alice,
    ):
        assert bob.wait(bob.submit("ECHO", {"x": 1}), timeout=30)["args"] == {"x": 1}
        assert alice.wait(alice.submit("ECHO", 2), timeout=30)["args"] == 2
        long_id = bob.submit("BLOCK", {"gate": str(tmp_path / "never"), "limit_s": 60})
        wait_until(lambda: bob.get(long_id).status == Status.RUNNING, 20, "bob's task to run")

        spy = secure.login("alice")
        assert spy.connect()
        for f in (
            "users/bob/#",
            "users/+/tasks/+",
            "users/+/results/+",
            "#",
            "users/bob/tasks/" + long_id,
            "nodes/n1/assign",
            "balancer/history",
        ):
            assert not spy.subscribe(secure.t(f)), f  # refused in the SUBACK
        assert not spy.subscribe("#")
        assert spy.subscribe(secure.t("users/alice/#"))
        # forged: a submit and a cancel in bob's name, published by alice
        forged = f"forged-{uuid.uuid4().hex[:6]}"
        forged_submit = f'{{"v": 1, "name": "ECHO", "args": 1, "id": "{forged}"}}'.encode()
        forged_cancel = f'{{"v": 1, "ids": ["{long_id}"], "by": "alice"}}'.encode()
        spy.publish(secure.t("users/bob/submit"), forged_submit)
        spy.publish(secure.t("users/bob/cancel"), forged_cancel)
        # (the control: her own query is answered on her own topics)
        spy.publish(secure.t("users/alice/query"), b'{"v": 1, "ids": ["no-such-task"]}')
        wait_until(
            lambda: any(
                t.startswith(secure.t("users/alice/")) and not t.endswith("query")
                for t in spy.topics()
            ),
            10,
            "the answer to alice's query",
        )
        probe(spy, secure)
        assert not any(t.startswith(secure.t("users/bob/")) for t in spy.topics())
        assert (secure.t("users/bob/submit"), forged_submit) not in watcher.messages
        assert (secure.t("users/bob/cancel"), forged_cancel) not in watcher.messages
        # in her own name, bob's task id is not hers: the balancer says so
        with pytest.raises(UnknownTask):
            alice.cancel(long_id)
        assert secure.system.record(forged) is None
        assert bob.get(long_id).status == Status.RUNNING
        # ...and bob's own cancel works
        assert bob.cancel(long_id)
        # bob's states keep flowing to bob only
        assert bob.wait(bob.submit("ECHO", 3), timeout=30)["args"] == 3
        probe(spy, secure)
        assert not any(t.startswith(secure.t("users/bob/")) for t in spy.topics())


# ----------------------------------------------------------------------------- nodes


def test_a_node_reads_only_its_own_assignments_and_cannot_act_as_a_user(
    secure: Secure, watcher: Login, tmp_path: Path
) -> None:
    with Client(secure.settings("bob"), user="bob") as bob:
        long_id = bob.submit("BLOCK", {"gate": str(tmp_path / "never"), "limit_s": 60})
        wait_until(lambda: bob.get(long_id).status == Status.RUNNING, 20, "bob's task to run")
        assert watcher.got(secure.t("nodes/n1/assign"))  # n1 has a retained assignment

        n2 = secure.login("n2")
        assert n2.connect()
        for f in ("nodes/n1/assign", "nodes/+/assign", "nodes/#", "users/bob/#"):
            assert not n2.subscribe(secure.t(f)), f
        assert n2.subscribe(secure.t("nodes/n2/assign"))
        forged = f"forged-{uuid.uuid4().hex[:6]}"
        forged_msgs = {
            "users/alice/submit": f'{{"v": 1, "name": "ECHO", "id": "{forged}"}}'.encode(),
            "nodes/n1/status": b'{"v": 1, "node": "n1", "online": false, "forged": 1}',
            "nodes/n1/reports": b'{"v": 1, "forged": 1}',
            "nodes/n1/assign": b'{"v": 1, "forged": 1}',
        }
        for t, p in forged_msgs.items():
            n2.publish(secure.t(t), p)
        marker = secure.t("nodes/n2/heartbeat")
        n2.publish(marker, b"{}")
        wait_until(lambda: watcher.got(marker), 10, "n2's own heartbeat")
        probe(n2, secure)
        assert not any(
            t.startswith(secure.t("nodes/n1/")) or t.startswith(secure.t("users/"))
            for t in n2.topics()
        )
        for t, p in forged_msgs.items():
            assert (secure.t(t), p) not in watcher.messages, t
        assert secure.system.record(forged) is None
        assert bob.get(long_id).status == Status.RUNNING
        assert "n1" in {n.name for n in secure.system.stats().nodes if n.online}
        assert bob.cancel(long_id)


# ----------------------------------------------------------------------------- monitors


def test_a_monitor_reads_stats_and_publishes_nothing_but_its_presence(
    secure: Secure, watcher: Login
) -> None:
    mon = secure.login("mon")
    assert mon.connect()
    assert mon.subscribe(secure.t("balancer/stats"))
    wait_until(lambda: mon.got(secure.t("balancer/stats")), 10, "the balancer's stats")
    assert not mon.subscribe(secure.t("users/alice/#"))
    forbidden = [
        "users/alice/submit",
        "users/alice/cancel",
        "users/alice/ack",
        "nodes/n1/status",
        "nodes/n1/assign",
        "nodes/n1/reports",
        "balancer/status",
        "balancer/stats",
        "balancer/history",
        "broker/status",
    ]
    for t in forbidden:
        mon.publish(secure.t(t), b'{"v": 1, "ids": []}')
    marker = secure.t("dashboard/status")
    mon.publish(marker, b'{"v": 1, "online": false}')
    wait_until(lambda: watcher.got(marker), 10, "the monitor's presence")
    for t in forbidden:
        assert all(
            p != b'{"v": 1, "ids": []}' for tt, p in watcher.messages if tt == secure.t(t)
        ), t


def test_mosquitto_and_its_plugin_follow_the_accounts_after_a_sighup(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts"
    write_accounts(accounts)
    prefix = f"sec/{uuid.uuid4().hex[:8]}"
    m = secured_mosquitto(tmp_path, accounts, prefix)
    port, stop, proc = m.port, m.stop, m.proc
    made: list[Login] = []
    try:
        r = subprocess.run(
            lbmqtt_cmd("user", "add", "carol", "--role", "user", "--file", str(accounts),
                       "--password-stdin"),
            input="pw-carol\n", capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "LBMQTT_TOPIC_PREFIX": prefix},
        )  # fmt: skip
        assert r.returncode == 0 and "updated" in r.stdout, r.stdout + r.stderr
        proc.send_signal(signal.SIGHUP)

        def carol_in() -> bool:
            c = Login(port, "carol", "pw-carol")
            made.append(c)
            return c.connect()

        wait_until(carol_in, 10, "Mosquitto to read the new account")
        carol = made[-1]
        # the plugin read the new rules too: carol's own topics granted, bob's refused
        assert carol.subscribe(f"{prefix}/users/carol/#")
        assert not carol.subscribe(f"{prefix}/users/bob/#")
    finally:
        for c in made:
            c.close()
        stop()


# ----------------------------------------------------------------------------- the CLI


def test_user_command_manages_the_accounts_file_and_the_mosquitto_acl(tmp_path: Path) -> None:
    f = tmp_path / "accounts"
    r = run_cli("user", "add", "alice", "--role", "user", "--file", str(f))
    assert r.returncode == 0, r.stderr
    password = r.stdout.split("password: ", 1)[1].split()[0]  # generated: not a terminal
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert run_cli("user", "add", "alice", "--role", "user", "--file", str(f)).returncode == 2
    assert run_cli("user", "add", "x/y", "--role", "user", "--file", str(f)).returncode == 2
    r = run_cli("user", "mosquitto", "--file", str(f))
    assert r.returncode == 0 and "acl_file" in r.stdout and "plugin" not in r.stdout
    # the plugin cannot be built: one clear line, exit 2, nothing written
    r = run_cli("user", "mosquitto", "--file", str(f), "--plugin", env={"CC": "/no/such/cc"})
    assert r.returncode == 2 and "/no/such/cc" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "lbmqtt_mosquitto.so").exists()
    r = subprocess.run(
        lbmqtt_cmd("user", "add", "gpu1", "--role", "node", "--file", str(f), "--password-stdin"),
        input="s3cret\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0 and "updated" in r.stdout  # the ACL follows the accounts
    accounts = access.read_accounts(f)
    assert {a.name: a.role for a in accounts.values()} == {"alice": "user", "gpu1": "node"}
    assert access.verify_password("s3cret", accounts["gpu1"].hash)
    assert access.verify_password(password, accounts["alice"].hash)
    assert "user gpu1" in (tmp_path / "accounts.acl").read_text()
    assert run_cli("user", "list", "--file", str(f)).stdout.split() == [
        "alice",
        "user",
        "gpu1",
        "node",
    ]
    assert run_cli("user", "remove", "alice", "--file", str(f)).returncode == 0
    assert "user alice" not in (tmp_path / "accounts.acl").read_text()


def test_a_broker_beyond_loopback_without_accounts_is_refused() -> None:
    r = run_cli("broker", "--bind", "0.0.0.0", "--broker-port", "0", timeout=30)
    assert r.returncode == 2
    assert "without accounts" in r.stderr and "lbmqtt user add" in r.stderr


def test_hashing_runs_off_the_brokers_loop(tmp_path: Path) -> None:
    """A login whose hash takes seconds to check does not hold up anyone else."""
    f = tmp_path / "accounts"
    write_accounts(f)
    accounts = access.read_accounts(f)
    accounts["slow"] = Account("slow", "user", access.hash_password("pw", iterations=3_000_000))
    access.write_accounts(f, accounts.values())
    bt = BrokerThread(guard=AccessGuard("p", f))
    broker = bt.broker
    try:
        a = logged_in(broker.port, "alice")
        slow = Login(broker.port, "slow", "pw")
        slow.c.connect("127.0.0.1", broker.port)
        slow.c.loop_start()
        echoes = 0
        topic = f"p/probe/{a.client_id}"
        assert a.subscribe(topic)
        for i in range(20):  # 20 round trips while the slow login is being checked
            a.publish(topic, str(i))
            wait_until(lambda i=i: (topic, str(i).encode()) in a.messages, 5, "an echo")
            if not slow.connack:
                echoes += 1
        assert echoes == 20, "the broker stalled while it checked a password"
        wait_until(lambda: slow.connack, 30, "the slow login")
        assert not slow.connack[0].is_failure
        slow.close()
        a.close()
    finally:
        bt.stop()


def test_up_with_accounts_logs_its_parts_in_and_admits_only_accounts(tmp_path: Path) -> None:
    f = tmp_path / "accounts"
    write_accounts(f)
    up = start_up("--no-dashboard", env_extra={"LBMQTT_AUTH_FILE": str(f)})
    try:
        assert "logins required" in up.text()
        s = make_settings(
            up.port, "lbmqtt/v1", BROKER_USERNAME="alice", BROKER_PASSWORD=PASSWORDS["alice"]
        )
        with Client(s, user="alice") as c:
            assert (
                c.wait(c.submit("HELLO", {"firstName": "A", "lastName": "B"}), timeout=30)
                == "Hello A B !"
            )
        assert not Login(up.port, None, None).connect()
        with pytest.raises(BrokerUnavailable, match="BROKER_USERNAME"):
            Client(make_settings(up.port, "lbmqtt/v1", CONNECT_TIMEOUT_S=2), user="alice")
    finally:
        finish(up)


def test_tls_listener_serves_clients_that_verify_it(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path, "127.0.0.1")
    f = tmp_path / "accounts"
    write_accounts(f)
    prefix = f"tls/{uuid.uuid4().hex[:8]}"
    base = make_settings(
        0,
        prefix,
        AUTH_FILE=str(f),
        BROKER_TLS_CERT=str(cert),
        BROKER_TLS_KEY=str(key),
        BROKER_TLS_PORT=0,
        BROKER_BIND="127.0.0.1",  # (TLS defaults to every address)
    )
    bt = BrokerThread(broker=embedded_broker(base))
    broker = bt.broker
    system = System(make_settings(broker.port, prefix))
    try:
        assert broker.tls_port and broker.host == "127.0.0.1"
        # the balancer and the node on plain MQTT (loopback), the client over TLS
        plain = {"BROKER_PORT": broker.port}
        system.start_balancer(
            make_settings(
                broker.port, prefix, BROKER_USERNAME="lb", BROKER_PASSWORD=PASSWORDS["lb"], **plain
            )
        )
        system.start_node(
            "n1",
            make_settings(
                broker.port,
                prefix,
                BROKER_USERNAME="n1",
                BROKER_PASSWORD=PASSWORDS["n1"],
                NODE_TASKS=[TEST_TASKS],
            ),
        )
        tls = make_settings(
            broker.tls_port,
            prefix,
            BROKER_TLS=True,
            BROKER_CA_FILE=str(cert),
            BROKER_USERNAME="alice",
            BROKER_PASSWORD=PASSWORDS["alice"],
        )
        with Client(tls, user="alice") as c:
            assert c.wait(c.submit("ECHO", "over tls"), timeout=30)["args"] == "over tls"
        # a client that does not trust the certificate does not connect
        untrusting = make_settings(
            broker.tls_port,
            prefix,
            BROKER_TLS=True,
            BROKER_USERNAME="alice",
            BROKER_PASSWORD=PASSWORDS["alice"],
            CONNECT_TIMEOUT_S=2,
        )
        with pytest.raises(BrokerUnavailable, match=r"(?i)certificate"):
            Client(untrusting, user="alice")
        # nor does one speaking plain MQTT to the TLS port
        with pytest.raises(BrokerUnavailable):
            Client(
                make_settings(
                    broker.tls_port,
                    prefix,
                    BROKER_USERNAME="alice",
                    BROKER_PASSWORD=PASSWORDS["alice"],
                    CONNECT_TIMEOUT_S=2,
                ),
                user="alice",
            )
    finally:
        system.close()
        bt.stop()


def test_removing_an_account_or_changing_its_role_ends_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lbmqtt.broker.embedded as broker_mod

    monkeypatch.setattr(broker_mod, "ACCOUNTS_CHECK_S", 0.1)
    f = tmp_path / "accounts"
    write_accounts(f)
    bt = BrokerThread(guard=AccessGuard("p", f))
    broker = bt.broker
    try:
        alice, bob = (
            Login(broker.port, "alice", PASSWORDS["alice"]),
            Login(broker.port, "bob", PASSWORDS["bob"]),
        )
        assert alice.connect() and bob.connect()
        accounts = access.read_accounts(f)
        del accounts["bob"]  # bob is removed; alice becomes a monitor
        accounts["alice"] = Account("alice", "monitor", accounts["alice"].hash)
        access.write_accounts(f, accounts.values())
        assert bob.closed.wait(10) and alice.closed.wait(10)
        assert not Login(broker.port, "bob", PASSWORDS["bob"]).connect()
        again = logged_in(broker.port, "alice")
        assert not again.subscribe("p/users/alice/#")  # a monitor now
        assert again.subscribe("p/balancer/stats")
        for c in (alice, bob, again):
            c.close()
    finally:
        bt.stop()


def test_an_oversized_subscribe_or_a_qos2_publish_ends_only_that_connection(
    guarded: tuple[BrokerThread, Path],
) -> None:
    broker, _ = guarded
    b = broker.patched
    bystander = logged_in(broker.port, "alice")
    mon = logged_in(broker.port, "mon")
    # 3,000 filters in one SUBSCRIBE (about 50 kB): refused from its header
    mon.c.subscribe([(f"p/balancer/f{i}", 0) for i in range(3000)])
    assert mon.closed.wait(10)
    assert b.too_large == 1
    user = logged_in(broker.port, "bob")
    user.c.publish("p/users/bob/submit", b"{}", qos=2)
    assert user.closed.wait(10)
    assert b.too_large == 2
    probe_topic = f"p/probe/{bystander.client_id}"
    assert bystander.subscribe(probe_topic)
    bystander.publish(probe_topic, b"still here")
    wait_until(lambda: bystander.got(probe_topic), 10, "the bystander's round trip")
    assert not bystander.closed.is_set()
    for c in (bystander, mon, user):
        c.close()


def test_subscriptions_are_capped_and_unsubscribed_filters_forgotten(
    guarded: tuple[BrokerThread, Path],
) -> None:
    from lbmqtt.broker import MAX_SUBSCRIPTIONS

    broker, _ = guarded
    b = broker.patched
    alice = logged_in(broker.port, "alice")
    before = len(b._subscriptions)
    for i in range(3):  # subscribe to 60 filters and drop them again, three times
        topics = [f"p/users/alice/x{i}-{j}" for j in range(60)]
        assert all(alice.subscribe(t) for t in topics)
        alice.c.unsubscribe(topics)
        wait_until(lambda: len(b._subscriptions) == before, 5, "the filters to be forgotten")
    granted = [alice.subscribe(f"p/users/alice/y{j}") for j in range(MAX_SUBSCRIPTIONS + 5)]
    assert granted.count(True) == MAX_SUBSCRIPTIONS and not any(granted[MAX_SUBSCRIPTIONS:])
    alice.close()


@pytest.mark.parametrize("qos", [1, 0])  # (amqtt's path; read and delivered at once)
def test_retained_messages_only_where_the_role_may_retain(
    guarded: tuple[BrokerThread, Path], qos: int
) -> None:
    broker, _ = guarded
    b = broker.patched
    mon = logged_in(broker.port, "mon")
    probe = f"p/probe/{mon.client_id}"
    _, mid = mon.c.subscribe(probe, 0)  # (QoS 0: a QoS 0 message may then go inline)
    wait_until(lambda: mid in mon.subacks, 5, "the SUBACK")
    inline = b.inline_deliveries
    # Given retained messages where the role may retain (three: the first may find a task
    # of the new connection still running, and take amqtt's path)
    for i in range(3):
        status = b'{"v": 1, "online": true, "n": %d}' % i
        mon.c.publish("p/dashboard/status", status, qos=qos, retain=True).wait_for_publish(5)
        wait_until(
            lambda s=status: (
                getattr(b._retained_messages.get("p/dashboard/status"), "data", None) == s
            ),
            5,
            "the presence kept",
        )
    # (kept; at QoS 0 by the broker's inline path, which checks the right to retain too)
    assert (b.inline_deliveries > inline) == (qos == 0)
    denied = b.denied
    # When it publishes a retained message where it may not retain, then a plain one there
    mon.c.publish(probe, b"x" * 1000, qos=qos, retain=True).wait_for_publish(5)
    mon.c.publish(probe, b"marker", qos=qos).wait_for_publish(5)
    wait_until(lambda: (probe, b"marker") in mon.messages, 5, "the marker")
    # Then the retained one is dropped whole (neither kept nor delivered), and counted once
    assert probe not in b._retained_messages
    assert [p for t, p in mon.messages if t == probe] == [b"marker"]
    assert b.denied == denied + 1
    mon.close()


def test_a_flood_of_wrong_passwords_does_not_hold_up_a_known_login(tmp_path: Path) -> None:
    f = tmp_path / "accounts"
    write_accounts(f)
    accounts = access.read_accounts(f)
    accounts["slow"] = Account("slow", "user", access.hash_password("pw", iterations=400_000))
    access.write_accounts(f, accounts.values())
    bt = BrokerThread(guard=AccessGuard("p", f))
    broker = bt.broker
    flood: list[Login] = []
    try:
        first = logged_in(broker.port, "bob")  # bob's login is known from now on
        first.close()
        for _ in range(24):  # each wrong guess costs a 400,000-round hash
            c = Login(broker.port, "slow", "wrong")
            c.c.connect_async("127.0.0.1", broker.port)
            c.c.loop_start()
            flood.append(c)
        b = bt.patched
        wait_until(lambda: b._hashes_waiting >= 20, 30, "the flood to queue up at the broker")
        again = logged_in(broker.port, "bob")
        answered = sum(1 for c in flood if c.connack)
        assert answered <= 6, f"bob waited for {answered} of the flood's logins"
        again.close()
        wait_until(
            lambda: all(c.connack or c.closed.is_set() for c in flood),
            60,
            "the flood to be answered",
        )
        assert all(c.connack and c.connack[0].is_failure for c in flood if c.connack)
    finally:
        for c in flood:
            stop_paho(c.c)
        bt.stop()


def test_a_persistent_session_does_not_keep_rights_its_login_lost(
    guarded: tuple[BrokerThread, Path],
) -> None:
    broker, f = guarded
    b = broker.patched
    mon = Login(broker.port, "mon", PASSWORDS["mon"], client_id="mon-kept", clean_session=False)
    assert mon.connect()
    assert mon.subscribe("p/balancer/#")
    mon.close()
    wait_until(
        lambda: b._sessions["mon-kept"][0].transitions.state != "connected",
        5,
        "the broker to see it leave",
    )
    accounts = access.read_accounts(f)
    accounts["mon"] = Account("mon", "user", accounts["mon"].hash)  # a user now
    access.write_accounts(f, accounts.values())
    back = Login(broker.port, "mon", PASSWORDS["mon"], client_id="mon-kept", clean_session=False)
    assert back.connect()
    assert back.subscribe("p/users/mon/#")
    lb = logged_in(broker.port, "lb")
    lb.publish("p/balancer/history", b"secret")
    lb.publish("p/users/mon/events", b"hers")
    wait_until(lambda: back.got("p/users/mon/events"), 10, "its own events")
    assert not back.got("p/balancer/history")
    for c in (back, lb):
        c.close()


def test_the_brokers_refusals_are_counted_in_the_balancers_stats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lbmqtt.broker.embedded as broker_mod

    monkeypatch.setattr(broker_mod, "STATUS_EVERY_S", 0.2)
    f = tmp_path / "accounts"
    write_accounts(f)
    prefix = f"cnt/{uuid.uuid4().hex[:8]}"
    bt = BrokerThread(guard=AccessGuard(prefix, f), prefix=prefix)
    broker = bt.broker
    system = System(make_settings(broker.port, prefix))
    try:
        system.start_balancer(
            make_settings(
                broker.port, prefix, BROKER_USERNAME="lb", BROKER_PASSWORD=PASSWORDS["lb"]
            )
        )
        assert not Login(broker.port, "alice", "wrong").connect()
        spy = logged_in(broker.port, "alice")
        assert not spy.subscribe(f"{prefix}/users/bob/#")
        spy.close()
        wait_until(
            lambda: (
                system.stats().broker_refused.get("logins") == 1
                and system.stats().broker_refused.get("denied") == 1
            ),
            10,
            "the broker's refusals in the stats",
        )
    finally:
        system.close()
        bt.stop()
