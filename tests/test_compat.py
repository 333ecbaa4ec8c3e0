"""pyLoadBalancer 0.2.0 programs, written in its style, run on lbmqtt with one import changed.

Each program below is ours (not pyLoadBalancer's code), written as its users wrote theirs:
``startAll`` / ``startWorkerHub`` / ``Client`` from the package, an old-format
``parameters.json`` (``LB_IP``, ``SOCKET_TIMEOUT``, the ZeroMQ ports), task functions in the
script. They run as real processes against the real system that ``startAll`` starts; the
test reads what they print and checks it against what pyLoadBalancer 0.2.0's balancer
answered (its ``LoadBalancer.py`` is the specification).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from lbmqtt.config import WARNED_ENV

from .conftest import (
    BrokerThread,
    System,
    descendants,
    free_port,
    make_settings,
    process_alive,
    wait_until,
)

OLD_PARAMETERS: dict[str, Any] = {
    # pyLoadBalancer 0.2.0's parameters.json, with its keys and their meanings
    "SOCKET_TIMEOUT": 500,
    "LB_IP": "127.0.0.1",
    "LB_WKPULLPORT": 5699,
    "LB_HCREPPORT": 5999,
    "LB_CLIENTPULLPORT": 5799,
    "MONITOR_IP": "127.0.0.1",
    "MONITOR_PORT": 0,
    "WKHUB_IP": "127.0.0.1",
    "WKHUB_LBPORT": 8300,
    "WKHUB_HCPORT": 8301,
    "WKHUB_WORKERS": [
        {"nWorkers": 1, "minP": 0, "maxP": 9, "processP": 10},
        {"nWorkers": 1, "minP": 10, "maxP": 99, "processP": 0},
    ],
    "LB_QUEING_MAXPERUSER": 2,
}


def old_parameters(tmp_path: Path, **changes: Any) -> Path:
    """An old-format parameters.json on a port of its own; no journal (as before, nothing
    survives a restart: and tests must not share one)."""
    data = {**OLD_PARAMETERS, "BROKER_PORT": free_port(), "JOURNAL_PATH": "none", **changes}
    path = tmp_path / "parameters.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LBMQTT_")}


def answers(stdout: str) -> dict[str, Any]:
    """The ``["label", answer]`` lines a program printed, by label. (What follows one on its
    line is left: with PYTHONUNBUFFERED, print() writes its text and its newline apart, and
    a line of another process on the same stdout may come between them.)"""
    out: dict[str, Any] = {}
    decoder = json.JSONDecoder()
    for line in stdout.splitlines():
        if line.startswith('["'):
            (label, value), _ = decoder.raw_decode(line)
            out[label] = value
    return out


# --------------------------------------------------------------------------- every answer

OLD_SYSTEM = textwrap.dedent("""
    import json
    import os
    import subprocess
    import sys
    import time
    from lbmqtt.compat import startAll, startWorkerHub, Client  # was: pyLoadBalancer

    pfile = 'parameters.json'
    HERE = os.path.dirname(os.path.abspath(__file__))


    def hellotask(**kwargs):
        return 'Hello ' + kwargs.get('task').get('name')


    def blocktask(**kwargs):
        open(os.path.join(HERE, 'started'), 'w').close()
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(HERE, 'go')) and time.time() < deadline:
            time.sleep(0.05)
        return 'unblocked'


    def show(label, answer):
        print(json.dumps([label, answer]), flush=True)


    def wait_for(CL, taskid, progress, seconds=30):
        deadline = time.time() + seconds
        answer = CL.getTask(taskid)
        while answer.get('progress') != progress and time.time() < deadline:
            time.sleep(0.05)
            answer = CL.getTask(taskid)
        return answer


    if __name__ == '__main__':
        processes, functions = startAll(pfile, True)
        hub, hubfunction = startWorkerHub(pfile, {'HELLO': hellotask, 'BLOCK': blocktask}, True)
        show('startAll', [len(processes)] + [p.is_alive() for p in processes])
        show('start functions', [f.__name__ for f in functions + [hubfunction]])
        CL = Client(pfile)

        # done: a float priority and a string one, as the old balancer read them (float(p))
        a = CL.sendTask('HELLO', {'name': 'A'}, 0.5, userid='alice')['taskid']
        show('done', wait_for(CL, a, 100))
        b = CL.sendTask('HELLO', {'name': 'B'}, 'not a number', userid='alice')['taskid']
        show('done string priority', wait_for(CL, b, 100))
        show('cancel done', CL.cancelTask(a))
        show('after cancel done', CL.getTask(a))

        # running: progress 0 until the worker reports (the old `while progress == 0` idiom)
        r = CL.sendTask('BLOCK', {}, 0, userid='bob')['taskid']
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(HERE, 'started')) and time.time() < deadline:
            time.sleep(0.05)
        show('running', CL.getTask(r))
        show('cancel running', CL.cancelTask(r))
        show('after cancel running', CL.getTask(r))

        # queued (no band takes 5000), unknown, the queue cap (2 per user)
        q = CL.sendTask('HELLO', {'name': 'Q'}, 5000, userid='carol')['taskid']
        show('queued', CL.getTask(q))
        show('list', CL.getTask([q, 'nope']))
        show('unknown', CL.getTask('nope'))
        show('cancel unknown', CL.cancelTask('nope'))
        CL.sendTask('HELLO', {'name': 'Q'}, 5000, userid='carol')
        show('over cap', CL.sendTask('HELLO', {'name': 'Q'}, 5000, userid='carol'))
        show('cancel queued', CL.cancelTask(q))
        show('cancel again', CL.cancelTask(q))
        show('after cancel queued', CL.getTask(q))

        # no userid: taken (with one warning), twice
        show('no userid', [sorted(CL.sendTask('HELLO', {'name': 'N'}, 0)) for i in range(2)])

        # ids from another process of the same system (any JSON userid)
        d = CL.sendTask('HELLO', {'name': 'D'}, 0, userid='a user with spaces')['taskid']
        wait_for(CL, d, 100)
        q2 = CL.sendTask('HELLO', {'name': 'Q2'}, 5000, userid=42)['taskid']
        other = subprocess.run([sys.executable, 'other.py', d, q2],
                               capture_output=True, text=True, timeout=60)
        show('other process', [json.loads(line) for line in other.stdout.splitlines()])
        show('after other cancel', CL.getTask(q2))

        # a queued task expires (QUEUED_TTL_S; 48 h by default, as before)
        e = CL.sendTask('HELLO', {'name': 'E'}, 5000, userid='erin')['taskid']
        show('before expiry', CL.getTask(e))
        show('expired', wait_for(CL, e, None))

        show('alive', [p.is_alive() for p in processes + [hub]])
        for p in processes + [hub]:
            p.terminate()
        for p in processes + [hub]:
            p.join()
        show('alive after join', [p.is_alive() for p in processes + [hub]])
""")

OTHER_PROCESS = textwrap.dedent("""
    import json
    import sys
    from lbmqtt.compat import Client   # was: from pyLoadBalancer import Client

    CL = Client('parameters.json')
    print(json.dumps(CL.getTask(sys.argv[1])))
    print(json.dumps(CL.cancelTask(sys.argv[2])))
    print(json.dumps(CL.getTask(sys.argv[2])))
""")


@pytest.mark.slow
def test_an_old_program_gets_every_answer_the_old_balancer_gave(tmp_path: Path) -> None:
    # Given an old-format parameters file whose LB_IP is 127.0.0.2 (a loopback address
    # that is not the default) and a queued-task lifetime of 4 s
    old_parameters(tmp_path, LB_IP="127.0.0.2", QUEUED_TTL_S=4)
    (tmp_path / "old_system.py").write_text(OLD_SYSTEM)
    (tmp_path / "other.py").write_text(OTHER_PROCESS)
    # When the old-style program runs
    r = subprocess.run(
        [sys.executable, "old_system.py"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    got = answers(r.stdout)
    # Then it got the old answers in every state
    assert r.returncode == 0, r.stderr[-3000:]
    assert got["startAll"] == [3, True, True, True], r.stdout
    assert got["start functions"] == [
        "startLBProcess",
        "startHCProcess",
        "startMonitorProcess",
        "startWorkerHubProcess",
    ]
    assert got["done"] == {"progress": 100, "result": "Hello A"}
    assert got["done string priority"] == {"progress": 100, "result": "Hello B"}
    assert got["cancel done"] == {"deleted": True, "from": "done"}
    assert got["after cancel done"] == {"progress": "cancelled", "result": None}
    assert got["running"] == {"progress": 0, "result": None}
    assert got["cancel running"] == {"deleted": True, "from": "pending"}
    assert got["after cancel running"] == {"progress": "cancelled", "result": None}
    assert got["queued"] == {"progress": 0, "result": None}
    assert got["unknown"] == {"progress": None, "result": None}
    listed = got["list"]
    assert len(listed) == 2 and listed.pop("nope") == {"progress": None, "result": None}
    assert list(listed.values()) == [{"progress": 0, "result": None}]
    assert got["cancel unknown"] == {"deleted": False, "from": None}
    assert got["over cap"] == {"error": "User has too many pending task (2)"}
    assert got["cancel queued"] == {"deleted": True, "from": "queue"}
    assert got["cancel again"] == {"deleted": False, "from": None}
    assert got["after cancel queued"] == {"progress": "cancelled", "result": None}
    assert got["no userid"] == [["taskid"], ["taskid"]]
    assert r.stderr.count("sendTask without userid") == 1, r.stderr
    assert got["other process"] == [
        {"progress": 100, "result": "Hello D"},
        {"deleted": True, "from": "queue"},
        {"progress": "cancelled", "result": None},
    ]
    assert got["after other cancel"] == {"progress": "cancelled", "result": None}
    assert got["before expiry"] == {"progress": 0, "result": None}
    assert got["expired"] == {"progress": None, "result": None}
    assert got["alive"] == [True] * 4
    assert got["alive after join"] == [False] * 4
    # and the obsolete keys were listed once for the whole system (its processes inherit
    # that they were), naming each key
    out = r.stdout + r.stderr
    assert out.count("ignoring pyLoadBalancer keys") == 1, out
    assert "LB_CLIENTPULLPORT, LB_HCREPPORT, LB_WKPULLPORT, WKHUB_HCPORT, WKHUB_IP" in out
    # and LB_IP was where the broker ran: 127.0.0.2 (the broker said so)
    assert "listening on 127.0.0.2:" in out, out


# --------------------------------------------------------------------------- stays up

ONLY_START_ALL = textwrap.dedent("""
    from lbmqtt.compat import startAll   # was: from pyLoadBalancer import startAll

    if __name__ == '__main__':
        processes = startAll('parameters.json')
        print('main done', flush=True)
""")


@pytest.mark.slow
def test_a_script_that_only_calls_startAll_stays_up_and_warns_it_has_no_workers(
    tmp_path: Path,
) -> None:
    old_parameters(tmp_path)
    (tmp_path / "core.py").write_text(ONLY_START_ALL)
    proc = subprocess.Popen(
        [sys.executable, "core.py"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # (its own process group: Ctrl-C is sent to the group)
    )
    family: list[int] = []
    try:
        assert proc.stdout is not None
        # When its main code has ended, it keeps running and the health check warns
        # (every second) that there are no workers, as pyLoadBalancer's did
        seen: list[str] = []
        deadline = time.monotonic() + 60
        warnings_after_main = 0
        while warnings_after_main < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline().decode(errors="replace")
                if not line:
                    break
                seen.append(line)
                if "HC - WARNING : LB HAS NO WORKERS" in line and any(
                    "main done" in s for s in seen
                ):
                    warnings_after_main += 1
        assert warnings_after_main == 2, "".join(seen)
        assert proc.poll() is None
        family = descendants(proc.pid)
        assert len(family) >= 5  # LB (broker, balancer), health check, monitor
        # When Ctrl-C reaches its process group, everything stops
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    wait_until(lambda: not any(process_alive(p) for p in family), 30, "startAll's children")


# --------------------------------------------------------------------------- no balancer

NO_BALANCER = textwrap.dedent("""
    import json
    import sys
    import time
    from lbmqtt.compat import Client   # was: from pyLoadBalancer import Client

    CL = Client(sys.argv[1])
    for call, args in (('sendTask', ('HELLO', {}, 0, 'alice')), ('getTask', ('x',)),
                       ('cancelTask', ('x',))):
        t0 = time.time()
        answer = getattr(CL, call)(*args)
        print(json.dumps([call, [answer, time.time() - t0]]), flush=True)
""")


@pytest.mark.slow
def test_without_a_balancer_a_call_fails_after_about_SOCKET_TIMEOUT(
    tmp_path: Path, broker: BrokerThread
) -> None:
    (tmp_path / "client.py").write_text(NO_BALANCER)
    # SOCKET_TIMEOUT 300 ms: the old client gave up after 3 tries and 2 pauses of 1 s
    expected_s = 3 * 0.3 + 2
    cases = {
        "no broker": {"BROKER_PORT": free_port()},
        "a broker, no balancer": {"BROKER_PORT": broker.port, "TOPIC_PREFIX": "nolb/v1"},
    }
    for case, changes in cases.items():
        p = old_parameters(tmp_path, SOCKET_TIMEOUT=300, **changes)
        r = subprocess.run(
            [sys.executable, "client.py", str(p)],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        got = answers(r.stdout)
        assert r.returncode == 0, r.stderr
        for call in ("sendTask", "getTask", "cancelTask"):
            answer, took = got[call]
            assert answer == {"LB": "ERROR"}, (case, call, answer)
            assert expected_s - 0.5 <= took <= expected_s + 3, (case, call, took)
        assert "sendTask ERROR WHILE SENDING/RECEIVING SOCKET" in r.stdout


# --------------------------------------------------------------------------- settings


def test_old_keys_keep_their_meaning_and_the_rest_are_listed_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lbmqtt.config import load_settings

    monkeypatch.setenv(WARNED_ENV, "")  # (restored after the test)
    p = old_parameters(tmp_path, LB_IP="192.0.2.7", SOCKET_TIMEOUT=1000)
    s = load_settings(p, env={})
    assert s.broker_host == "192.0.2.7"  # LB_IP: where the broker (with the balancer) runs
    assert s.client_ack_timeout_s == 5.0 and s.connect_timeout_s == 5.0
    assert s.queued_ttl_s == 48 * 3600
    warnings = [r for r in caplog.records if "pyLoadBalancer" in r.getMessage()]
    assert len(warnings) == 1
    assert (
        warnings[0]
        .getMessage()
        .endswith(
            "ignoring pyLoadBalancer keys LB_CLIENTPULLPORT, LB_HCREPPORT, LB_WKPULLPORT, "
            "WKHUB_HCPORT, WKHUB_IP, WKHUB_LBPORT: lbmqtt talks through the MQTT broker "
            "(LB_IP is its host, BROKER_PORT its port)"
        )
    )
    # loading it again (another part of the same system) says nothing more
    caplog.clear()
    load_settings(p, env={})
    assert "pyLoadBalancer" not in caplog.text
    # the new keys win over the old ones
    both = old_parameters(tmp_path, BROKER_HOST="127.0.0.1", CLIENT_ACK_TIMEOUT_S=9)
    s = load_settings(both, env={})
    assert s.broker_host == "127.0.0.1" and s.client_ack_timeout_s == 9
    # a bad old value gets a clear error
    bad = old_parameters(tmp_path, SOCKET_TIMEOUT="fast")
    from lbmqtt.errors import ConfigError

    with pytest.raises(ConfigError, match="SOCKET_TIMEOUT: milliseconds"):
        load_settings(bad, env={})


def test_old_priorities_are_read_as_the_old_balancer_read_them() -> None:
    from lbmqtt.compat import old_priority, owner_of, user_of

    assert [old_priority(p) for p in (0, 0.5, 9.99, -0.5, "7", "x", None, 1e300)] == [
        0,
        0,
        9,
        -1,
        7,
        0,
        0,
        2**31 - 1,
    ]
    assert user_of("alice") == "alice" and user_of(42) == "42" and user_of(None) == "default"
    spaced = user_of("a user with spaces")
    assert spaced.startswith("u-") and spaced == user_of("a user with spaces")
    assert owner_of(f"0123@{spaced}") == spaced and owner_of("nope") == "default"


# --------------------------------------------------------------------------- native expiry


def test_a_task_still_queued_QUEUED_TTL_S_after_its_submit_expires_and_says_why(
    broker_port: int, prefix: str
) -> None:
    from lbmqtt import Client
    from lbmqtt.protocol import Status

    # Given queued tasks that live 1 s, and a node whose bands stop at 1000
    settings = make_settings(broker_port, prefix, QUEUED_TTL_S=1.0, JOURNAL_PATH="none")
    system = System(settings)
    try:
        system.start_balancer()
        system.start_node("n1")
        with Client(settings, user="alice") as c:
            # When one task can run (for longer than 1 s) and one cannot (priority 5000)
            stuck = c.submit("HELLO", {"firstName": "A", "lastName": "B"}, priority=5000)
            slow = c.submit("SLEEP", {"seconds": 1.5})
            # Then the one that never left the queue expires, saying why
            state = c.wait_state(stuck, timeout=20)
            assert state.status == Status.EXPIRED
            assert state.error is not None and "QUEUED_TTL_S (1 s)" in state.error.message
            # and the one that was running when its second passed is not touched
            assert c.wait_state(slow, timeout=20).status == Status.DONE
        b = system.balancer
        assert b is not None
        assert system.lt.call(lambda: (b.counters["expired"], b.stats().queued)) == (1, 0)
    finally:
        system.close()


@pytest.mark.slow
def test_the_old_health_check_command_says_when_the_balancer_is_down(tmp_path: Path) -> None:
    # Given no broker on the port of an old parameters file
    p = old_parameters(tmp_path)
    code = "from lbmqtt.compat import HealthCheck; HealthCheck.main()"  # pyLoadBalancer_HC
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "-p", str(p)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        # Then it says so, as before, and goes on
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while sum("LB DOWN ??" in s for s in seen) < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    break
                seen.append(line)
        assert sum(s.startswith(" HC - CAN'T GET WORKER LIST : LB DOWN ??") for s in seen) == 2
        assert proc.poll() is None
        # and Ctrl-C stops it
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert "EXITED Health Check" in out and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
