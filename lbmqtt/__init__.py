"""lbmqtt: a task load balancer for unequal machines on a LAN, over MQTT.

Public API (imported lazily, so that worker processes start fast)::

    from lbmqtt import Client, AsyncClient          # submit, get, wait, cancel, map
    from lbmqtt import Node, Registry, task         # run tasks on a machine
    from lbmqtt import Balancer, load_settings      # run the balancer in-process
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
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

_WHERE = {
    "AsyncClient": "client",
    "Client": "client",
    "Balancer": "balancer",
    "EmbeddedBroker": "broker",
    "Node": "node",
    "Registry": "registry",
    "TaskContext": "registry",
    "task": "registry",
    "Settings": "config",
    "load_settings": "config",
    "Status": "protocol",
    "TaskState": "protocol",
    "BalancerUnavailable": "errors",
    "BrokerUnavailable": "errors",
    "ConfigError": "errors",
    "InvalidTask": "errors",
    "LbmqttError": "errors",
    "QuotaExceeded": "errors",
    "RateLimited": "errors",
    "SubmitRefused": "errors",
    "TaskCancelled": "errors",
    "TaskError": "errors",
    "TaskFailed": "errors",
    "UnknownTask": "errors",
    "WaitTimeout": "errors",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'lbmqtt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{where}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .balancer import Balancer
    from .broker import EmbeddedBroker
    from .client import AsyncClient, Client
    from .config import Settings, load_settings
    from .errors import (
        BalancerUnavailable,
        BrokerUnavailable,
        ConfigError,
        InvalidTask,
        LbmqttError,
        QuotaExceeded,
        RateLimited,
        SubmitRefused,
        TaskCancelled,
        TaskError,
        TaskFailed,
        UnknownTask,
        WaitTimeout,
    )
    from .node import Node
    from .protocol import Status, TaskState
    from .registry import Registry, TaskContext, task
