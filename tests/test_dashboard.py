"""The live dashboard, without a browser: a real embedded broker, real MQTT clients, the
Bokeh document built on a bare ``Document``, and the served page fetched over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from bokeh.document import Document
from bokeh.util.token import generate_jwt_token, generate_session_id
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from lbmqtt.broker import EmbeddedBroker
from lbmqtt.config import Settings
from lbmqtt.dashboard import (
    ROLLOVER,
    DashboardState,
    dashboard_transport,
    make_document,
    serve,
    warnings_of,
)
from lbmqtt.mqtt import MqttTransport
from lbmqtt.protocol import (
    BalancerHistory,
    BalancerStats,
    DashboardStatus,
    HistorySample,
    NodeSummary,
    StreamBar,
    TaskRow,
    Topics,
    UserSummary,
    decode,
)

HOST = "127.0.0.1"


def _settings(broker_port: int) -> Settings:
    return Settings().with_overrides(
        broker_host=HOST,
        broker_port=broker_port,
        monitor_ip=HOST,
        monitor_port=0,
        topic_prefix=f"test-{uuid.uuid4().hex[:10]}/v1",
    )


def _stats(i: int, t0: float = 1_700_000_000.0, **extra: Any) -> BalancerStats:
    return BalancerStats(
        time=t0 + 0.5 * i,
        instance="lb1",
        queued=10 + i,
        running=i % 4,
        busy=i % 4,
        slots=4,
        done_total=i,
        **extra,
    )


async def _wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


async def _client(
    port: int,
    name: str,
    topics: list[str] | None = None,
    inbox: list[tuple[str, bytes]] | None = None,
) -> MqttTransport:
    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        if inbox is not None:
            inbox.append((topic, payload))

    t = MqttTransport(
        host=HOST,
        port=port,
        client_id=f"{name}-{uuid.uuid4().hex[:6]}",
        on_message=on_message,
        subscriptions=[(f, 1) for f in topics or []],
    )
    await t.start(wait=True, timeout_s=10)
    return t


async def _read_line(fd: int, timeout_s: float) -> str:
    """Read one line from a pipe without blocking the loop (no thread left behind)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buf:
        readable = asyncio.Event()
        loop.add_reader(fd, readable.set)
        try:
            await asyncio.wait_for(readable.wait(), max(0.0, deadline - time.monotonic()))
        finally:
            loop.remove_reader(fd)
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode()


def _http_get(url: str, gzip_ok: bool = False) -> tuple[int, dict[str, str], bytes]:
    headers = {"Accept-Encoding": "gzip"} if gzip_ok else {}
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, dict(resp.headers), resp.read()


# --------------------------------------------------------------------------------- state


def test_state_receives_stats_over_mqtt() -> None:
    async def main() -> None:
        async with EmbeddedBroker(HOST, 0) as broker:
            settings = _settings(broker.port)
            topics = Topics(settings.topic_prefix)
            state = DashboardState()
            dash = dashboard_transport(settings, state, "http://127.0.0.1:1/")
            await dash.start(wait=True, timeout_s=10)
            pub = await _client(broker.port, "pub")
            try:
                for i in range(5):
                    assert await pub.publish_confirmed(
                        topics.balancer_stats, _stats(i).encode(), retain=True
                    )
                    await _wait_until(lambda i=i: state.last_seq == i + 1, f"sample {i + 1}")
                await pub.publish_confirmed(topics.balancer_stats, b"{not json")
                await pub.publish_confirmed(topics.balancer_stats, b'{"queued": 3}')
                await _wait_until(lambda: state.bad_messages == 2, "2 bad messages counted")
                # a replay of the retained snapshot is not a new sample
                assert not state.add_stats(_stats(4))
                samples = state.samples()
                assert [s.seq for s in samples] == [1, 2, 3, 4, 5]
                assert [s.queued for s in samples] == [10, 11, 12, 13, 14]
                snap = state.snapshot(since=3)
                assert [s.seq for s in snap.samples] == [4, 5]
                assert snap.stats is not None and snap.stats.done_total == 4
                assert snap.mqtt_connected
                assert "2 malformed messages ignored" in warnings_of(snap)
            finally:
                await pub.close()
                await dash.close()

    asyncio.run(main())


def test_ring_buffer_is_bounded() -> None:
    state = DashboardState(capacity=10)
    for i in range(25):
        assert state.add_stats(_stats(i))
    samples = state.samples()
    assert len(samples) == 10
    assert [s.seq for s in samples] == list(range(16, 26))
    # a page that fell behind gets what is still kept
    assert [s.seq for s in state.snapshot(since=2).samples] == list(range(16, 26))
    assert state.snapshot(since=25).samples == ()


def test_history_goes_in_front_and_pages_redraw() -> None:
    state = DashboardState(capacity=50)
    for i in range(10, 13):  # live samples first (the retained stats arrive before history)
        state.add_stats(_stats(i, queued_by_band={"0-9": i}))
    page = make_document(Document(), state)
    assert len(page.samples.data["t"]) == 3
    history = BalancerHistory(
        instance="lb1",
        samples=[
            HistorySample(
                time=1_700_000_000.0 + 0.5 * i, queued=10 + i, done_total=i, bands={"0-9": i}
            )
            for i in range(12)
        ],
    )  # overlaps the live ones
    assert state.add_history(history) == 10  # only what is older than the first live one
    assert [s.seq for s in state.samples()] == list(range(1, 14))
    assert [s.queued for s in state.samples()] == [10 + i for i in range(13)]
    # one task finished per 0.5 s: 2 tasks/s once the rate window is covered
    assert state.samples()[-1].rate == pytest.approx(2.0)
    asyncio.run(page.update())  # a new epoch: the page redraws everything
    assert page.samples.data["queued"] == [10 + i for i in range(13)]
    assert page.queue.data["b0"] == list(range(13))
    # history of another balancer instance is not mixed in
    assert (
        state.add_history(BalancerHistory(instance="other", samples=[HistorySample(time=1.0)])) == 0
    )
    assert state.feed_history(b"{broken") == 0 and state.bad_messages == 1


def test_rate_is_zero_across_a_balancer_restart() -> None:
    state = DashboardState()
    state.add_stats(_stats(0))
    state.add_stats(_stats(8))
    assert state.samples()[-1].rate == pytest.approx(2.0)
    restarted = _stats(9).model_copy(update={"instance": "lb2", "done_total": 0})
    state.add_stats(restarted)
    assert state.samples()[-1].rate == 0.0


def test_odd_but_valid_stats_do_not_stop_a_page() -> None:
    """Whatever decodes as stats (a stray publisher, a future balancer) is drawn, or at
    worst skipped: the page keeps updating."""
    state = DashboardState()
    page = make_document(Document(), state)
    dup = NodeSummary(name="n1", online=True, slots=2, busy=5, speed=float("nan"))
    odd = [
        _stats(
            1,
            nodes=[dup, dup.model_copy(update={"online": False})],
            users=[UserSummary(user="a", queued=1), UserSummary(user="a", running=2)],
        ),
        _stats(
            2,
            bands=[f"{i}-{i}" for i in range(20)],
            queued_by_band={f"{i}-{i}": i for i in range(20)} | {"none": 3, "zzz": 1},
        ),
        _stats(3).model_copy(update={"queued": -5, "slots": -1, "busy": -2}),
        _stats(
            4,
            tasks=[
                TaskRow(
                    id="x",
                    user="u",
                    name="N",
                    status="weird",
                    progress=250,
                    wait_s=-1.0,
                    run_s=1e12,
                )
            ],
        ),
    ]
    for stats in odd:
        assert state.add_stats(stats)
        asyncio.run(page.update())
        assert not page._failed, stats
        for factors in (page.node_range.factors, page.user_range.factors):
            assert len(set(factors)) == len(factors)  # BokehJS refuses repeated categories
    assert list(page.node_range.factors) == []
    state.add_stats(_stats(5, nodes=[dup], users=[UserSummary(user="a")]))
    asyncio.run(page.update())
    assert list(page.node_range.factors) == ["n1"] and list(page.user_range.factors) == ["a"]
    assert "queued <b>15</b>" in page.summary.text


# ---------------------------------------------------------------------------- document


def test_make_document_streams_new_samples() -> None:
    state = DashboardState()
    doc = Document()
    page = make_document(doc, state)
    assert doc.roots and doc.title == "lbmqtt dashboard"
    assert doc.select_one({"name": "samples"}) is page.samples
    assert len(page.samples.data["t"]) == 0
    assert "no balancer stats received yet" in page.warnings.text
    assert "not connected to the MQTT broker" in page.warnings.text

    node = NodeSummary(
        name="n1", online=True, host="h1", slots=4, busy=2, speed=2.0, tasks=["HELLO", "SLEEP"]
    )
    for i in range(3):
        state.add_stats(_stats(i, nodes=[node], warnings=["no node offers task 'X'"]))
    state.set_connected(True)
    asyncio.run(page.update())
    assert page.samples.data["queued"] == [10, 11, 12]
    assert page.samples.data["t"][0] == pytest.approx(1_700_000_000_000.0)
    assert page.nodes.data["name"] == ["n1"]
    assert page.nodes.data["tasks"] == ["HELLO, SLEEP"]
    assert "no node offers task &#x27;X&#x27;" in page.warnings.text
    assert "no balancer stats received yet" not in page.warnings.text
    assert "queued <b>12</b>" in page.summary.text

    # only the new samples are streamed, and the chart keeps at most ROLLOVER points
    for i in range(3, ROLLOVER + 50):
        state.add_stats(_stats(i))
    asyncio.run(page.update())
    t = page.samples.data["t"]
    assert len(t) == ROLLOVER
    assert t == sorted(t) and len(set(t)) == ROLLOVER
    asyncio.run(page.update())  # nothing new: nothing changes
    assert len(page.samples.data["t"]) == ROLLOVER

    # a page built later starts with the history kept in the buffer
    late = make_document(Document(), state)
    assert len(late.samples.data["t"]) == ROLLOVER

    # when the dashboard stops, each page drops its periodic callback
    assert len(doc.session_callbacks) == 1
    state.close()
    asyncio.run(page.update())
    assert len(doc.session_callbacks) == 0


def test_the_task_stream_has_a_row_per_node_slot_and_marks_copies() -> None:
    state = DashboardState()
    page = make_document(Document(), state)
    t = 1_700_000_000.0
    bars = [
        StreamBar(id="a", name="SHORT", node="fast", start=t, end=t + 1, status="done"),
        StreamBar(id="b", name="SHORT", node="fast", start=t, end=t + 2, status="done"),
        StreamBar(id="c", name="SHORT", node="fast", start=t + 1, end=t + 3, status="done"),
        StreamBar(id="L", name="LONG", node="slow", start=t, end=t + 4, status="withdrawn"),
        StreamBar(
            id="L",
            name="LONG",
            node="fast",
            start=t + 3,
            end=t + 4,
            status="done",
            speculative=True,
        ),
        StreamBar(id="r", name="SHORT", node="slow", start=t + 4.5),
    ]
    state.add_stats(_stats(10, t0=t, stream=bars))  # at t + 5
    state.add_stats(_stats(11, t0=t, stream=bars[:5]))  # the same ended ones again
    asyncio.run(page.update())
    d = page.stream.data
    lanes = dict(zip(zip(d["id"], d["node"], strict=True), d["lane"], strict=True))
    # two slots' worth of rows on fast (c and the copy reuse the first), one on slow
    assert lanes == {
        ("a", "fast"): "fast #1",
        ("b", "fast"): "fast #2",
        ("L", "slow"): "slow #1",
        ("c", "fast"): "fast #1",
        ("L", "fast"): "fast #1",
    }
    assert list(page.lane_range.factors) == ["slow #1", "fast #2", "fast #1"]
    keys = list(zip(d["id"], d["node"], strict=True))
    i_copy, i_orig = keys.index(("L", "fast")), keys.index(("L", "slow"))
    assert (d["hatch"][i_copy], d["copy"][i_copy]) == ("/", "copy")
    assert d["hatch"][i_orig] == " " and d["alpha"][i_orig] < d["alpha"][i_copy]
    assert d["color"][d["id"].index("a")] != d["color"][i_orig]  # by task name
    assert len(d["id"]) == 5  # no duplicates; the running one went with the first snapshot
    state.add_stats(_stats(12, t0=t, stream=bars))
    asyncio.run(page.update())
    d = page.stream.data
    running = d["id"].index("r")
    assert d["right"][running] == pytest.approx(1000 * (t + 6))  # up to the snapshot's time
    assert d["lane"][running] == "slow #1"


# ------------------------------------------------------------------------------- serve()


def test_serve_on_port_0(capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        async with EmbeddedBroker(HOST, 0) as broker:
            settings = _settings(broker.port)
            topics = Topics(settings.topic_prefix)
            inbox: list[tuple[str, bytes]] = []
            watcher = await _client(broker.port, "watch", [topics.dashboard_status], inbox)
            pub = await _client(broker.port, "pub")
            stop = asyncio.Event()
            r, w = os.pipe()
            task = asyncio.create_task(serve(settings, ready_fd=w, stop=stop))
            try:
                line = await _read_line(r, 15)
                ready = json.loads(line)
                port = ready["port"]
                url = ready["url"]
                assert port > 0 and url == f"http://127.0.0.1:{port}/"

                def statuses() -> list[DashboardStatus]:
                    return [
                        decode(DashboardStatus, p)
                        for t, p in inbox
                        if t == topics.dashboard_status and p
                    ]

                await _wait_until(
                    lambda: any(s.online and s.url == url for s in statuses()),
                    "the retained online DashboardStatus with the URL",
                )

                status, _, body = await asyncio.to_thread(_http_get, url)
                page = body.decode()
                assert status == 200
                assert "Bokeh" in page and "<title>lbmqtt dashboard</title>" in page
                assert "cdn.bokeh.org" not in page
                scripts = re.findall(r'src="([^"]*static/js/bokeh[^"]*\.js[^"]*)"', page)
                assert scripts, "the page loads BokehJS from the dashboard itself"
                js_url = urllib.request.urljoin(url, scripts[0])
                status, headers, js = await asyncio.to_thread(_http_get, js_url, True)
                assert status == 200 and headers.get("Content-Encoding") == "gzip"
                assert b"Bokeh" in gzip.decompress(js)

                # the page's websocket accepts the origin of the printed URL (and only
                # known origins), and its session streams new samples as they arrive
                ws_url = f"ws://127.0.0.1:{port}/ws"
                token = generate_jwt_token(generate_session_id())
                evil = HTTPRequest(ws_url, headers={"Origin": "http://evil.example"})
                with pytest.raises(HTTPClientError) as refused:
                    await websocket_connect(evil, subprotocols=["bokeh", token])
                assert refused.value.code == 403
                req = HTTPRequest(ws_url, headers={"Origin": url.rstrip("/")})
                conn = await asyncio.wait_for(
                    websocket_connect(req, subprotocols=["bokeh", token]), 10
                )
                try:
                    frames: list[str] = []

                    async def until(text: str) -> None:
                        deadline = time.monotonic() + 10
                        while not any(text in f for f in frames):
                            left = deadline - time.monotonic()
                            assert left > 0, f"no websocket frame with {text!r} in {frames}"
                            msg = await asyncio.wait_for(conn.read_message(), left)
                            assert msg is not None, "websocket closed by the dashboard"
                            frames.append(msg if isinstance(msg, str) else msg.decode())

                    await until('"ACK"')
                    await pub.publish_confirmed(
                        topics.balancer_stats, _stats(0).encode(), retain=True
                    )
                    await until("ColumnsStreamed")
                finally:
                    conn.close()

                stop.set()
                await asyncio.wait_for(task, 15)
                await _wait_until(
                    lambda: bool(statuses()) and not statuses()[-1].online,
                    "the retained offline DashboardStatus",
                )
                with pytest.raises(urllib.error.URLError):
                    await asyncio.to_thread(_http_get, url)
            finally:
                stop.set()
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                os.close(r)
                await pub.close()
                await watcher.close()

    asyncio.run(main())
    out = capsys.readouterr().out
    assert re.search(r"^lbmqtt dashboard: http://127\.0\.0\.1:\d+/$", out, re.MULTILINE)


def test_serve_reports_a_busy_port() -> None:
    async def main() -> None:
        async with EmbeddedBroker(HOST, 0) as broker:
            settings = _settings(broker.port).with_overrides(monitor_port=broker.port)
            r, w = os.pipe()
            try:
                with pytest.raises(OSError, match="cannot listen on"):
                    await serve(settings, ready_fd=w, stop=asyncio.Event())
                assert await _read_line(r, 5) == ""  # the ready pipe was closed: EOF
            finally:
                os.close(r)

    asyncio.run(main())


def test_dashboard_package_exports_its_public_names() -> None:
    import lbmqtt.dashboard as dashboard

    assert sorted(dashboard.__all__) == (
        """
        ALL_TASKS DashboardPage DashboardServer DashboardState ROLLOVER Sample Snapshot
        dashboard_transport make_document message_handler serve start_server subscriptions
        warnings_of
        """.split()
    )
    assert all(hasattr(dashboard, name) for name in dashboard.__all__)
