"""The search researcher, driven in-process on a synthetic objective with a known optimum."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from pydantic import ValidationError

from nightlab import researchers
from nightlab.constants import find_constants
from nightlab.errors import UsageError
from nightlab.researchers import Context, Researcher
from nightlab.researchers.search import Options, SearchResearcher, create, violation
from nightlab.spec import Spec
from nightlab.types import Candidate, Direction, Experiment, Status, Usage

TRAIN = """\
import math

LEARNING_RATE = 1e-3   # optimum 1e-2 (log scale)
DEPTH = 4              # optimum 10
DROPOUT = 0.3          # nightlab: 0.0..0.5
SEED = 1               # nightlab: fixed


def main():
    print("---")
"""


def spec(**researcher: Any) -> Spec:
    return Spec.model_validate(
        {
            "files": {"editable": ["*.py"]},
            "run": {"command": "python train.py"},
            "metric": {"name": "loss", "direction": "minimize"},
            "researcher": {"kind": "search", **researcher},
        }
    )


def loss(files: dict[str, str]) -> float:
    """The truth, read back from the files the candidate would run."""
    c = {k.name: k.value for k in find_constants(files["train.py"])}
    return (
        (math.log10(c["LEARNING_RATE"]) + 2) ** 2
        + ((c["DEPTH"] - 10) / 8) ** 2
        + 4 * (c["DROPOUT"] - 0.1) ** 2
        + (0.0 if "\nSEED = 1 " in files["train.py"] else 100.0)  # fixed: never touched
    )


def experiment(
    idx: int, status: Status, metric: float | None, params: dict[str, Any] | None = None
) -> Experiment:
    return Experiment(
        id=idx + 1, session_id=1, idx=idx, status=status, parent_commit="p", commit=None, metric=metric,
        secondary={}, trust="inline", description="", reason="", log_tail="", seed=0, started_at=0.0,
        finished_at=1.0, propose_s=0.0, run_s=0.0, overhead_s=0.0, exit_code=0, evidence={},
        researcher="search", rationale="", diff="", params=dict(params or {}), usage=Usage(),
    )  # fmt: skip


def context(
    files: dict[str, str], idx: int, history: tuple[Experiment, ...] = (), incumbent: float | None = None
) -> Context:
    return Context(
        spec=spec(), lab_dir=Path("/nonexistent"), program="", parent=f"commit{idx}", files=dict(files),
        history=history, metric_name="loss", direction=Direction.MINIMIZE, incumbent_metric=incumbent,
        baseline_metric=None, idx=idx,
    )  # fmt: skip


def run_loop(
    r: SearchResearcher, files: dict[str, str], n: int, history: tuple[Experiment, ...] = ()
) -> tuple[list[Candidate], list[Experiment], dict[str, str], float]:
    """A tiny engine: propose, 'run' (evaluate the objective), greedy keep, observe."""
    incumbent_files = dict(files)
    history = history or (experiment(0, Status.KEEP, loss(files)),)
    if len(history) == 1:
        r.observe(history[0])
    best = min(e.metric for e in history if e.status is Status.KEEP and e.metric is not None)
    candidates: list[Candidate] = []
    start = len(history)
    for idx in range(start, start + n):
        cand = r.propose(context(incumbent_files, idx, history, best))
        candidates.append(cand)
        assert cand.files is not None
        merged = {**incumbent_files, **cand.files}
        value = loss(merged)
        keep = value < best
        e = experiment(idx, Status.KEEP if keep else Status.DISCARD, value, cand.params)
        if keep:
            best, incumbent_files = value, merged
        r.observe(e)
        history = (*history, e)
    return candidates, list(history), incumbent_files, best


def test_it_is_a_researcher_and_registered() -> None:
    r = researchers.create(spec(sampler="random", seed=3), Path("."))
    assert isinstance(r, SearchResearcher) and isinstance(r, Researcher)
    assert r.options.sampler == "random" and r.options.seed == 3
    with pytest.raises(ValidationError):
        Options.model_validate({"sampeler": "tpe"})


def test_seeded_tpe_improves_on_the_baseline_and_is_deterministic() -> None:
    files = {"train.py": TRAIN}
    baseline = loss(files)
    runs = []
    for _ in range(2):
        r = create(Options(seed=7), spec(), Path("."))
        cands, _, final, best = run_loop(r, files, 30)
        runs.append([c.params for c in cands])
        assert best < baseline / 4, (baseline, best)
        assert find_constants(final["train.py"])[-1].name == "DROPOUT"  # still a well-formed file
    assert runs[0] == runs[1]
    other = create(Options(seed=8), spec(), Path("."))
    assert [c.params for c in run_loop(other, files, 30)[0]] != runs[0]


def test_candidates_are_well_formed() -> None:
    r = create(Options(seed=1), spec(), Path("."))
    cands, *_ = run_loop(r, {"train.py": TRAIN}, 8)
    for c in cands:
        assert list(c.params) == ["LEARNING_RATE", "DEPTH", "DROPOUT"]  # stable keys, SEED is fixed
        assert c.researcher == "search" and c.rationale.startswith("search(tpe): ")
        assert c.parent.startswith("commit")
        assert c.files and set(c.files) == {"train.py"}
        # the file says exactly what params say
        written = {k.name: k.value for k in find_constants(c.files["train.py"])}
        assert {k: written[k] for k in c.params} == c.params
        assert isinstance(c.params["DEPTH"], int) and isinstance(c.params["DROPOUT"], float)


def test_unchanged_files_are_left_out_and_names_are_qualified_with_several_files() -> None:
    files = {"train.py": TRAIN, "model.py": "WIDTH = 256\nACT = 'gelu'\n", "notes.md": "LR = 1\n"}
    r = create(Options(seed=0, params=["train.py:DEPTH"]), spec(), Path("."))
    r.observe(experiment(0, Status.KEEP, 1.0))
    for idx in range(1, 6):
        c = r.propose(context(files, idx))
        assert list(c.params) == ["train.py:DEPTH"]
        assert c.files is not None and set(c.files) == {"train.py"}
        assert c.rationale.startswith("search(tpe): train.py:DEPTH 4 -> ")
        changed = [ln for ln in c.files["train.py"].splitlines() if ln not in TRAIN.splitlines()]
        assert len(changed) == 1 and changed[0].startswith("DEPTH = ")
    r2 = create(Options(seed=0, exclude=["DEPTH", "DROPOUT", "LEARNING_RATE"]), spec(), Path("."))
    c = r2.propose(context(files, 1))
    assert list(c.params) == ["model.py:WIDTH"] and c.files is not None and set(c.files) == {"model.py"}


def test_never_proposes_the_incumbent_again() -> None:
    files = {"train.py": "BATCH = 64  # nightlab: choices 64,128\nLR = 0.1  # nightlab: choices 0.1,0.2\n"}
    r = create(Options(seed=0, n_startup_trials=1), spec(), Path("."))
    r.observe(experiment(0, Status.KEEP, 1.0))
    for idx in range(1, 16):
        c = r.propose(context(files, idx, incumbent=1.0))
        assert c.params != {"BATCH": 64, "LR": 0.1} and c.files
        r.observe(experiment(idx, Status.DISCARD, 2.0, c.params))


def test_random_perturbation_when_asks_keep_repeating_the_incumbent() -> None:
    files = {"train.py": TRAIN}
    r = create(Options(seed=0), spec(), Path("."))
    r.max_asks = 0  # as if every ask had returned the incumbent
    incumbent = {"LEARNING_RATE": 1e-3, "DEPTH": 4, "DROPOUT": 0.3}
    seen = []
    for idx in range(1, 6):
        c = r.propose(context(files, idx))
        changed = [k for k in incumbent if c.params[k] != incumbent[k]]
        assert len(changed) == 1 and c.files and set(c.files) == {"train.py"}
        assert r.space[changed[0]].contains(c.params[changed[0]])
        r.observe(experiment(idx, Status.DISCARD, 1.0, c.params))
        seen.append(c.params)
    assert r.study is not None and [t.params for t in r.study.trials] == seen  # learnt via add_trial
    again = create(Options(seed=0), spec(), Path("."))
    again.max_asks = 0
    assert [again.propose(context(files, i)).params for i in range(1, 6)] == seen  # seeded


def test_resume_replays_history_into_a_fresh_study() -> None:
    files = {"train.py": TRAIN}
    first = create(Options(seed=2), spec(), Path("."))
    _, history, incumbent_files, best = run_loop(first, files, 10)
    history.append(experiment(11, Status.CRASH, None, history[3].params))
    history.append(experiment(12, Status.DISCARD, 5.0, {"LEARNING_RATE": 1e-3, "DEPTH": 4, "DROPOUT": 0.9}))
    history.append(experiment(13, Status.DISCARD, 5.0, {"OTHER": 1}))
    kept = any(e.status is Status.KEEP for e in history[1:])

    again = create(Options(seed=2), spec(), Path("."))
    for e in history:  # the engine replays history before the first propose
        again.observe(e)
    c = again.propose(context(incumbent_files, 14, tuple(history), best))
    assert again.study is not None
    trials = again.study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state is TrialState.COMPLETE and not violation(t)]
    crashed = [t for t in trials if t.state is TrialState.COMPLETE and violation(t)]
    # the incumbent moved, so the baseline's values are unknown and its default ranges moved:
    # they are widened to fit every replayed value
    assert kept
    expected = history[1:11]
    assert [t.params for t in done] == [e.params for e in expected]
    assert [t.value for t in done] == [e.metric for e in expected]
    # the crash, as an infeasible trial (TPE learns from it); out-of-range/foreign skipped
    assert [t.params for t in crashed] == [history[3].params]
    assert violation(crashed[0]) == 1.0 and crashed[0].value == max(e.metric or 0 for e in expected)
    assert not [t for t in trials if t.state is TrialState.FAIL]
    assert c.params and trials[-1].state is TrialState.RUNNING


def test_baseline_becomes_a_trial_crashes_are_infeasible_and_other_failures_fail() -> None:
    r = create(Options(seed=0), spec(), Path("."))
    files = {"train.py": TRAIN}
    r.observe(experiment(0, Status.KEEP, 3.0))
    statuses = [
        Status.CRASH,
        Status.TIMEOUT,
        Status.INVALID,
        Status.REJECTED,
        Status.INTERRUPTED,
        Status.DISCARD,
    ]
    for idx, status in enumerate(statuses, start=1):
        c = r.propose(context(files, idx))
        r.observe(experiment(idx, status, 2.0 if status is Status.DISCARD else None, c.params))
    assert r.study is not None and not r.pending
    trials = r.study.get_trials(deepcopy=False)
    assert trials[0].params == {"LEARNING_RATE": 1e-3, "DEPTH": 4, "DROPOUT": 0.3} and trials[0].value == 3.0
    # crash and timeout: completed with the worst value so far (the baseline's) and a violated
    # constraint, so TPE counts them among the bad trials; the harness-side failures are FAIL
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 3 + [TrialState.COMPLETE]
    assert [violation(t) for t in trials[1:]] == [1.0] * 2 + [0.0] * 4
    assert [t.value for t in trials[1:3]] == [3.0, 3.0] and trials[-1].value == 2.0


def test_observe_never_raises_on_odd_experiments() -> None:
    r = create(Options(seed=0), spec(), Path("."))
    r.propose(context({"train.py": TRAIN}, 1))
    odd = [
        experiment(5, Status.DISCARD, float("nan"), {"DEPTH": "deep", "LEARNING_RATE": 0.01, "DROPOUT": 0.1}),
        experiment(6, Status.KEEP, 1.0, {"DEPTH": True, "LEARNING_RATE": None}),
        experiment(7, Status.RUNNING, None, {}),
        experiment(1, Status.KEEP, float("inf"), {}),
    ]
    for e in odd:
        r.observe(e)
    assert r.study is not None
    assert [t.state for t in r.study.get_trials(deepcopy=False)] == [TrialState.FAIL]  # idx 1, no metric


def test_random_sampler_works() -> None:
    r = create(Options(sampler="random", seed=5), spec(), Path("."))
    cands, *_ = run_loop(r, {"train.py": TRAIN}, 5)
    assert len({tuple(c.params.values()) for c in cands}) == 5
    assert all(c.rationale.startswith("search(random): ") for c in cands)


@pytest.mark.skipif(importlib.util.find_spec("cmaes") is not None, reason="cmaes is installed")
def test_cmaes_without_the_package_says_how_to_install_it() -> None:
    with pytest.raises(UsageError) as info:
        create(Options(sampler="cmaes"), spec(), Path("."))
    assert "pip install cmaes" in info.value.fix


def test_gp_sampler_improves_on_the_baseline_and_is_deterministic() -> None:
    """sampler = "gp": Optuna's GPSampler, seeded (the same proposals twice), after its random start-up."""
    files = {"train.py": TRAIN}
    baseline = loss(files)
    runs = []
    for _ in range(2):
        r = create(Options(sampler="gp", seed=3, n_startup_trials=4), spec(), Path("."))
        assert isinstance(r._make_sampler(0), optuna.samplers.GPSampler)
        cands, _, final, best = run_loop(r, files, 12)
        runs.append([c.params for c in cands])
        assert all(c.rationale.startswith("search(gp): ") for c in cands)
        assert best < baseline / 4, (baseline, best)
        assert find_constants(final["train.py"])[-1].name == "DROPOUT"
    assert runs[0] == runs[1]


@pytest.mark.parametrize("crashes", ["infeasible", "worst"])
def test_gp_sampler_takes_crashes_and_pending_trials(crashes: str) -> None:
    """A crash is told as infeasible (GP then models the constraint too) or as the worst value, and a proposal
    made while another is pending (pipelining, slots) is still a new point: none of it stops the sampler."""
    files = {"train.py": TRAIN}
    r = create(Options(sampler="gp", seed=1, n_startup_trials=3, crashes=crashes), spec(), Path("."))
    r.observe(experiment(0, Status.KEEP, loss(files)))
    for idx in range(1, 5):
        c = r.propose(context(files, idx))
        status = Status.CRASH if idx == 2 else Status.DISCARD
        r.observe(experiment(idx, status, None if status is Status.CRASH else loss({"train.py": c.files["train.py"]}),
                             c.params))
    first = r.propose(context(files, 5))
    second = r.propose(context(files, 6))  # the first still running
    assert first.params != second.params
    assert r.study is not None
    trials = r.study.get_trials(deepcopy=False)
    assert [violation(t) for t in trials[:5]] == [0.0, 0.0, 1.0 if crashes == "infeasible" else 0.0, 0.0, 0.0]
    assert all(t.system_attrs.get("constraints") is not None for t in trials[:5])
    assert [t.state for t in trials[5:]] == [TrialState.RUNNING] * 2


def test_gp_without_its_packages_says_how_to_install_them(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(UsageError) as info:
        create(Options(sampler="gp"), spec(), Path("."))
    assert "scipy" in info.value.message and "torch" not in info.value.message
    assert "nightlab[gp]" in info.value.fix


def test_no_constants_is_a_usage_error_with_a_fix() -> None:
    r = create(Options(), spec(), Path("."))
    with pytest.raises(UsageError) as info:
        r.propose(context({"train.py": "def f():\n    LR = 1\n", "README.md": "X = 1\n"}, 1))
    assert "train.py" in info.value.message
    assert "[researcher.space]" in info.value.fix and "nightlab space" in info.value.fix and "kind" in info.value.fix


def test_unknown_param_names_are_a_usage_error() -> None:
    r = create(Options(params=["LR"]), spec(), Path("."))
    with pytest.raises(UsageError) as info:
        r.propose(context({"train.py": TRAIN}, 1))
    assert "LR" in info.value.message and "LEARNING_RATE" in info.value.fix
