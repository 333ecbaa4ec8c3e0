"""The journal as an append-only log: a :class:`~lbmqtt.balancer.journal.JournalStore` in
one file (``JOURNAL_FORMAT: "log"``, the default).

SQLite rewrites a task's row at every change (6-8 µs per row in a busy balancer, a fifth of
its time at 4.2 rows per task); this store appends. Each group commit is one frame, written
with one ``write``: a header (the body's length and its CRC-32) and the body, the commit's
new entries, changes and deleted seqs as ``marshal`` data (plain tuples of str, int, float,
bytes and None). The times results were collected ride among the deleted seqs as
``(seq, collected_at)`` pairs, applied after the frame's entries and changes: a balancer
from before them took every item there for a seq to delete, so it passes over a pair (no
entry has a tuple for its seq) and reads such a journal whole, only without those times.
A write to a file survives the balancer being killed at any moment, as SQLite's WAL does
at ``JOURNAL_SYNC: normal``; ``full`` adds an fsync per commit.

Opening replays the frames in order, one at a time. A frame cut short or damaged (a power
cut in the middle of a write) ends the journal there: it and whatever follows are cut off,
with a warning, before anything is appended. A write that fails (a full disk) is cut back
at once, so no later commit can follow a damaged frame.

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

from .journal import CHANGING, JournalEntry, refuse_unwritten

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
_COLLECTED = JournalEntry._fields.index("collected_at")


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
        # Replayed now, not when load() is iterated: a damaged tail must be cut off, and
        # the live seqs known, before anything is appended.
        entries, end, records, damaged = _replay(self.path, None)
        if damaged:
            log.warning(
                "journal %s: a damaged or unfinished last write at byte %d is cut off "
                "(the commits from there on are lost: a power cut, or a full disk)",
                self.path,
                end,
            )
            os.truncate(self.path, end)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = end
        """Bytes of whole frames in the file: a failed write is cut back to this."""
        self._broken = ""
        """Why the file can no longer be written to ("" while it can)."""
        self._live = bytearray()
        """Bit ``seq``: the entry of that seq is written and not deleted."""
        for seq in entries:
            _set(self._live, seq)
        self._loaded: dict[int, tuple[object, ...]] | None = entries
        """The entries replayed at open, until load() hands them out or a commit changes
        them."""
        self._records = records
        """Records in the file (entries, changes, deletions)."""
        self._entries = len(entries)
        """Live entries."""
        self._compactor: threading.Thread | None = None
        self._compacted: tuple[int, int, int] | None = None
        """(offset, live, fd) of a compaction done: the new file (open as fd) holds the old
        one to offset."""
        self._counts_at_start = (0, 0)
        """(records, entries) when the compaction under way started."""
        self._retry_at = 0.0
        """No compaction before this (time.monotonic), after one failed."""
        self._stop = threading.Event()
        self.commits = 0
        self.rows_written = 0
        self.commit_seconds = 0.0
        self.compactions = 0

    def _create(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, MAGIC)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._fsync_dir()

    # ------------------------------------------------------------------------ reading

    def load(self) -> Iterator[JournalEntry]:
        """Every entry, in submit order."""
        entries, self._loaded = self._loaded, None
        if entries is None:  # (again: from the file as it is now)
            entries = _replay(self.path, self._size)[0]
        pop = entries.pop
        for seq in sorted(entries):  # (each let go as it is handed out: half the peak)
            yield _new(JournalEntry, pop(seq))

    def count(self) -> int:
        """The live entries (replays the file)."""
        return count_log_entries(self.path)

    # ------------------------------------------------------------------------ writing

    def commit(
        self,
        new: Sequence[JournalEntry],
        changed: Sequence[JournalEntry] = (),
        gone: Iterable[int] = (),
        collected: Sequence[tuple[int, float]] = (),
    ) -> int:
        """Append one frame: delete the ``gone`` seqs, write the ``new`` entries whole,
        then the :data:`CHANGING` fields of the ``changed`` ones, then the ``collected``
        (seq, time) pairs. Returns the number of entries written (whole or changed).

        Raises:
            LookupError: a changed entry was never written, or was deleted (then nothing
                is written).
            OSError: the write failed (then nothing of it is in the file: a part written
                is cut off again; if that fails too, every later commit fails).
        """
        t0 = time.perf_counter()
        gone = list(gone)
        if not new and not changed and not gone and not collected:
            return 0
        if self._broken:
            raise OSError(f"the journal cannot be written to since: {self._broken}")
        live = self._live
        refuse_unwritten(new, changed, set(gone), lambda seq: _has(live, seq))
        body = marshal.dumps(
            (
                list(map(tuple, new)),
                [(e[_SEQ], *e[_FIRST_CHANGING:]) for e in changed],
                [*gone, *collected] if collected else gone,
            )
        )
        frame = _frame(body)
        try:
            _write_all(self._fd, frame)
            if self.sync:
                os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError as again:
                self._broken = f"{exc}; and cutting the part written off failed: {again}"
            raise
        self._size += len(frame)
        self._loaded = None  # (what was replayed at open is not the whole truth now)
        for seq in gone:
            if _has(live, seq):
                _clear(live, seq)
                self._entries -= 1
        for e in new:
            if not _has(live, e.seq):
                _set(live, e.seq)
                self._entries += 1
        self._records += len(new) + len(changed) + len(gone) + len(collected)
        self.commits += 1
        self.rows_written += len(new) + len(changed) + len(collected)
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
        compactor = self._compactor
        if compactor is not None:
            compactor.join()
        self._compactor = None
        done = self._compacted
        if done is not None:
            self._compacted = None
            with contextlib.suppress(OSError):
                os.close(done[2])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)
        if self._fd >= 0:  # (closed once: a second close must not hit a reused fd number)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    # -------------------------------------------------------------------- compaction

    def _wants_compaction(self) -> bool:
        garbage = self._records - self._entries
        return garbage > COMPACT_MIN_RECORDS and garbage > COMPACT_RATIO * self._entries

    def _start_compaction(self) -> None:
        self._counts_at_start = (self._records, self._entries)
        self._compactor = threading.Thread(
            target=self._compact,
            args=(self._size,),
            name="lbmqtt-journal-compaction",
            daemon=True,
        )
        self._compactor.start()

    def _compact(self, offset: int) -> None:
        """(thread) Write the live entries of the file up to ``offset`` to the temporary
        file, fsynced; the next commit puts it in place."""
        fd = -1
        try:
            entries, _, _, damaged = _replay(self.path, offset)
            if damaged:
                raise OSError("the journal changed under the compaction")
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            _write_all(fd, MAGIC)
            rows = [entries[seq] for seq in sorted(entries)]
            for i in range(0, len(rows), SNAPSHOT_FRAME):
                if self._stop.is_set():
                    raise OSError("the journal is closing")
                body = marshal.dumps((rows[i : i + SNAPSHOT_FRAME], [], []))
                _write_all(fd, _frame(body))
            os.fsync(fd)
            self._compacted = (offset, len(entries), fd)
        except Exception as exc:  # (never the balancer's problem: the old file is whole)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            if not self._stop.is_set():
                log.warning("journal %s: compaction abandoned (%s)", self.path, exc)
            self._retry_at = time.monotonic() + 60

    def _switch(self) -> None:
        """Append to the compacted file what was committed during the compaction, fsync
        it, and put it in the old file's place."""
        assert self._compacted is not None
        offset, live, fd = self._compacted
        self._compacted = None
        compactor = self._compactor
        if compactor is not None:
            compactor.join()
        self._compactor = None
        try:
            with open(self.path, "rb") as old:
                old.seek(offset)
                tail = old.read(self._size - offset)
            if len(tail) != self._size - offset:
                raise OSError("the journal is shorter than what was written to it")
            size = os.fstat(fd).st_size
            _write_all(fd, tail)
            os.fsync(fd)
            os.replace(self._tmp, self.path)
        except OSError as exc:
            log.warning("journal %s: compaction abandoned (%s)", self.path, exc)
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._retry_at = time.monotonic() + 60
            return
        # (the new file's fd, open for appending, follows it through the rename)
        old_fd, self._fd = self._fd, fd
        with contextlib.suppress(OSError):
            os.close(old_fd)
        self._fsync_dir()
        before = self._size
        self._size = size + len(tail)
        records0, entries0 = self._counts_at_start
        self._records = live + (self._records - records0)  # (+ what the tail holds)
        self._entries = live + (self._entries - entries0)
        self.compactions += 1
        log.info(
            "journal %s: compacted %d bytes to %d (%d entries)", self.path, before, self._size, live
        )

    def _fsync_dir(self) -> None:
        """Make the file's name durable (after its creation or a rename)."""
        try:
            fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            (log.error if self.sync else log.warning)(
                "journal %s: its directory could not be synced (%s): after a power cut "
                "the file may be an older one",
                self.path,
                exc,
            )


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (a short write goes on; none at all: OSError)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError("no byte written (is the disk full?)")
        view = view[n:]


# ------------------------------------------------------------------------ the format


_new = tuple.__new__


def _frame(body: bytes) -> bytes:
    """``body`` as a frame: its header (length, CRC-32), then itself (read by :func:`_replay`)."""
    return FRAME.pack(len(body), zlib.crc32(body)) + body


def _replay(path: str, end: int | None) -> tuple[dict[int, tuple[object, ...]], int, int, bool]:
    """The live entries of the file (up to byte ``end``), as field tuples by seq; the
    offset where the valid frames end; the records (entries, changes, deletions) in them;
    and whether a damaged frame ends them. Read a frame at a time (a journal of a million
    queued tasks is ~120 MB)."""
    entries: dict[int, tuple[object, ...]] = {}
    records = 0
    head = FRAME.size
    first = _FIRST_CHANGING
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path} is not an lbmqtt log journal")
        pos = len(MAGIC)
        limit = end if end is not None else os.fstat(f.fileno()).st_size
        while pos < limit:
            header = f.read(head) if pos + head <= limit else b""
            if len(header) < head:
                return entries, pos, records, True
            length, crc = FRAME.unpack(header)
            body = f.read(length) if pos + head + length <= limit else b""
            if len(body) < length or zlib.crc32(body) != crc:
                return entries, pos, records, True
            try:
                # (the balancer's own file, its CRC checked: marshal is safe on what it wrote)
                new, changed, gone = marshal.loads(body)  # noqa: S302
            except (ValueError, EOFError, TypeError):
                return entries, pos, records, True
            del body
            collected = []
            for seq in gone:
                if type(seq) is tuple:
                    collected.append(seq)  # (seq, collected_at)
                else:
                    entries.pop(seq, None)
            for row in new:
                entries[row[_SEQ]] = tuple(row)
            for ch in changed:
                row = entries.get(ch[0])
                if row is not None:
                    entries[ch[0]] = row[:first] + ch[1:]
            for seq, when in collected:
                row = entries.get(seq)
                if row is not None:
                    entries[seq] = (*row[:_COLLECTED], when, *row[_COLLECTED + 1 :])
            records += len(new) + len(changed) + len(gone)
            pos += head + length
    return entries, pos, records, False


def count_log_entries(path: str | os.PathLike[str]) -> int:
    """The live entries of a log journal (replays the file).

    Raises:
        OSError: it cannot be read. ValueError: it is not a log journal.
    """
    return len(_replay(str(path), None)[0])


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
