"""The live dashboard: a Bokeh server page fed by the balancer's retained stats over MQTT.

The page: queued tasks over time stacked by priority band (selectable by task name), tasks
queued and running, busy and free slots, throughput, per-user running and queued, per-node
slots with load, speed and last-seen, wait and run time percentiles per task name, a table
of running and recent tasks with their progress, and the warnings.

One module per concern (NOTES.md, "Bokeh", has the facts the design rests on):

``state``
    The MQTT subscriber side (:func:`dashboard_transport`) and :class:`DashboardState`, the
    ring buffer of samples shared by every page, read through immutable snapshots.
``columns``
    What a page shows as plain data: data-source columns, summary, warnings.
``page``
    The Bokeh document of one session (:func:`make_document`): figures, data sources and
    its one ``async`` catch-up callback that streams new samples with ``rollover``.
``server``
    The Bokeh server embedded on the running loop (:func:`start_server`) and the dashboard
    process (:func:`serve`).
"""

from .columns import warnings_of
from .page import DashboardPage, make_document
from .server import DashboardServer, serve, start_server
from .state import (
    ALL_TASKS,
    ROLLOVER,
    DashboardState,
    Sample,
    Snapshot,
    dashboard_transport,
    message_handler,
    subscriptions,
)

__all__ = [
    "ALL_TASKS",
    "ROLLOVER",
    "DashboardPage",
    "DashboardServer",
    "DashboardState",
    "Sample",
    "Snapshot",
    "dashboard_transport",
    "make_document",
    "message_handler",
    "serve",
    "start_server",
    "subscriptions",
    "warnings_of",
]
