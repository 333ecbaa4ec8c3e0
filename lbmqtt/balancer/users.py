"""What users ask of the balancer: submit, cancel, ack and query, and the rate limit.

Identity comes from the topic: the user of ``users/{u}/submit`` owns the tasks; cancel, ack
and query only touch that user's tasks. Each handler acts on the task table and answers
through the outbox (states, errors); none publishes.
"""

from __future__ import annotations

import os
import sys
import time

from ..config import Settings
from ..errors import DecodeError, ErrorCode
from ..protocol import (
    ErrorInfo,
    IdList,
    Status,
    TaskSpec,
    decode,
    decode_submit,
    encode_json,
)
from ..scheduler import NO_TAGS, Scheduler, requires_of
from .outbox import Outbox
from .records import TaskRecord
from .stats import Tally
from .tasks import TaskTable

UNKNOWN_EACH = 20
"""Unknown ids in one cancel or query answered one by one; beyond, with one error."""


class Users:
    """The handlers of the users' commands.

    Args:
        settings: MAX_BATCH, SUBMIT_RATE, SUBMIT_BURST, LB_QUEING_MAXPERUSER.
        table: the tasks.
        scheduler: the queues (a user's queue cap).
        outbox: the answers.
        tally: refusals are counted there.
    """

    def __init__(
        self,
        settings: Settings,
        table: TaskTable,
        scheduler: Scheduler,
        outbox: Outbox,
        tally: Tally,
    ):
        self.settings = settings
        self.table = table
        self.scheduler = scheduler
        self.outbox = outbox
        self.tally = tally
        self.buckets: dict[str, list[float]] = {}
        """user -> [tokens, at] (SUBMIT_RATE)."""

    def on_submit(self, user: str, payload: bytes) -> None:
        """One task or a batch: each is accepted, or refused with an error."""
        now = time.time()
        items = decode_submit(payload)
        if len(items) > self.settings.max_batch:
            self.tally.refused(
                user, f"a batch of {len(items)} tasks: more than MAX_BATCH", ErrorCode.TOO_LARGE
            )
            raise DecodeError(
                f"a batch of {len(items)} tasks is more than MAX_BATCH ({self.settings.max_batch})",
                payload[:200],
                ErrorCode.TOO_LARGE,
            )
        for item in items:
            if isinstance(item, DecodeError):
                self.outbox.bad_message("user", user, "submit", item)
                self.tally.refused(user, f"invalid task: {item}", item.code)
                continue
            if not self.take_token(user, now):
                rate = self.settings.submit_rate
                self.tally.refused(
                    user, f"faster than SUBMIT_RATE ({rate:g}/s)", ErrorCode.RATE_LIMITED
                )
                self.outbox.error(
                    user,
                    ErrorCode.RATE_LIMITED,
                    f"user {user!r} submits faster than {rate:g} tasks/s "
                    f"(SUBMIT_RATE); task {item.name!r} refused: send it again "
                    f"later",
                    task_id=item.id,
                    ref=item.ref,
                )
                continue
            self.accept(user, item, now)

    def take_token(self, user: str, now: float) -> bool:
        """The user's token bucket (SUBMIT_RATE per second, SUBMIT_BURST deep)."""
        rate = self.settings.submit_rate
        if not rate:
            return True
        burst = float(self.settings.submit_burst or self.settings.max_batch)
        bucket = self.buckets.get(user)
        if bucket is None:
            if len(self.buckets) > 100_000:  # (names are bounded by the ACL with logins)
                self.buckets.clear()
            bucket = self.buckets[user] = [burst, now]
        bucket[0] = min(burst, bucket[0] + max(0.0, now - bucket[1]) * rate)
        bucket[1] = now
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True

    def accept(self, user: str, spec: TaskSpec, now: float) -> None:
        """Take one valid task of ``user``'s (queued, unless its id is taken or its user
        is at LB_QUEING_MAXPERUSER)."""
        table = self.table
        args_json = encode_json(spec.args)
        task_id = spec.id or os.urandom(16).hex()  # (as the client's; uuid4().hex cost 4x)
        old = table.tasks.get(task_id)
        if old is not None:
            if old.user == user and old.same_submit(spec, args_json):
                self.outbox.emit(old, durable=False)  # a resend: acknowledge again, run once
                return
            self.tally.refused(
                user, f"task id {task_id!r} is already used by another task", ErrorCode.DUPLICATE_ID
            )
            self.outbox.error(
                user,
                ErrorCode.DUPLICATE_ID,
                f"task id {task_id!r} is already used by another task",
                task_id=task_id,
                ref=spec.ref,
            )
            return
        cap = self.settings.lb_queing_maxperuser
        if cap and self.scheduler.queued_for(user) >= cap:
            self.tally.refused(
                user, f"queue cap of {cap} (LB_QUEING_MAXPERUSER)", ErrorCode.QUOTA_EXCEEDED
            )
            self.outbox.error(
                user,
                ErrorCode.QUOTA_EXCEEDED,
                f"user {user!r} already has {cap} queued tasks "
                f"(LB_QUEING_MAXPERUSER); task {spec.name!r} refused",
                task_id=task_id,
                ref=spec.ref,
            )
            return
        table.seq += 1
        rec = TaskRecord(
            id=task_id,
            user=user,
            name=sys.intern(spec.name),
            args_json=args_json,
            priority=spec.priority,
            seq=table.seq,
            submitted_at=now,
            notify=spec.notify,
            timeout_s=spec.timeout_s,
            ref=spec.ref,
            requires=requires_of(spec.requires),
            tags=frozenset(spec.tags) if spec.tags else NO_TAGS,
            cost=spec.cost,
            speculate=spec.speculate is not False,
        )
        table.tasks[task_id] = rec
        self.tally.counters["submitted"] += 1
        table.enqueue(rec)
        self.outbox.emit(rec)

    def _unknown(self, user: str, ids: list[str], topic: str, message: str) -> None:
        """Answer unknown ids: one error each, or, beyond UNKNOWN_EACH of them in one
        message, one error for them all (an answer must not be bigger than the question)."""
        if len(ids) <= UNKNOWN_EACH:
            for tid in ids:
                self.outbox.error(
                    user,
                    ErrorCode.UNKNOWN_TASK,
                    message.format(f"task {tid!r}"),
                    task_id=tid,
                    topic=topic,
                )
            return
        shown = ", ".join(repr(t) for t in ids[:5])
        self.outbox.error(
            user,
            ErrorCode.UNKNOWN_TASK,
            message.format(f"tasks {shown}, ... ({len(ids)} in all)"),
            topic=topic,
        )

    def on_cancel(self, user: str, payload: bytes) -> None:
        """Cancel the user's tasks (a placed one is taken off its node)."""
        ids = decode(IdList, payload).all_ids()
        unknown = []
        for tid in ids:
            rec = self.table.tasks.get(tid)
            if rec is None or rec.user != user:
                unknown.append(tid)
                continue
            if rec.status.final:
                self.outbox.emit(rec, durable=False)  # too late: tell the current state
                continue
            if rec.status == Status.QUEUED:
                self.scheduler.remove(rec.id)
                self.table.left_queue(rec)
            else:
                self.table.unplace(rec)
            rec.error = ErrorInfo(type="Cancelled", message="cancelled by its user")
            self.table.finalize(rec, Status.CANCELLED, time.time())
        self._unknown(user, unknown, "cancel", "no {} to cancel")  # (str.format)

    def on_ack(self, user: str, payload: bytes) -> None:
        """The user collected these results: they expire sooner."""
        now = time.time()
        for tid in decode(IdList, payload).all_ids():
            rec = self.table.tasks.get(tid)
            if rec is None or rec.user != user or not rec.status.final:
                continue
            self.table.collected(rec, now)

    def on_query(self, user: str, payload: bytes) -> None:
        """Send the current state of the user's tasks again."""
        unknown = []
        for tid in decode(IdList, payload).all_ids():
            rec = self.table.tasks.get(tid)
            if rec is None or rec.user != user:
                unknown.append(tid)
            else:
                self.outbox.emit(rec, durable=False)
        self._unknown(user, unknown, "query", f"no {{}} (never submitted by {user!r}, or expired)")
