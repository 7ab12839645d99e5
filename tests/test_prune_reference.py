"""The median pruner's reference: which earlier runs a run is compared with at a step.

Optuna's MedianPruner compares with the *completed* runs only; once pruning works those are the
baseline and the survivors, so the bar sits on the best curves and nearly every run is stopped.
nightlab's default (``reference = "all"``) counts the pruned runs too, as worse than any value at
the steps after the one they were stopped at."""

from __future__ import annotations

import threading

import optuna
import pytest
from tests.conftest import SPEC

from nightlab.errors import SpecError
from nightlab.prune import Percentile, Pruner, make_pruner
from nightlab.spec import PruneSpec, load_spec
from nightlab.types import Direction, Status

STOP = threading.Event()


def run(pruner: Pruner, values: list[float], status: Status | None = None, final: float | None = None) -> int | None:
    """One run reporting ``values`` at steps 1, 2, …; returns the step it was pruned at (None: went on)."""
    w = pruner.watch(None, STOP, prunable=True)
    for step, v in enumerate(values, start=1):
        w.feed(f"nightlab: step={step} loss={v}")
    w.close()
    if w.pruned_at is not None:
        w.finish(Status.PRUNED, None, 0.5)
    else:
        w.finish(status or Status.DISCARD, final if final is not None else values[-1], 1.0)
    return w.pruned_at


def night(reference: str, percentile: float = 50.0) -> list[int | None]:
    """A baseline, two good runs, four hopeless ones, then a run slightly worse than the good ones."""
    spec = PruneSpec(pruner="median", startup_runs=1, warmup_fraction=0, reference=reference,
                     percentile=percentile)
    pruner = Pruner(spec, "loss", Direction.MINIMIZE)
    good = [10.0 - step for step in range(10)]  # 10 … 1
    out = [run(pruner, good, Status.KEEP), run(pruner, [v - 0.2 for v in good]), run(pruner, [v - 0.1 for v in good])]
    out += [run(pruner, [50.0 + i] * 10) for i in range(4)]
    out.append(run(pruner, [v + 0.3 for v in good]))
    return out


def test_optunas_median_prunes_a_run_near_the_good_curves_the_default_does_not():
    completed = night("completed")
    assert completed[:3] == [None, None, None] and completed[3:7] == [1, 1, 1, 1]
    # compared with the three good completed curves only: worse than their median from the first step
    assert completed[7] == 1
    # every run counts: at every step the bar is the median of the 7 earlier runs, four of them hopeless
    assert night("all") == [None, None, None, 1, 1, 1, 1, None]


def test_reached_counts_pruned_runs_only_at_the_steps_they_reached():
    # at step 1 the hopeless runs lift the bar; after it only the good runs reached a step
    assert night("reached") == [None, None, None, 1, 1, 1, 1, 2]


def test_a_stricter_percentile_prunes_more():
    # the 25th percentile of the 7 values at step 1 is a good run's, the median a hopeless one's
    assert night("all", percentile=25.0) == [None, None, None, 1, 1, 1, 1, 1]


def test_with_all_about_half_of_runs_in_random_order_are_pruned_not_nearly_all():
    """Runs whose quality comes in random order: Optuna's reference (the completed runs, i.e. the
    survivors) stops nearly all of them; counting every run stops about half."""
    import random

    def share(reference: str) -> float:
        rng = random.Random(7)
        spec = PruneSpec(pruner="median", startup_runs=1, warmup_fraction=0, reference=reference)
        pruner = Pruner(spec, "loss", Direction.MINIMIZE)
        run(pruner, [5.0 + 10.0 / s for s in range(1, 11)], Status.KEEP)
        results = []
        for _ in range(40):
            level, noise = rng.uniform(3.0, 7.0), [rng.gauss(0, 0.3) for _ in range(10)]
            results.append(run(pruner, [level + 10.0 / s + n for s, n in zip(range(1, 11), noise, strict=True)]))
        return sum(r is not None for r in results) / len(results)

    assert share("completed") >= 0.8
    assert 0.3 <= share("all") <= 0.7


def test_completed_is_optunas_percentile_pruner():
    spec = PruneSpec(pruner="median", reference="completed", startup_runs=2, warmup_steps=3,
                     warmup_fraction=0, finish_fraction=1, percentile=40)
    p = make_pruner(spec)
    assert isinstance(p, optuna.pruners.PercentilePruner) and not isinstance(p, Percentile)
    assert p._percentile == 40 and p._n_startup_trials == 2 and p._n_warmup_steps == 3
    assert isinstance(make_pruner(PruneSpec(pruner="median", warmup_fraction=0, finish_fraction=1)), Percentile)


def test_a_run_past_the_finish_fraction_is_let_finish():
    """``finish_fraction`` (0.9): a hopeless run is not stopped in the last tenth of a full run (the baseline's
    10 steps), where stopping saves at most a tenth and loses a nearly complete measurement."""
    good = [10.0 - step for step in range(10)]

    def late(finish: float) -> int | None:
        spec = PruneSpec(pruner="median", startup_runs=1, warmup_fraction=0, finish_fraction=finish)
        pruner = Pruner(spec, "loss", Direction.MINIMIZE)
        assert run(pruner, good, Status.KEEP) is None
        return run(pruner, [*good[:8], 50.0, 50.0])  # level with the baseline, then hopeless at steps 9 and 10

    assert late(1.0) == 9
    assert late(0.9) is None  # step 9 is 0.9 of the 10-step run
    assert late(0.95) == 9
    assert PruneSpec().finish_fraction == 0.9


def test_maximize_mirrors_minimize():
    spec = PruneSpec(pruner="median", startup_runs=1, warmup_fraction=0)
    pruner = Pruner(spec, "acc", Direction.MAXIMIZE)

    def go(values: list[float], status: Status = Status.DISCARD) -> int | None:
        w = pruner.watch(None, STOP, prunable=True)
        for step, v in enumerate(values, start=1):
            w.feed(f"nightlab: step={step} acc={v}")
        w.close()
        w.finish(Status.PRUNED if w.pruned_at else status, None if w.pruned_at else values[-1], 1.0)
        return w.pruned_at

    assert go([0.1 * s for s in range(1, 6)], Status.KEEP) is None
    assert go([0.0] * 5) == 1  # worse than the only run at step 1
    assert go([0.1 * s - 0.01 for s in range(1, 6)]) is None  # the bar at step 1 is the pruned run's 0.0


def test_nan_only_is_pruned_and_a_nan_reference_is_ignored():
    spec = PruneSpec(pruner="median", startup_runs=1, warmup_fraction=0)
    pruner = Pruner(spec, "loss", Direction.MINIMIZE)
    assert run(pruner, [5.0, 4.0, 3.0], Status.KEEP) is None
    assert run(pruner, [float("nan")] * 3) == 1


def test_the_reference_and_percentile_are_checked(make_lab):
    for bad, key in (('reference = "survivors"', "reference"), ("percentile = 0", "percentile"),
                     ("percentile = 101", "percentile")):
        lab = make_lab(spec=SPEC.replace("[executor]", f'[prune]\npruner = "median"\n{bad}\n\n[executor]'))
        with pytest.raises(SpecError, match=rf"\[prune\] {key}"):
            load_spec(lab)


def test_a_real_session_judges_against_every_run_not_only_the_completed_ones(make_lab):
    """Real runs, real log tailing: after two good runs complete and three hopeless ones are pruned,
    a middling run (X = 1.3: final 0.59, incumbent 0.5) is stopped by Optuna's reference (worse than
    the completed runs' median at step 2) and runs to its end with nightlab's (the median of all six
    earlier runs at step 2 is a hopeless one's, and after step 2 the pruned ones count as worst)."""
    from tests.test_prune import CURVED, PRUNE_SPEC, Steps

    from nightlab.engine import Engine

    xs = [1.0, 1.05, 9.0, 8.0, 7.0, 1.3]
    got = {}
    for reference in ("completed", "all"):
        spec = PRUNE_SPEC.replace("warmup_fraction = 0\n", f'warmup_fraction = 0\nreference = "{reference}"\n')
        lab = make_lab(files={"target.py": CURVED}, spec=spec)
        eng = Engine(lab, tag=f"ref-{reference}", researcher=Steps(xs), sandbox_mode="none", max_experiments=len(xs))
        session = eng.run()
        got[reference] = {e.idx: e for e in eng.ledger.experiments(session.id)}
        eng.close()
    for by in got.values():
        assert [by[i].status for i in (1, 2)] == [Status.KEEP, Status.DISCARD]
        assert all(by[i].status is Status.PRUNED and by[i].evidence["pruned_at"] == 2 for i in (3, 4, 5))
    assert got["completed"][6].status is Status.PRUNED and got["completed"][6].evidence["pruned_at"] == 2
    assert got["all"][6].status is Status.DISCARD and got["all"][6].metric == pytest.approx(0.59)
    assert len(got["all"][6].evidence["curve"]) == 10
