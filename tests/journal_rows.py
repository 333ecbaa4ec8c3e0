"""Journal entries for the journal's tests (``test_journal.py``, ``test_journal_stores.py``)."""

from __future__ import annotations

from typing import Any

from lbmqtt.balancer import CHANGING, JournalEntry


def row(tid: str, seq: int, status: str = "queued") -> JournalEntry:
    return JournalEntry(
        tid,
        "u",
        "ECHO",
        b"[1]",
        0,
        seq,
        1.0,
        "events",
        None,
        None,
        None,
        None,
        None,
        1,
        status,
        0,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        0,
    )


def change(*changing_then_seq: Any) -> JournalEntry:
    """An entry whose CHANGING fields and seq are these; its other fields are junk (a
    change must not write them)."""
    *changing, seq = changing_then_seq
    junk = row("junk", seq)._replace(user="junk", name="JUNK", args=b"junk", notify="junk")
    return junk._replace(**dict(zip(CHANGING, changing, strict=True)))
