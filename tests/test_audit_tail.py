"""The audit log's tail after a harness is SIGKILLed: what a cut of the last records shows.

The engine's records are grouped: the ledger anchors the log (record count + head hash) at every
decision and session event, and otherwise at most 0.1 s after a record was written (so during every
run and proposal that lasts). A cut that removes an anchored record is detected (``audit verify``
exits 1, and ``--resume`` refuses to continue the log); records after the last anchor can be cut
without a trace, and ``audit verify`` says how many there are.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tests._cli import nl
from tests.conftest import SPEC, cli_env, git, nightlab_cmd

from nightlab.audit import AuditLog, ledger_head, read_records, store_head, verify, verify_lab
from nightlab.ledger import Ledger

# the record kinds these unit tests anchor after (AuditLog's contract, whatever the engine picks)
ANCHOR_KINDS = frozenset({"decision", "session.start", "session.stop"})

# unanchored records a kill can leave: those of the last 0.1 s before it, at most the records of one
# experiment between two decisions (git.advance, the proposal's two, candidate, four guards, git.commit,
# sandbox.start, sandbox.exit, measurement: 12; 16 leaves room for an evaluator's two)
MAX_UNANCHORED = 16


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_verify_counts_the_records_after_the_last_anchor(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        path = tmp_path / "audit.jsonl"
        log = AuditLog(path, anchor=lambda i, n, h: store_head(ledger, i, n, h), anchor_kinds=ANCHOR_KINDS)
        log.emit("session.start", tag="t")
        log.emit("decision", experiment=1, status="keep")  # anchored: record 3
        log.emit("guard", experiment=1, ok=True)  # not anchored
        log.emit("measurement", experiment=1, metric=1.0)  # not anchored
        log.close()
        held = ledger_head(ledger, next(read_records(path))["hash"])
        assert held is not None and held[0] == 3
        lines = _lines(path)
        assert len(lines) == 5
        for cut in range(1, 5):
            path.write_bytes(b"".join(lines[:-cut]))
            r = verify(path, expected_count=held[0], expected_head=held[1])
            if 5 - cut >= 3:  # only unanchored records went: undetectable, and said so
                assert r.ok and r.last_anchor == 3 and r.unanchored == 2 - cut
            else:
                assert not r.ok and "truncated" in r.reason and r.first_bad_seq == 5 - cut + 1


def _cycling_lab(make_lab) -> Path:
    spec = SPEC.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"\ncycle = true')
    spec = spec.replace("max_experiments = 3", "max_experiments = 1000")
    lab = make_lab(spec=spec)
    run = "import time\ntime.sleep({s})\nprint('---')\nprint('score: {v}')\n"
    (lab / "steps.json").write_text(json.dumps([
        {"rationale": "a", "files": {"target.py": run.format(s=0.05, v=1.0)}},
        {"rationale": "b", "files": {"target.py": run.format(s=0.2, v=2.0)}},
    ]))
    git(lab, "add", "-A")
    git(lab, "commit", "-qm", "steps")
    return lab


def _kill_after(lab: Path, delay: float, first: bool) -> None:
    args = ["--tag", "k"] if first else ["--resume"]
    proc = subprocess.Popen(nightlab_cmd("run", "--lab", str(lab), *args, "--plain", "--sandbox", "none"),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_cutting_one_to_four_tail_records_after_kills(make_lab):
    lab = _cycling_lab(make_lab)
    state = lab / ".nightlab"
    path = state / "audit.jsonl"
    rng = random.Random(7)
    seen_unanchored = set()
    for i in range(6):
        _kill_after(lab, 2.0 + rng.random() * 3.0, first=i == 0)
        if not path.exists():
            continue
        lines = _lines(path)
        with Ledger.for_lab(lab) as ledger:
            result, _ = verify_lab(state, ledger)
            assert result.ok, result.reason
            assert result.unanchored <= MAX_UNANCHORED, [json.loads(x)["kind"] for x in lines[-6:]]
            seen_unanchored.add(result.unanchored)
            anchored = result.last_anchor
            for cut in range(1, min(5, len(lines) + 1)):  # a kill can leave fewer than 4 records
                path.write_bytes(b"".join(lines[:-cut]))
                r, _ = verify_lab(state, ledger)
                if len(lines) - cut >= anchored and (cut < len(lines) or anchored == 0):  # 0: killed before any anchor
                    assert r.ok and r.unanchored == len(lines) - cut - anchored
                else:
                    assert not r.ok and "truncated" in r.reason, (cut, r)
        if i == 2:  # the CLI says the same, with exit status 1 for a cut into the anchored records
            path.write_bytes(b"".join(lines[:anchored - 1]))
            res = subprocess.run(nl("audit", "verify", "--lab", str(lab)), env=cli_env(), capture_output=True,
                                 text=True)
            assert res.returncode == 1 and "truncated" in res.stdout, res.stdout
        path.write_bytes(b"".join(lines))
    res = subprocess.run(nl("audit", "verify", "--lab", str(lab)), env=cli_env(), capture_output=True, text=True)
    assert res.returncode == 0 and "chain intact, last anchor at record" in res.stdout, res.stdout + res.stderr
    assert 0 in seen_unanchored  # kills during a run or a proposal leave nothing unanchored


def test_a_kill_during_a_run_leaves_every_record_anchored(make_lab):
    lab = _cycling_lab(make_lab)
    (lab / "steps.json").write_text(json.dumps([{"rationale": "slow", "files": {
        "target.py": "import time\ntime.sleep(60)\n"}}]))
    proc = subprocess.Popen(nightlab_cmd("run", "--lab", str(lab), "--tag", "k", "--plain", "--sandbox", "none"),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = lab / ".nightlab" / "audit.jsonl"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            kinds = [r["kind"] for r in read_records(path)]
            if kinds.count("sandbox.start") >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    lines = _lines(path)
    assert json.loads(lines[-1])["kind"] == "sandbox.start"
    res = subprocess.run(nl("audit", "verify", "--lab", str(lab)), env=cli_env(), capture_output=True, text=True)
    assert res.returncode == 0 and f"last anchor at record {len(lines)} (nothing after it)" in res.stdout, res.stdout
    for cut in range(1, 5):
        path.write_bytes(b"".join(lines[:-cut]))
        res = subprocess.run(nl("audit", "verify", "--lab", str(lab)), env=cli_env(), capture_output=True,
                             text=True)
        assert res.returncode == 1, res.stdout
        assert f"BROKEN at record {len(lines) - cut + 1}" in res.stdout and "truncated" in res.stdout
    # resuming onto the cut log is refused: the session would re-anchor the cut and hide it
    res = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--resume", "--plain", "--sandbox", "none"),
                         env=cli_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "were cut" in res.stderr + res.stdout, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    path.write_bytes(b"".join(lines))  # restored from a copy: resume goes on
    (lab / ".nightlab" / "STOP").write_text("")
    res = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--resume", "--plain", "--sandbox", "none"),
                         env=cli_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("unanchored", [0, 1])
def test_cli_wording(tmp_path, unanchored):
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        state = tmp_path / ".nightlab"
        log = AuditLog(state / "audit.jsonl", anchor=lambda i, n, h: store_head(ledger, i, n, h),
                       anchor_kinds=ANCHOR_KINDS, checkpoint_every=0)
        log.emit("decision", experiment=1)
        for _ in range(unanchored):
            log.emit("guard", experiment=2)
        log.close()
    res = subprocess.run(nl("audit", "verify", "--lab", str(tmp_path), "--db", f"sqlite:///{tmp_path / 'l.db'}"),
                         env=cli_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    n = 2 + unanchored
    tail = "nothing after it" if not unanchored else "1 record after it is unanchored"
    assert f"OK: {n} records, chain intact, last anchor at record 2 ({tail})" in res.stdout, res.stdout


def _ledger_vs_audit(lab: Path, path: Path) -> tuple[list[int], list[int]]:
    """What the ledger holds that the audit log lacks: (decisions, candidates) by experiment index.
    Asserts the other direction: every decision (or recovery) the log holds is the ledger's."""
    with Ledger.for_lab(lab) as ledger:
        sess = ledger.get_session("k")  # None: killed before the session's row was written
        rows = ledger.experiments(sess.id) if sess is not None else []
    status_of = {e.idx: e.status.value for e in rows}
    finished = {idx for idx, st in status_of.items() if st != "running"}
    audited: dict[int, str] = {}
    candidates = set()
    for rec in read_records(path):
        if rec["kind"] == "decision":
            audited[rec["experiment"]] = rec["data"]["status"]
        elif rec["kind"] == "recover" and rec.get("experiment") is not None:
            audited[rec["experiment"]] = "recovered"
        elif rec["kind"] == "candidate":
            candidates.add(rec["experiment"])
    for idx, status in audited.items():
        # a recovery is recorded before the ledger marks the orphan (a kill in between leaves it running,
        # and the next resume recovers it again); a decision after the ledger's row
        ok = status_of.get(idx) in ("interrupted", "running") if status == "recovered" else status_of.get(idx) == status
        assert ok, (idx, status, status_of.get(idx))
    return sorted(finished - set(audited)), sorted({e.idx for e in rows if e.idx > 0} - candidates)


def test_sigkill_mid_experiment_leaves_a_verified_log_that_agrees_with_the_ledger(make_lab):
    """Real harness processes SIGKILLed at random points of a night of fast experiments (grouped
    fsyncs): each time the log verifies as it is, every decision it holds is the ledger's, and the
    ledger holds at most one decision and one candidate more than the log after each kill -- the one
    whose audit record the kill beat (the ledger is written first) -- never an older one."""
    lab = _cycling_lab(make_lab)
    path = lab / ".nightlab" / "audit.jsonl"
    rng = random.Random(13)
    kills = 0
    gone_decisions: set[int] = set()
    gone_candidates: set[int] = set()
    for i in range(5):
        _kill_after(lab, 1.5 + rng.random() * 2.5, first=i == 0)
        if not path.exists():
            continue
        kills += 1
        res = subprocess.run(nl("audit", "verify", "--lab", str(lab)), env=cli_env(), capture_output=True,
                             text=True)
        assert res.returncode == 0 and "chain intact" in res.stdout, res.stdout + res.stderr
        lost_decisions, lost_candidates = _ledger_vs_audit(lab, path)
        with Ledger.for_lab(lab) as ledger:
            sess = ledger.get_session("k")
            rows = ledger.experiments(sess.id) if sess is not None else []
            last = max((e.idx for e in rows), default=-1)
            last_done = max((e.idx for e in rows if e.status.value != "running"), default=-1)
        # what this kill lost (what earlier kills lost stays lost: the log is append-only)
        assert set(lost_decisions) - gone_decisions <= {last_done}, (lost_decisions, gone_decisions, last_done)
        assert set(lost_candidates) - gone_candidates <= {last}, (lost_candidates, gone_candidates, last)
        gone_decisions |= set(lost_decisions)
        gone_candidates |= set(lost_candidates)
    assert kills >= 3
