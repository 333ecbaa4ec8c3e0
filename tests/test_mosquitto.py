"""lbmqtt unchanged against Mosquitto: only BROKER_PORT differs (standard MQTT 3.1.1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbmqtt import Client, TaskCancelled
from lbmqtt.protocol import Status

from .conftest import DEMO_TASKS, TEST_TASKS, System, make_settings, wait_until


def test_tasks_run_end_to_end_through_mosquitto(
    mosquitto: int, prefix: str, tmp_path: Path
) -> None:
    s = make_settings(mosquitto, prefix)
    system = System(s)
    try:
        system.start_balancer()
        system.start_node("m1", tasks=[DEMO_TASKS, TEST_TASKS])
        with Client(s, user="alice") as c:
            tid = c.submit("HELLO", {"firstName": "John", "lastName": "Doe"})
            assert c.wait(tid, timeout=20) == "Hello John Doe !"
            assert c.map("ADD", [[i, 1] for i in range(20)]) == [i + 1 for i in range(20)]
            gate = tmp_path / "gate"
            blocked = c.submit("BLOCK", {"gate": str(gate)})
            wait_until(lambda: c.get(blocked).status == Status.RUNNING, 20, "the task to run")
            assert c.cancel(blocked) is True
            with pytest.raises(TaskCancelled):
                c.wait(blocked, timeout=5)
            assert c.get(blocked).status == Status.CANCELLED
    finally:
        system.close()
