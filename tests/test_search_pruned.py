"""A pruned run teaches the search researcher what its curve showed (issue 12, pruning efficiency).

A pruned experiment reaches the Optuna study as a PRUNED trial whose intermediate values are the
points of its progress curve (``evidence["curve"]``), live, on replay and in a persistent study;
TPE then ranks pruned trials by their last value instead of all alike. Driven in-process on a
synthetic lab whose hopeless runs are pruned at step 25 with a curve that shows how bad they are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from tests.test_search import context, experiment, spec

from nightlab.constants import find_constants
from nightlab.researchers.search import Options, SearchResearcher, create
from nightlab.types import Experiment, Status

LAB = """\
X = 0.1     # nightlab: 0..1
Y = 0.5     # nightlab: 0..1
"""
BEST = 0.85  # the optimum of X; Y does not matter
PRUNE_ABOVE = 0.0009  # pruned above this final loss (|X - BEST| > 0.03): completed runs are rare


def final(files: dict[str, str]) -> float:
    c = {k.name: k.value for k in find_constants(files["train.py"])}
    return (c["X"] - BEST) ** 2


def curve(loss: float, upto: int) -> list[list[float]]:
    """The run's progress curve: decays towards its final loss; reported every 5 steps."""
    return [[s, loss + 1.0 / s] for s in range(5, upto + 1, 5)]


def session(r: SearchResearcher, n: int, *, with_curve: bool = True) -> list[Experiment]:
    """Propose, run, observe. A run whose final loss is above PRUNE_ABOVE is pruned at step 25 (a quarter
    of its 100 steps), with its curve in the evidence (``with_curve=False``: none, as a pruned
    run reached the study before); the others finish (greedy keep)."""
    files = {"train.py": LAB}
    best = final(files)
    history: tuple[Experiment, ...] = (experiment(0, Status.KEEP, best),)
    r.observe(history[0])
    for idx in range(1, n + 1):
        cand = r.propose(context(files, idx, history, best))
        merged = {**files, **(cand.files or {})}
        loss = final(merged)
        if loss > PRUNE_ABOVE:
            e = experiment(idx, Status.PRUNED, None, cand.params)
            if with_curve:
                e = _with_evidence(e, {"curve": curve(loss, 25), "pruned_at": 25})
        elif loss < best:
            e, best, files = experiment(idx, Status.KEEP, loss, cand.params), loss, merged
        else:
            e = experiment(idx, Status.DISCARD, loss, cand.params)
        r.observe(e)
        history = (*history, e)
    return list(history)


def _with_evidence(e: Experiment, evidence: dict[str, Any]) -> Experiment:
    from dataclasses import replace

    return replace(e, evidence=evidence)


def _told(r: SearchResearcher) -> dict[int, tuple[TrialState, dict[int, float]]]:
    assert r.study is not None
    return {t.user_attrs["nightlab_experiment"]: (t.state, dict(t.intermediate_values))
            for t in r.study.get_trials(deepcopy=False)
            if isinstance(t.user_attrs.get("nightlab_experiment"), int) and t.state is not TrialState.RUNNING}


def test_a_pruned_run_reaches_the_study_with_its_curve() -> None:
    r = create(Options(seed=0, n_startup_trials=3), spec(), Path("."))
    history = session(r, 8)
    pruned = [e for e in history if e.status is Status.PRUNED]
    assert pruned
    told = _told(r)
    for e in pruned:
        state, values = told[e.idx]
        assert state is TrialState.PRUNED
        assert values == {int(s): v for s, v in e.evidence["curve"]}  # every recorded point, at its step


def _replay(history: list[Experiment], **options: Any) -> SearchResearcher:
    again = create(Options(seed=1, n_startup_trials=3, **options), spec(), Path("."))
    for e in history:  # as the engine replays a resumed session's ledger before the first propose
        again.observe(e)
    again.propose(context({"train.py": LAB}, len(history), tuple(history), None))
    return again


def test_resume_replays_a_pruned_run_as_pruned_with_its_curve() -> None:
    live = create(Options(seed=0, n_startup_trials=3), spec(), Path("."))
    history = session(live, 10)
    assert any(e.status is Status.PRUNED for e in history)
    again = _replay(history)
    told = {i: v for i, v in _told(live).items() if i > 0}
    assert {i: v for i, v in _told(again).items() if i > 0} == told  # not FAIL: PRUNED, same values
    assert again.pruned == live.pruned


def test_a_persistent_study_keeps_its_pruned_curves(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    live = create(Options(seed=2, n_startup_trials=3, storage=url), spec(), Path("."))
    history = session(live, 8)
    assert any(e.status is Status.PRUNED for e in history)
    reopened = _replay(history, storage=url)
    assert _told(reopened) == _told(live)  # loaded, not added twice, curves intact
    assert reopened.pruned == live.pruned and reopened.pruned


def test_a_re_asked_pruned_setting_is_told_as_pruned_with_its_curve() -> None:
    r = create(Options(seed=0, n_startup_trials=3), spec(), Path("."))
    history = session(r, 6)
    e = next(e for e in history if e.status is Status.PRUNED)
    key = r._key(e.params)
    assert r.study is not None
    assert r.tried[key] is None and key in r.pruned  # what propose's re-ask path tells it from
    asked = r.study.ask(r.distributions)
    r._tell_pruned(asked, r.pruned[key])
    assert r.study.trials[-1].state is TrialState.PRUNED
    assert r.study.trials[-1].intermediate_values == {int(s): v for s, v in e.evidence["curve"]}


def _near(history: list[Experiment], lo: int) -> float:
    """Mean distance of X to the optimum over the proposals from ``lo`` on."""
    xs = [e.params["X"] for e in history[lo:]]
    return sum(abs(x - BEST) for x in xs) / len(xs)


SEEDS = range(6)
N = 30


def test_tpe_moves_away_from_the_pruned_region_when_told_the_curves() -> None:
    taught = [session(create(Options(seed=s, n_startup_trials=5), spec(), Path(".")), N) for s in SEEDS]
    blind = [session(create(Options(seed=s, n_startup_trials=5), spec(), Path(".")), N, with_curve=False)
             for s in SEEDS]
    # warm-up: the same random points either way
    assert [e.params for e in taught[0][1:6]] == [e.params for e in blind[0][1:6]]

    def pruned_late(h: list[Experiment]) -> int:
        return sum(e.status is Status.PRUNED for e in h[N // 2 + 1:])

    # told what pruned runs showed, TPE's later proposals leave the pruned region more often and get
    # nearer the optimum than when every pruned trial is ranked alike
    assert sum(map(pruned_late, taught)) < sum(map(pruned_late, blind))
    assert sum(_near(h, 6) for h in taught) < sum(_near(h, 6) for h in blind)
    assert all(math.isfinite(_near(h, 6)) for h in taught)
