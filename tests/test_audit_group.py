"""Grouped audit records (``AuditLog(flush_after=...)``, what the engine uses): written at once, fsynced
and anchored together at an anchor kind, by the background flusher, or on close; thread-safe."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from nightlab import audit
from nightlab.audit import AuditError, AuditLog, read_records, verify

ANCHOR_KINDS = frozenset({"decision", "session.start", "session.stop"})


class Counted:
    """The real ``os.fsync``, counted per file (instrumentation: every call still reaches the kernel)."""

    def __init__(self, path: Path, fail: bool = False) -> None:
        self.path, self.fail, self.n = path, fail, 0
        self.real = os.fsync

    def __call__(self, fd: int) -> None:
        if os.path.samefile(f"/proc/self/fd/{fd}", self.path):
            self.n += 1
            if self.fail:
                raise OSError(5, "Input/output error")
        self.real(fd)


def _log(path: Path, anchors: list[tuple[int, str]], flush_after: float) -> AuditLog:
    return AuditLog(path, anchor=lambda _id, n, head: anchors.append((n, head)), anchor_kinds=ANCHOR_KINDS,
                    flush_after=flush_after, checkpoint_every=0)


def test_one_fsync_and_one_anchor_for_the_records_of_an_experiment(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    anchors: list[tuple[int, str]] = []
    log = _log(path, anchors, flush_after=600)  # no background flush in this test
    fsyncs = Counted(path)
    monkeypatch.setattr(audit.os, "fsync", fsyncs)
    kinds = ["researcher.request", "researcher.response", "candidate", "guard", "guard", "git.commit", "guard",
             "guard", "sandbox.start", "sandbox.exit", "measurement"]
    for k in kinds:
        log.emit(k, experiment=1)
    # written at once (a SIGKILL of the harness loses none of them), not yet synced nor anchored
    assert [r["kind"] for r in read_records(path)][1:] == kinds
    assert fsyncs.n == 0 and anchors == []
    log.emit("decision", experiment=1, status="keep")
    assert fsyncs.n == 1 and [n for n, _ in anchors] == [len(kinds) + 2]
    assert anchors[-1][1] == list(read_records(path))[-1]["hash"]
    log.emit("git.advance", experiment=1)
    log.close()  # close syncs and anchors what is left
    assert fsyncs.n == 2 and anchors[-1][0] == len(kinds) + 3
    assert verify(path, expected_count=anchors[-1][0], expected_head=anchors[-1][1]).ok


def test_the_background_flusher_anchors_a_record_left_waiting(tmp_path):
    path = tmp_path / "audit.jsonl"
    anchors: list[tuple[int, str]] = []
    log = _log(path, anchors, flush_after=0.05)
    log.emit("sandbox.start", experiment=1)  # then a long run: nothing else is emitted
    deadline = time.monotonic() + 10
    while (not anchors or anchors[-1][0] < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert anchors and anchors[-1][0] == 2
    log.close()


def test_threads_append_one_chain_and_anchors_only_go_forward(tmp_path):
    path = tmp_path / "audit.jsonl"
    anchors: list[tuple[int, str]] = []
    log = _log(path, anchors, flush_after=0.002)

    def slot(i: int) -> None:
        for j in range(60):
            log.emit("decision" if j % 7 == 0 else "guard", experiment=i * 1000 + j)

    threads = [threading.Thread(target=slot, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    counts = [n for n, _ in anchors]
    assert counts == sorted(counts) and counts[-1] == 1 + 8 * 60
    r = verify(path, expected_count=anchors[-1][0], expected_head=anchors[-1][1])
    assert r.ok and r.count == 1 + 8 * 60, r.reason


def test_a_failed_grouped_fsync_stops_the_writer(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    anchors: list[tuple[int, str]] = []
    log = _log(path, anchors, flush_after=600)
    log.emit("guard", experiment=1)
    monkeypatch.setattr(audit.os, "fsync", Counted(path, fail=True))
    with pytest.raises(AuditError, match="fsync failed"):
        log.emit("decision", experiment=1)
    assert anchors == []  # nothing anchored that is not on disk
    with pytest.raises(AuditError, match="stopped accepting"):
        log.emit("guard", experiment=2)
    monkeypatch.undo()
    log.close()
