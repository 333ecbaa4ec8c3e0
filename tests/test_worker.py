"""The node <-> worker process protocol, on a real worker process: several tasks handed over
in one write run in order, a ``skip`` withdraws one that has not started, and results held
back to share a write still leave while a long task runs."""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_HEADER = struct.Struct("!I")
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
        assert self.recv()[0] == "ready"

    def send(self, *msgs: tuple[Any, ...]) -> None:
        frames = [pickle.dumps(m) for m in msgs]
        self.sock.sendall(b"".join(_HEADER.pack(len(f)) + f for f in frames))

    def run(self, task_id: str, name: str, args: Any) -> tuple[Any, ...]:
        return ("run", task_id, 1, name, json.dumps(args).encode(), {"name": name})

    def recv(self) -> tuple[Any, ...]:
        while True:
            if len(self._in) >= _HEADER.size:
                (n,) = _HEADER.unpack_from(self._in)
                if len(self._in) >= _HEADER.size + n:
                    body = bytes(self._in[_HEADER.size : _HEADER.size + n])
                    del self._in[: _HEADER.size + n]
                    msg = pickle.loads(body)
                    assert isinstance(msg, tuple)
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
    worker.send(("skip", "B", 1))  # withdrawn before it started
    gate.touch()
    done = [worker.recv() for _ in range(2)]
    assert [(m[0], m[1]) for m in done] == [("done", "A"), ("done", "C")]
    # B would have come before D: its absence is not a matter of waiting longer
    worker.send(worker.run("D", "ECHO", "d"))
    msg = worker.recv()
    assert (msg[0], msg[1], json.loads(msg[3])["args"]) == ("done", "D", "d")


def test_results_held_to_share_a_write_leave_while_a_long_task_runs(
    worker: WorkerProc, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    worker.send(
        *(worker.run(f"E{i}", "ECHO", i) for i in range(3)),
        worker.run("L", "BLOCK", {"gate": str(gate), "limit_s": 60}),
    )
    # L waits for the gate, which only opens once the three results are here: they were
    # held (more work was queued behind them), and the worker's flush thread sent them
    got = [worker.recv() for _ in range(3)]
    assert [(m[0], m[1]) for m in got] == [("done", "E0"), ("done", "E1"), ("done", "E2")]
    gate.touch()
    msg = worker.recv()
    assert (msg[0], msg[1], json.loads(msg[3])["opened"]) == ("done", "L", True)


def test_a_failure_amid_a_batch_is_reported_and_the_rest_still_run(worker: WorkerProc) -> None:
    worker.send(
        worker.run("A", "ECHO", 1),
        worker.run("B", "NO_SUCH_TASK", None),
        worker.run("C", "ECHO", 3),
    )
    got = [worker.recv() for _ in range(3)]
    assert [(m[0], m[1]) for m in got] == [("done", "A"), ("failed", "B"), ("done", "C")]
    assert got[1][3] == "LookupError"
