"""[autonomy]: review and approve-keep wait for a human through the ledger; stops end the wait cleanly."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests._cli import nl
from tests.conftest import SPEC, TARGET_PY, cli_env, git

from nightlab import approvals
from nightlab.audit import read_records, verify
from nightlab.engine import Engine
from nightlab.errors import UsageError
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.types import Status

FAST = "\n[autonomy]\npoll_s = 0.1\n"


def target(x: float) -> str:
    return TARGET_PY.replace("X = 3.0", f"X = {x}")


def step(x: float) -> dict[str, Any]:
    return {"rationale": f"move X to {x}", "files": {"target.py": target(x)}}


def db(lab: Path) -> Path:
    return lab / ".nightlab" / "ledger.db"


def rows(lab: Path, sql: str, *args: Any) -> list[tuple]:
    with sqlite3.connect(db(lab)) as con:
        return con.execute(sql, args).fetchall()


def wait_pending(lab: Path, idx: int, kind: str, timeout: float = 30) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = rows(lab, "select id from approvals where status='pending' and experiment_idx=? "
                              "and kind=?", idx, kind)
        except sqlite3.OperationalError:
            found = []
        if found:
            return int(found[0][0])
        time.sleep(0.05)
    raise AssertionError(f"no pending {kind} approval for experiment {idx}")


def audit(lab: Path) -> list[dict]:
    return list(read_records(lab / ".nightlab" / "audit.jsonl"))


class Background:
    """engine.run() on a thread; the test plays the human on the main thread."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.result: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.eng.run()
        except BaseException as e:  # surfaced by join()
            self.result = e

    def join(self, timeout: float = 60) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the engine did not finish"
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def engine(lab: Path, steps: list, tag: str, autonomy: str, n: int, **kw: Any) -> Engine:
    return Engine(lab, tag=tag, researcher=ScriptedResearcher(steps), sandbox_mode="none", max_experiments=n,
                  autonomy=autonomy, **kw)


def scripted_lab(make_lab, steps: list, extra: str = FAST) -> Path:
    lab = make_lab(spec=SPEC.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"') + extra)
    (lab / "steps.json").write_text(json.dumps(steps))
    return lab


def test_review_runs_nothing_until_approved_from_a_second_process(make_lab):
    lab = scripted_lab(make_lab, [step(1.0)])
    proc = subprocess.Popen(nl("run", "--lab", str(lab), "--tag", "rv", "--plain", "--sandbox", "none",
                               "--autonomy", "review", "--max-experiments", "1"),
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        aid = wait_pending(lab, 1, "run")
        time.sleep(1.0)  # ample time to (wrongly) run it
        assert proc.poll() is None
        exps = rows(lab, "select idx, status, pid, exit_code, id from experiments order by idx")
        assert [e[:4] for e in exps] == [(0, "keep", exps[0][2], 0), (1, "running", None, None)]
        assert not list((lab / ".nightlab" / "artifacts").glob("*/1/run.log"))
        assert "sandbox.start" not in [r["kind"] for r in audit(lab) if r["experiment"] == 1]
        res = subprocess.run(nl("approve", "1", "--lab", str(lab), "--why", "looks fine"), env=cli_env(),
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and "approved its run" in res.stdout, res.stdout + res.stderr
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "waits for a human before it runs: nightlab approve 1" in out
    assert rows(lab, "select idx, status from experiments order by idx") == [(0, "keep"), (1, "keep")]
    status, who, why = rows(lab, "select status, who, why from approvals where id=?", aid)[0]
    assert status == "approved" and "(cli)" in who and why == "looks fine"
    recs = audit(lab)
    kinds = [(r["kind"], r["experiment"]) for r in recs]
    req = kinds.index(("approval.request", 1))
    ans = kinds.index(("approval.answer", 1))
    assert req < ans < kinds.index(("sandbox.start", 1))
    assert recs[ans]["data"]["status"] == "approved" and recs[ans]["data"]["why"] == "looks fine"
    assert verify(lab / ".nightlab" / "audit.jsonl").ok
    # an answer is final
    res = subprocess.run(nl("reject", "1", "--lab", str(lab), "--why", "late"), env=cli_env(),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no pending approval" in res.stderr


def test_review_reject_from_the_cli_means_it_never_runs(make_lab):
    lab = scripted_lab(make_lab, [step(1.0)])
    eng = engine(lab, [step(1.0)], "rj", "review", 1)
    bg = Background(eng)
    wait_pending(lab, 1, "run")
    res = subprocess.run(nl("reject", "1", "--lab", str(lab)), env=cli_env(), capture_output=True, text=True)
    assert res.returncode == 2 and "--why" in res.stderr  # a rejection needs a reason
    shown = subprocess.run(nl("pending", "--lab", str(lab)), env=cli_env(), capture_output=True, text=True)
    assert "experiment 1 of session rj: may it run?" in shown.stdout and "+X = 1.0" in shown.stdout
    assert "move X to 1.0" in shown.stdout
    res = subprocess.run(nl("reject", "1", "--lab", str(lab), "--why", "touches too much"), env=cli_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    session = bg.join()
    exp = eng.ledger.experiments(session.id)[1]
    assert exp.status is Status.REJECTED and exp.reason == "human: touches too much"
    assert exp.exit_code is None and not list((lab / ".nightlab" / "artifacts").glob(f"*/{exp.idx}/run.log"))
    assert session.status == "finished"
    assert git(lab, "rev-parse", "nightlab/rj").strip() == session.base_commit
    eng.close()


def test_interactive_pending_answers_each_request(make_lab):
    lab = scripted_lab(make_lab, [step(1.0)])
    eng = engine(lab, [step(1.0)], "ia", "review", 1)
    bg = Background(eng)
    wait_pending(lab, 1, "run")
    res = subprocess.run(nl("pending", "--lab", str(lab), "--interactive", "--who", "alice"), input="y\nok\n",
                         env=cli_env(), capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "approved" in res.stdout, res.stdout + res.stderr
    session = bg.join()
    assert [e.status for e in eng.ledger.experiments(session.id)] == [Status.KEEP, Status.KEEP]
    answer = [r for r in audit(lab) if r["kind"] == "approval.answer"][-1]
    assert answer["data"]["who"] == "alice" and answer["data"]["status"] == "approved"
    eng.close()


def test_approve_keep_rejected_keep_does_not_advance_the_branch(make_lab):
    lab = make_lab(spec=SPEC + FAST)
    eng = engine(lab, [step(2.0), step(1.0)], "ak", "approve-keep", 2)
    base = git(lab, "rev-parse", "HEAD").strip()
    bg = Background(eng)
    aid = wait_pending(lab, 1, "keep")
    assert git(lab, "rev-parse", "nightlab/ak").strip() == base  # waiting: not advanced
    row = approvals.get(eng.ledger, aid)
    assert row is not None and "score = 5.5 (incumbent 8.5)" in row["rationale"] and "+X = 2.0" in row["diff"]
    approvals.answer(eng.ledger, aid, False, "not convinced", "dashboard")  # the dashboard's path
    with pytest.raises(UsageError, match="already answered"):
        approvals.answer(eng.ledger, aid, True, "", "someone else")
    aid2 = wait_pending(lab, 2, "keep")
    assert git(lab, "rev-parse", "nightlab/ak").strip() == base
    approvals.answer(eng.ledger, aid2, True, "", "dashboard")
    session = bg.join()
    exps = eng.ledger.experiments(session.id)
    assert [e.status for e in exps] == [Status.KEEP, Status.DISCARD, Status.KEEP]
    assert exps[1].reason == "human rejected the keep: not convinced" and exps[1].metric == pytest.approx(5.5)
    assert exps[1].exit_code == 0  # it ran; only the keep was refused
    assert git(lab, "rev-parse", "nightlab/ak").strip() == exps[2].commit == session.incumbent_commit
    assert session.incumbent_metric == pytest.approx(4.5)
    answers = [r["data"] for r in audit(lab) if r["kind"] == "approval.answer"]
    assert [(a["approval_kind"], a["status"], a["who"]) for a in answers] == [
        ("keep", "rejected", "dashboard"), ("keep", "approved", "dashboard")]
    eng.close()


def test_stop_file_consumed_by_the_loop_is_still_seen_by_an_approval_wait(make_lab):
    # the loop's stop check deletes the STOP file; a wait on another thread must still see the request
    # (CI once hung here: the loop consumed the file first and the approval wait polled for it forever)
    lab = make_lab(spec=SPEC + FAST)
    eng = engine(lab, [step(2.0)], "sfc", "review", 3)
    (lab / ".nightlab" / "STOP").write_text("")
    assert eng.stop_reason([]) == "STOP file"
    assert not (lab / ".nightlab" / "STOP").exists()
    assert eng._stop_requested() == "STOP file"
    eng.close()


def test_stop_file_while_waiting_stops_cleanly_and_resume_continues(make_lab):
    lab = make_lab(spec=SPEC.replace("max_experiments = 3", "max_experiments = 50") + FAST)
    eng = engine(lab, [step(2.0)], "sf", "review", 50)
    bg = Background(eng)
    aid = wait_pending(lab, 1, "run")
    (lab / ".nightlab" / "STOP").write_text("")
    session = bg.join(30)
    assert session.status == "stopped" and session.stop_reason == "STOP file"
    exp = eng.ledger.experiments(session.id)[1]
    assert exp.status is Status.INTERRUPTED and "awaiting approval (STOP file)" in exp.reason
    assert approvals.get(eng.ledger, aid)["status"] == "cancelled"
    assert not (lab / ".nightlab" / "STOP").exists()
    eng.close()
    # resume from the incumbent, this time without waiting
    eng = Engine(lab, tag="sf", resume=True, researcher=ScriptedResearcher([step(1.0)]), sandbox_mode="none",
                 max_experiments=2, autonomy="auto")
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    assert [(e.idx, e.status) for e in exps] == [(0, Status.KEEP), (1, Status.INTERRUPTED), (2, Status.KEEP)]
    assert exps[2].parent_commit == session.base_commit and session.status == "finished"
    assert git(lab, "rev-parse", "nightlab/sf").strip() == exps[2].commit
    kinds = [r["kind"] for r in audit(lab)]
    assert "session.resume" in kinds and verify(lab / ".nightlab" / "audit.jsonl").ok
    eng.close()


def test_sigint_while_waiting_interrupts(make_lab):
    lab = make_lab(spec=SPEC + FAST)
    eng = engine(lab, [step(2.0)], "si", "review", 3)
    bg = Background(eng)
    aid = wait_pending(lab, 1, "run")
    eng.stop.interrupt("interrupted (SIGINT)")
    session = bg.join(30)
    assert session.status == "stopped" and session.stop_reason == "interrupted (SIGINT)"
    assert eng.ledger.experiments(session.id)[1].status is Status.INTERRUPTED
    assert approvals.get(eng.ledger, aid)["status"] == "cancelled"
    eng.close()


def test_an_unanswered_request_expires_as_a_rejection(make_lab):
    lab = make_lab(spec=SPEC + "\n[autonomy]\npoll_s = 0.1\nexpire_h = 0.0003\n")  # about a second
    eng = engine(lab, [step(1.0)], "ex", "review", 1)
    session = eng.run()
    exp = eng.ledger.experiments(session.id)[1]
    assert exp.status is Status.REJECTED and exp.reason == "human: no answer within 0.0003 h"
    answer = [r for r in audit(lab) if r["kind"] == "approval.answer"][-1]["data"]
    assert answer["who"] == "nightlab (expire_h)" and answer["waited_s"] >= 1.0
    eng.close()


def test_sigterm_while_waiting_stops_and_resume_finishes(make_lab):
    lab = scripted_lab(make_lab, [step(1.0)])
    proc = subprocess.Popen(nl("run", "--lab", str(lab), "--tag", "st", "--plain", "--sandbox", "none",
                               "--autonomy", "review"),
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        aid = wait_pending(lab, 1, "run")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert rows(lab, "select status, stop_reason from sessions") == [("stopped", "stopped by SIGTERM")]
    assert rows(lab, "select status from approvals where id=?", aid) == [("cancelled",)]
    argv = nl("run", "--lab", str(lab), "--resume", "--plain", "--sandbox", "none", "--max-experiments", "2")
    res = subprocess.run(argv, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    # max_experiments counts the interrupted one; the resumed session does not wait ([autonomy] is auto)
    assert rows(lab, "select idx, status from experiments order by idx") == [
        (0, "keep"), (1, "interrupted"), (2, "keep")]
    assert rows(lab, "select status from sessions") == [("finished",)]
