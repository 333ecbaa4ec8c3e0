"""The node daemon: runs assigned tasks in worker processes and reports on them.

Modules: :mod:`.core` (:class:`Node`: lifecycle and the MQTT side: status and will, the
assignment set in, heartbeats, resends), :mod:`.supervisor` (the worker processes and the
tasks handed to them), :mod:`.reports` (the report batcher), :mod:`.announce` (the status
and heartbeat messages, the default name). The messages between the node
and its workers are in :mod:`lbmqtt.protocol_worker`, the decoding of its assignment set in
:mod:`lbmqtt.protocol.assign`.
"""

from __future__ import annotations

from .announce import default_node_name
from .core import Node
from .reports import PROGRESS_FLUSH_S, REPORT_GAP_S
from .supervisor import HANDOFF_BATCH, HANDOFF_SHORT_S, RESTART_BACKOFF_MAX_S

__all__ = [
    "HANDOFF_BATCH",
    "HANDOFF_SHORT_S",
    "PROGRESS_FLUSH_S",
    "REPORT_GAP_S",
    "RESTART_BACKOFF_MAX_S",
    "Node",
    "default_node_name",
]
