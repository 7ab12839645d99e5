"""Crashes teach the search researcher where not to go (issue 12, item 5).

A crashed run is told to the Optuna study as a completed trial that violates a constraint, so
TPE puts it among the bad trials and samples that region less; told as FAIL (Optuna's default,
``crashes = "fail"``) it is invisible to TPE's model, which keeps sampling the region.
Driven in-process on a lab whose runs crash "out of memory" when BATCH * WIDTH is too large,
with its best point just below that limit (as batch sizes on a GPU are).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from tests.test_search import context, experiment, spec

from nightlab.constants import find_constants
from nightlab.researchers.search import CRASH, Options, SearchResearcher, create, violation
from nightlab.types import Experiment, Status

LAB = """\
LEARNING_RATE = 1e-3   # nightlab: 1e-5..1e-1 log
BATCH = 16             # nightlab: 4..512 log
WIDTH = 64             # nightlab: 16..1024 log
"""


def outcome(files: dict[str, str]) -> float | None:
    """The run's loss, or None: it crashed (out of memory above 2**13 = BATCH * WIDTH)."""
    c = {k.name: k.value for k in find_constants(files["train.py"])}
    size = math.log2(c["BATCH"] * c["WIDTH"])
    if size > 13:
        return None
    return (math.log10(c["LEARNING_RATE"]) + 2) ** 2 + (13 - size) / 4


def session(r: SearchResearcher, n: int) -> list[Experiment]:
    """Propose, run, keep if better (greedy), observe: n experiments after the baseline."""
    files = {"train.py": LAB}
    best = outcome(files)
    assert best is not None
    history: tuple[Experiment, ...] = (experiment(0, Status.KEEP, best),)
    r.observe(history[0])
    for idx in range(1, n + 1):
        cand = r.propose(context(files, idx, history, best))
        merged = {**files, **(cand.files or {})}
        value = outcome(merged)
        if value is None:
            e = experiment(idx, Status.CRASH, None, cand.params)
        elif value < best:
            e, best, files = experiment(idx, Status.KEEP, value, cand.params), value, merged
        else:
            e = experiment(idx, Status.DISCARD, value, cand.params)
        r.observe(e)
        history = (*history, e)
    return list(history)


def crashes(history: list[Experiment]) -> tuple[int, int]:
    """Crashes in the first and in the second half of the session (the baseline aside)."""
    runs = history[1:]
    half = len(runs) // 2
    return (sum(e.status is Status.CRASH for e in runs[:half]), sum(e.status is Status.CRASH for e in runs[half:]))


SEEDS = range(4)
N = 30


def test_crashes_teach_tpe_to_avoid_the_region() -> None:
    learned = [crashes(session(create(Options(seed=s), spec(), Path(".")), N)) for s in SEEDS]
    blind = [crashes(session(create(Options(seed=s, crashes="fail"), spec(), Path(".")), N)) for s in SEEDS]
    first, second = sum(a for a, _ in learned), sum(b for _, b in learned)
    assert first > 0  # the region is found during the warm-up...
    assert second < first  # ...and then avoided
    # same seeds, crashes told as FAIL: TPE never sees them and keeps going there
    assert sum(second for _, second in blind) > 2 * second
    assert sum(map(sum, blind)) > sum(map(sum, learned))


def _by_experiment(r: SearchResearcher) -> dict[int, tuple[TrialState, float, bool]]:
    assert r.study is not None
    out = {}
    for t in r.study.get_trials(deepcopy=False):
        idx = t.user_attrs.get("nightlab_experiment")
        if isinstance(idx, int) and idx > 0 and t.state is not TrialState.RUNNING:  # not the new proposal
            out[idx] = (t.state, violation(t), bool(t.user_attrs.get(CRASH)))
    return out


def _replay(history: list[Experiment], **options: Any) -> SearchResearcher:
    again = create(Options(seed=1, **options), spec(), Path("."))
    for e in history:  # as the engine replays a resumed session's ledger before the first propose
        again.observe(e)
    again.propose(context({"train.py": LAB}, len(history), tuple(history), None))
    return again


def test_resume_replays_crashes_the_way_they_were_told() -> None:
    live = create(Options(seed=1), spec(), Path("."))
    history = session(live, 16)
    told = _by_experiment(live)
    crashed = [e.idx for e in history if e.status is Status.CRASH]
    assert crashed and all(told[i][0] is TrialState.COMPLETE and told[i][1] == 1.0 for i in crashed)
    again = _replay(history)
    assert _by_experiment(again) == told  # same state, same constraint, same mark, experiment by experiment
    assert again.crashed == live.crashed and len(again.crashed) == len(crashed)
    # the old behaviour, replayed, stays the old behaviour
    blind = _by_experiment(_replay(history, crashes="fail"))
    assert {blind[i][0] for i in crashed} == {TrialState.FAIL}


def test_a_persistent_study_keeps_its_crashes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    live = create(Options(seed=3, storage=url), spec(), Path("."))
    history = session(live, 12)
    assert any(e.status is Status.CRASH for e in history)
    reopened = _replay(history, storage=url)
    assert reopened.crashed == live.crashed
    assert _by_experiment(reopened) == _by_experiment(live)  # loaded, not added twice


def test_a_re_asked_crashed_setting_is_told_as_a_crash_not_run() -> None:
    r = create(Options(seed=0), spec(), Path("."))
    history = session(r, 20)
    settings = [tuple(sorted(e.params.items())) for e in history[1:]]
    assert len(set(settings)) == len(settings)  # no setting twice, crashed ones included
    assert r.study is not None
    infeasible = [t for t in r.study.get_trials(deepcopy=False) if violation(t)]
    assert len(infeasible) >= sum(e.status is Status.CRASH for e in history)
    assert all(t.user_attrs.get(CRASH) for t in infeasible)


def test_worst_mode_tells_the_worst_value_and_fails_before_any_measurement() -> None:
    r = create(Options(seed=0, crashes="worst"), spec(), Path("."))
    files = {"train.py": LAB}
    c = r.propose(context(files, 1))
    r.observe(experiment(1, Status.CRASH, None, c.params))  # nothing measured yet: nothing to tell but FAIL
    r.observe(experiment(0, Status.KEEP, 2.0))  # the baseline, measured after it
    for idx, metric in ((2, 3.5), (3, None), (4, 1.0), (5, None)):
        c = r.propose(context(files, idx))
        r.observe(experiment(idx, Status.DISCARD if metric else Status.TIMEOUT, metric, c.params))
    assert r.study is not None
    told = {t.user_attrs.get("nightlab_experiment"): t for t in r.study.get_trials(deepcopy=False)}
    assert told[1].state is TrialState.FAIL and told[1].user_attrs[CRASH]
    for idx in (3, 5):  # the worst measured so far (3.5, a minimised loss), no constraint
        assert told[idx].state is TrialState.COMPLETE and told[idx].value == 3.5 and not violation(told[idx])
    assert r.crashed and len(r.crashed) == 3
