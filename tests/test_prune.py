"""Early stopping: progress lines read live, hopeless runs pruned against earlier runs at the same step,
curves stored and drawn, the time saved shown by `status`, the dashboard and the report."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.conftest import SPEC, dashboard_client

from nightlab.cli.read import status as status_cmd
from nightlab.engine import Engine
from nightlab.errors import SpecError
from nightlab.ledger import Ledger
from nightlab.prune import Pruner, parse_progress, thin
from nightlab.researchers import Context
from nightlab.spec import PruneSpec, load_spec
from nightlab.types import Candidate, Direction, Status

# ten steps of 0.15 s; the curve falls towards the final score, so it ranks runs from the first step
CURVED = """\
import time
X = 3.0
final = (X - 1) ** 2 + 0.5
for step in range(1, 11):
    time.sleep(0.15)
    print(f"nightlab: step={step} score={final * (1 + 1 / step):.6f} lr=0.1", flush=True)
print("---")
print(f"score: {final:.6f}")
"""

PRUNE_SPEC = SPEC.replace("[executor]", '[prune]\npruner = "median"\nstartup_runs = 1\nwarmup_steps = 2\n'
                          'warmup_fraction = 0\n\n[executor]')


def at(x: float) -> str:
    return CURVED.replace("X = 3.0", f"X = {x}")


class Steps:
    name = "steps"

    def __init__(self, xs: list[float]) -> None:
        self.xs = xs

    def propose(self, ctx: Context) -> Candidate:
        x = self.xs[(ctx.idx - 1) % len(self.xs)]
        return Candidate(parent=ctx.parent, rationale=f"X = {x}", files={"target.py": at(x)})

    def observe(self, e: object) -> None:
        pass

    def close(self) -> None:
        pass


def test_progress_lines_are_a_small_contract():
    assert parse_progress("nightlab: step=120 val_bpb=1.23") == (120, {"val_bpb": 1.23})
    assert parse_progress("nightlab:  step=3 loss=nan acc=0.5 ") == (3, {"loss": pytest.approx(float("nan"),
                                                                                              nan_ok=True),
                                                                          "acc": 0.5})
    for not_progress in ["step=3 loss=1", "nightlab: step=x loss=1", "nightlab: step=3", "nightlab: loss=1 step=3",
                         "nightlab: step=-1 loss=1", "nightlab: step=3 loss=abc", "---"]:
        assert parse_progress(not_progress) is None, not_progress
    curve = [[i, float(i)] for i in range(5000)]
    thinned = thin(curve, 100)
    assert len(thinned) == 100 and thinned[0] == [0, 0.0] and thinned[-1] == [4999, 4999.0]


def test_a_threshold_pruner_needs_a_bound(make_lab):
    lab = make_lab(spec=SPEC.replace("[executor]", '[prune]\npruner = "threshold"\n\n[executor]'))
    with pytest.raises(SpecError, match="lower"):
        load_spec(lab)
    with pytest.raises(SpecError, match=r"\[prune\] pruner"):
        load_spec(make_lab(spec=SPEC.replace("[executor]", '[prune]\npruner = "asha"\n\n[executor]')))


def test_a_hopeless_run_is_pruned_and_a_good_one_is_not(make_lab):
    lab = make_lab(files={"target.py": CURVED}, spec=PRUNE_SPEC)
    eng = Engine(lab, tag="pr", researcher=Steps([1.0, 9.0]), sandbox_mode="none", max_experiments=2)
    session = eng.run()
    by = {e.idx: e for e in eng.ledger.experiments(session.id)}
    eng.close()
    # the baseline and the good run went to their end, with their whole curve stored
    assert by[0].status is Status.KEEP and [p[0] for p in by[0].evidence["curve"]] == list(range(1, 11))
    assert by[1].status is Status.KEEP and len(by[1].evidence["curve"]) == 10
    # the hopeless one (X = 9: 64.5 vs 4.5) was stopped after the warm-up, not at its end
    bad = by[2]
    assert bad.status is Status.PRUNED, (bad.status, bad.reason)
    assert bad.evidence["pruned_at"] == 2 and bad.reason.startswith("pruned at step 2: score=")
    assert [p[0] for p in bad.evidence["curve"]] == [1, 2]
    log = (lab / ".nightlab" / "artifacts" / "pr" / str(bad.idx) / "run.log").read_text()
    assert "step=2 " in log and "step=10 " not in log and "---" not in log  # really killed
    assert bad.metric is None and bad.evidence["saved_s"] > 0
    assert session.incumbent_commit == by[1].commit


def test_the_median_pruner_waits_for_a_fraction_of_a_full_run(make_lab):
    """``warmup_fraction``: no prune before that share of the longest completed curve (10 steps here),
    whatever ``warmup_steps`` says; the hopeless run is still stopped, later."""
    spec = PRUNE_SPEC.replace("warmup_steps = 2\nwarmup_fraction = 0\n", "warmup_fraction = 0.5\n")
    lab = make_lab(files={"target.py": CURVED}, spec=spec)
    eng = Engine(lab, tag="wf", researcher=Steps([9.0]), sandbox_mode="none", max_experiments=1)
    session = eng.run()
    bad = eng.ledger.experiments(session.id)[1]
    eng.close()
    assert bad.status is Status.PRUNED and bad.evidence["pruned_at"] == 5  # not 1 (warmup_steps = 0)
    assert [p[0] for p in bad.evidence["curve"]] == [1, 2, 3, 4, 5]


def test_the_default_warmup_fraction_prunes_nothing_before_a_run_completed():
    import threading

    spec = PruneSpec(pruner="median", startup_runs=0)
    assert spec.warmup_fraction == 0.25
    pruner = Pruner(spec, "loss", Direction.MINIMIZE)
    stop = threading.Event()
    first = pruner.watch(None, stop, prunable=True)
    for step in range(1, 11):
        first.feed(f"nightlab: step={step} loss={100 - step}")
    first.close()
    assert first.pruned_at is None  # nothing completed: no full-run length to measure the warm-up by
    first.finish(Status.DISCARD, 90.0, 1.0)
    second = pruner.watch(None, stop, prunable=True)
    for step in range(1, 11):
        second.feed(f"nightlab: step={step} loss={1000 - step}")
    second.close()
    assert second.pruned_at == 3  # the first step at or past 25 % of the completed run's 10
    second.finish(Status.PRUNED, None, 0.3)


def test_pruning_is_off_by_default_and_every_curve_is_still_stored(make_lab):
    lab = make_lab(files={"target.py": CURVED}, spec=SPEC)
    eng = Engine(lab, tag="off", researcher=Steps([9.0]), sandbox_mode="none", max_experiments=1)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    assert [e.status for e in exps] == [Status.KEEP, Status.DISCARD]
    assert all(len(e.evidence["curve"]) == 10 for e in exps)


def test_resume_judges_new_runs_against_the_stored_curves(make_lab):
    spec = PRUNE_SPEC.replace("startup_runs = 1", "startup_runs = 2")
    lab = make_lab(files={"target.py": CURVED}, spec=spec)
    eng = Engine(lab, tag="rs", researcher=Steps([1.0]), sandbox_mode="none", max_experiments=1)
    eng.run()
    eng.close()
    # a fresh process: the pruner knows the two finished runs only from the ledger
    eng = Engine(lab, tag="rs", resume=True, researcher=Steps([9.0]), sandbox_mode="none", max_experiments=2)
    session = eng.run()
    by = {e.idx: e for e in eng.ledger.experiments(session.id)}
    eng.close()
    assert by[2].status is Status.PRUNED and by[2].evidence["pruned_at"] == 2
    # status, report and dashboard show the time saved
    r = CliRunner(env={"COLUMNS": "200"}).invoke(status_cmd, ["--lab", str(lab), "--tag", "rs"],
                                                 catch_exceptions=False)
    assert r.exit_code == 0 and "1 run(s) stopped early" in r.output and "pruned 1" in r.output, r.output
    pytest.importorskip("fastapi")

    from nightlab.report import render_html
    from nightlab.web.app import create_app
    from nightlab.web.security import Access

    with Ledger.for_lab(lab) as led:
        s = led.get_session("rs")
        assert s is not None
        html = render_html(led, s)
        assert 'id="pruning"' in html and "saved" in html
        client = dashboard_client(create_app(led, lab, Access.make("127.0.0.1", "tok")), base_url="http://127.0.0.1")
        page = client.get("/s/rs").text
        assert 'id="pruning"' in page and "1 run stopped early" in page
        exp = client.get("/s/rs/e/2").text
        assert 'class="nl-curve"' in exp and 'class="pruned-at"' in exp and "pruned at step 2" in exp
        kept = client.get("/s/rs/e/1").text
        assert 'class="nl-curve"' in kept and "polyline" in kept and "pruned-at" not in kept


# the progress figure is not the metric (tinygpt prunes on train_bpb, keeps on val_bpb); FAKE = 1 prints 0.0
OTHER = CURVED.replace("X = 3.0", "X = 3.0\nFAKE = 0").replace(
    'score={final * (1 + 1 / step):.6f}', 'train_score={0.0 if FAKE else final * (1 + 1 / step):.6f}')
OTHER_SPEC = PRUNE_SPEC.replace('pruner = "median"\n', 'pruner = "median"\nfigure = "train_score"\n')


class Fakes(Steps):
    """Each X in turn; a negative X is -X with a fake curve (0.0 at every step)."""

    def propose(self, ctx: Context) -> Candidate:
        x = self.xs[(ctx.idx - 1) % len(self.xs)]
        code = OTHER.replace("X = 3.0", f"X = {abs(x)}").replace("FAKE = 0", f"FAKE = {int(x < 0)}")
        return Candidate(parent=ctx.parent, rationale=f"X = {x}", files={"target.py": code})


def test_true_improvements_printing_fake_curves_of_another_figure_set_no_bar_after_a_resume(make_lab):
    """Broke on main (the strict xfail in test_attacks_more.py): with ``[prune] figure`` other than the
    metric, three candidates that truly improve the metric but print ``train_score=0.0`` made the median
    pruner stop an honest improvement. Now the baseline ties the figure to the metric (its last progress
    value minus its trusted metric) and a completed run's curve is no better than its own metric plus that
    gap; the tie is rebuilt from the ledger on resume, so after it the honest improvement runs to its end
    and a hopeless run is still stopped."""
    lab = make_lab(files={"target.py": OTHER}, spec=OTHER_SPEC)
    eng = Engine(lab, tag="fk", researcher=Fakes([-2.5, -2.0, -1.5]), sandbox_mode="none", max_experiments=3)
    eng.run()
    eng.close()
    eng = Engine(lab, tag="fk", resume=True, researcher=Fakes([9.0, 1.2]), sandbox_mode="none",
                 max_experiments=5)  # idx 4: 1.2, idx 5: 9.0
    session = eng.run()
    by = {e.idx: e for e in eng.ledger.experiments(session.id)}
    eng.close()
    assert [by[i].status for i in range(4)] == [Status.KEEP] * 4, [(e.status, e.reason) for e in by.values()]
    assert by[1].evidence["curve"][0] == [1, 0.0]  # the fakes' curves are stored as printed
    honest, hopeless = by[4], by[5]
    assert honest.status is Status.KEEP and len(honest.evidence["curve"]) == 10, (honest.status, honest.reason)
    assert hopeless.status is Status.PRUNED and hopeless.evidence["pruned_at"] == 2, (hopeless.status,
                                                                                        hopeless.reason)


def test_without_a_baseline_curve_of_another_figure_the_median_pruner_stops_nothing():
    """With ``[prune] figure`` other than the metric, only the baseline (the user's code) ties the curves to
    the trusted metric; when it printed none of that figure, the candidates' curves alone set no bar."""
    import threading

    spec = PruneSpec(pruner="median", startup_runs=1, warmup_fraction=0, figure="train_loss")
    stop = threading.Event()
    for baseline_curve, pruned_at in ((False, None), (True, 1)):
        pruner = Pruner(spec, "train_loss", Direction.MINIMIZE, "val_loss")
        base = pruner.watch(None, stop, prunable=False)
        if baseline_curve:
            for step in range(1, 11):
                base.feed(f"nightlab: step={step} train_loss={10 - step / 2}")
        base.close()
        base.finish(Status.KEEP, 5.2, 1.0)
        good = pruner.watch(None, stop, prunable=True)  # a candidate's curve, a candidate's word
        for step in range(1, 11):
            good.feed(f"nightlab: step={step} train_loss={5 - step / 2}")
        good.close()
        good.finish(Status.KEEP, 0.2, 1.0)
        bad = pruner.watch(None, stop, prunable=True)
        for step in range(1, 11):
            bad.feed(f"nightlab: step={step} train_loss={100 - step}")
        bad.close()
        assert bad.pruned_at == pruned_at, baseline_curve
        bad.finish(Status.PRUNED if bad.pruned_at else Status.DISCARD, None if bad.pruned_at else 90.0, 1.0)


def test_a_run_flooding_its_log_with_progress_lines_is_judged_up_to_a_cap_and_stored_thinned(monkeypatch):
    """Optuna's in-memory storage copies a trial's values at every report, so a run printing 10^5 progress
    lines cost the harness minutes (bench/prune_cost.py). A run reports at most ``MAX_REPORTS`` points (each
    judged); the rest of its curve is stored thinned, steps increasing; the pruner still judges later runs."""
    import threading

    from nightlab import prune

    monkeypatch.setattr(prune, "MAX_REPORTS", 50)
    monkeypatch.setattr(prune, "MAX_POINTS", 20)
    pruner = Pruner(PruneSpec(pruner="median", startup_runs=1, warmup_fraction=0), "loss", Direction.MINIMIZE)
    stop = threading.Event()
    base = pruner.watch(None, stop, prunable=False)
    for step in range(1, 101):
        base.feed(f"nightlab: step={step} loss={5 + 10 / step}")
    base.close()
    base.finish(Status.KEEP, 5.0, 1.0)
    flood = pruner.watch(None, stop, prunable=True)
    for step in [*range(1, 301), 7, 150, 299, 1000]:  # honest up to 100, then on; repeats and a step back
        flood.feed(f"nightlab: step={step} loss={4 + 10 / step}")
    flood.close()
    assert flood.pruned_at is None and flood.trial is not None
    assert sorted(pruner.study.trials[1].intermediate_values) == list(range(1, 51))  # reported: the first 50
    steps = [p[0] for p in flood.curve]
    assert len(steps) <= 2 * 20 and steps == sorted(set(steps)) and steps[-1] == 1000
    flood.finish(Status.DISCARD, 4.0, 1.0)
    bad = pruner.watch(None, stop, prunable=True)
    for step in range(1, 11):
        bad.feed(f"nightlab: step={step} loss={50 + 10 / step}")
    bad.close()
    assert bad.pruned_at == 1


def test_the_pruners_incremental_reading_agrees_with_reading_every_value():
    """prune.Seen reads only the values added since its last call; it must agree with max/min over all."""
    import random

    import optuna

    from nightlab.prune import Seen

    rng = random.Random(0)
    for maximize in (False, True):
        study = optuna.create_study(direction="maximize" if maximize else "minimize")
        trial = study.ask()
        seen = Seen(maximize)
        values: dict[int, float] = {}
        for step in rng.sample(range(1, 10_000), 300):  # steps in any order, NaN among the values
            v = math.nan if rng.random() < 0.1 else rng.uniform(-5, 5)
            trial.report(v, step)
            values[step] = v
            if rng.random() < 0.3:
                frozen = study.trials[-1]
                finite = [x for x in values.values() if not math.isnan(x)]
                want = (max(finite) if maximize else min(finite)) if finite else None
                assert seen(frozen) == (max(values), want)


def test_the_watch_reads_a_log_written_by_someone_else(tmp_path: Path):
    """Decoupled from the sandbox: the watch tails whatever file the run's log is, even rewritten."""
    import threading

    pruner = Pruner(PruneSpec(pruner="threshold", upper=10.0, poll_s=0.02), "loss", Direction.MINIMIZE)
    log = tmp_path / "run.log"
    stop = threading.Event()
    w = pruner.watch(log, stop, prunable=True)
    with open(log, "w") as f:
        f.write("noise\nnightlab: step=1 loss=5\nnightlab: step=1 loss=6\nnightlab: step=2 lo")
        f.flush()
        time.sleep(0.2)
        f.write("ss=20\n")
    for _ in range(100):
        if w.cancel.is_set():
            break
        time.sleep(0.02)
    w.close()
    assert w.cancel.is_set() and w.pruned_at == 2 and w.curve == [[1, 5.0], [2, 20.0]]
    ev = w.finish(Status.PRUNED, None, 1.0)
    assert ev == {"curve": [[1, 5.0], [2, 20.0]], "pruned_at": 2}
    # the session's stop reaches the run through the same event
    w2 = pruner.watch(tmp_path / "other.log", stop, prunable=False)
    stop.set()
    for _ in range(100):
        if w2.cancel.is_set():
            break
        time.sleep(0.02)
    w2.close()
    assert w2.cancel.is_set() and w2.pruned_at is None


def test_the_example_labs_print_progress_lines(tmp_path: Path):
    import shutil
    import subprocess
    import sys

    from nightlab.measure import parse_summary

    root = Path(__file__).resolve().parent.parent / "examples"
    lab = tmp_path / "quickfit"
    shutil.copytree(root / "quickfit", lab)
    env = {"PATH": "/usr/bin:/bin", "NIGHTLAB_DATA_DIR": str(tmp_path / "data"), "NIGHTLAB_BUDGET_S": "5",
           "NIGHTLAB_SEED": "0"}
    subprocess.run([sys.executable, "prepare.py"], cwd=lab, env=env, check=True, capture_output=True)
    out = subprocess.run([sys.executable, "fit.py"], cwd=lab, env=env, check=True, capture_output=True,
                         text=True).stdout
    points = [p for line in out.splitlines() if (p := parse_progress(line))]
    assert [s for s, _ in points] == list(range(1, 31))  # one per epoch (EPOCHS = 30)
    assert points[-1][1]["val_loss"] == pytest.approx(float(parse_summary(out)["val_loss"]), abs=1e-6)
    assert load_spec(root / "quickfit").prune.pruner in ("none", "median")
    # tinygpt prints its smoothed training loss every 5% of the budget, pruned on as [prune] figure
    text = (root / "tinygpt" / "train.py").read_text()
    assert 'print(f"nightlab: step={reported} train_bpb=' in text
    assert load_spec(root / "tinygpt").prune.figure in ("", "train_bpb")
