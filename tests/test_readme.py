"""The README stays true: its commands, its MQTT recipe and its parameters table."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from lbmqtt.config import ALIASES

from .conftest import ROOT, System

README = (ROOT / "README.md").read_text()


def test_every_parameter_is_documented_in_the_readme() -> None:
    table = README.split("## parameters.json", 1)[1].split("\n## ", 1)[0]
    missing = [key for key in ALIASES if f"`{key}`" not in table]
    assert missing == []


def test_the_two_quick_start_commands_are_there() -> None:
    assert "pip install -e . && .venv/bin/lbmqtt up" in README
    assert "pip install -e '.[test]' && .venv/bin/pytest" in README


@pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None,
    reason="needs mosquitto-clients (Debian package; .ci/run installs it)",
)
def test_the_mosquitto_recipe_returns_hello(running: System) -> None:
    recipe = README.split("<!-- mqtt-recipe -->", 1)[1].split("<!-- /mqtt-recipe -->", 1)[0]
    script = re.search(r"```sh\n(.*?)```", recipe, re.S)
    assert script is not None
    s = running.settings
    text = (
        script.group(1)
        .replace("-p 1883", f"-p {s.broker_port}")
        .replace("lbmqtt/v1/", f"{s.topic_prefix}/")
    )
    r = subprocess.run(
        ["bash", "-c", text], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    assert '"status":"done"' in r.stdout and '"result":"Hello John Doe !"' in r.stdout
