"""The journal's stores on their own (SQLite, the append-only log, memory): the same
commits give the same entries; the log store's compaction, power cuts and full disks.
(The balancer's use of them: ``test_journal.py``.)"""

from __future__ import annotations

import marshal
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbmqtt.balancer import JournalEntry, JournalStore, LogJournal, MemoryJournal, SqliteJournal

from .journal_rows import change, row

# ------------------------------------------------------------- every store


@pytest.fixture(params=["sqlite", "log", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JournalStore]:
    s: JournalStore
    if request.param == "sqlite":
        s = SqliteJournal(tmp_path / "j.sqlite3")
    elif request.param == "log":
        s = LogJournal(tmp_path / "j.log")
    else:
        s = MemoryJournal()
    yield s
    s.close()


def test_both_stores_keep_the_same_entries_from_the_same_commits(store: JournalStore) -> None:
    store.commit([row("b", 2), row("a", 1), row("c", 3)])
    store.commit([row("x", 4, "done")], gone=[3])
    store.commit([], [change("running", 1, "n1", 0, 5.0, None, None, None, None, 0, 2)])
    with pytest.raises(LookupError, match="1 of 2 changed tasks have no row"):
        store.commit(
            [row("d", 5)],
            [
                change("done", 1, "n1", None, 5.0, 6.0, b"[2]", None, 7.0, 0, 2),
                change("done", 1, None, None, None, None, None, None, None, 0, 9),
            ],
        )
    got = [(e.id, e.seq, e.status, e.node, e.grp, e.user) for e in store.load()]
    assert got == [
        ("a", 1, "queued", None, None, "u"),
        ("b", 2, "running", "n1", 0, "u"),  # (its static fields were not changed)
        ("x", 4, "done", None, None, "u"),
    ]


def test_a_collection_writes_its_time_alone_and_every_store_keeps_it(
    store: JournalStore, tmp_path: Path
) -> None:
    done = row("a", 1, "done")._replace(result=b"[1]", finished_at=3.0)
    store.commit([done, row("b", 2)])
    # a collection time for a, none for b, and one for a seq never written (passed over)
    store.commit([], collected=[(1, 7.5), (99, 8.0)])
    # a deleted seq's collection in the same commit is passed over too
    store.commit([], gone=[2], collected=[(2, 9.0)])
    got = [(e.id, e.status, e.result, e.finished_at, e.collected_at) for e in store.load()]
    assert got == [("a", "done", b"[1]", 3.0, 7.5)]
    path = getattr(store, "path", ":memory:")
    if path != ":memory:":  # (and once it is opened again)
        store.close()
        again = LogJournal(path) if isinstance(store, LogJournal) else SqliteJournal(path)
        try:
            assert [(e.id, e.collected_at) for e in again.load()] == [("a", 7.5)]
        finally:
            again.close()


def test_a_log_journal_s_collection_times_pass_as_deletions_of_nothing_to_an_older_reader(
    tmp_path: Path,
) -> None:
    """A balancer from before collection times were written alone read each frame as
    ``new, changed, gone = marshal.loads(body)`` and deleted every item of ``gone``: a
    frame with a collection must read whole that way, deleting nothing more."""
    import lbmqtt.balancer.logstore as logstore

    path = tmp_path / "j.log"
    j = LogJournal(path)
    j.commit([row("a", 1, "done"), row("b", 2, "done")])
    j.commit([], gone=[2], collected=[(1, 7.5)])
    j.close()
    data = path.read_bytes()[len(logstore.MAGIC) :]
    entries: dict[int, object] = {}
    while data:  # (the older reader's loop)
        length, _crc = logstore.FRAME.unpack(data[: logstore.FRAME.size])
        body = data[logstore.FRAME.size : logstore.FRAME.size + length]
        new, _changed, gone = marshal.loads(body)
        for seq in gone:
            entries.pop(seq, None)
        for entry in new:
            entries[entry[JournalEntry._fields.index("seq")]] = entry
        data = data[logstore.FRAME.size + length :]
    assert sorted(entries) == [1]


# ------------------------------------------------------------- the log store


def _churn(stores: list[JournalStore], n: int, start: int = 0) -> None:
    """The same commits to each store: ``n`` tasks submitted, placed, done, and the first
    half of them deleted (a busy balancer's journal: far more changes than live rows)."""
    for lo in range(start, start + n, 50):
        seqs = range(lo, min(lo + 50, start + n))
        for s in stores:
            s.commit([row(f"t{q}", q) for q in seqs])
            s.commit(
                [],
                [change("assigned", 1, "n1", 0, None, None, None, None, None, 0, q) for q in seqs],
            )
            s.commit(
                [],
                [change("done", 1, "n1", 0, 2.0, 3.0, b"[1]", None, None, 0, q) for q in seqs],
                gone=[q - n // 2 for q in seqs if q - n // 2 >= start],
                collected=[(q, 4.0 + q) for q in seqs if q % 3 == 0],
            )


def test_a_log_journal_compacts_while_it_is_written_and_keeps_the_same_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lbmqtt.balancer.logstore as logstore

    monkeypatch.setattr(logstore, "COMPACT_MIN_RECORDS", 1_000)
    path = tmp_path / "j.log"
    log_j, mem = LogJournal(path), MemoryJournal()
    whole = LogJournal(tmp_path / "never-compacted.log")
    monkeypatch.setattr(whole, "_wants_compaction", lambda: False)
    stores: list[JournalStore] = [log_j, mem, whole]
    _churn(stores, 2_000)  # (a compaction starts in the middle; commits go on meanwhile)
    if log_j._compactor is not None:  # (still running: else it is in place already)
        log_j._compactor.join(20)
    _churn(stores, 100, start=10_000)  # (a commit after it puts the compacted file in place)
    assert log_j.compactions >= 1
    # the file holds the live entries and the changes since, not the whole history
    assert path.stat().st_size < 0.8 * (tmp_path / "never-compacted.log").stat().st_size
    for s in stores:
        s.close()
    again = LogJournal(path)
    assert list(again.load()) == mem.load()
    again.close()
    assert not (tmp_path / "j.log.compacting").exists()


def test_a_log_journal_cut_short_by_a_power_cut_keeps_the_whole_commits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j.log"
    j = LogJournal(path)
    j.commit([row("a", 1), row("b", 2)])
    j.commit([], [change("done", 1, "n1", 0, 2.0, 3.0, b"[1]", None, None, 0, 1)])
    j.close()
    whole = path.read_bytes()
    j = LogJournal(path)
    j.commit([row("c", 3)])
    j.close()
    # the last write only in part on disk, then garbage
    path.write_bytes(path.read_bytes()[:-3] + b"\x00junk")
    j = LogJournal(path)
    with caplog.at_level("WARNING"):
        got = [(e.id, e.status) for e in j.load()]
    assert got == [("a", "done"), ("b", "queued")]
    assert "cut off" in caplog.text
    assert path.read_bytes() == whole  # (cut: the next commits follow the whole ones)
    j.commit([row("d", 4)])
    j.close()
    assert [e.id for e in LogJournal(path).load()] == ["a", "b", "d"]


def test_a_log_journal_refuses_a_file_that_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "j.log"
    path.write_bytes(b"something else")
    with pytest.raises(ValueError, match="not an lbmqtt log journal"):
        LogJournal(path)


def test_a_log_journal_write_that_fails_half_way_leaves_no_part_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk: the kernel writes what fits, then refuses. The part written must not
    # stay, or every later commit, acknowledged, would follow a damaged frame and be cut
    # off at the next start.
    import errno

    import lbmqtt.balancer.logstore as logstore

    path = tmp_path / "j.log"
    j = LogJournal(path)
    j.commit([row("a", 1)])
    size = path.stat().st_size
    real_write = os.write
    calls = []

    def disk_fills(fd: int, data: Any) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])  # (what fits)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logstore.os, "write", disk_fills)
    with pytest.raises(OSError, match="No space left"):
        j.commit([row("b", 2)])
    monkeypatch.undo()
    assert path.stat().st_size == size  # (the half frame is cut off again)
    j.commit([row("c", 3)])
    j.close()
    assert [e.id for e in LogJournal(path).load()] == ["a", "c"]
