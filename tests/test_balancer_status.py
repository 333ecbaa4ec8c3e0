"""The balancer's own status topic: a status it did not publish (a forged offline, another
instance's) is replaced by its own, at a bounded rate (issue 20)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from lbmqtt.balancer.ownstatus import STATUS_FIX_S
from lbmqtt.config import Settings
from lbmqtt.health import read_retained
from lbmqtt.protocol import BalancerStatus, Topics, decode
from lbmqtt.status import fetch_stats

from .conftest import System, wait_until


def retained_status(system: System, settings: Settings) -> BalancerStatus | None:
    """What a new subscriber (``lbmqtt status``, a dashboard) reads on balancer/status."""
    topic = Topics(settings.topic_prefix).balancer_status
    got = system.lt.run(
        read_retained(
            host="127.0.0.1",
            port=settings.broker_port,
            filters=[topic],
            prefix=settings.topic_prefix,
        )
    )
    return decode(BalancerStatus, got[topic]) if got.get(topic) else None


def test_a_forged_offline_status_is_replaced_while_the_balancer_runs(
    system: System, settings: Settings, raw: Any
) -> None:
    b = system.start_balancer()
    topic = Topics(settings.topic_prefix).balancer_status
    assert system.lt.run(fetch_stats(settings)).instance == b.instance
    # When anyone retains {"online": false} on its status topic (no logins: anyone may)
    raw().publish(topic, json.dumps({"v": 1, "online": False}), retain=True)
    # Then the balancer publishes its own status again
    system.until(lambda b: b.counters["status_replaced"] >= 1, 10, "the forged status replaced")

    def online_again() -> bool:
        st = retained_status(system, settings)
        return st is not None and st.online and st.instance == b.instance

    wait_until(online_again, 10, "its own status retained again")
    # and `lbmqtt status` says it is online
    assert system.lt.run(fetch_stats(settings, timeout_s=5)).instance == b.instance


def test_another_instances_status_is_replaced_and_a_flood_costs_one_status_a_second(
    system: System, settings: Settings, raw: Any
) -> None:
    b = system.start_balancer()
    topic = Topics(settings.topic_prefix).balancer_status
    watcher, stray = raw(), raw()
    watcher.subscribe(topic)
    wait_until(lambda: watcher.payloads(topic), 5, "its retained status")
    # When a stranger retains statuses of other instances (younger than this one, or with
    # no start time), many in a row
    t0 = time.monotonic()
    for i in range(200):
        forged = {"v": 1, "online": True, "instance": f"forged{i}", "started_at": time.time()}
        stray.c.publish(topic, json.dumps(forged), qos=0, retain=True)
    stray.publish(topic, json.dumps({"v": 1, "online": True, "instance": "last"}), retain=True)

    # Then the balancer's own status is retained again
    def own_again() -> bool:
        st = retained_status(system, settings)
        return st is not None and st.instance == b.instance

    def ours() -> list[bytes]:
        return [p for p in watcher.payloads(topic) if json.loads(p).get("instance") == b.instance]

    wait_until(own_again, 10, "its own status retained again")
    # (the watcher is another connection: the broker may deliver the new status to it after
    # a later subscriber got it retained; CI once counted only the first one)
    wait_until(lambda: len(ours()) >= 2, 10, "the watcher to see it published again")
    elapsed = time.monotonic() - t0
    # and it answered the flood with at most one status a second
    assert len(ours()) <= 1 + elapsed / STATUS_FIX_S + 1, (len(ours()), elapsed)


def test_a_status_claiming_another_balancer_is_online_is_replaced_and_named(
    system: System, settings: Settings, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # (anyone may forge one, with any start time: deferring to it would leave the topic
    # to a forger for good)
    b = system.start_balancer()
    topic = Topics(settings.topic_prefix).balancer_status
    older = BalancerStatus(
        online=True, instance="older0000000", started_at=b.started_at - 60, host="box", pid=42
    ).encode()
    stray = raw()
    # When a status says a balancer started before this one is online on the same prefix
    stray.publish(topic, older, retain=True)
    # Then this one replaces it, and says whom it names
    system.until(lambda b: b.counters["status_replaced"] >= 1, 10, "the status replaced")
    wait_until(
        lambda: getattr(retained_status(system, settings), "instance", None) == b.instance,
        10,
        "its own again",
    )
    assert "another balancer (instance older0000000, host box, pid 42)" in caplog.text
