"""A refused login, as a user meets it: at once and in one line, except for a daemon that
was logged in before (it keeps trying); and the `Try:` lines of `lbmqtt up` with accounts,
run as printed."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lbmqtt import access
from lbmqtt.access import AccessGuard, Account
from lbmqtt.broker import EmbeddedBroker
from lbmqtt.client import Client
from lbmqtt.errors import LoginRefused
from lbmqtt.mqtt import MqttTransport

from .cluster import free_port, self_signed_cert, start_mosquitto
from .conftest import (
    PASSWORDS,
    ROOT,
    TEST_TASKS,
    BrokerThread,
    finish,
    lbmqtt_cmd,
    make_settings,
    run_cli,
    start_up,
    wait_until,
    write_accounts,
)

HELLO = '{"firstName": "John", "lastName": "Doe"}'


def transport(port: int, user: str | None, password: str | None, **kw: Any) -> MqttTransport:
    return MqttTransport(
        host="127.0.0.1",
        port=port,
        client_id=f"test-login-{user}",
        on_message=lambda *a: None,
        username=user,
        password=password,
        **kw,
    )


def test_a_wrong_password_is_refused_at_once_not_retried(
    guarded: tuple[BrokerThread, Path],
) -> None:
    broker, _ = guarded

    async def refused(user: str | None, password: str | None) -> LoginRefused:
        t = transport(broker.port, user, password, connect_timeout_s=30)
        started = time.monotonic()
        try:
            with pytest.raises(LoginRefused) as caught:
                await t.start(wait=True)
        finally:
            await t.close()
        assert time.monotonic() - started < 3  # not the 30 s of the connect timeout
        return caught.value

    wrong = asyncio.run(refused("alice", "not-her-password"))
    assert wrong.code == "bad_login" and wrong.login == "alice"
    assert "'alice'" in str(wrong) and "LBMQTT_BROKER_PASSWORD" in str(wrong)
    anonymous = asyncio.run(refused(None, None))
    assert anonymous.login is None and "requires a login" in str(anonymous)
    # the Python client raises the same, within its first attempt
    s = make_settings(
        broker.port, "p", BROKER_USERNAME="bob", BROKER_PASSWORD="x", CONNECT_TIMEOUT_S=30
    )
    started = time.monotonic()
    with pytest.raises(LoginRefused, match="'bob'"):
        Client(s, user="bob")
    assert time.monotonic() - started < 3


def test_commands_and_daemons_with_a_wrong_password_exit_6_with_one_line(
    guarded: tuple[BrokerThread, Path],
) -> None:
    broker, _ = guarded
    env = {
        "LBMQTT_BROKER_USERNAME": "alice",
        "LBMQTT_BROKER_PASSWORD": "not-her-password",
        "LBMQTT_CONNECT_TIMEOUT_S": "30",
        "LBMQTT_JOURNAL_PATH": "none",
    }
    commands = (["submit", "HELLO", HELLO, "--wait"], ["status"])
    daemons = (["node", "--tasks", TEST_TASKS], ["balancer"])  # (their start-up check)
    for args in (*commands, *daemons):
        started = time.monotonic()
        r = run_cli(*args, "--broker-port", str(broker.port), "--prefix", "p", env=env)
        assert r.returncode == 6, (args, r.stderr)
        assert time.monotonic() - started < 15  # (a Python start-up; not 30 s of retries)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("lbmqtt: the MQTT broker at 127.0.0.1:")
        assert "refused the login 'alice' (bad user name or password)" in lines[0]


def test_a_daemon_started_before_its_broker_exits_6_with_one_line_when_refused(
    tmp_path: Path,
) -> None:
    # Given a node with a wrong password, started while no broker listens on its port
    port = free_port()
    env = {
        **os.environ,
        "LBMQTT_BROKER_USERNAME": "alice",
        "LBMQTT_BROKER_PASSWORD": "not-her-password",
        "LBMQTT_JOURNAL_PATH": "none",
    }
    args = ["node", "--tasks", TEST_TASKS, "--broker-port", str(port), "--prefix", "p"]
    err = tmp_path / "stderr"
    with err.open("w") as f:
        proc = subprocess.Popen(lbmqtt_cmd(*args), cwd=ROOT, env=env, stderr=f)
    f = tmp_path / "accounts"
    write_accounts(f)
    broker: BrokerThread | None = None
    try:
        # (the node gives up its start-up check of the name and goes on, reconnecting)
        wait_until(lambda: "not reachable" in err.read_text(), 30, "the node to go on")
        # When the broker comes up and refuses its login
        broker = BrokerThread(
            broker=EmbeddedBroker("127.0.0.1", port, prefix="p", guard=AccessGuard("p", f))
        )
        # Then the node exits 6, with one line that says why and no traceback
        assert proc.wait(30) == 6, err.read_text()
        text = err.read_text()
        assert "Traceback" not in text, text
        said = [line for line in text.splitlines() if line.startswith("lbmqtt: ")]
        assert len(said) == 1, text
        assert "refused the login 'alice' (bad user name or password)" in said[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if broker is not None:
            broker.stop()


def test_up_with_a_refused_login_stops_at_once_with_status_6(
    guarded: tuple[BrokerThread, Path],
) -> None:
    # Given an external broker with accounts, and a wrong password for `up`'s parts
    broker, _ = guarded
    env = {
        "LBMQTT_BROKER_EMBEDDED": "false",
        "LBMQTT_BROKER_USERNAME": "lb",
        "LBMQTT_BROKER_PASSWORD": "not-its-password",
        "LBMQTT_JOURNAL_PATH": "none",
    }
    started = time.monotonic()
    # When `up` starts them, Then it stops at once with the parts' status (no restarts)
    r = run_cli(
        "up",
        "--broker-port",
        str(broker.port),
        "--prefix",
        "p",
        "--monitor-port",
        "0",
        "--metrics-port",
        "0",
        env=env,
        timeout=60,
    )
    assert r.returncode == 6, r.stdout + r.stderr
    assert time.monotonic() - started < 30
    assert "refused the login 'lb' (bad user name or password)" in r.stderr


def test_a_daemon_whose_password_changes_keeps_trying_and_comes_back(
    guarded: tuple[BrokerThread, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import lbmqtt.broker.embedded as broker_mod

    broker, f = guarded
    monkeypatch.setattr(broker_mod, "ACCOUNTS_CHECK_S", 0.1)  # (read by the broker's loop)
    before = access.read_accounts(f)

    def set_password(password: str) -> None:
        accounts = dict(before)
        accounts["n1"] = Account("n1", "node", access.hash_password(password, iterations=1000))
        access.write_accounts(f, accounts.values())

    async def scenario() -> None:
        # Given a node's connection, accepted once
        t = transport(broker.port, "n1", PASSWORDS["n1"], reconnect_max_s=0.2)
        await t.start(wait=True)
        watch = asyncio.ensure_future(t.watch())
        refused = broker.patched.refused_logins
        try:
            # When its password is changed while it runs (the broker ends its connection)
            set_password("a new one")
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="lbmqtt.mqtt"):
                deadline = time.monotonic() + 20
                while broker.patched.refused_logins < refused + 4:
                    assert time.monotonic() < deadline, "no login attempts refused"
                    await asyncio.sleep(0.05)
            # Then it keeps trying (said once), instead of ending
            assert not watch.done()
            said = [r for r in caplog.records if "refused the login 'n1'" in r.getMessage()]
            assert len(said) == 1, caplog.text
            # and it is back once its login works again
            set_password(PASSWORDS["n1"])
            await t.wait_ready(20)
            assert t.connects == 2 and not watch.done()
        finally:
            watch.cancel()
            await t.close()

    asyncio.run(scenario())


def test_the_try_lines_of_up_with_accounts_work_as_printed(tmp_path: Path) -> None:
    f = tmp_path / "accounts"
    write_accounts(f)
    up = start_up("--no-dashboard", env_extra={"LBMQTT_AUTH_FILE": str(f)})
    try:
        text = up.text()
        start = next(i for i, line in enumerate(up.lines) if line.startswith("Try"))
        end = up.lines.index("Ctrl-C stops everything.")
        assert up.lines[start].startswith(f"Try (as alice, a user of {f}; or bob)"), text
        commands = [line.strip() for line in up.lines[start + 1 : end]]
        # the one thing the lines say to fill in: alice's password in place of PASSWORD
        assert commands[0].endswith("# alice's password in place of PASSWORD"), text
        commands[0] = commands[0].replace("'PASSWORD'", f"'{PASSWORDS['alice']}'")
        r = run_printed(commands)
        assert r.returncode == 0, (commands, r.stdout, r.stderr)
        assert "Hello John Doe !" in r.stdout and "online" in r.stdout, r.stdout
    finally:
        finish(up)


def run_printed(commands: list[str]) -> subprocess.CompletedProcess[str]:
    """Printed commands, run as copied into a new shell (no LBMQTT_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        ["bash", "-ec", "\n".join(commands)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )


def test_the_try_lines_of_up_with_an_external_tls_broker_work_as_printed(tmp_path: Path) -> None:
    # Given Mosquitto serving TLS only, with a certificate of a private CA (self-signed)
    cert, key = self_signed_cert(tmp_path, "127.0.0.1")
    mosq = start_mosquitto(
        tmp_path,
        lambda port: (
            f"listener {port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n"
            "allow_anonymous true\npersistence false\n"
        ),
    )
    port = mosq.port
    up = None
    try:
        # When `lbmqtt up` runs against it with the TLS settings in its environment
        up = start_up(
            "--no-dashboard",
            port=port,
            env_extra={
                "LBMQTT_BROKER_EMBEDDED": "false",
                "LBMQTT_BROKER_TLS": "true",
                "LBMQTT_BROKER_CA_FILE": str(cert),
            },
        )
        text = up.text()
        assert f"mqtts://127.0.0.1:{port}" in text, text
        start = next(i for i, line in enumerate(up.lines) if line.startswith("Try"))
        end = up.lines.index("Ctrl-C stops everything.")
        commands = [line.strip() for line in up.lines[start + 1 : end]]
        assert all(f"--tls-ca {cert}" in c for c in commands), text
        # Then its Try: lines work when copied into a shell that has none of them
        r = run_printed(commands)
        assert r.returncode == 0, (commands, r.stdout, r.stderr)
        assert "Hello John Doe !" in r.stdout and "online" in r.stdout, r.stdout
        # (and without the CA the same line fails: the flag is what makes it work)
        bare = commands[0].replace(f" --tls-ca {cert}", "") + " --timeout 5"
        assert run_printed([bare]).returncode != 0
    finally:
        if up is not None:
            finish(up)
        mosq.stop()
