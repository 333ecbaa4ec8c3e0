"""The journal on disk: a :class:`~lbmqtt.balancer.journal.JournalStore` in one SQLite file.

SQLite from the standard library, in WAL mode; the only module of lbmqtt that imports
sqlite3. Each group commit of the balancer (the records that changed during one tick) is
one transaction, so a task whose ``queued`` state a client has seen survives a SIGKILL of
the balancer.

``JOURNAL_SYNC``: ``normal`` (the default) survives the balancer process dying at any
moment - SQLite's WAL is in the kernel's page cache at commit - but a power cut may lose
the last commits; ``full`` fsyncs every group commit and survives power loss too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from ..config import Settings
from ..errors import ConfigError
from .journal import CHANGING, JournalEntry, JournalStore, default_path
from .logstore import MAGIC as LOG_MAGIC
from .logstore import LogJournal, count_log_entries

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3

# The columns, in the order of a row: the fields of a JournalEntry (the one list of them),
# the CHANGING ones last.
_COLUMNS = JournalEntry._fields
_FIRST_CHANGING = len(_COLUMNS) - len(CHANGING)
assert _COLUMNS[_FIRST_CHANGING:] == CHANGING

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL, user TEXT NOT NULL, name TEXT NOT NULL, args BLOB NOT NULL,
    priority INTEGER NOT NULL, submitted_at REAL NOT NULL,
    notify TEXT NOT NULL, timeout_s REAL, ref TEXT, requires TEXT, tags TEXT,
    cost REAL, speculate INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL, attempt INTEGER NOT NULL, node TEXT, grp INTEGER,
    started_at REAL, finished_at REAL, result BLOB, error BLOB, collected_at REAL,
    waived INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO meta VALUES ('schema', '3');
"""

# Schema 2 -> 3 (issue 17): a task's cost hint and its speculate opt-out; every task of
# an older journal may be copied, as before, and has no cost.
_MIGRATE_2 = """
ALTER TABLE tasks ADD COLUMN cost REAL;
ALTER TABLE tasks ADD COLUMN speculate INTEGER NOT NULL DEFAULT 1;
UPDATE meta SET value = '3' WHERE key = 'schema';
"""

# (the statements are built from the constant column names above, never from input)
_NAMES = ", ".join(_COLUMNS)
_SELECT = f"SELECT {_NAMES} FROM tasks ORDER BY seq"  # noqa: S608
_MARKS = ", ".join("?" * len(_COLUMNS))
_UPSERT = f"INSERT OR REPLACE INTO tasks ({_NAMES}) VALUES ({_MARKS})"  # noqa: S608
_UPDATE = f"UPDATE tasks SET {', '.join(f'{c} = ?' for c in CHANGING)} WHERE seq = ?"  # noqa: S608


class JournalOpenError(OSError):
    """The journal file cannot be opened (its message says why)."""


class SqliteJournal:
    """A durable task journal in one SQLite file.

    Args:
        path: the file (created with its directory), or ``":memory:"`` for tests.
        sync: ``"normal"`` or ``"full"`` (see the module docstring).

    Raises:
        JournalOpenError: the file cannot be opened or created.
        RuntimeError: the file holds another schema version.
    """

    def __init__(self, path: str | os.PathLike[str], sync: str = "normal"):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: transactions are explicit (BEGIN ... COMMIT), one per group
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            (version,) = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if int(version) == 2:
                self._db.executescript("BEGIN;" + _MIGRATE_2 + "COMMIT;")
                log.info("journal %s: schema 2 brought to 3 (cost, speculate)", self.path)
                version = "3"
        except sqlite3.Error as exc:
            raise JournalOpenError(str(exc)) from exc
        if int(version) != SCHEMA_VERSION:
            raise RuntimeError(
                f"journal {self.path} has schema {version}; this lbmqtt "
                f"reads schema {SCHEMA_VERSION}"
            )
        self.commits = 0
        self.rows_written = 0
        self.commit_seconds = 0.0

    def load(self) -> Iterator[JournalEntry]:
        """Every task in the journal, in submit order."""
        cur = self._db.execute(_SELECT)
        for row in cur:
            yield JournalEntry(*row)

    def count(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM tasks").fetchone()
        return int(n)

    def commit(
        self,
        new: Sequence[JournalEntry],
        changed: Sequence[JournalEntry] = (),
        gone: Iterable[int] = (),
        collected: Sequence[tuple[int, float]] = (),
    ) -> int:
        """Delete the rows of the ``gone`` seqs, write the ``new`` entries whole and the
        :data:`CHANGING` columns of the ``changed`` ones, then the ``collected_at`` of the
        ``collected`` (seq, time) pairs, in one transaction. Returns the number of rows
        written (whole or changed). Raises sqlite3.Error, and LookupError if a change has no
        row (then nothing is written).

        Rows are keyed by the task's ``seq`` (submit order), not its id: new rows append
        and changes touch recent pages, so a group commit writes few pages (random ids as
        keys cost ~2.5x more per row). A change rewrites 10 columns, not 22: half the cost
        of writing the row again."""
        t0 = time.perf_counter()
        rows = new
        changes = changed
        deleted = [(seq,) for seq in gone]
        if not rows and not deleted and not changes and not collected:
            return 0
        db = self._db
        db.execute("BEGIN")
        try:
            if deleted:
                db.executemany("DELETE FROM tasks WHERE seq = ?", deleted)
            # (as plain tuples: sqlite3 binds those ~25% faster than a tuple subclass)
            if rows:
                db.executemany(_UPSERT, map(tuple, rows))
            if changes:
                updated = db.executemany(
                    _UPDATE, [(*e[_FIRST_CHANGING:], e.seq) for e in changes]
                ).rowcount
                if updated != len(changes):
                    raise LookupError(
                        f"{len(changes) - updated} of {len(changes)} changed "
                        f"tasks have no row in the journal"
                    )
            if collected:
                db.executemany(
                    "UPDATE tasks SET collected_at = ? WHERE seq = ?",
                    [(when, seq) for seq, when in collected],
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        self.commits += 1
        self.rows_written += len(rows) + len(changes) + len(collected)
        self.commit_seconds += time.perf_counter() - t0
        return len(rows) + len(changes)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


SQLITE_HEADER = b"SQLite format 3\x00"


def journal_file(settings: Settings) -> Path | None:
    """The file of the journal JOURNAL_PATH names, or None if it is ``none``: the file a
    balancer with these settings opens. ``auto``: :func:`.journal.default_path` of the
    broker and prefix, ``.sqlite3`` or ``.log`` after JOURNAL_FORMAT, unless only a journal
    of the other format is there (it is kept: ``lbmqtt journal reset`` starts anew)."""
    where = settings.journal_path.strip()
    if where.lower() in ("none", ""):
        return None
    s = settings
    if where.lower() == "auto":
        suffixes = [".log", ".sqlite3"] if s.journal_format == "log" else [".sqlite3", ".log"]
        paths = [default_path(s.broker_host, s.broker_port, s.topic_prefix, x) for x in suffixes]
        return next((p for p in paths if p.exists()), paths[0])
    return Path(where).expanduser()


def _format_of(path: Path) -> str | None:
    """``sqlite`` or ``log`` after the file's first bytes; None if it is missing or empty."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LOG_MAGIC))
    except FileNotFoundError:
        return None
    if not head:
        return None
    if head.startswith(SQLITE_HEADER):
        return "sqlite"
    if head == LOG_MAGIC:
        return "log"
    return "unknown"


def open_journal(settings: Settings) -> JournalStore | None:
    """The journal JOURNAL_PATH names (see :func:`journal_file`), or None if it is ``none``:
    in the format the file has, or JOURNAL_FORMAT's for a new one.

    Raises:
        ConfigError: the file cannot be opened, or holds another schema.
    """
    path = journal_file(settings)
    if path is None:
        return None
    kind = _format_of(path) or settings.journal_format
    try:
        if kind == "log":
            return LogJournal(path, sync=settings.journal_sync)
        return SqliteJournal(path, sync=settings.journal_sync)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot open the journal {path}: {exc} (JOURNAL_PATH)") from exc


def remove_journal(path: Path) -> tuple[list[Path], int | None]:
    """Delete the journal file at ``path`` (SQLite's with its ``-wal`` and ``-shm`` files, a
    log with the file a compaction left) (a balancer must not be using it). Returns the
    files removed and the number of tasks the journal held (None if it could not be read).

    Raises:
        ConfigError: ``path`` is not a journal (then nothing is removed).
        OSError: a file exists but cannot be removed.
    """
    tasks: int | None = None
    kind = _format_of(path)
    if kind == "unknown":
        raise ConfigError(f"{path} is not an lbmqtt journal: not removed (JOURNAL_PATH)")
    if kind == "sqlite":
        with contextlib.suppress(sqlite3.Error):
            db = sqlite3.connect(path)
            try:
                (n,) = db.execute("SELECT count(*) FROM tasks").fetchone()
                tasks = int(n)
            finally:
                db.close()
    elif kind == "log":
        with contextlib.suppress(OSError, ValueError):
            tasks = count_log_entries(path)
    removed = []
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}.compacting")):
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    return removed, tasks
