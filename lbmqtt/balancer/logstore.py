"""The journal as an append-only log: a :class:`~lbmqtt.balancer.journal.JournalStore` in
one file (``JOURNAL_FORMAT: "log"``).

SQLite rewrites a task's row at every change (6-8 µs per row in a busy balancer, a fifth of
its time at 4.2 rows per task); this store appends. Each group commit is one frame, written
with one ``write``: a header (the body's length and its CRC-32) and the body, the commit's
new entries, changes and deleted seqs as ``marshal`` data (plain tuples of str, int, float,
bytes and None). A write to a file survives the balancer being killed at any moment, as
SQLite's WAL does at ``JOURNAL_SYNC: normal``; ``full`` adds an fsync per commit.

Loading replays the frames in order. A frame cut short or damaged (a power cut in the middle
of a write) ends the journal there: it and whatever follows are cut off, with a warning.

The file grows with every change, so it is rewritten (*compacted*) once the records that
later ones replaced or deleted outnumber the live entries three times over (and 500,000):
a thread replays the file up to its end at that moment and writes the live entries to a
new file, while commits go on appending to the old one; the next commit after the thread
is done copies what was appended meanwhile, fsyncs the new file and puts it in the old
one's place (``os.replace``). A killed balancer leaves the old file whole (and a temporary
one, removed at the next open).

The store keeps one bit per seq (live or not) to refuse a change of an entry never written
(:class:`LookupError`, as the other stores do): 125 KB per million tasks ever submitted.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .journal import CHANGING, JournalEntry

log = logging.getLogger(__name__)

MAGIC = b"lbmqtt journal log 1\n"
"""The first bytes of a log journal (an SQLite journal starts with ``SQLite format 3``)."""
FRAME = struct.Struct("!II")
"""A frame's header: the body's length and its CRC-32."""
COMPACT_MIN_RECORDS = 500_000
"""A log is compacted only once it holds more replaced or deleted records than this..."""
COMPACT_RATIO = 3
"""... and more than this many times as many as live entries."""
SNAPSHOT_FRAME = 10_000
"""Entries per frame in a compacted file."""

_FIRST_CHANGING = len(JournalEntry._fields) - len(CHANGING)
_SEQ = JournalEntry._fields.index("seq")


class LogJournal:
    """A durable task journal in one append-only file.

    Args:
        path: the file (created with its directory).
        sync: ``"normal"`` or ``"full"`` (an fsync per commit).

    Raises:
        OSError: the file cannot be opened or created.
        ValueError: the file is not a log journal.
    """

    def __init__(self, path: str | os.PathLike[str], sync: str = "normal"):
        self.path = str(path)
        self.sync = sync == "full"
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path + ".compacting"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)  # (a compaction a killed balancer left unfinished)
        if not os.path.exists(self.path):
            self._create(self.path)
        with open(self.path, "rb") as f:
            head = f.read(len(MAGIC))
        if head != MAGIC:
            raise ValueError(f"{self.path} is not an lbmqtt log journal")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._live = bytearray()
        """Bit ``seq``: the entry of that seq is written and not deleted."""
        self._records = 0
        """Records in the file (entries, changes, deletions)."""
        self._entries = 0
        """Live entries (as far as counted: an entry written whole again counts twice)."""
        self._loaded = False
        self._compactor: threading.Thread | None = None
        self._compacted: tuple[int, int] | None = None
        """(offset, live) of a compaction done: the new file holds the old one to offset."""
        self._counts_at_start = (0, 0)
        """(records, entries) when the compaction under way started."""
        self._retry_at = 0.0
        """No compaction before this (time.monotonic), after one failed."""
        self._stop = threading.Event()
        self.commits = 0
        self.rows_written = 0
        self.commit_seconds = 0.0
        self.compactions = 0

    @staticmethod
    def _create(path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, MAGIC)
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------ reading

    def load(self) -> Iterator[JournalEntry]:
        """Every entry, in submit order (a damaged tail is cut off first)."""
        entries, end, damaged = _replay(self.path, None)
        if damaged:
            log.warning(
                "journal %s: a damaged or unfinished last write at byte %d is cut off "
                "(the commits from there on are lost: a power cut, or a full disk)",
                self.path,
                end,
            )
            os.truncate(self.path, end)
        live = bytearray()
        for seq in entries:
            _set(live, seq)
        self._live = live
        self._entries = self._records = len(entries)
        self._loaded = True
        for seq in sorted(entries):
            yield _new(JournalEntry, entries[seq])

    def count(self) -> int:
        """The live entries (replays the file)."""
        return count_log_entries(self.path)

    # ------------------------------------------------------------------------ writing

    def commit(
        self,
        new: Sequence[JournalEntry],
        changed: Sequence[JournalEntry] = (),
        gone: Iterable[int] = (),
    ) -> int:
        """Append one frame: delete the ``gone`` seqs, write the ``new`` entries whole,
        then the :data:`CHANGING` fields of the ``changed`` ones. Returns the number of
        entries written.

        Raises:
            LookupError: a changed entry was never written, or was deleted (then nothing
                is written).
            OSError: the write failed (the frame may be in part on disk: the next open
                cuts it off).
        """
        t0 = time.perf_counter()
        gone = list(gone)
        if not new and not changed and not gone:
            return 0
        live = self._live
        added = {e.seq for e in new}
        gone_set = set(gone)
        missing = sum(
            1
            for e in changed
            if e.seq not in added and (e.seq in gone_set or not _has(live, e.seq))
        )
        if missing:
            raise LookupError(
                f"{missing} of {len(changed)} changed tasks have no row in the journal"
            )
        body = marshal.dumps(
            (
                list(map(tuple, new)),
                [(e[_SEQ], *e[_FIRST_CHANGING:]) for e in changed],
                gone,
            )
        )
        os.write(self._fd, FRAME.pack(len(body), zlib.crc32(body)) + body)
        if self.sync:
            os.fsync(self._fd)
        for seq in gone:
            _clear(live, seq)
        for seq in added:
            _set(live, seq)
        self._records += len(new) + len(changed) + len(gone)
        self._entries += len(new) - len(gone)
        self.commits += 1
        self.rows_written += len(new) + len(changed)
        if self._compacted is not None:
            self._switch()
        elif (
            self._compactor is None
            and self._wants_compaction()
            and time.monotonic() >= self._retry_at
        ):
            self._start_compaction()
        self.commit_seconds += time.perf_counter() - t0
        return len(new) + len(changed)

    def close(self) -> None:
        """Close the file (a compaction under way is abandoned: the file stays whole)."""
        self._stop.set()
        if self._compactor is not None:
            self._compactor.join()
            self._compactor = None
            if self._compacted is not None:
                self._switch()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)
        with contextlib.suppress(OSError):
            os.close(self._fd)

    # -------------------------------------------------------------------- compaction

    def _wants_compaction(self) -> bool:
        garbage = self._records - self._entries
        return garbage > COMPACT_MIN_RECORDS and garbage > COMPACT_RATIO * self._entries

    def _start_compaction(self) -> None:
        offset = os.fstat(self._fd).st_size  # (whole frames only: one write per frame)
        self._counts_at_start = (self._records, self._entries)
        self._compactor = threading.Thread(
            target=self._compact, args=(offset,), name="lbmqtt-journal-compaction", daemon=True
        )
        self._compactor.start()

    def _compact(self, offset: int) -> None:
        """(thread) Write the live entries of the file up to ``offset`` to the temporary
        file, fsynced; the next commit puts it in place."""
        try:
            entries, _, damaged = _replay(self.path, offset)
            if damaged:
                raise OSError("the journal changed under the compaction")
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, MAGIC)
                rows = [entries[seq] for seq in sorted(entries)]
                for i in range(0, len(rows), SNAPSHOT_FRAME):
                    if self._stop.is_set():
                        raise OSError("the journal is closing")
                    body = marshal.dumps((rows[i : i + SNAPSHOT_FRAME], [], []))
                    os.write(fd, FRAME.pack(len(body), zlib.crc32(body)) + body)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._compacted = (offset, len(entries))
        except Exception as exc:  # (never the balancer's problem: the old file is whole)
            if not self._stop.is_set():
                log.warning("journal %s: compaction abandoned (%s)", self.path, exc)
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._retry_at = time.monotonic() + 60
            self._compactor = None

    def _switch(self) -> None:
        """Append to the compacted file what was committed during the compaction, fsync
        it, and put it in the old file's place."""
        assert self._compacted is not None
        offset, live = self._compacted
        self._compacted = None
        if self._compactor is not None:
            self._compactor.join()
            self._compactor = None
        try:
            with open(self.path, "rb") as old:
                old.seek(offset)
                tail = old.read()
            fd = os.open(self._tmp, os.O_WRONLY | os.O_APPEND)
            try:
                if tail:
                    os.write(fd, tail)
                os.fsync(fd)
            finally:
                os.close(fd)
            size_before = offset + len(tail)
            os.replace(self._tmp, self.path)
            _fsync_dir(self.path)
        except OSError as exc:
            log.warning("journal %s: compaction abandoned (%s)", self.path, exc)
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._retry_at = time.monotonic() + 60
            return
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        records0, entries0 = self._counts_at_start
        self._records = live + (self._records - records0)  # (+ what the tail holds)
        self._entries = live + (self._entries - entries0)
        self.compactions += 1
        log.info(
            "journal %s: compacted %d bytes to %d (%d entries)",
            self.path,
            size_before,
            os.fstat(self._fd).st_size,
            live,
        )


# ------------------------------------------------------------------------ the format


_new = tuple.__new__


def _replay(path: str, end: int | None) -> tuple[dict[int, list[object]], int, bool]:
    """The live entries of the file (up to byte ``end``), as field lists by seq; the
    offset where the valid frames end; and whether a damaged frame ends them."""
    with open(path, "rb") as f:
        data = f.read() if end is None else f.read(end)
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not an lbmqtt log journal")
    entries: dict[int, list[object]] = {}
    pos, size = len(MAGIC), len(data)
    head = FRAME.size
    first = _FIRST_CHANGING
    while pos < size:
        if pos + head > size:
            return entries, pos, True
        length, crc = FRAME.unpack_from(data, pos)
        body = data[pos + head : pos + head + length]
        if len(body) < length or zlib.crc32(body) != crc:
            return entries, pos, True
        try:
            # (the balancer's own file, its CRC checked: marshal is safe on what it wrote)
            new, changed, gone = marshal.loads(body)  # noqa: S302
        except (ValueError, EOFError, TypeError):
            return entries, pos, True
        for seq in gone:
            entries.pop(seq, None)
        for row in new:
            entries[row[_SEQ]] = list(row)
        for ch in changed:
            row = entries.get(ch[0])
            if row is not None:
                row[first:] = ch[1:]
        pos += head + length
    return entries, pos, False


def count_log_entries(path: str | os.PathLike[str]) -> int:
    """The live entries of a log journal (replays the file).

    Raises:
        OSError: it cannot be read. ValueError: it is not a log journal.
    """
    return len(_replay(str(path), None)[0])


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _set(bits: bytearray, seq: int) -> None:
    i = seq >> 3
    if i >= len(bits):
        bits.extend(bytes(max(i + 1 - len(bits), len(bits))))
    bits[i] |= 1 << (seq & 7)


def _clear(bits: bytearray, seq: int) -> None:
    i = seq >> 3
    if i < len(bits):
        bits[i] &= ~(1 << (seq & 7)) & 0xFF


def _has(bits: bytearray, seq: int) -> bool:
    i = seq >> 3
    return i < len(bits) and bool(bits[i] >> (seq & 7) & 1)
