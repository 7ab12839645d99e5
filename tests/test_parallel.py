"""Many experiments at once: local slots, pipelined proposals, stale candidates kept as measured."""

from __future__ import annotations

import time

import pytest
from tests.conftest import SPEC, TARGET_PY, git

from nightlab.audit import parse_time, read_records
from nightlab.engine import REBASE, Engine
from nightlab.ledger import Ledger
from nightlab.researchers import Context
from nightlab.types import Candidate, Status

# X and Y far apart, so a change to one applies on top of a change to the other; the run time
# depends on the values, so the file itself carries no per-candidate sleep line to conflict on.
SPREAD = """\
import time
X = 3.0
# -
# -
# -
# -
# -
# -
Y = 0.0
time.sleep({"X=3.0,Y=2.0": 2.0, "X=9.0,Y=0.0": 3.5}.get(f"X={X},Y={Y}", 0.1))
print("---")
print(f"score: {(X - 1) ** 2 + (Y - 2) ** 2 + 0.5:.6f}")
"""


def spread(x: float, y: float) -> str:
    return SPREAD.replace("X = 3.0", f"X = {x}").replace("Y = 0.0", f"Y = {y}")


def slow_target(x: float, y: float, sleep_s: float) -> str:
    return (f"import time\ntime.sleep({sleep_s})\n") + TARGET_PY.replace("X = 3.0", f"X = {x}").replace(
        "Y = 0.0", f"Y = {y}")


class Plan:
    """A researcher that proposes fixed files per experiment index (the rest: a harmless regression)."""

    name = "plan"

    def __init__(self, by_idx: dict[int, str], default: str, sleep_s: float = 0.0) -> None:
        self.by_idx, self.default, self.sleep_s = by_idx, default, sleep_s
        self.proposed_at: list[tuple[int, float]] = []

    def propose(self, ctx: Context) -> Candidate:
        time.sleep(self.sleep_s)
        self.proposed_at.append((ctx.idx, time.time()))
        text = self.by_idx.get(ctx.idx, self.default)
        return Candidate(parent=ctx.parent, rationale=f"plan {ctx.idx}", files={"target.py": text})

    def observe(self, experiment: object) -> None:
        pass

    def close(self) -> None:
        pass


def run(lab, researcher, **kw):
    eng = Engine(lab, tag="p", researcher=researcher, sandbox_mode="none", **kw)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    return session, exps


def test_slots_run_in_parallel(make_lab):
    lab = make_lab(spec=SPEC.replace("pipeline = false", "slots = 3"))
    plan = Plan({}, slow_target(9.0, 0.0, 1.5))
    t0 = time.monotonic()
    _session, exps = run(lab, plan, max_experiments=6)
    wall = time.monotonic() - t0
    tried = exps[1:]
    assert [e.idx for e in exps] == list(range(7))  # no duplicate, no gap
    assert all(e.status is Status.DISCARD for e in tried)
    total_run = sum(e.run_s for e in tried)
    assert total_run >= 6 * 1.5
    # experiments overlapped in time: at the start of some run, two others were still going (3 slots used);
    # how much wall time that saves is bench/parallel.py's to measure, not a timed assertion's
    overlaps = sum(1 for a in tried for b in tried if a.idx < b.idx and b.started_at < (a.finished_at or 0))
    assert overlaps >= 3
    # the runs themselves (the audit's sandbox.start .. sandbox.exit): never more at once than slots. A row
    # outlives its run by its decision and records, written while the slot's next run goes
    runs: dict[int, list[float]] = {}
    for r in read_records(lab / ".nightlab" / "audit.jsonl"):
        if r["kind"] in ("sandbox.start", "sandbox.exit") and (r.get("experiment") or 0) > 0:
            runs.setdefault(r["experiment"], []).append(parse_time(r["time"]))
    assert len(runs) == 6 and all(len(v) == 2 for v in runs.values())
    at_once = max(sum(1 for a, z in runs.values() if a <= b < z) for b, _ in runs.values())
    assert at_once == 3, at_once
    assert wall < total_run, (wall, total_run)
    assert not any((lab / ".nightlab" / "worktrees").iterdir())
    assert len(git(lab, "worktree", "list").strip().splitlines()) == 1


def _tree(lab, rev):
    return git(lab, "rev-parse", f"{rev}^{{tree}}").strip()


def _two_slots(extra: str = "") -> str:
    return SPEC.replace("pipeline = false", "slots = 2\npipeline = false") + extra


def test_a_stale_winner_is_kept_as_measured_and_its_combination_queued(make_lab):
    # slow -> fast: X=1,Y=0 (#2, measured on the baseline) sleeps 2 s; everything else is quick
    sleepy = SPREAD.replace('"X=3.0,Y=2.0": 2.0', '"X=1.0,Y=0.0": 2.0')
    lab = make_lab(files={"target.py": sleepy}, spec=_two_slots())

    def at(x, y):
        return sleepy.replace("X = 3.0", f"X = {x}").replace("Y = 0.0", f"Y = {y}")

    plan = Plan({1: at(3.0, 1.0),   # fast: Y 0 -> 1, 8.5 -> 5.5: kept first
                 2: at(1.0, 0.0)},  # slow, on the baseline: X 3 -> 1, 4.5: beats the new incumbent 5.5
                default=at(9.0, 0.0))  # afterwards: a slow regression
    session, exps = run(lab, plan, max_experiments=4)
    by = {e.idx: e for e in exps}
    assert by[1].status is Status.KEEP and by[1].metric == pytest.approx(5.5)
    assert by[2].parent_commit == by[0].commit  # measured on the baseline ...
    assert by[2].status is Status.KEEP and by[2].metric == pytest.approx(4.5), by[2].reason  # ... kept anyway
    assert by[2].evidence["stale"] and by[2].evidence["incumbent"] == pytest.approx(5.5)
    # exactly the measured tree, as a commit on top of the incumbent it beat: the branch fast-forwards
    assert _tree(lab, by[2].commit) == _tree(lab, by[2].evidence["measured_commit"])
    assert git(lab, "rev-parse", f"{by[2].commit}^").strip() == by[1].commit
    # the combination (X=1 from #2 on top of Y=1 from #1) ran as its own candidate and won
    combo = [e for e in exps if e.researcher == REBASE]
    assert len(combo) == 1 and combo[0].rationale.startswith("combination with #2")
    assert combo[0].status is Status.KEEP and combo[0].metric == pytest.approx(1.5)
    assert session.incumbent_commit == combo[0].commit
    text = git(lab, "show", "nightlab/p:target.py")
    assert "X = 1.0" in text and "Y = 1.0" in text
    assert git(lab, "merge-base", "--is-ancestor", by[1].commit, "nightlab/p") == ""


def test_a_conflicting_stale_winner_is_still_kept_and_no_row_is_made_for_the_conflict(make_lab):
    lab = make_lab(spec=_two_slots())
    plan = Plan({1: slow_target(1.2, 0.0, 0.1), 2: slow_target(1.0, 0.0, 2.0)},  # both change X's line
                default=slow_target(9.0, 0.0, 3.5))
    session, exps = run(lab, plan, max_experiments=4)
    by = {e.idx: e for e in exps}
    assert by[1].status is Status.KEEP and by[1].metric == pytest.approx(4.54)
    # #2 conflicts with #1 as a patch, but what was measured (4.5) beats the incumbent (4.54): kept
    assert by[2].status is Status.KEEP and by[2].metric == pytest.approx(4.5), by[2].reason
    assert "nothing queued" in by[2].reason
    assert _tree(lab, "nightlab/p") != _tree(lab, by[1].commit)
    assert "X = 1.0" in git(lab, "show", f"{by[2].commit}:target.py")
    # every row ran: nothing was recorded for the conflicting rebase
    assert all(e.status.was_run() for e in exps), [(e.idx, e.status, e.reason) for e in exps]
    assert not [e for e in exps if e.researcher == REBASE]
    assert session.incumbent_commit in (by[2].commit, by[3].commit, by[4].commit)


def test_a_stale_loser_that_beat_its_parent_queues_its_combination(make_lab):
    lab = make_lab(files={"target.py": spread(3.0, 0.0)}, spec=_two_slots())
    plan = Plan({1: spread(1.0, 0.0),    # fast: 8.5 -> 4.5
                 2: spread(3.0, 2.0)},   # slow, on the baseline: 4.5, not better than the incumbent 4.5
                default=spread(9.0, 0.0))
    session, exps = run(lab, plan, max_experiments=4)
    by = {e.idx: e for e in exps}
    assert by[2].status is Status.DISCARD and by[2].reason.startswith("stale") and by[2].evidence["stale"]
    assert "queued" in by[2].reason
    combo = [e for e in exps if e.researcher == REBASE]
    assert len(combo) == 1 and combo[0].parent_commit == by[1].commit
    assert combo[0].status is Status.KEEP and combo[0].metric == pytest.approx(0.5)
    assert session.incumbent_commit == combo[0].commit


def test_the_old_rebase_semantics_stay_reachable_for_the_benchmark(make_lab, monkeypatch):
    monkeypatch.setattr(Engine, "keep_semantics", "rebase")
    lab = make_lab(spec=_two_slots())
    plan = Plan({1: slow_target(1.2, 0.0, 0.1), 2: slow_target(1.0, 0.0, 2.0)},
                default=slow_target(9.0, 0.0, 3.5))
    session, exps = run(lab, plan, max_experiments=4)
    by = {e.idx: e for e in exps}
    assert by[2].status is Status.DISCARD and by[2].reason.startswith("stale:")
    assert by[4].researcher == REBASE and "conflicts with the new incumbent" in by[4].reason
    assert session.incumbent_commit == by[1].commit


NOISY = """\
import os, time
X = 3.0
# -
# -
# -
Y = 0.0
time.sleep({"X=1.0,Y=0.0": 2.5}.get(f"X={X},Y={Y}", 0.05))
noise = (int(os.environ["NIGHTLAB_SEED"]) * 7919 % 13) / 1300
print("---")
print(f"score: {(X - 1) ** 2 + (Y - 2) ** 2 + 0.5 + noise:.6f}")
"""


def test_repeat_judges_a_stale_candidate_against_the_current_incumbent(make_lab):
    # repeat: the screen compares the stale measurement with the *current* incumbent; if it passes, the
    # re-runs are of the measured tree and are tested against the current incumbent's samples
    spec = _two_slots('\n[accept]\npolicy = "repeat"\nscreen = "greedy"\nrepeats = 3\ncalibrate = 3\n')

    def at(x, y):
        return NOISY.replace("X = 3.0", f"X = {x}").replace("Y = 0.0", f"Y = {y}")

    lab = make_lab(files={"target.py": at(3.0, 0.0)}, spec=spec)
    plan = Plan({1: at(3.0, 1.0),    # fast: ~5.5, kept after 3 re-runs
                 2: at(1.0, 0.0)},   # slow, on the baseline: ~4.5 beats ~5.5
                default=at(9.0, 0.0))
    session, exps = run(lab, plan, max_experiments=2)
    by = {e.idx: e for e in exps}
    assert by[1].status is Status.KEEP
    assert by[2].status is Status.KEEP, by[2].reason
    ev = by[2].evidence
    assert ev["stale"] and len(ev["remeasured"]) == 3 and ev["incumbent"] == pytest.approx(by[1].metric, abs=0.02)
    assert ev["incumbent_samples"] and all(abs(v - 5.5) < 0.02 for v in ev["incumbent_samples"])
    assert session.incumbent_commit == by[2].commit


def test_pipelining_proposes_while_the_slot_runs(make_lab):
    lab = make_lab(spec=SPEC.replace("pipeline = false", "pipeline = true"))
    plan = Plan({}, slow_target(9.0, 0.0, 1.0), sleep_s=0.5)
    session, exps = run(lab, plan, max_experiments=4)
    tried = exps[1:]
    assert [e.status for e in tried] == [Status.DISCARD] * 4
    # proposals 2..4 were made while the previous experiment was still running
    proposed = dict(plan.proposed_at)
    for e in tried[:-1]:
        assert e.started_at < proposed[e.idx + 1] < (e.finished_at or 0), e.idx
    with Ledger.for_lab(lab) as led:
        noise = led.session_json(session.id)[1]
    stats = noise["executor"]
    assert stats["slots"] == 1 and stats["pipeline"] is True
    # the duty cycle is recorded (busy run seconds over the loop's wall time); its size is bench/parallel.py's
    # to measure: a timed threshold here failed once on a shared machine at load 5
    busy = sum(e.run_s for e in tried)
    assert stats["busy_s"] == pytest.approx(busy, abs=0.01), stats
    assert 0 < stats["duty_cycle"] <= 1 and stats["duty_cycle"] == pytest.approx(busy / stats["wall_s"], abs=1e-3)


class Fresh(Plan):
    """A researcher that would rather see each result: proposing ahead only pays when waiting would idle the slot
    for 90 % of a run (the default, 1 %, would need runs of seconds here to show the same)."""

    ahead_share = 0.9


def test_a_proposal_waits_for_the_result_when_proposing_ahead_saves_little(make_lab):
    lab = make_lab(files={"target.py": slow_target(3.0, 0.0, 1.0)},  # the baseline runs as long as the candidates
                   spec=SPEC.replace("pipeline = false", "pipeline = true"))
    plan = Fresh({}, slow_target(9.0, 0.0, 1.0))
    _, exps = run(lab, plan, max_experiments=4)
    by = {e.idx: e for e in exps}
    assert [by[i].status for i in range(1, 5)] == [Status.DISCARD] * 4
    proposed = dict(plan.proposed_at)
    # a run against milliseconds of proposing and staging (before #1's run was timed: the baseline's): each
    # proposal came after the result before it, and saw it
    for i in (2, 3, 4):
        assert proposed[i] > (by[i - 1].finished_at or 0), i
    switched = [r for r in read_records(lab / ".nightlab" / "audit.jsonl") if r["kind"] == "scheduler"]
    assert switched and switched[0]["data"]["pipeline_ahead"] is False, switched
    data = switched[0]["data"]
    assert data["ahead_share"] == 0.9 and data["gap_s"] < 0.9 * data["run_s"], data


def test_gpus_are_pinned_per_slot(make_lab):
    script = ("import os, time\ntime.sleep(0.3)\nprint('---')\nprint('score: 1.0')\n"
              "ids = os.environ['CUDA_VISIBLE_DEVICES'].split(',')\n"
              "print('gpu0:', ids[0])\nprint('ngpu:', len(ids))\nprint('slot:', os.environ['NIGHTLAB_SLOT'])\n")
    lab = make_lab(files={"target.py": script},
                   spec=SPEC.replace("pipeline = false", "slots = 2\ngpus_per_slot = 2\ngpus = [4, 5, 6, 7]")
                   .replace('secondary = ["seed"]', 'secondary = ["gpu0", "ngpu", "slot"]'))
    plan = Plan({}, script.replace("score: 1.0", "score: 2.0"))
    _session, exps = run(lab, plan, max_experiments=4)
    for e in exps:
        slot = int(e.secondary["slot"])
        assert e.secondary["ngpu"] == 2 and e.secondary["gpu0"] == (4 if slot == 0 else 6), e.secondary
    assert {int(e.secondary["slot"]) for e in exps[1:]} == {0, 1}
