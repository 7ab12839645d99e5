"""Many experiments at once: local slots, pipelined proposals, stale keeps rebased and re-measured."""

from __future__ import annotations

import time

import pytest
from tests.conftest import SPEC, TARGET_PY, git

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
    assert wall < 0.7 * total_run, (wall, total_run)  # 3 at a time: about a third of the sum
    # experiments overlapped in time
    overlaps = sum(1 for a in tried for b in tried if a.idx < b.idx and b.started_at < (a.finished_at or 0))
    assert overlaps >= 3
    assert not any((lab / ".nightlab" / "worktrees").iterdir())
    assert len(git(lab, "worktree", "list").strip().splitlines()) == 1


def test_a_stale_winner_is_rebased_and_remeasured(make_lab):
    lab = make_lab(files={"target.py": spread(3.0, 0.0)},
                   spec=SPEC.replace("pipeline = false", "slots = 2\npipeline = false"))
    plan = Plan({1: spread(1.0, 0.0),    # fast: X to its optimum (8.5 -> 4.5)
                 2: spread(3.0, 2.0)},   # slow, measured on the baseline: Y to its optimum (-> 4.5)
                default=spread(9.0, 0.0))  # after: a slow regression (#2 ends first)
    session, exps = run(lab, plan, max_experiments=4)
    by = {e.idx: e for e in exps}
    assert by[1].status is Status.KEEP and by[1].metric == pytest.approx(4.5)
    # #2 beat its parent (the baseline) but the incumbent moved on: discarded as stale, requeued
    assert by[2].status is Status.DISCARD and by[2].reason.startswith("stale:") and by[2].evidence["stale"]
    assert by[3].status is Status.DISCARD
    # #4 is #2's change rebased onto #1: re-measured, and kept on its own merit
    assert by[4].researcher == REBASE and by[4].rationale.startswith("rebase of #2")
    assert by[4].parent_commit == by[1].commit
    assert by[4].status is Status.KEEP and by[4].metric == pytest.approx(0.5), (by[4].reason, by[4].diff)
    assert session.incumbent_commit == by[4].commit
    text = git(lab, "show", "nightlab/p:target.py")
    assert "X = 1.0" in text and "Y = 2.0" in text


def test_a_stale_winner_that_conflicts_is_discarded(make_lab):
    lab = make_lab(spec=SPEC.replace("pipeline = false", "slots = 2\npipeline = false"))
    plan = Plan({1: slow_target(1.0, 0.0, 0.1), 2: slow_target(1.2, 0.0, 2.0)},  # both change X's line
                default=slow_target(9.0, 0.0, 3.5))
    session, exps = run(lab, plan, max_experiments=4)
    by = {e.idx: e for e in exps}
    assert by[1].status is Status.KEEP and by[2].reason.startswith("stale:")
    assert by[4].researcher == REBASE
    assert by[4].status is Status.DISCARD and "conflicts with the new incumbent" in by[4].reason
    assert session.incumbent_commit == by[1].commit


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
    # the researcher's 0.5 s per proposal hides behind the 1 s runs: the slot is busy most of the time
    assert stats["duty_cycle"] > 0.6, stats  # generous: CI machines are shared; bench/parallel.py measures it


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
