"""The example labs end to end through the Engine in evaluator (and holdout) mode, tiny budgets."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from nightlab.engine import Engine
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.scaffold import copy_example
from nightlab.spec import Spec, parse_spec
from nightlab.types import Status

MODE = "required" if shutil.which("bwrap") else "none"


def tiny(lab: Path, **sections: dict) -> Spec:
    """The lab's spec with smaller budgets (the search researcher may not be installed: scripted)."""
    data = tomllib.loads((lab / "nightlab.toml").read_text())
    data["researcher"] = {"kind": "scripted"}
    spec = parse_spec(lab / "nightlab.toml", data)
    update = {name: getattr(spec, name).model_copy(update=values) for name, values in sections.items()}
    return spec.model_copy(update=update)


@pytest.mark.slow
def test_circle_packing_runs_with_its_protected_evaluator(tmp_path):
    lab = copy_example("circle_packing", tmp_path / "cp")
    spec = tiny(lab, run={"budget_s": 5.0, "timeout_s": 30.0})
    src = (lab / "pack.py").read_text()
    steps = [{"rationale": "more growth", "replace": {"pack.py": ["GROW_ROUNDS = 3", "GROW_ROUNDS = 20"]}},
             {"rationale": "broken", "replace": {"pack.py": ["N = 26", "N = 25"]}}]
    assert "GROW_ROUNDS = 3" in src and "N = 26" in src
    eng = Engine(lab, tag="e2e", spec=spec, researcher=ScriptedResearcher(steps), sandbox_mode=MODE,
                 max_experiments=2)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    assert exps[0].status is Status.KEEP and exps[0].trust == "evaluator" and exps[0].metric > 2.0
    assert exps[1].status in (Status.KEEP, Status.DISCARD) and exps[1].trust == "evaluator"
    assert exps[2].status is Status.CRASH and "evaluator exited with 1" in exps[2].reason
    eng.close()


@pytest.mark.slow
def test_tinygpt_runs_with_evaluator_holdout_and_repeat(tmp_path):
    pytest.importorskip("torch")
    lab = copy_example("tinygpt", tmp_path / "tg")
    # a budget of steps, not seconds: at 1.5 s a loaded machine trained too few steps to beat 8 bits per byte
    env = {**tomllib.loads((lab / "nightlab.toml").read_text())["run"].get("env", {}),
           "TINYGPT_STEPS": "20", "TINYGPT_THREADS": "1"}
    spec = tiny(lab,
                run={"budget_s": 1.5, "timeout_s": 120.0, "env": env,
                     "setup": "python prepare.py --train-bytes 40000 --val-bytes 2048 --holdout-bytes 2048"},
                accept={"calibrate": 2, "repeats": 2, "screen": "greedy", "alpha": 0.5})
    steps = [{"rationale": "higher learning rate", "replace": {"train.py": ["LEARNING_RATE = 2e-3",
                                                                            "LEARNING_RATE = 6e-3"]}}]
    eng = Engine(lab, tag="e2e", spec=spec, researcher=ScriptedResearcher(steps), sandbox_mode=MODE,
                 max_experiments=1)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    base = exps[0]
    assert base.status is Status.KEEP and base.trust == "evaluator", base.reason
    assert 0 < base.metric < 8 and 0 < base.secondary["holdout"] < 8  # bits per byte
    assert (lab / ".nightlab" / "holdout" / "holdout.bin").is_file()
    noise = eng.ledger.session_json(session.id)[1]
    assert noise["k"] == 2 and noise["sigma"] >= 0
    assert noise["holdout"]["baseline"] == base.secondary["holdout"]
    cand = exps[1]
    assert cand.status in (Status.KEEP, Status.DISCARD) and cand.trust == "evaluator"
    assert "run_claimed" in cand.evidence  # train.py prints its own val_bpb: recorded, not used
    if cand.evidence["screen"]["improvement"] > 0:
        assert len(cand.evidence["remeasured"]) == 2
    eng.close()
