"""Verified keeps with real sessions: evaluator mode, tamper checks, holdout, noise, replay, verify."""

from __future__ import annotations

import json
import random
import shutil
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.conftest import SPEC, git

from nightlab.cli.verify import calibrate, replay, verify
from nightlab.engine import Engine
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.types import Candidate, Status

HAVE_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed")
MODE = "required" if HAVE_BWRAP else "none"

# the run writes its choice of constants; the protected evaluator computes the score itself
RUN_PY = '''\
import json
X = 3.0
Y = 0.0
json.dump({"x": X, "y": Y}, open("params.json", "w"))
print("---")
print("note: 1")
'''
EVALUATE_PY = '''\
import json
p = json.load(open("params.json"))
print("---")
print(f"score: {(p['x'] - 1) ** 2 + (p['y'] - 2) ** 2 + 0.5:.6f}")
'''
EVAL_SPEC = SPEC.replace('command = "python target.py"', 'command = "python target.py"').replace(
    "[metric]", '[evaluate]\ncommand = "python evaluate.py"\noutputs = ["params.json"]\n\n[metric]').replace(
    'secondary = ["seed"]', 'secondary = ["note"]')

# metric = 1.0 + gaussian noise seeded by NIGHTLAB_SEED (+ a constant that has no real effect)
NOISY_PY = '''\
import os, random
OFFSET = 0
rng = random.Random(int(os.environ["NIGHTLAB_SEED"]) + OFFSET)
print("---")
print(f"score: {1.0 + rng.gauss(0.0, 0.1)!r}")
'''


def noisy(seed: int) -> float:
    return 1.0 + random.Random(seed).gauss(0.0, 0.1)


def engine(lab: Path, steps, *, tag: str = "t", mode: str = MODE, **kw) -> Engine:
    return Engine(lab, tag=tag, researcher=ScriptedResearcher(steps), sandbox_mode=mode, **kw)


def run_py(x: float, y: float = 0.0) -> str:
    return RUN_PY.replace("X = 3.0", f"X = {x}").replace("Y = 0.0", f"Y = {y}")


# --------------------------------------------------------------------------- evaluator mode


def test_a_forged_metric_line_is_defeated_in_evaluator_mode(make_lab):
    lab = make_lab(files={"target.py": run_py(3.0), "evaluate.py": EVALUATE_PY}, spec=EVAL_SPEC)
    forged = run_py(2.0) + 'print("---")\nprint("score: 0.001")\n'
    eng = engine(lab, [{"rationale": "forge the metric", "files": {"target.py": forged}},
                       {"rationale": "honest gain", "files": {"target.py": run_py(1.0)}}], max_experiments=2)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    assert [e.status for e in exps] == [Status.KEEP, Status.KEEP, Status.KEEP]
    assert exps[0].metric == pytest.approx(8.5) and exps[0].trust == "evaluator"
    assert exps[1].metric == pytest.approx(5.5)  # the evaluator's number, not the forged 0.001
    assert exps[1].evidence["run_claimed"] == "0.001" and exps[1].trust == "evaluator"
    assert exps[2].metric == pytest.approx(4.5) and session.incumbent_metric == pytest.approx(4.5)
    # a secondary figure from the run's own block is kept, and labelled as inline
    assert exps[2].secondary["note"] == 1.0 and exps[2].evidence["inline_secondary"] == ["note"]
    eng.close()


def test_inline_metrics_are_labelled_inline(make_lab):
    lab = make_lab()
    eng = engine(lab, [{"rationale": "x", "files": {"target.py": "print('---')\nprint('score: 1.0')\n"}}],
                 max_experiments=1)
    session = eng.run()
    assert {e.trust for e in eng.ledger.experiments(session.id)} == {"inline"}
    eng.close()


def test_edits_to_the_evaluator_are_rejected_before_and_during_the_run(make_lab):
    lab = make_lab(files={"target.py": run_py(3.0), "evaluate.py": EVALUATE_PY}, spec=EVAL_SPEC)
    overwrite = run_py(1.0) + 'open("evaluate.py", "w").write("print(\'---\'); print(\'score: 0\')")\n'
    shadow = run_py(1.0) + 'open("json.py", "w").write("def load(f): return {\'x\': 1, \'y\': 2}")\n'
    eng = engine(lab, [
        {"rationale": "edit the evaluator", "files": {"evaluate.py": "print('---')\nprint('score: 0')\n"}},
        {"rationale": "overwrite it at run time", "files": {"target.py": overwrite}},
        {"rationale": "shadow its imports", "files": {"target.py": shadow}},
    ], max_experiments=3, mode="none")  # no sandbox at all: the hash check and the clean tree must do it
    session = eng.run()
    exps = eng.ledger.experiments(session.id)[1:]
    assert [e.status for e in exps] == [Status.REJECTED, Status.REJECTED, Status.KEEP]
    assert exps[0].reason == "policy: protected (evaluate.py is a protected file)"
    assert exps[1].reason.startswith("protected:") and "evaluate.py: protected file changed" in exps[1].reason
    assert exps[1].metric is None
    # the planted json.py never reaches the evaluator's clean tree: the true score (x=1, y=0), not the
    # forged one (x=1, y=2 gives 0.5)
    assert exps[2].metric == pytest.approx(4.5) and exps[2].trust == "evaluator"
    assert session.incumbent_metric == pytest.approx(4.5)
    eng.close()


@needs_bwrap
def test_the_evaluator_cannot_write_to_the_worktree(make_lab):
    sneaky = EVALUATE_PY + 'open("params.json", "w").write("{}")\n'
    lab = make_lab(files={"target.py": run_py(3.0), "evaluate.py": sneaky}, spec=EVAL_SPEC)
    eng = engine(lab, [{"rationale": "x", "files": {"target.py": run_py(1.0)}}], max_experiments=1)
    with pytest.raises(Exception, match="baseline failed"):
        eng.run()
    base = eng.ledger.experiments(eng.session.id)[0]
    assert "Read-only file system" in base.reason
    eng.close()


# --------------------------------------------------------------------------- holdout


HOLDOUT_SPEC = SPEC.replace(
    "[run]", "[run]\nsetup = \"python setup.py\"").replace(
    "[metric]", '[evaluate]\noutputs = []\n\n[holdout]\ncommand = "python holdout.py"\nmetric = "holdout_score"\n'
    'files = ["secret/*.txt"]\n'
    'max_divergence = 0.1\nstop_on_divergence = true\n\n[metric]')
SETUP_PY = '''\
import os, pathlib
d = pathlib.Path(os.environ["NIGHTLAB_HOLDOUT_DIR"])
(d / "hold.txt").write_text("8.5")
'''
HOLDOUT_PY = '''\
import os, pathlib
base = float((pathlib.Path(os.environ["NIGHTLAB_HOLDOUT_DIR"]) / "hold.txt").read_text())
labels = pathlib.Path("secret/labels.txt").read_text()
assert labels == "the labels", labels
print("---")
print(f"holdout_score: {base:.6f}")
'''
PEEK_PY = '''\
import pathlib
for p in ("secret/labels.txt", HOLD):
    try:
        print(f"read {p}: {pathlib.Path(p).read_text()!r}")
    except OSError as e:
        print(f"cannot read {p}: {type(e).__name__}")
print(pathlib.Path(HOLD).read_text())
print("---")
print("score: 0.1")
'''


@needs_bwrap
def test_holdout_files_are_invisible_to_runs_and_the_researcher(make_lab):
    lab = make_lab(files={"setup.py": SETUP_PY, "holdout.py": HOLDOUT_PY, "secret/labels.txt": "the labels"},
                   spec=HOLDOUT_SPEC.replace('protected = ["evaluate.py"]',
                                             'protected = ["evaluate.py", "holdout.py", "setup.py"]'))
    hold = lab / ".nightlab" / "holdout" / "hold.txt"
    seen: list[dict[str, str]] = []

    def peek(ctx):
        seen.append(dict(ctx.files))
        code = PEEK_PY.replace("HOLD", repr(str(hold)))
        return Candidate(parent=ctx.parent, rationale="peek", files={"target.py": code})

    eng = engine(lab, [peek, {"rationale": "touch the holdout", "files": {"secret/labels.txt": "mine"}}],
                 max_experiments=2)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    assert hold.read_text() == "8.5"  # setup wrote it outside the runs' sight
    # the read of the holdout data fails inside the sandbox; the hidden lab file cannot be opened (EACCES)
    assert exps[1].status is Status.CRASH and exps[1].exit_code == 1
    tail = exps[1].log_tail
    assert f"cannot read {hold}: FileNotFoundError" in tail and tail.rstrip().endswith(f"{str(hold)!r}")
    assert "cannot read secret/labels.txt: PermissionError" in tail and "the labels" not in tail
    assert exps[2].status is Status.REJECTED and "protected" in exps[2].reason
    assert seen and all("secret/labels.txt" not in files for files in seen) and "target.py" in seen[0]
    # the verifier scored the baseline on the holdout: the holdout command sees what runs cannot
    assert exps[0].secondary["holdout"] == pytest.approx(8.5) and exps[0].evidence["holdout"]["error"] == ""
    eng.close()


def test_holdout_divergence_warns_and_stops(make_lab):
    # the search metric improves, the holdout does not: overfitting the metric is a stop condition
    lab = make_lab(files={"setup.py": SETUP_PY, "holdout.py": HOLDOUT_PY, "secret/labels.txt": "the labels"},
                   spec=HOLDOUT_SPEC.replace("max_experiments = 3", "max_experiments = 5"))
    eng = engine(lab, [{"rationale": "gain", "files": {"target.py": _target(1.0)}},
                       {"rationale": "more", "files": {"target.py": _target(1.0, 2.0)}}], mode="none")
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    assert [e.status for e in exps] == [Status.KEEP, Status.KEEP]
    ev = exps[1].evidence["holdout"]
    assert ev["search_gain"] == pytest.approx(4.0 / 8.5) and ev["holdout_gain"] == 0.0
    noise = eng.ledger.session_json(session.id)[1]
    assert noise["warnings"] and "holdout divergence" in noise["warnings"][0]["message"]
    assert session.status == "stopped" and session.stop_reason.startswith("overfitting")
    eng.close()


def _target(x: float, y: float = 0.0) -> str:
    from tests.conftest import TARGET_PY

    return TARGET_PY.replace("X = 3.0", f"X = {x}").replace("Y = 0.0", f"Y = {y}")


# --------------------------------------------------------------------------- noise


def _offset_that_looks_better() -> int:
    """A no-effect change (a different seed offset) whose first run is luckier than the baseline's."""
    return next(o for o in range(1, 100) if noisy(o) < noisy(0) - 0.05)


@pytest.mark.parametrize("policy", ["greedy", "repeat"])
def test_greedy_keeps_a_no_effect_change_that_repeat_discards(make_lab, policy):
    spec = SPEC.replace("[metric]", f'[accept]\npolicy = "{policy}"\nrepeats = 4\ncalibrate = 5\n'
                                  'screen = "greedy"\nalpha = 0.05\n\n[metric]')
    lab = make_lab(files={"target.py": NOISY_PY}, spec=spec)
    offset = _offset_that_looks_better()
    step = {"rationale": "new seed", "replace": {"target.py": ["OFFSET = 0", f"OFFSET = {offset}"]}}
    eng = engine(lab, [step],
                 max_experiments=1, mode="none")
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    assert exps[1].metric == pytest.approx(noisy(offset)) and exps[1].metric < exps[0].metric
    noise = eng.ledger.session_json(session.id)[1]
    if policy == "greedy":
        assert exps[1].status is Status.KEEP and "sigma" not in noise  # greedy needs no noise floor
        return
    assert exps[1].status is Status.DISCARD and "did not hold" in exps[1].reason
    assert noise["seeds"] == [1, 2, 3, 4, 5]
    assert noise["samples"] == pytest.approx([noisy(s) for s in range(1, 6)])
    ev = exps[1].evidence
    assert ev["samples"] == pytest.approx([noisy(1000 + j + offset) for j in range(1, 5)])
    assert ev["incumbent_samples"] == pytest.approx([noisy(0)] + [noisy(s) for s in range(1, 6)])
    assert ev["result"]["p"] >= 0.05 and ev["test"] == "welch"
    assert session.incumbent_commit == session.base_commit
    eng.close()


def test_calibrate_stores_sigma_and_a_real_gain_is_verified(make_lab):
    code = NOISY_PY.replace("1.0 +", "BASE +").replace("OFFSET = 0", "OFFSET = 0\nBASE = 1.0")
    lab = make_lab(files={"target.py": code})
    res = CliRunner().invoke(calibrate, ["--lab", str(lab), "--tag", "n", "-k", "4", "--sandbox", "none"])
    assert res.exit_code == 0, res.output
    assert "sigma" in res.output
    eng = engine(lab, [{"rationale": "a real gain", "replace": {"target.py": ["BASE = 1.0", "BASE = 0.5"]}}],
                 tag="n", resume=True, max_experiments=1, mode="none")
    noise = eng.ledger.session_json(eng.session.id)[1]
    expected = [noisy(s) for s in range(1, 5)]
    assert noise["k"] == 4 and noise["sigma"] == pytest.approx(statistics.stdev(expected))
    assert noise["mean"] == pytest.approx(statistics.fmean(expected))
    session = eng.run()
    assert [e.status for e in eng.ledger.experiments(session.id)] == [Status.KEEP, Status.KEEP]
    eng.close()
    args = ["--lab", str(lab), "--tag", "n", "-r", "3", "--sandbox", "none", "--json"]
    res = CliRunner().invoke(verify, args)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["rows"]
    assert [r["label"] for r in rows] == ["baseline", "#1"]
    assert rows[1]["gain"] == pytest.approx(0.5, abs=0.2)
    assert rows[1]["gain_ci"][0] > 0 and rows[1]["p"] < 0.01
    assert rows[0]["samples"] == pytest.approx([noisy(500 + j) for j in range(1, 4)])


# --------------------------------------------------------------------------- replay


@pytest.mark.parametrize("spec_kind", ["inline", "evaluator"])
def test_replay_of_a_deterministic_target_reproduces_the_metric_exactly(make_lab, spec_kind):
    if spec_kind == "inline":
        lab, step = make_lab(), {"rationale": "x", "files": {"target.py": _target(1.5, 1.0)}}
    else:
        lab = make_lab(files={"target.py": run_py(3.0), "evaluate.py": EVALUATE_PY}, spec=EVAL_SPEC)
        step = {"rationale": "x", "files": {"target.py": run_py(1.5, 1.0)}}
    eng = engine(lab, [step], max_experiments=1)
    session = eng.run()
    recorded = eng.ledger.get_experiment(session.id, 1)
    eng.close()
    # the lab's file changes after the session: replay must use the recorded commit, not the checkout
    (lab / "target.py").write_text("raise SystemExit(1)\n")
    git(lab, "commit", "-qam", "break it")
    res = CliRunner().invoke(replay, ["1", "--lab", str(lab), "--tag", "t", "--sandbox", "none"])
    assert res.exit_code == 0, res.output
    assert "(exact)" in res.output and f"recorded {recorded.metric:.6g}" in res.output
    eng = Engine(lab, tag="t", resume=True, sandbox_mode="none")
    r = eng.verifier.replay(0)
    assert r.exact and r.replayed == eng.ledger.get_experiment(session.id, 0).metric
    eng.close()
