"""The balancer: MQTT in -> scheduler -> MQTT out (``lbmqtt balancer`` runs one).

One module per concern:

- :mod:`.records`: :class:`TaskRecord` and :class:`NodeInfo`, plain data;
- :mod:`.outbox`: the states, errors, node sets and journal writes waiting for the next
  tick (it encodes, never publishes: every other piece depends on it, it on none);
- :mod:`.tasks`: the task table and every transition of a task (queued, placed, retried,
  finished, expired);
- :mod:`.stats`: the counts kept as tasks move, and the published stats;
- :mod:`.users`: submit, cancel, ack, query, the rate limit;
- :mod:`.nodes`: node status, heartbeats, reports, adoption, liveness and probes;
- :mod:`.journal`: the journal interface (:class:`JournalStore`), the mapping between
  records and entries, recovery, :class:`MemoryJournal`; :mod:`.sqlite`: the store on disk
  (and the choice of store); :mod:`.logstore`: the append-only store (``JOURNAL_FORMAT: log``);
- :mod:`.core`: :class:`Balancer`: lifecycle, transport, routing, the tick, the loops.
"""

from .core import GC_THRESHOLDS, Balancer, tune_gc
from .journal import CHANGING, JournalEntry, JournalStore, MemoryJournal, default_path
from .logstore import LogJournal
from .nodes import PROBE_PATIENCE_S
from .records import NodeInfo, TaskRecord
from .sqlite import SqliteJournal

__all__ = [
    "CHANGING",
    "GC_THRESHOLDS",
    "PROBE_PATIENCE_S",
    "Balancer",
    "JournalEntry",
    "JournalStore",
    "LogJournal",
    "MemoryJournal",
    "NodeInfo",
    "SqliteJournal",
    "TaskRecord",
    "default_path",
    "tune_gc",
]
