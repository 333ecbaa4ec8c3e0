"""Journal costs: ``python bench/journal.py [--tasks 100000]``

- group commit: the time to write one tick's worth of task records (a batch of
  ``MAX_BATCH`` = 10,000 accepted submits), per task, with ``JOURNAL_SYNC`` normal and full;
- small commits: 4 records per commit, as a busy balancer writes them, per record write;
- restart: the time a new balancer takes to resume ``--tasks`` queued tasks from the
  journal (read + rebuild the queues), and the journal's size on disk.

The balancer is not connected to a broker here: this measures the journal and the
recovery code alone. The end-to-end cost (throughput with the journal off / on / full, in
one run) is ``python bench/run.py journal``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lbmqtt.balancer import Balancer, LogJournal, SqliteJournal, TaskRecord  # noqa: E402
from lbmqtt.balancer.journal import entry_of, recover  # noqa: E402
from lbmqtt.config import load_settings  # noqa: E402


def records(n: int, start: int = 0) -> list[TaskRecord]:
    now = time.time()
    return [
        TaskRecord(
            id=uuid.UUID(int=random.getrandbits(128)).hex,
            user=f"user{i % 10}",
            name="RENDER",
            args_json=b'{"scene":%d,"quality":"high"}' % i,
            priority=i % 3,
            seq=i + 1,
            submitted_at=now,
            notify="events",
        )
        for i in range(start, start + n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ns = ap.parse_args()
    out: dict[str, object] = {"bench": "journal", "tasks": ns.tasks}
    with tempfile.TemporaryDirectory(prefix="lbmqtt-bench-journal-") as d:
        for sync in ("normal", "full"):
            j = SqliteJournal(Path(d) / f"commit-{sync}.sqlite3", sync=sync)
            per_task = []
            for r in range(ns.repeat):
                batch = records(10_000, start=r * 10_000)
                t0 = time.perf_counter()
                j.commit([entry_of(rec) for rec in batch])
                per_task.append((time.perf_counter() - t0) / len(batch))
            j.close()
            out[f"commit_us_per_task_{sync}"] = round(1e6 * statistics.median(per_task), 2)

        # what a busy balancer does: many small group commits (4 records per tick), each
        # record written ~4 times in its life, into a journal that already holds 100k rows
        j = SqliteJournal(Path(d) / "small.sqlite3")
        for start in range(0, 100_000, 10_000):
            j.commit([entry_of(r) for r in records(10_000, start)])
        recs = records(8_000, start=100_000)
        t0 = time.perf_counter()
        for _ in range(4):  # queued, assigned, running, done
            for k in range(0, len(recs), 4):
                j.commit([entry_of(r) for r in recs[k : k + 4]])
        out["small_commits_us_per_write"] = round(
            1e6 * (time.perf_counter() - t0) / (4 * len(recs)), 2
        )
        j.close()
        # the same with the log store (JOURNAL_FORMAT log), same run
        lj = LogJournal(Path(d) / "small.log")
        for start in range(0, 100_000, 10_000):
            lj.commit([entry_of(r) for r in records(10_000, start)])
        t0 = time.perf_counter()
        for _ in range(4):
            for k in range(0, len(recs), 4):
                lj.commit([entry_of(r) for r in recs[k : k + 4]])
        out["log_small_commits_us_per_write"] = round(
            1e6 * (time.perf_counter() - t0) / (4 * len(recs)), 2
        )
        lj.close()
        # baseline, same run: the same writes into a table keyed by the (random) task id,
        # as the journal first was
        db = sqlite3.connect(Path(d) / "by-id.sqlite3", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE tasks (id TEXT PRIMARY KEY, seq INTEGER, user TEXT, "
            "name TEXT, args BLOB, status TEXT, attempt INTEGER) WITHOUT ROWID"
        )
        put = "INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?)"

        def by_id(rs: list[TaskRecord]) -> list[tuple[object, ...]]:
            return [(r.id, r.seq, r.user, r.name, r.args_json, "queued", 0) for r in rs]

        for start in range(0, 100_000, 10_000):
            db.execute("BEGIN")
            db.executemany(put, by_id(records(10_000, start)))
            db.execute("COMMIT")
        t0 = time.perf_counter()
        for _ in range(4):
            for k in range(0, len(recs), 4):
                db.execute("BEGIN")
                db.executemany(put, by_id(recs[k : k + 4]))
                db.execute("COMMIT")
        out["baseline_keyed_by_id_us_per_write"] = round(
            1e6 * (time.perf_counter() - t0) / (4 * len(recs)), 2
        )
        db.close()

        path = Path(d) / "restart.sqlite3"
        j = SqliteJournal(path)
        for start in range(0, ns.tasks, 10_000):
            j.commit([entry_of(r) for r in records(min(10_000, ns.tasks - start), start)])
        j.close()
        out["journal_mb"] = round(
            sum(p.stat().st_size for p in Path(d).glob("restart*")) / 2**20, 1
        )
        b = Balancer(load_settings(None, env={}, overrides={"JOURNAL_PATH": "none"}))
        t0 = time.perf_counter()
        j = SqliteJournal(path)
        n = recover(j.load(), b.table)
        out["restart_s"] = round(time.perf_counter() - t0, 2)
        out["restart_us_per_task"] = round(1e6 * (time.perf_counter() - t0) / n, 2)
        assert n == ns.tasks and b.scheduler.queued == ns.tasks
        j.close()
        # the same with the log store, same run
        lpath = Path(d) / "restart.log"
        lj = LogJournal(lpath)
        for start in range(0, ns.tasks, 10_000):
            lj.commit([entry_of(r) for r in records(min(10_000, ns.tasks - start), start)])
        lj.close()
        out["log_journal_mb"] = round(lpath.stat().st_size / 2**20, 1)
        b = Balancer(load_settings(None, env={}, overrides={"JOURNAL_PATH": "none"}))
        t0 = time.perf_counter()
        lj = LogJournal(lpath)
        n = recover(lj.load(), b.table)
        out["log_restart_s"] = round(time.perf_counter() - t0, 2)
        assert n == ns.tasks and b.scheduler.queued == ns.tasks
        lj.close()
    out["machine"] = (
        f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
