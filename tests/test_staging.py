"""The next candidate's git work done while the slot still runs the one before (staging.py, scheduler.py).

Real git, real runs (``sandbox = none`` for speed; the staging does no sandboxed work). What is checked:
the staged commit exists before the run before it ends; ledger rows and audit records are the same as
without pipelining for candidates that are invalid, break a rule, or change nothing; a stop drops a
staged candidate (no row, no worktree, its usage recorded); a SIGKILL while one is staged leaves nothing
after ``--resume``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from tests.conftest import SPEC, TARGET_PY, cli_env, git, nightlab_cmd
from tests.test_resume import _wait
from tests.test_worktree_pool import _registrations

from nightlab.audit import read_records
from nightlab.engine import Engine
from nightlab.researchers import Context
from nightlab.types import Candidate, Status, Usage

PIPELINED = SPEC.replace("pipeline = false", "pipeline = true")


def slow(x: float, sleep_s: float = 0.2) -> str:
    return f"import time\ntime.sleep({sleep_s})\n" + TARGET_PY.replace("X = 3.0", f"X = {x}")


class ByIdx:
    """Proposes ``plan[idx]`` (Candidate keyword arguments), else a slow harmless regression."""

    name = "plan"

    def __init__(self, plan: dict[int, dict], usage: Usage | None = None) -> None:
        self.plan, self.usage = plan, usage or Usage()

    def propose(self, ctx: Context) -> Candidate:
        kw = self.plan.get(ctx.idx, {"files": {"target.py": slow(9.0 + ctx.idx)}})
        return Candidate(parent=ctx.parent, rationale=f"plan {ctx.idx}", usage=self.usage, **kw)

    def observe(self, experiment: object) -> None:
        pass

    def close(self) -> None:
        pass


def spy_staging(eng: Engine) -> list[tuple[int, float, str, int]]:
    """Record, for each candidate staged ahead: (idx, when its staging ended, its commit, registrations);
    a marker file ``.nightlab/staged-<idx>`` says it to the runs."""
    seen: list[tuple[int, float, str, int]] = []
    real = eng.stage_ahead

    def stage_ahead(idx: int, candidate: Candidate):
        st = real(idx, candidate)
        seen.append((idx, time.time(), st.commit, len(_registrations(eng.lab_dir))))
        (eng.lab_dir / ".nightlab" / f"staged-{idx}").touch()
        return st

    eng.stage_ahead = stage_ahead  # type: ignore[method-assign]
    return seen


def waits_for_staging(lab: Path, idx: int, x: float, only_if: Path | None = None, then: str = "") -> str:
    """A run that ends once the next candidate is staged (or after 10 s, and the test fails); with
    ``only_if``, only while that file exists. ``then``: code run after the wait."""
    marker = lab / ".nightlab" / f"staged-{idx + 1}"
    cond = f"os.path.exists({str(only_if)!r})" if only_if else "True"
    return (f"import os, time\nt = time.time()\nwhile {cond} and not os.path.exists({str(marker)!r}) "
            f"and time.time() < t + 10:\n    time.sleep(0.02)\n{then}") + TARGET_PY.replace("X = 3.0", f"X = {x}")


def test_the_next_candidate_is_committed_while_the_run_before_goes(make_lab):
    lab = make_lab(spec=PIPELINED)
    plan = {i: {"files": {"target.py": waits_for_staging(lab, i, 9.0 + i)}} for i in (1, 2, 3)}
    plan[4] = {"files": {"target.py": slow(13.0, 0)}}
    eng = Engine(lab, tag="s", researcher=ByIdx(plan), sandbox_mode="none", max_experiments=4)
    seen = spy_staging(eng)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    assert [e.idx for e in exps] == [0, 1, 2, 3, 4]  # max_experiments exactly: nothing staged past it
    assert [e.status for e in exps[1:]] == [Status.DISCARD] * 4
    by = {e.idx: e for e in exps}
    assert [i for i, *_ in seen] == [2, 3, 4]  # #1 found the slot free; each later one was staged ahead
    for idx, done_at, commit, regs in seen:
        assert done_at < (by[idx - 1].finished_at or 0), (idx, done_at, by[idx - 1].finished_at)
        assert by[idx - 1].run_s < 9, by[idx - 1].run_s  # its run saw the marker, not the 10 s limit
        assert commit == by[idx].commit and git(lab, "cat-file", "-t", commit).strip() == "commit"
        assert regs <= 2  # one slot running + the staged candidate (slots + 1)
    assert git(lab, "rev-parse", "refs/nightlab/s/4").strip() == seen[-1][2]
    assert not any((lab / ".nightlab" / "worktrees").iterdir()) and _registrations(lab) == []


BAD_DIFF = "--- a/target.py\n+++ b/target.py\n@@ -1,1 +1,1 @@\n-no such line\n+x\n"
SYMLINK_DIFF = ("diff --git a/extra/link.py b/extra/link.py\nnew file mode 120000\n--- /dev/null\n"
                "+++ b/extra/link.py\n"
                "@@ -0,0 +1 @@\n+/etc/passwd\n\\ No newline at end of file\n")
VOLATILE = {"commit", "seconds", "wall_s", "cwd", "log_sha256"}


def _session_records(lab: Path, tag: str) -> dict[int, list[tuple[str, dict]]]:
    """Per experiment, its audit records (kind, data) without what differs between two sessions."""
    out: dict[int, list[tuple[str, dict]]] = {}
    for r in read_records(lab / ".nightlab" / "audit.jsonl"):
        if r["session"] == tag and r["experiment"] is not None:
            data = {k: v for k, v in r["data"].items() if k not in VOLATILE}
            if "evidence" in data:
                data["evidence"] = {k: v for k, v in data["evidence"].items() if k != "timing"}
            out.setdefault(r["experiment"], []).append((r["kind"], data))
    return out


def test_staged_ahead_bad_candidates_are_recorded_as_without_staging(make_lab):
    spec = SPEC.replace('editable = ["target.py"]', 'editable = ["target.py", "extra/*.py"]') + (
        "\n[permissions]\nmax_diff_bytes = 3000\n")
    lab = make_lab(files={"extra/a.py": "A = 1\n"}, spec=spec)
    plan = {2: {"diff": BAD_DIFF},  # invalid: the edit does not apply
            4: {"files": {"evaluate.py": "print('gamed')\n"}},  # rejected: a protected path (no worktree)
            6: {"diff": SYMLINK_DIFF},  # rejected after staging: a symlink
            8: {"files": {"target.py": TARGET_PY}},  # invalid: changes nothing
            10: {"files": {"target.py": slow(9.0) + "#" * 4000 + "\n"}}}  # rejected: diff too big
    flag = lab / ".nightlab" / "expect-staging"  # the runs before them wait for their staging, when pipelined
    for i in (1, 3, 5, 7, 9):
        plan[i] = {"files": {"target.py": waits_for_staging(lab, i, 9.0 + i, only_if=flag)}}
    rows, records, staged = {}, {}, {}
    for tag, pipeline in (("plain", False), ("ahead", True)):
        if pipeline:
            flag.touch()
        eng = Engine(lab, tag=tag, researcher=ByIdx(plan), sandbox_mode="none", max_experiments=10,
                     executor={"pipeline": pipeline})
        seen = spy_staging(eng)
        session = eng.run()
        rows[tag] = [(e.idx, e.status, e.reason, e.diff, e.parent_commit, bool(e.commit))
                     for e in eng.ledger.experiments(session.id)]
        eng.close()
        records[tag] = _session_records(lab, tag)
        staged[tag] = {i for i, *_ in seen}
    assert staged["plain"] == set() and {2, 4, 6, 8, 10} <= staged["ahead"]
    assert rows["ahead"] == rows["plain"]
    status = {r[0]: (r[1], r[2]) for r in rows["ahead"]}
    assert status[2][0] is Status.INVALID and status[2][1].startswith("edit did not apply")
    assert status[4] == (Status.REJECTED, "policy: protected (evaluate.py is a protected file)")
    assert status[6][0] is Status.REJECTED and "symlinks are not allowed" in status[6][1]
    assert status[8] == (Status.INVALID, "the candidate changes nothing")
    assert status[10][0] is Status.REJECTED and "max_diff_bytes" in status[10][1]
    assert records["ahead"] == records["plain"]
    kinds = [k for k, _ in records["ahead"][10]]
    assert kinds == ["researcher.request", "researcher.response", "candidate", "guard", "guard", "git.commit",
                     "guard", "policy.violation", "decision"]
    assert not any((lab / ".nightlab" / "worktrees").iterdir()) and _registrations(lab) == []


def test_a_stop_drops_the_staged_candidate(make_lab):
    lab = make_lab(spec=PIPELINED)
    stop = lab / ".nightlab" / "STOP"
    run1 = waits_for_staging(lab, 1, 8.0, then=f"open({str(stop)!r}, 'w').close()\ntime.sleep(0.3)\n")
    eng = Engine(lab, tag="s", researcher=ByIdx({1: {"files": {"target.py": run1}}}, Usage(tokens_in=7)),
                 sandbox_mode="none", max_experiments=10)
    seen = spy_staging(eng)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    with sqlite3.connect(lab / ".nightlab" / "ledger.db") as con:
        spend = con.execute("select idx, tokens_in, why from spend").fetchall()
    eng.close()
    assert session.stop_reason == "STOP file"
    assert [(e.idx, e.status) for e in exps] == [(0, Status.KEEP), (1, Status.DISCARD)]
    assert [i for i, *_ in seen] == [2]  # staged while #1 ran, then never run
    assert spend == [(2, 7, "dropped at a stop: STOP file")]
    assert git(lab, "for-each-ref", "refs/nightlab/s/2") == ""  # its commit has no ref
    assert not any((lab / ".nightlab" / "worktrees").iterdir()) and _registrations(lab) == []
    dropped = [r for r in read_records(lab / ".nightlab" / "audit.jsonl") if r["experiment"] == 2]
    assert [r["kind"] for r in dropped] == ["researcher.request", "researcher.response", "researcher.dropped"]


def test_a_sigkill_while_a_candidate_is_staged_leaves_nothing_after_resume(make_lab):
    lab = make_lab(spec=PIPELINED.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"'))
    steps = [{"rationale": "long", "files": {"target.py": slow(8.0, 30)}},
             {"rationale": "next", "files": {"target.py": slow(7.0, 0)}}]
    (lab / "steps.json").write_text(json.dumps(steps))
    proc = subprocess.Popen(nightlab_cmd("run", "--lab", str(lab), "--tag", "r", "--plain", "--sandbox", "none"),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    staged = lab / ".nightlab" / "worktrees" / "r-2"
    try:
        _wait(lambda: (staged / "target.py").exists() and "X = 7.0" in (staged / "target.py").read_text(),
              what="#2 staged while #1 runs")
        time.sleep(0.2)  # its commit made (a kill inside the checkout is bench/kill_resume.py's business)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert staged.exists() and len(_registrations(lab)) == 2
    (lab / "steps.json").write_text(json.dumps(steps[1:]))
    (lab / ".nightlab" / "STOP").touch()  # recover, then stop at once
    res = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--resume", "--plain", "--sandbox", "none"),
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    with sqlite3.connect(lab / ".nightlab" / "ledger.db") as con:
        rows = con.execute("select idx, status from experiments order by idx").fetchall()
    assert rows == [(0, "keep"), (1, "interrupted")]  # #2 never got a row
    assert not any((lab / ".nightlab" / "worktrees").iterdir()) and _registrations(lab) == []
    assert len(git(lab, "worktree", "list").splitlines()) == 1


# --------------------------------------------------------------------------- the slot handed back at the run's end


class Watching(ByIdx):
    """:class:`ByIdx` that notes, at each proposal, which experiments it had been told of."""

    def __init__(self, plan: dict[int, dict]) -> None:
        super().__init__(plan)
        self.told: set[int] = set()
        self.knew: dict[int, set[int]] = {}

    def propose(self, ctx: Context) -> Candidate:
        self.knew[ctx.idx] = set(self.told)
        return super().propose(ctx)

    def observe(self, experiment: object) -> None:
        self.told.add(experiment.idx)  # type: ignore[attr-defined]


def _seq(lab: Path, tag: str) -> dict[tuple[int, str], int]:
    """(experiment, kind) -> the audit sequence number of its first record of that kind."""
    out: dict[tuple[int, str], int] = {}
    for r in read_records(lab / ".nightlab" / "audit.jsonl"):
        if r["session"] == tag and r["experiment"] is not None:
            out.setdefault((r["experiment"], r["kind"]), r["seq"])
    return out


def test_the_next_run_starts_before_the_decision_before_it_is_recorded(make_lab):
    # one slot, pipelined: once a run and its measurement are over, the slot's next run starts, and the
    # finished experiment writes its decision and records while it goes -- yet runs never overlap, every
    # row and ref is complete, and each proposal still knows every result but the one in flight
    lab = make_lab(spec=PIPELINED)
    plan = {i: {"files": {"target.py": slow(1.0 + i / 10 if i % 2 else 9.0 + i, 0.2)}} for i in range(1, 7)}
    researcher = Watching(plan)
    eng = Engine(lab, tag="h", researcher=researcher, sandbox_mode="none", max_experiments=6)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    assert [e.idx for e in exps] == list(range(7)) and all(e.finished_at and e.metric for e in exps)
    seq = _seq(lab, "h")
    for k in range(2, 7):
        assert seq[(k - 1, "sandbox.exit")] < seq[(k, "sandbox.start")], k  # one run at a time
        assert seq[(k, "sandbox.start")] < seq[(k - 1, "decision")], k  # the slot was handed back first
    for k in range(3, 7):  # the proposal of k waited for k-2's records: only k-1 was still unknown to it
        assert set(range(1, k - 1)) <= researcher.knew[k], (k, researcher.knew[k])
    for e in exps[1:]:
        ref = git(lab, "rev-parse", f"refs/nightlab/h/{e.idx}").strip()
        assert ref == e.commit or e.status is Status.KEEP, (e.idx, ref, e.commit)
        assert e.diff and e.evidence["timing"]["run"] > 0.2
    assert not any((lab / ".nightlab" / "worktrees").iterdir()) and _registrations(lab) == []


HOLDOUT = '[evaluate]\noutputs = []\n\n[holdout]\ncommand = "python holdout.py"\nmetric = "score"\n\n[metric]'


def test_a_lab_with_a_holdout_check_holds_the_slot_until_the_decision(make_lab):
    # a keep's holdout check runs on the slot's machine: the next run waits for it, as before
    lab = make_lab(files={"holdout.py": "print('---')\nprint('score: 1.0')\n"},
                   spec=PIPELINED.replace("[metric]", HOLDOUT, 1).replace(
                       'protected = ["evaluate.py"]', 'protected = ["evaluate.py", "holdout.py"]'))
    plan = {i: {"files": {"target.py": slow(3.0 - i / 4, 0.1)}} for i in range(1, 4)}  # each one a keep
    eng = Engine(lab, tag="k", researcher=ByIdx(plan), sandbox_mode="none", max_experiments=3)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    assert [e.status for e in exps] == [Status.KEEP] * 4
    assert all("holdout" in e.evidence for e in exps)
    seq = _seq(lab, "k")
    for k in range(2, 4):
        assert seq[(k - 1, "decision")] < seq[(k, "sandbox.start")], k


def test_without_pipelining_the_decision_comes_before_the_next_run(make_lab):
    # autoresearch's strict order (pipeline = false): each experiment is decided before the next one starts
    lab = make_lab(spec=SPEC)
    plan = {i: {"files": {"target.py": slow(3.0 - i / 4, 0.1)}} for i in range(1, 4)}
    eng = Engine(lab, tag="o", researcher=ByIdx(plan), sandbox_mode="none", max_experiments=3)
    eng.run()
    eng.close()
    seq = _seq(lab, "o")
    for k in range(2, 4):
        assert seq[(k - 1, "decision")] < seq[(k, "researcher.request")] < seq[(k, "sandbox.start")], k
