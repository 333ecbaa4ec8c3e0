"""The public API is pinned: renaming breaks users and scripts."""

from __future__ import annotations

import subprocess
import sys

import lbmqtt


def test_public_names_are_pinned() -> None:
    assert sorted(lbmqtt.__all__) == sorted(
        [
            "AsyncClient",
            "Balancer",
            "BalancerUnavailable",
            "BrokerUnavailable",
            "Client",
            "ConfigError",
            "EmbeddedBroker",
            "InvalidTask",
            "LbmqttError",
            "Node",
            "QuotaExceeded",
            "RateLimited",
            "Registry",
            "Settings",
            "Status",
            "SubmitRefused",
            "TaskCancelled",
            "TaskContext",
            "TaskError",
            "TaskFailed",
            "TaskState",
            "UnknownTask",
            "WaitTimeout",
            "__version__",
            "load_settings",
            "task",
        ]
    )
    for name in lbmqtt.__all__:
        assert getattr(lbmqtt, name) is not None


def test_client_signatures_keep_their_contract() -> None:
    import inspect

    from lbmqtt import AsyncClient, Client

    for cls in (Client, AsyncClient):
        sig = {
            n: str(inspect.signature(getattr(cls, n)))
            for n in ("submit", "get", "wait", "cancel", "map")
        }
        assert sig["submit"].startswith(
            "(self, name: 'str', args: 'Any' = None, *, "
            "priority: 'int' = 0, task_id: 'str | None' = None"
        )
        assert sig["wait"].startswith("(self, task_id: 'str', timeout: 'float | None' = None")
        assert sig["map"].startswith("(self, name: 'str', iterable: 'Iterable[Any]'")


def test_a_worker_process_does_not_import_the_heavy_modules() -> None:
    code = (
        "import sys, lbmqtt.worker, lbmqtt.registry; "
        "print(sorted(m for m in ('pydantic', 'paho', 'bokeh', 'amqtt') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


def test_the_client_names_import_from_lbmqtt_client_as_they_did_from_one_module() -> None:
    import lbmqtt.client as client

    assert client.__all__ == ["AsyncClient", "Client", "SubmitRefused", "outcome"]
    assert client.Client is lbmqtt.Client and client.AsyncClient is lbmqtt.AsyncClient
    assert client.SubmitRefused is lbmqtt.SubmitRefused
    for name in ("RESEND_S", "REQUERY_S", "DEFAULT_BATCH", "RATE_PAUSE_MIN_S", "default_user"):
        assert getattr(client, name) is not None
