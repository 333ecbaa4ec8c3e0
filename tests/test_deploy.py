"""Deployment files: node configs and systemd units say what the code accepts."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from lbmqtt.cli import build_parser
from lbmqtt.config import Settings, load_settings
from lbmqtt.node import Node
from lbmqtt.registry import load_sources

from .conftest import ROOT

UNITS = sorted([*ROOT.glob("nodes/*.service"), *ROOT.glob("broker/*.service")])
NODE_CONFIGS = sorted(ROOT.glob("nodes/*.json"))


def test_there_are_node_configs_and_units() -> None:
    assert {p.name for p in NODE_CONFIGS} >= {
        "workstation.json",
        "gpu-box.json",
        "laptop.json",
        "raspberry-pi.json",
    }
    assert {p.name for p in UNITS} == {
        "lbmqtt-node.service",
        "lbmqtt-broker.service",
        "lbmqtt-balancer.service",
    }


@pytest.mark.parametrize("path", NODE_CONFIGS, ids=lambda p: p.name)
def test_node_configs_load_and_make_a_node(path: Path) -> None:
    s = load_settings(path, env={})
    assert s.broker_host == "auto" and s.node_tasks
    assert all(Path(t).exists() for t in s.node_tasks), s.node_tasks
    Node(s, name="check")
    assert sum(g.n_workers for g in s.wkhub_workers) > 0
    assert load_sources(s.node_tasks).names()  # the task modules import


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(path)
    return cp


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_run_commands_the_cli_accepts(path: Path) -> None:
    unit = _unit(path)
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0].endswith("/lbmqtt")
    ns = build_parser().parse_args(argv[1:])  # exits (fails the test) on a bad flag
    assert ns.command == path.stem.removeprefix("lbmqtt-")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_node_unit_lets_a_node_drain_before_it_is_killed() -> None:
    svc = _unit(ROOT / "nodes" / "lbmqtt-node.service")["Service"]
    # SIGTERM to the daemon only (the workers must not be killed before the drain)
    assert svc["KillMode"] == "mixed" and svc["KillSignal"] == "SIGTERM"
    assert float(svc["TimeoutStopSec"]) > Settings().node_drain_s


def test_balancer_unit_keeps_its_journal_in_the_state_directory() -> None:
    svc = _unit(ROOT / "broker" / "lbmqtt-balancer.service")["Service"]
    assert svc["StateDirectory"] == "lbmqtt"
    assert svc["Environment"] == "XDG_STATE_HOME=/var/lib"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_verify(tmp_path: Path) -> None:
    for unit in UNITS:
        run = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # missing /opt/lbmqtt or user lbmqtt on a test machine is expected; syntax is not
        bad = [
            line
            for line in run.stderr.splitlines()
            if "Unknown" in line or "Failed to parse" in line
        ]
        assert bad == [], run.stderr
