"""The Bokeh document of one browser session: figures, data sources and its catch-up callback.

:func:`make_document` builds one page per browser session. Its ``async def`` periodic
callback streams only the samples it has not shown yet (``rollover``), so a session costs
one callback however many samples arrive, and a closed session leaks nothing (NOTES.md,
"Bokeh").
"""

from __future__ import annotations

import contextlib
import html
import logging
from collections.abc import Callable
from typing import Any, Final, cast

from bokeh.core.properties import value
from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, CustomJS, DataRange1d, FactorRange
from bokeh.models.annotations import Legend, LegendItem
from bokeh.models.widgets.inputs import Select
from bokeh.models.widgets.markups import Div
from bokeh.models.widgets.tables import DataTable, HTMLTemplateFormatter, TableColumn
from bokeh.plotting import figure

from ..protocol import BalancerStats
from .columns import (
    BAND_COLORS,
    MAX_BANDS,
    band_slots,
    bands_seen,
    node_columns,
    queue_columns,
    sample_columns,
    stream_columns,
    summary_html,
    task_columns,
    time_columns,
    user_columns,
    warnings_of,
)
from .state import ALL_TASKS, ROLLOVER, DashboardState, Snapshot

log = logging.getLogger(__name__)

UPDATE_MS: Final = 500
"""Period of each page's update callback."""


def _table(
    source: ColumnDataSource,
    name: str,
    columns: list[tuple[str, str]],
    height: int,
    progress: str | None = None,
) -> DataTable:
    cols = []
    for field, title in columns:
        fmt: Any = None
        if field == progress:
            fmt = HTMLTemplateFormatter(template=_PROGRESS_TEMPLATE)
        cols.append(
            TableColumn(field=field, title=title, formatter=fmt)
            if fmt is not None
            else TableColumn(field=field, title=title)
        )
    table = DataTable(
        source=source,
        index_position=None,
        height=height,
        sizing_mode="stretch_width",
        name=name,
        columns=cols,
    )
    # BokehJS (3.9) redraws a DataTable only when its CDSView's indices change, so new data
    # with as many rows as before would never show: nudge the view on every replacement.
    source.js_on_change("data", CustomJS(args={"table": table}, code="table.view.change.emit()"))
    return table


def _legend_above(fig: Any, renderers: list[Any], labels: list[str]) -> None:
    items = [
        LegendItem(label=value(t), renderers=[r]) for t, r in zip(labels, renderers, strict=True)
    ]
    fig.add_layout(Legend(items=items, orientation="horizontal", location="top_left"), "above")


_PROGRESS_TEMPLATE: Final = (
    '<div style="background:#eee;width:100%;height:12px;margin-top:4px;position:relative">'
    '<div style="background:#2ca02c;height:12px;width:<%= value %>%"></div>'
    '<span style="position:absolute;top:-3px;left:4px;font-size:10px"><%= value %>%</span>'
    "</div>"
)


class DashboardPage:
    """The models of one page (one per browser session) and its update coroutine."""

    def __init__(self, doc: Document, state: DashboardState):
        self.state = state
        snap = state.snapshot()
        self._last_seq = snap.samples[-1].seq if snap.samples else 0
        self._epoch = snap.epoch
        self._last_stats: BalancerStats | None = snap.stats
        self._band_labels = bands_seen((), snap.stats, snap.samples)
        self._name = ALL_TASKS
        self._failed = False
        self.samples = ColumnDataSource(sample_columns(snap.samples), name="samples")
        self.queue = ColumnDataSource(
            queue_columns(snap.samples, self._band_labels, self._name), name="queue"
        )
        self.nodes = ColumnDataSource(node_columns(snap.stats), name="nodes")
        self.users = ColumnDataSource(user_columns(snap.stats), name="users")
        self.times = ColumnDataSource(time_columns(snap.stats), name="times")
        self.tasks = ColumnDataSource(task_columns(snap.stats), name="tasks")
        stream_cols, lanes = stream_columns(snap.bars, snap.stats.time if snap.stats else 0.0)
        self.stream = ColumnDataSource(stream_cols, name="stream")
        self.summary = Div(text=summary_html(snap), name="summary")
        self.warnings = Div(text=self._warnings_html(snap), name="warnings")
        self.select = Select(
            title="queued tasks of",
            value=ALL_TASKS,
            name="name_select",
            options=self._name_options(snap.stats),
            width=240,
        )
        self.select.on_change("value", self._on_select)

        tools = "pan,xwheel_zoom,box_zoom,reset,save"

        def timeseries(title: str, name: str, **kw: Any) -> Any:
            return figure(
                title=title,
                x_axis_type="datetime",
                height=260,
                tools=tools,
                sizing_mode="stretch_width",
                name=name,
                y_range=DataRange1d(start=0),
                **kw,
            )

        queue = timeseries("Queued tasks by priority band", "queue_chart")
        stacked = queue.varea_stack(
            [f"b{i}" for i in range(MAX_BANDS)], x="t", color=list(BAND_COLORS), source=self.queue
        )
        self.band_items = [
            LegendItem(label=value(""), renderers=[r], visible=False) for r in stacked
        ]
        queue.add_layout(Legend(items=self.band_items, location="top_left", click_policy="hide"))
        self._show_bands()
        tasks = timeseries("Tasks", "tasks_chart", x_range=queue.x_range)
        tasks.line(
            "t", "queued", source=self.samples, legend_label="queued", color="#d62728", line_width=2
        )
        tasks.line(
            "t",
            "running",
            source=self.samples,
            legend_label="running",
            color="#2ca02c",
            line_width=2,
        )
        workers = timeseries("Worker slots: busy and free", "slots_chart", x_range=queue.x_range)
        workers.varea_stack(
            ["busy", "free"],
            x="t",
            color=["#1f77b4", "#c6dbef"],
            legend_label=["busy", "free"],
            source=self.samples,
        )
        rate = timeseries(
            "Throughput (tasks finished per second)", "rate_chart", x_range=queue.x_range
        )
        rate.line(
            "t", "rate", source=self.samples, legend_label="tasks/s", color="#9467bd", line_width=2
        )
        for fig in (tasks, workers, rate):
            fig.legend.location = "top_left"
            fig.legend.click_policy = "hide"

        self.user_range = FactorRange(factors=list(self.users.data["user"]))
        users = figure(
            title="Users: running and queued",
            y_range=self.user_range,
            height=260,
            sizing_mode="stretch_width",
            name="users_chart",
            tools="save",
            x_range=DataRange1d(start=0),
        )
        bars = users.hbar_stack(
            ["running", "queued"],
            y="user",
            height=0.7,
            source=self.users,
            color=["#2ca02c", "#d62728"],
        )
        _legend_above(users, bars, ["running", "queued"])
        self.node_range = FactorRange(factors=list(self.nodes.data["name"]))
        nodes = figure(
            title="Nodes: busy, free and offline slots",
            y_range=self.node_range,
            height=260,
            sizing_mode="stretch_width",
            name="nodes_chart",
            tools="save",
            x_range=DataRange1d(start=0),
        )
        bars = nodes.hbar_stack(
            ["busy", "free", "offline"],
            y="name",
            height=0.7,
            source=self.nodes,
            color=["#1f77b4", "#c6dbef", "#bbbbbb"],
        )
        _legend_above(nodes, bars, ["busy", "free", "offline"])
        for fig in (users, nodes):
            fig.ygrid.grid_line_color = None

        # reversed: the first node's first slot on top
        self.lane_range = FactorRange(factors=lanes[::-1])
        stream = figure(
            title="Task stream: a row per node slot, a bar per task attempt, coloured by task "
            "name (hatched: speculative copy; faded: withdrawn or lost)",
            y_range=self.lane_range,
            x_axis_type="datetime",
            height=320,
            sizing_mode="stretch_width",
            name="stream_chart",
            tools="pan,xwheel_zoom,box_zoom,reset,save",
            tooltips=[
                ("task", "@name @id"),
                ("node", "@node"),
                ("state", "@status @copy"),
            ],
        )
        stream.hbar(
            y="lane",
            left="left",
            right="right",
            height=0.8,
            source=self.stream,
            fill_color="color",
            fill_alpha="alpha",
            line_color="color",
            hatch_pattern="hatch",
            hatch_color="black",
            hatch_alpha=0.6,
        )
        stream.ygrid.grid_line_color = None

        node_table = _table(
            self.nodes,
            "nodes_table",
            [
                ("name", "node"),
                ("online", "online"),
                ("last_seen", "last seen"),
                ("busy", "busy"),
                ("slots", "slots"),
                ("load", "load (1 min)"),
                ("speed", "speed"),
                ("speed_learned", "learned (fastest 1)"),
                ("host", "host"),
                ("tasks", "tasks"),
            ],
            120,
        )
        time_table = _table(
            self.times,
            "times_table",
            [
                ("name", "task"),
                ("queued", "queued"),
                ("running", "running"),
                ("done", "done"),
                ("failed", "failed"),
                ("wait_p50", "wait p50 ms"),
                ("wait_p95", "p95"),
                ("wait_p99", "p99"),
                ("run_p50", "run p50 ms"),
                ("run_p95", "p95"),
                ("run_p99", "p99"),
                ("waiting", "why waiting"),
            ],
            180,
        )
        task_table = _table(
            self.tasks,
            "tasks_table",
            [
                ("status", "state"),
                ("progress", "progress"),
                ("name", "task"),
                ("user", "user"),
                ("node", "node"),
                ("priority", "priority"),
                ("wait_ms", "wait ms"),
                ("run_ms", "run ms"),
                ("id", "id"),
            ],
            300,
            progress="progress",
        )
        doc.title = "lbmqtt dashboard"
        w: Final = "stretch_width"
        doc.add_root(
            column(
                self.summary,
                self.warnings,
                row(
                    column(self.select, queue, sizing_mode=w),
                    column(tasks, sizing_mode=w),
                    sizing_mode=w,
                ),
                row(workers, rate, sizing_mode=w),
                row(users, nodes, sizing_mode=w),
                stream,
                Div(text="<b>Nodes</b>"),
                node_table,
                Div(text="<b>Task names</b>: wait (submit to start) and run times of recent tasks"),
                time_table,
                Div(text="<b>Tasks</b>: running, then recently finished"),
                task_table,
                sizing_mode=w,
            )
        )
        self._doc = doc
        # Bokeh's stubs only know plain callbacks; coroutine functions are supported.
        self._callback = doc.add_periodic_callback(cast(Callable[[], None], self.update), UPDATE_MS)

    @staticmethod
    def _name_options(stats: BalancerStats | None) -> list[str | None]:
        names = sorted(n.name for n in stats.names) if stats is not None else []
        return [ALL_TASKS, *names]

    @staticmethod
    def _warnings_html(snap: Snapshot) -> str:
        items = warnings_of(snap)
        if not items:
            return ""
        lis = "".join(f"<li>{html.escape(w)}</li>" for w in items)
        return f'<ul style="color:#b35900;margin:0">{lis}</ul>'

    def _show_bands(self) -> None:
        labels = band_slots(self._band_labels)
        for i, item in enumerate(self.band_items):
            text = f"priority {labels[i]}" if i < len(labels) else ""
            if item.label != value(text):
                item.label = value(text)
            item.visible = i < len(labels)

    def _redraw_queue(self) -> None:
        # up to the last sample this page has shown: the next update streams the rest
        shown = tuple(s for s in self.state.samples() if s.seq <= self._last_seq)
        self.queue.data = queue_columns(shown[-ROLLOVER:], self._band_labels, self._name)

    def _on_select(self, attr: str, old: Any, new: Any) -> None:
        self._name = new if isinstance(new, str) else ALL_TASKS
        self._redraw_queue()

    async def update(self) -> None:
        """Stream the samples this page has not shown yet and refresh the rest.

        Runs as the session's periodic callback on the event loop (``async def``: Bokeh
        3.10 would run a plain function in a worker thread). Whatever goes wrong is logged
        (once per page) and the next update tries again: a page never stops updating.
        """
        try:
            await self._update()
        except Exception:
            if not self._failed:
                log.exception("dashboard page update failed (logged once per page)")
            self._failed = True

    async def _update(self) -> None:
        snap = self.state.snapshot(self._last_seq, self._epoch)
        if snap.closed:
            with contextlib.suppress(ValueError):
                self._doc.remove_periodic_callback(self._callback)
            return
        stats = snap.stats
        bands = bands_seen(self._band_labels, stats, snap.samples)
        redraw = snap.epoch != self._epoch or bands != self._band_labels
        self._band_labels = bands
        if snap.epoch != self._epoch:
            self._epoch = snap.epoch
            self.samples.data = sample_columns(snap.samples[-ROLLOVER:])
        elif snap.samples:
            self.samples.stream(sample_columns(snap.samples), rollover=ROLLOVER)
        if snap.samples:
            self._last_seq = snap.samples[-1].seq
        if redraw:
            self._show_bands()
            self._redraw_queue()
        elif snap.samples:
            self.queue.stream(queue_columns(snap.samples, bands, self._name), rollover=ROLLOVER)
        if stats is not self._last_stats:
            self._last_stats = stats
            self.nodes.data = node_columns(stats)
            self.users.data = user_columns(stats)
            self.times.data = time_columns(stats)
            self.tasks.data = task_columns(stats)
            cols, lanes = stream_columns(snap.bars, stats.time if stats else 0.0)
            self.stream.data = cols
            if list(self.lane_range.factors) != lanes[::-1]:
                self.lane_range.factors = lanes[::-1]
            if list(self.user_range.factors) != self.users.data["user"]:
                self.user_range.factors = list(self.users.data["user"])
            if list(self.node_range.factors) != self.nodes.data["name"]:
                self.node_range.factors = list(self.nodes.data["name"])
            options = self._name_options(stats)
            if self._name not in options:
                options.append(self._name)
            if options != self.select.options:
                self.select.options = options
            self.summary.text = summary_html(snap)
        text = self._warnings_html(snap)
        if text != self.warnings.text:
            self.warnings.text = text


def make_document(doc: Document, state: DashboardState) -> DashboardPage:
    """Build the dashboard page on ``doc`` (one per session) and start its updates."""
    return DashboardPage(doc, state)
