"""Several hosts for real: network namespaces on a bridge of our own (tests/cluster.py Lan).

One host runs the broker and the balancer, two node hosts of different size and speed, one
client host. Everything addresses the broker by its LAN address (a namespace has no route
to another's loopback), and BROKER_HOST "auto" finds it by mDNS.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import Cluster, Lan, NetNs, free_port, self_signed_cert

pytestmark = pytest.mark.slow

CLIENT = textwrap.dedent("""
    import json, sys
    from lbmqtt import Client
    log = sys.argv[1]
    with Client(user="desk") as c:                      # BROKER_HOST "auto": mDNS
        ids = c.submit_many([{"name": "CHAOS", "args": {"value": i, "ms": 150, "log": log}}
                             for i in range(24)])
        states = [c.wait_state(t, timeout=60) for t in ids]
        print(json.dumps({
            "broker": f"{c.settings.broker_host}:{c.settings.broker_port}",
            "ok": all(s.result == {"value": 2 * i} for i, s in enumerate(states)),
            "nodes": sorted({s.node for s in states}),
            "per_node": {n: sum(s.node == n for s in states) for n in {s.node for s in states}},
        }))
""")


@pytest.fixture
def lan() -> Iterator[Lan]:
    why = NetNs.available()
    if why:
        pytest.skip(why)
    with Lan() as lan:
        yield lan


def test_tasks_run_across_hosts_that_find_the_broker_by_mdns(lan: Lan, tmp_path: Path) -> None:
    hub, big, small, desk = (lan.add_host(n) for n in ("hub", "big", "small", "desk"))
    # A broker on the LAN has accounts (Cluster adds them) and, since the nodes and the
    # client find it by mDNS and log in, TLS: its certificate proves it is the hub
    cert, key = self_signed_cert(tmp_path, hub.ip, "hub")
    tls_port = free_port()
    cluster = Cluster(
        tmp_path,
        host=hub.ip,
        overrides={
            "BROKER_ADVERTISE": True,
            "BROKER_TLS_CERT": str(cert),
            "BROKER_TLS_KEY": str(key),
            "BROKER_TLS_PORT": tls_port,
        },
    )
    # the hub's own parts speak plain MQTT on its loopback; everyone else TLS on the LAN
    tls = {"BROKER_TLS": True, "BROKER_CA_FILE": str(cert), "BROKER_PORT": tls_port}
    try:
        cluster.start_broker(wrap=hub.wrap)
        cluster.start_balancer(
            wrap=hub.wrap, env=cluster.env(login=("balancer", "balancer"), BROKER_HOST="127.0.0.1")
        )
        # "big" finds the broker by mDNS; "small" is given its address
        cluster.start_node(
            "big",
            workers=3,
            speed=2.0,
            wrap=big.wrap,
            env=cluster.env(login=("big", "node"), BROKER_HOST="auto", **tls),
        )
        cluster.start_node(
            "small",
            workers=1,
            speed=1.0,
            wrap=small.wrap,
            env=cluster.env(login=("small", "node"), **tls),
        )
        script = tmp_path / "client.py"
        script.write_text(CLIENT)
        desk_env = cluster.env(login=("desk", "user"), BROKER_HOST="auto", **tls)
        run = subprocess.run(
            [*desk.wrap, sys.executable, str(script), str(cluster.runs_log)],
            env=desk_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr[-3000:] + cluster.log_tail()
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["broker"] == f"{hub.ip}:{tls_port}"
        assert out["ok"] is True
        assert out["nodes"] == ["big", "small"]
        assert out["per_node"]["big"] > out["per_node"]["small"]  # 3 fast slots against 1
        node_log = (tmp_path / "big.log").read_text()
        assert f"found the broker {hub.ip}:{tls_port} by mDNS" in node_log
        assert f"ready with 3 worker slots on {hub.ip}:{tls_port}" in node_log
        # the command line finds it too
        cli = subprocess.run(
            [*desk.wrap, sys.executable, "-m", "lbmqtt", "submit", "ECHO", '["hi"]', "--wait"],
            env=desk_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["args"] == ["hi"]
        # a login without TLS is never sent to whoever answers on mDNS
        plain = subprocess.run(
            [*desk.wrap, sys.executable, "-m", "lbmqtt", "submit", "ECHO", "1"],
            env=cluster.env(login=("desk", "user"), BROKER_HOST="auto"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert plain.returncode == 2 and "in clear" in plain.stderr, plain.stderr
    finally:
        cluster.close()


def test_auto_without_any_broker_on_the_lan_says_so(lan: Lan, tmp_path: Path) -> None:
    desk = lan.add_host("desk")
    cluster = Cluster(tmp_path, host=desk.ip, overrides={"DISCOVERY_TIMEOUT_S": 1.0})
    run = subprocess.run(
        [*desk.wrap, sys.executable, "-m", "lbmqtt", "submit", "ECHO", "1"],
        env=cluster.env(BROKER_HOST="auto"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode != 0
    assert "no broker advertised itself on the LAN" in run.stderr
