"""``lbmqtt journal reset``: start clean without turning crash recovery off.

Removes the journal a balancer with the same settings would open (JOURNAL_PATH, ``auto``:
one file per broker and prefix), but never under a balancer that is online on that broker
and prefix: it would go on writing to a file nobody can open again, and its tasks would
be lost at its next restart.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .cli import Exit
from .config import Settings
from .errors import BrokerUnavailable, LoginRefused
from .protocol import BalancerStatus, Topics


def cmd_journal(ns: argparse.Namespace, s: Settings) -> int:
    """Remove the balancer's journal (see ``lbmqtt journal --help``)."""
    from .balancer.sqlite import journal_file, remove_journal

    path = journal_file(s)
    if path is None:
        print("JOURNAL_PATH is none: the balancer keeps no journal, nothing to reset")
        return Exit.OK
    where = f"{s.broker_host}:{s.broker_port} with topics under {s.topic_prefix}/"
    try:
        other = asyncio.run(_online_balancer(s))
    except LoginRefused:
        raise  # (its own exit status: the login must be fixed first)
    except BrokerUnavailable:
        other = None  # (no broker there, or none found: no balancer can be online on it)
    if other is not None:
        print(
            f"lbmqtt: a balancer is online on {where} (host {other.host or '?'}, pid "
            f"{other.pid or '?'}): stop it first; nothing removed",
            file=sys.stderr,
        )
        return Exit.BALANCER_ONLINE
    removed, tasks = remove_journal(path)
    if not removed:
        print(f"no journal at {path}: nothing to remove")
        return Exit.OK
    held = "" if tasks is None else f" ({tasks} task{'' if tasks == 1 else 's'})"
    print(f"removed the journal of {where}{held}: " + ", ".join(map(str, removed)))
    return Exit.OK


async def _online_balancer(configured: Settings) -> BalancerStatus | None:
    """The retained status of a balancer online on this broker and prefix, else None: the
    check a balancer makes before it starts (BROKER_HOST ``auto`` found as it finds it).

    Raises:
        BrokerUnavailable: the broker is not reachable or not found (LoginRefused: it
            refused us).
    """
    from .discovery import resolve
    from .health import read_online

    s = await resolve(configured)
    # (a stopped `lbmqtt up` took its broker along: its "retrying" lines would only alarm)
    logging.getLogger("lbmqtt.mqtt").setLevel(logging.ERROR)
    return await read_online(s, Topics(s.topic_prefix).balancer_status, BalancerStatus)
