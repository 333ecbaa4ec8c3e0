"""The balancer's journal: every accepted task and every change of its state, on disk.

SQLite from the standard library, in WAL mode. The balancer writes in *group commits*: the
records that changed during one tick go to disk in one transaction, and only then are the
tick's states (the acknowledgements clients wait for) and assignment sets published. So a
task whose ``queued`` state a client has seen survives a SIGKILL of the balancer.

``JOURNAL_SYNC``: ``normal`` (the default) survives the balancer process dying at any
moment - SQLite's WAL is in the kernel's page cache at commit - but a power cut may lose
the last commits; ``full`` fsyncs every group commit and survives power loss too.

Progress percentages are not journaled (they change often and are superseded); everything
needed to run, reconcile and answer for a task is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

# The column order of a row tuple; the SQL below spells the same list out (kept literal).
_COLUMNS = (
    "id",
    "user",
    "name",
    "args",
    "priority",
    "seq",
    "submitted_at",
    "notify",
    "timeout_s",
    "ref",
    "requires",
    "tags",
    "status",
    "attempt",
    "node",
    "grp",
    "started_at",
    "finished_at",
    "result",
    "error",
    "collected_at",
    "waived",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL, user TEXT NOT NULL, name TEXT NOT NULL, args BLOB NOT NULL,
    priority INTEGER NOT NULL, submitted_at REAL NOT NULL,
    notify TEXT NOT NULL, timeout_s REAL, ref TEXT, requires TEXT, tags TEXT,
    status TEXT NOT NULL, attempt INTEGER NOT NULL, node TEXT, grp INTEGER,
    started_at REAL, finished_at REAL, result BLOB, error BLOB, collected_at REAL,
    waived INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO meta VALUES ('schema', '2');
"""

_SELECT = (
    "SELECT id, user, name, args, priority, seq, submitted_at, notify, timeout_s, ref, "
    "requires, tags, status, attempt, node, grp, started_at, finished_at, result, "
    "error, collected_at, waived FROM tasks ORDER BY seq"
)
_UPSERT = (
    "INSERT OR REPLACE INTO tasks (id, user, name, args, priority, seq, submitted_at, "
    "notify, timeout_s, ref, requires, tags, status, attempt, node, grp, started_at, "
    "finished_at, result, error, collected_at, waived) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
assert _UPSERT.count("?") == len(_COLUMNS)
CHANGING = (
    "status",
    "attempt",
    "node",
    "grp",
    "started_at",
    "finished_at",
    "result",
    "error",
    "collected_at",
    "waived",
)
"""The columns a task's row changes in after its submit (the others never change)."""
_UPDATE = (
    "UPDATE tasks SET status = ?, attempt = ?, node = ?, grp = ?, started_at = ?, "
    "finished_at = ?, result = ?, error = ?, collected_at = ?, waived = ? "
    "WHERE seq = ?"
)
assert _COLUMNS[-len(CHANGING) :] == CHANGING and _UPDATE.count("?") == len(CHANGING) + 1


@dataclass(slots=True)
class JournalRow:
    """One task as the journal holds it (JSON fields still encoded)."""

    id: str
    user: str
    name: str
    args: bytes
    priority: int
    seq: int
    submitted_at: float
    notify: str
    timeout_s: float | None
    ref: str | None
    requires: str | None
    tags: str | None
    status: str
    attempt: int
    node: str | None
    grp: int | None
    started_at: float | None
    finished_at: float | None
    result: bytes | None
    error: bytes | None
    collected_at: float | None
    waived: int = 0

    def requires_dict(self) -> dict[str, float]:
        return dict(json.loads(self.requires)) if self.requires else {}

    def tags_list(self) -> list[str]:
        return list(json.loads(self.tags)) if self.tags else []


def default_path(host: str, port: int, prefix: str) -> Path:
    """Where the journal of a balancer for this broker and prefix lives by default:
    ``$XDG_STATE_HOME/lbmqtt/`` (``~/.local/state/lbmqtt/``), one file per broker and prefix.
    """
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{host}_{port}_{prefix}")
    return Path(base) / "lbmqtt" / f"journal-{stem}.sqlite3"


class Journal:
    """A durable task journal in one SQLite file.

    Args:
        path: the file (created with its directory), or ``":memory:"`` for tests.
        sync: ``"normal"`` or ``"full"`` (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike[str], sync: str = "normal"):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN ... COMMIT), one per group
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        (version,) = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if int(version) != SCHEMA_VERSION:
            raise RuntimeError(
                f"journal {self.path} has schema {version}; this lbmqtt "
                f"reads schema {SCHEMA_VERSION}"
            )
        self.commits = 0
        self.rows_written = 0
        self.commit_seconds = 0.0

    def load(self) -> Iterator[JournalRow]:
        """Every task in the journal, in submit order."""
        cur = self._db.execute(_SELECT)
        for row in cur:
            yield JournalRow(*row)

    def count(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM tasks").fetchone()
        return int(n)

    def commit(
        self,
        rows: Iterable[tuple[Any, ...]],
        deleted: Iterable[int] = (),
        changes: Iterable[tuple[Any, ...]] = (),
    ) -> int:
        """Write ``rows`` (whole rows: tuples in :data:`_COLUMNS` order), apply ``changes``
        to rows written before (tuples of the :data:`CHANGING` columns, then the seq) and
        delete the rows of the ``deleted`` seqs, in one transaction. Returns the number of
        rows written. Raises sqlite3.Error, and LookupError if a change has no row (then
        nothing is written).

        Rows are keyed by the task's ``seq`` (submit order), not its id: new rows append
        and changes touch recent pages, so a group commit writes few pages (random ids as
        keys cost ~2.5x more per row). A change rewrites 10 columns, not 22: half the cost
        of writing the row again."""
        t0 = time.perf_counter()
        rows = list(rows)
        changes = list(changes)
        gone = [(seq,) for seq in deleted]
        if not rows and not gone and not changes:
            return 0
        db = self._db
        db.execute("BEGIN")
        try:
            if gone:
                db.executemany("DELETE FROM tasks WHERE seq = ?", gone)
            if rows:
                db.executemany(_UPSERT, rows)
            if changes:
                updated = db.executemany(_UPDATE, changes).rowcount
                if updated != len(changes):
                    raise LookupError(
                        f"{len(changes) - updated} of {len(changes)} changed "
                        f"tasks have no row in the journal"
                    )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        self.commits += 1
        self.rows_written += len(rows) + len(changes)
        self.commit_seconds += time.perf_counter() - t0
        return len(rows) + len(changes)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
