"""The node <-> worker process protocol, on a real worker process: several tasks handed over
in one write run in order, a ``skip`` withdraws one that has not started (also one read
together with its task), and results leave while a long task behind them runs."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbmqtt.protocol_worker import (
    HEADER,
    Done,
    Failed,
    Hello,
    Message,
    Run,
    Skip,
    TaskProgress,
    TaskReference,
    WorkerMessageError,
    decode,
    decode_json,
    decode_task_reference,
    encode,
    encode_result,
    encode_task_reference,
    take,
)

ROOT = Path(__file__).resolve().parent.parent


class WorkerProc:
    """A worker process started the way the node starts one, and its end of the socket."""

    def __init__(self) -> None:
        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lbmqtt.worker",
                "--fd",
                str(child.fileno()),
                "--parent",
                str(os.getpid()),
                "--source",
                "tests.tasks_for_tests",
            ],
            pass_fds=[child.fileno()],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.sock.settimeout(30)
        self._in = bytearray()
        assert isinstance(self.recv(), Hello)

    def send(self, *msgs: Message) -> None:
        self.sock.sendall(encode(*msgs))

    def run(self, task_id: str, name: str, args: Any) -> Run:
        return Run(task_id, 1, name, json.dumps(args).encode(), "", 0)

    def recv(self) -> Any:
        while True:
            msg = take(self._in)
            if msg is not None:
                return msg
            chunk = self.sock.recv(1 << 16)
            assert chunk, "the worker closed its socket"
            self._in += chunk

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def worker() -> Iterator[WorkerProc]:
    w = WorkerProc()
    yield w
    w.close()


def wait_for_file(path: Path, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def test_tasks_handed_over_together_run_in_order_and_a_skipped_one_never_runs(
    worker: WorkerProc, tmp_path: Path
) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    worker.send(
        worker.run("A", "BLOCK", {"gate": str(gate), "started": str(started)}),
        worker.run("B", "ECHO", "b"),
        worker.run("C", "ECHO", "c"),
    )
    wait_for_file(started)  # A runs; B and C wait in the worker
    worker.send(Skip("B", 1))  # withdrawn before it started
    gate.touch()
    done = [worker.recv() for _ in range(2)]
    assert [(type(m), m.id) for m in done] == [(Done, "A"), (Done, "C")]
    # B would have come before D: its absence is not a matter of waiting longer
    worker.send(worker.run("D", "ECHO", "d"))
    msg = worker.recv()
    assert (type(msg), msg.id, json.loads(msg.result_json)["args"]) == (Done, "D", "d")


def test_a_skip_read_together_with_its_run_withdraws_it(worker: WorkerProc, tmp_path: Path) -> None:
    gate, started = tmp_path / "gate", tmp_path / "started"
    worker.send(worker.run("A", "BLOCK", {"gate": str(gate), "started": str(started)}))
    wait_for_file(started)  # A runs, nothing waits behind it in the worker
    # handed over behind A (HANDOFF_NEXT_S), then withdrawn before it started: both frames
    # wait in the socket, and the worker's next read takes them together
    worker.send(worker.run("B", "ECHO", "b"), Skip("B", 1))
    gate.touch()
    assert (type(m := worker.recv()), m.id) == (Done, "A")
    worker.send(worker.run("D", "ECHO", "d"))
    msg = worker.recv()
    assert (type(msg), msg.id, json.loads(msg.result_json)["args"]) == (Done, "D", "d"), msg


def test_results_leave_while_a_long_task_behind_them_runs(
    worker: WorkerProc, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    worker.send(
        *(worker.run(f"E{i}", "ECHO", i) for i in range(3)),
        worker.run("L", "BLOCK", {"gate": str(gate), "limit_s": 60}),
    )
    # L waits for the gate, which only opens once the three results are here: a result
    # leaves when its task returns, not when the work handed over with it is done
    got = [worker.recv() for _ in range(3)]
    assert [(type(m), m.id) for m in got] == [(Done, "E0"), (Done, "E1"), (Done, "E2")]
    gate.touch()
    msg = worker.recv()
    assert (type(msg), msg.id, json.loads(msg.result_json)["opened"]) == (Done, "L", True)


def test_a_failure_amid_a_batch_is_reported_and_the_rest_still_run(worker: WorkerProc) -> None:
    worker.send(
        worker.run("A", "ECHO", 1),
        worker.run("B", "NO_SUCH_TASK", None),
        worker.run("C", "ECHO", 3),
    )
    got = [worker.recv() for _ in range(3)]
    assert [(type(m), m.id) for m in got] == [(Done, "A"), (Failed, "B"), (Done, "C")]
    assert got[1].type == "LookupError"


# ------------------------------------------------------------------ the messages themselves

EVERY_KIND: list[Message] = [
    Run("t-1", 2, "ECHO", b'{"a":1}', "alice", 7),
    Skip("t-1", 2),
    Hello(4242, ["ECHO", "HELLO"]),
    TaskProgress("t-1", 2, 40),
    Done("t-1", 2, b'{"ok":true}', 0.25),
    Failed("t-1", 2, "ValueError", "bad", "Traceback ...", 0.5),
]


def test_every_message_kind_comes_through_a_frame_as_it_went_in() -> None:
    buf = bytearray(encode(*EVERY_KIND))  # one write, as the node hands tasks over
    got = []
    while (msg := take(buf)) is not None:
        got.append(msg)
    assert got == EVERY_KIND
    assert [type(m) for m in got] == [type(m) for m in EVERY_KIND]
    assert not buf
    # a frame cut short is not a message yet
    partial = bytearray(encode(EVERY_KIND[4])[:-1])
    assert take(partial) is None


@pytest.mark.parametrize(
    ("kind", "body", "reason"),
    [
        (4, b"not a pickle", "malformed frame"),
        (4, pickle.dumps(("t", 1)), "Done frame holds"),
        (4, pickle.dumps(["t", 1, b"{}", 0.1]), "Done frame holds"),
        (99, pickle.dumps(("t", 1)), "unknown kind 99"),
    ],
)
def test_a_malformed_frame_is_a_clear_error(kind: int, body: bytes, reason: str) -> None:
    with pytest.raises(WorkerMessageError, match=reason) as err:
        decode(kind, body)
    assert err.value.raw == body


def test_a_malformed_frame_from_a_worker_does_not_stop_the_node_reading_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from lbmqtt.node.reports import ReportBatcher
    from lbmqtt.node.supervisor import Supervisor
    from lbmqtt.protocol import GroupInfo

    async def scenario() -> Any:
        held: dict[str, Any] = {}
        reports = ReportBatcher("n", "i", "t", held, lambda: None)
        sup = Supervisor(held, reports, {}, lambda: None)
        sup.add_groups([GroupInfo(index=0, workers=1, min_p=0, max_p=9)], [])
        w = sup.workers[0]
        ours, theirs = socket.socketpair()
        # garbled frames (the first is logged; more of the same, within the log's rate
        # limit, are not), then a good hello
        garbage = b"\x80garbage"
        theirs.sendall(
            HEADER.pack(len(garbage), 4)
            + garbage
            + HEADER.pack(3, 99)
            + b"abc"
            + encode(Hello(1234, ["ECHO"]))
        )
        theirs.close()
        await sup._serve(w, ours)
        return w

    w = asyncio.run(scenario())
    assert (w.state, w.pid) == ("dead", 1234)  # the hello was read; then the socket closed
    assert "worker 0: malformed frame (8 bytes)" in caplog.text


def test_a_task_reference_and_a_result_come_through_as_they_went_in() -> None:
    ref = TaskReference("SQUARE", "mymod:square", "pyloadbalancer", {"k": [1, 2]})
    assert decode_task_reference(encode_task_reference(ref)) == ref
    assert decode_task_reference('{"name": "N", "ref": "m:f"}') == TaskReference("N", "m:f")
    assert decode_json(encode_result({"a": [1, 2.5, None]})) == {"a": [1, 2.5, None]}
    with pytest.raises(ValueError):
        encode_result(float("nan"))  # (strict JSON, for any MQTT client)
    with pytest.raises(TypeError):
        encode_task_reference(TaskReference("N", "m:f", "auto", {"k": object()}))


def test_held_tasks_go_to_a_worker_highest_priority_first_and_otherwise_in_order() -> None:
    """The node's pipelining window holds tasks of several priorities: an urgent one goes
    to the next idle worker before ordinary ones held earlier; tasks of one priority go in
    the order they came (several at a time when known to be short)."""
    from collections import Counter

    from lbmqtt.node.reports import ReportBatcher
    from lbmqtt.node.supervisor import HANDOFF_BATCH, HeldTask, Supervisor
    from lbmqtt.protocol import Assignment, GroupInfo

    async def handed(priorities: list[int], short: bool) -> list[list[tuple[str, int]]]:
        """The hand-offs (ids and priorities of each write) to one worker that finishes
        nothing, of tasks held with these priorities, and then of as many again."""
        held: dict[str, HeldTask] = {}
        reports = ReportBatcher("n", "i", "t", held, lambda: None)
        sup = Supervisor(held, reports, Counter(), lambda: None)
        sup.add_groups([GroupInfo(index=0, workers=1, min_p=0, max_p=99)], [])
        if short:
            sup._ran("NOOP", 1e-5)
        w = sup.workers[0]
        ours, theirs = socket.socketpair()
        _, w.writer = await asyncio.open_connection(sock=ours)
        w.state = "idle"
        writes: list[list[tuple[str, int]]] = []
        for i, p in enumerate(priorities):
            a = Assignment(id=f"t{i}", attempt=1, user="u", name="NOOP", priority=p)
            held[a.id] = lt = HeldTask(a=a, args_json=b"null")
            assert sup.enqueue(lt)
        for _ in range(len(priorities)):  # (each round: the worker's queue is let go)
            sup.dispatch()
            await w.writer.drain()
            if not w.queue:
                break
            buf = bytearray(theirs.recv(1 << 20))
            write = []
            while (msg := take(buf)) is not None:
                assert isinstance(msg, Run)
                write.append((msg.id, msg.priority))
            writes.append(write)
            for lt in w.queue:
                lt.state = "finished"
            w.queue.clear()
        w.writer.close()
        theirs.close()
        return writes

    # not known to be short: one at a time, the urgent ones first, then in order
    one_by_one = asyncio.run(handed([0, 0, 5, 0, 9, 5], short=False))
    assert [w for [w] in one_by_one] == [
        ("t4", 9), ("t2", 5), ("t5", 5), ("t0", 0), ("t1", 0), ("t3", 0)
    ]  # fmt: skip
    ends_as_it_began = asyncio.run(handed([0, 5, 0], short=False))
    assert [w for [w] in ends_as_it_began] == [("t1", 5), ("t0", 0), ("t2", 0)]
    # known to be short: in batches, each in that order
    n = HANDOFF_BATCH + 10
    batches = asyncio.run(handed([0] * (n - 1) + [7], short=True))
    assert [len(b) for b in batches] == [HANDOFF_BATCH, 10]
    assert [tid for b in batches for tid, _ in b] == [f"t{n - 1}"] + [f"t{i}" for i in range(n - 1)]
    # one priority: the order they came, whole batches
    same = asyncio.run(handed([3] * n, short=True))
    assert [tid for b in same for tid, _ in b] == [f"t{i}" for i in range(n)]


def test_the_node_reads_every_frame_of_a_burst_from_a_worker_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A busy worker's results arrive as many small frames, more than one read takes and
    cut anywhere: each is handled once, in the order sent; a malformed frame, or one whose
    handling fails, is logged and the frames after it are still read, up to a last frame
    cut short by the end of the stream."""
    from collections import Counter

    from lbmqtt.node.reports import ReportBatcher
    from lbmqtt.node.supervisor import HeldTask, Supervisor
    from lbmqtt.protocol import Assignment, GroupInfo

    n = 3000  # (~60 bytes a frame: ~180 KB, reads of up to 64 KiB)

    async def scenario() -> tuple[list[object], Any]:
        held: dict[str, HeldTask] = {}
        reports = ReportBatcher("n", "i", "t", held, lambda: None)
        sup = Supervisor(held, reports, Counter(), lambda: None)
        sup.add_groups([GroupInfo(index=0, workers=1, min_p=0, max_p=9)], [])
        w = sup.workers[0]
        for i in range(n):
            a = Assignment(id=f"t{i}", attempt=1, user="u", name="ECHO")
            held[a.id] = lt = HeldTask(a=a, args_json=b"null", state="running", worker=w)
            w.queue.append(lt)
        ours, theirs = socket.socketpair()

        def done(i: int, result: bytes | None = None) -> bytes:
            return encode(Done(f"t{i}", 1, result or json.dumps({"i": i}).encode(), 0.001))

        half = n // 2
        frames = (
            encode(Hello(1234, ["ECHO"]))
            + b"".join(done(i) for i in range(half))
            + done(half, b"{not json")  # (its handling fails: the task stays unfinished)
            + HEADER.pack(8, 2)
            + b"\x80garbage"  # (a malformed frame)
            + b"".join(done(i) for i in range(half, n))  # (the result of t{half} again)
            + HEADER.pack(100, 2)
            + b"cut short"
        )
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()

        async def send() -> None:
            await loop.sock_sendall(theirs, frames)
            theirs.close()

        sender = asyncio.create_task(send())
        await sup._serve(w, ours)
        await sender
        return [r.result for r in reports.results.values()], sup.counters

    results, counters = asyncio.run(scenario())
    assert results == [{"i": i} for i in range(n)]
    assert counters["done"] == n
    assert "failed to handle a message from worker 1234" in caplog.text
    assert "worker 1234: malformed frame (8 bytes)" in caplog.text
