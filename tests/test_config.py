"""parameters.json: typed settings, clear one-line errors, environment overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lbmqtt.config import Settings, load_settings
from lbmqtt.errors import ConfigError

from .conftest import ROOT, run_cli


def write(tmp_path: Path, data: object | str) -> Path:
    p = tmp_path / "parameters.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_defaults_load_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, env={})
    assert s.broker_host == "127.0.0.1" and s.broker_port == 1883
    assert s.topic_prefix == "lbmqtt/v1" and s.source == "defaults"
    assert s.wkhub_workers[0].n_workers == 2


def test_the_repository_parameters_file_is_valid() -> None:
    s = load_settings(ROOT / "parameters.json", env={})
    assert s.node_tasks == [str(ROOT / "nodes" / "demo_tasks.py")]
    assert s.monitor_port == 9000 and s.lb_queing_maxperuser == 1000


def test_pyloadbalancer_keys_are_read_and_obsolete_ones_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LBMQTT_OLD_KEYS_WARNED", "")  # (the warning's marker; restored after)
    old = {
        "SOCKET_TIMEOUT": 500,
        "LB_IP": "127.0.0.1",
        "LB_WKPULLPORT": 5699,
        "MONITOR_IP": "0.0.0.0",
        "MONITOR_PORT": 9001,
        "LB_QUEING_MAXPERUSER": 10,
        "WKHUB_WORKERS": [
            {"nWorkers": 4, "minP": 0, "maxP": 9, "processP": 10},
            {"nWorkers": 4, "minP": 100, "maxP": 1000, "processP": 0},
        ],
    }
    s = load_settings(write(tmp_path, old), env={})
    assert s.monitor_ip == "0.0.0.0" and s.monitor_port == 9001
    assert s.lb_queing_maxperuser == 10
    assert [(g.n_workers, g.min_p, g.max_p, g.process_p) for g in s.wkhub_workers] == [
        (4, 0, 9, 10),
        (4, 100, 1000, 0),
    ]
    assert s.broker_host == "127.0.0.1" and s.client_ack_timeout_s == 3.5  # (LB_IP, SOCKET_TIMEOUT)
    assert "ignoring pyLoadBalancer keys LB_WKPULLPORT:" in caplog.text


def test_unknown_key_names_the_file_and_suggests_the_right_one(tmp_path: Path) -> None:
    p = write(tmp_path, {"BROKER_PROT": 1884})
    with pytest.raises(ConfigError) as info:
        load_settings(p, env={})
    assert str(info.value) == f"{p}: unknown key 'BROKER_PROT' (did you mean 'BROKER_PORT'?)"


def test_bad_value_names_the_key_path(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        {
            "WKHUB_WORKERS": [
                {"nWorkers": 1, "minP": 0, "maxP": 9},
                {"nWorkers": "two", "minP": 0, "maxP": 9},
            ]
        },
    )
    with pytest.raises(ConfigError, match=r"WKHUB_WORKERS\[1\]\.nWorkers: .*integer.*\"two\""):
        load_settings(p, env={})


def test_band_with_min_above_max_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, {"WKHUB_WORKERS": [{"nWorkers": 1, "minP": 10, "maxP": 9}]})
    with pytest.raises(ConfigError, match=r"minP \(10\) must not exceed maxP \(9\)"):
        load_settings(p, env={})


def test_not_json_names_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path, '{\n  "BROKER_PORT": 1883,\n}')
    with pytest.raises(ConfigError, match=r"not valid JSON at line 3 column 1"):
        load_settings(p, env={})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such parameters file"):
        load_settings(tmp_path / "nope.json", env={})


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    p = write(tmp_path, {"BROKER_PORT": 1111, "NODE_NAME": "a"})
    env = {
        "LBMQTT_BROKER_PORT": "2222",
        "LBMQTT_NODE_NAME": "007",
        "LBMQTT_WKHUB_WORKERS": '[{"nWorkers": 3, "minP": 0, "maxP": 5}]',
        "LBMQTT_SOMETHING_ELSE": "ignored",
    }
    s = load_settings(p, env=env)
    assert s.broker_port == 2222 and s.node_name == "007"
    assert s.wkhub_workers[0].n_workers == 3
    assert "LBMQTT_BROKER_PORT" in s.source
    assert load_settings(p, env=env, overrides={"BROKER_PORT": 3333}).broker_port == 3333


def test_bad_environment_value_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"LBMQTT_BROKER_PORT.*BROKER_PORT"):
        load_settings(None, env={"LBMQTT_BROKER_PORT": "lots"})


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValueError):
        s.broker_port = 5  # type: ignore[misc]


def test_cli_prints_one_line_for_a_bad_file_and_exits_2(tmp_path: Path) -> None:
    p = write(tmp_path, {"MONITOR_PORT": "ninety"})
    r = run_cli("status", "--parameters", str(p), timeout=30)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert str(p) in r.stderr and "MONITOR_PORT" in r.stderr


def test_every_command_takes_parameters() -> None:
    for command in (
        "up",
        "broker",
        "balancer",
        "node",
        "dashboard",
        "submit",
        "get",
        "cancel",
        "status",
    ):
        r = run_cli(command, "--help", timeout=30)
        assert r.returncode == 0 and "--parameters FILE" in r.stdout, command
