"""The dashboard in a real browser: Debian's chromium, headless, driven by selenium through
chromium-driver (``.ci/run`` installs both; no browser is downloaded). It loads the page of a
running ``lbmqtt up``, waits until BokehJS has drawn the charts, watches the data grow while
tasks run, and saves a screenshot (also to ``$LBMQTT_SCREENSHOT`` if set: that is how the
README's picture is made)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbmqtt import Client, TaskCancelled
from lbmqtt.config import load_settings

from .conftest import finish, start_up, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

# What the page holds, read through BokehJS: the rows of each named data source, and whether
# the document has drawn everything (``is_idle``; the root views' flags on older BokehJS).
PAGE_STATE_JS = """
const B = window.Bokeh;
if (!B || !B.documents || !B.documents.length) return null;
const doc = B.documents[0];
const rows = {};
for (const name of ["samples", "queue", "users", "nodes", "tasks", "times", "stream"]) {
  const src = doc.get_model_by_name(name);
  if (!src) return null;
  const data = src.data instanceof Map ? Object.fromEntries(src.data) : src.data;
  rows[name] = data;
}
const idx = B.index || {};
const views = idx instanceof Map ? [...idx.values()] : Object.values(idx);
const idle = doc.is_idle !== undefined ? doc.is_idle
           : views.length > 0 && views.every(v => v.is_idle);
const s = rows.samples, t = rows.tasks;
// the rows the tables show, as drawn (SlickGrid rows, inside Bokeh's shadow roots)
const drawn = [];
const walk = (root) => {
  for (const el of root.querySelectorAll("*")) {
    if (el.classList && el.classList.contains("slick-row")) drawn.push(el.innerText);
    if (el.shadowRoot) walk(el.shadowRoot);
  }
};
walk(document);
return {
  idle: idle,
  samples: s.t.length,
  max_queued: Math.max(0, ...Array.from(s.queued)),
  last_done: s.done_total.length ? s.done_total[s.done_total.length - 1] : 0,
  users: Array.from(rows.users.user),
  nodes: Array.from(rows.nodes.name),
  task_states: Array.from(t.status),
  progress: Array.from(t.progress),
  drawn_rows: drawn,
  stream_lanes: Array.from(rows.stream.lane),
  stream_status: Array.from(rows.stream.status),
  stream_chart: !!doc.get_model_by_name("stream_chart"),
};
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if CHROMIUM is None or DRIVER is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver must be installed in CI (.ci/run)")
        pytest.skip(
            "needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium: never download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
def test_the_dashboard_draws_and_grows_while_tasks_run(browser: Any, tmp_path: Path) -> None:
    up = start_up()
    try:
        assert up.url.startswith("http://127.0.0.1:"), up.text()
        browser.get(up.url)

        def page() -> dict[str, Any] | None:
            state: dict[str, Any] | None = browser.execute_script(PAGE_STATE_JS)
            return state

        # (the page may open before the balancer's stats show the node: wait for both)
        first = wait_until(
            lambda: (p := page()) and p["idle"] and p["samples"] > 0 and p["nodes"] and p,
            60,
            "the page to draw its first samples, with the local node",
        )

        settings = load_settings(None, env={}, overrides={"BROKER_PORT": up.port})
        with Client(settings, user="alice") as alice, Client(settings, user="bob") as bob:
            # more than the node's slots, from two users: a queue builds up, then drains
            mine = [alice.submit("SLEEP", {"seconds": 2, "steps": 5}) for _ in range(4)]
            theirs = [
                bob.submit("SLEEP", {"seconds": 1.5, "steps": 4}, priority=20) for _ in range(2)
            ]
            # and one each that runs until the test has seen what it waits for (they are
            # cancelled then): a page slowed by a loaded machine may otherwise first draw
            # again after the short ones (and a user with them) have all ended
            lasting = alice.submit("SLEEP", {"seconds": 120, "steps": 240})
            theirs_lasting = bob.submit("SLEEP", {"seconds": 120, "steps": 240}, priority=20)
            # (each seen on some drawing, not all on one: bob's tasks may be gone again
            # before a page slowed by a loaded machine shows alice's running)
            users: set[str] = set()
            states: set[str] = set()

            def queue_users_running() -> dict[str, Any] | None:
                p = page()
                if not p:
                    return None
                users.update(p["users"])
                states.update(p["task_states"])
                if p["max_queued"] > 0 and {"alice", "bob"} <= users and "running" in states:
                    return p
                return None

            seen = wait_until(
                queue_users_running, 30, "the queue, both users and running tasks on the page"
            )
            # the picture (the README shows it): some tasks done, others running with
            # progress, after at least one more update has been drawn (each seen on some
            # drawing: on a loaded machine the done count's sample may come only after the
            # last task has stopped running)
            seen_running: list[bool] = []
            last: list[dict[str, Any]] = [{}]

            def done_and_running() -> dict[str, Any] | None:
                p = page()
                if not p:
                    return None
                last[0] = p
                if "running" in p["task_states"] and max(p["progress"]) > 0:
                    seen_running.append(True)
                return p if p["last_done"] >= 2 and seen_running else None

            try:
                mid = wait_until(done_and_running, 30, "tasks done and others running")
            except AssertionError as exc:
                keys = ("samples", "last_done", "task_states", "progress", "users")
                shown = {k: last[0].get(k) for k in keys}
                raise AssertionError(f"{exc}; running seen: {bool(seen_running)}; {shown}") from exc
            wait_until(
                lambda: (p := page()) and p["idle"] and p["samples"] > mid["samples"] and p,
                20,
                "the page to draw the next update",
            )
            shot = tmp_path / "dashboard.png"
            assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
            if os.environ.get("LBMQTT_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["LBMQTT_SCREENSHOT"])
            for who, tid in ((alice, lasting), (bob, theirs_lasting)):
                assert who.cancel(tid) is True
                with pytest.raises(TaskCancelled):
                    who.wait(tid, 30)
            for tid in mine:
                alice.wait(tid, 60)
            for tid in theirs:
                bob.wait(tid, 60)
        # ... and the task table, as drawn, shows the six short ones finished (rows drawn
        # before as running now say done), which BokehJS would not redraw without the
        # dashboard's nudge
        done = wait_until(
            lambda: (
                (p := page())
                and p["last_done"] >= 6
                and p["task_states"].count("done") >= 6
                and sum(r.startswith("done") for r in p["drawn_rows"]) >= 6
                and p
            ),
            30,
            "the finished tasks on the page",
        )
        assert done["samples"] > seen["samples"] >= first["samples"]
        # the task stream: a bar per attempt, in rows of the node's slots (3 here), the six
        # SLEEP tasks done, drawn in the chart
        stream = wait_until(
            lambda: (p := page()) and p["stream_status"].count("done") >= 6 and p,
            30,
            "the finished tasks in the task stream",
        )
        assert stream["stream_chart"]
        assert 1 <= len(set(stream["stream_lanes"])) <= 3, stream["stream_lanes"]
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        finish(up)
