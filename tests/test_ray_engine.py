"""A whole session through the Ray executor: each experiment is a Ray task on a local cluster."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time

import pytest
from tests.conftest import SPEC, TARGET_PY, git

from nightlab.engine import Engine
from nightlab.executors.ray_executor import RayExecutor
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.runtime import Reporter
from nightlab.types import Candidate, Status

ray = pytest.importorskip("ray")

pytestmark = [
    pytest.mark.ray,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


def target(x: float) -> str:
    return TARGET_PY.replace("X = 3.0", f"X = {x}")


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the cluster listens on loopback only (conftest sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)
    assert all(n["NodeManagerAddress"].startswith("127.") for n in ray.nodes())
    yield
    ray.shutdown()


@pytest.mark.parametrize("mode", ["none", pytest.param("required", marks=pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bwrap not installed"))])
def test_a_session_runs_through_ray(make_lab, cluster, mode):
    lab = make_lab(spec=SPEC.replace("pipeline = false", 'kind = "ray"\nslots = 2\nnum_cpus = 1'))
    steps = [{"rationale": "opt X", "files": {"target.py": target(1.0)}},
             {"rationale": "worse", "files": {"target.py": target(7.0)}},
             {"rationale": "edit the evaluator", "files": {"evaluate.py": "print('x')\n"}}]
    told = Told()
    eng = Engine(lab, tag="ray", researcher=ScriptedResearcher(steps), sandbox_mode=mode, max_experiments=3,
                 reporter=told)
    assert told.lines[0].startswith("Ray: starting 2 slot(s) (CPU=1 each); waiting up to 30 s")
    assert told.lines[1].startswith("Ray: 2 slot(s) started (CPU=1 each)"), told.lines
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    by = {e.idx: e for e in exps}
    assert sorted(by) == [0, 1, 2, 3]
    assert by[0].status is Status.KEEP and by[0].evidence["executor"] == "ray" and by[0].metric == pytest.approx(8.5)
    ran = [e for e in exps if e.status in (Status.KEEP, Status.DISCARD)]
    assert all(e.evidence.get("executor") == "ray" and e.evidence.get("attempts") == 1 for e in ran)
    # the slots' actors were started with the engine: no run waited for a worker to import nightlab
    assert all(e.evidence["ray_timing"]["import_on_path"] == 0 for e in ran)
    assert all(e.evidence["ray_timing"]["sandbox"] > 0 for e in ran)
    # the head's `git archive` of the commit is timed, and counted in the run stage
    assert all(0 < e.evidence["ray_timing"]["archive"] <= e.evidence["timing"]["run"] for e in ran)
    assert session.incumbent_metric == pytest.approx(4.5)
    assert "X = 1.0" in git(lab, "show", "nightlab/ray:target.py")
    assert any(e.status is Status.REJECTED for e in exps)  # the guard runs on the head, before Ray
    # the log came home
    assert "training..." in (lab / ".nightlab" / "artifacts" / "ray" / "1" / "run.log").read_text()
    # exactly one row per experiment, even though Ray runs tasks at least once
    with sqlite3.connect(lab / ".nightlab" / "ledger.db") as con:
        dup = con.execute("select idx, count(*) from experiments group by session_id, idx having count(*) > 1")
        assert dup.fetchall() == []


class Told(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_unplaced_slots_are_reported_and_a_run_waiting_for_a_slot_stops_before_it_starts(make_lab, cluster,
                                                                                       tmp_path, monkeypatch):
    monkeypatch.setitem(RayExecutor.__init__.__kwdefaults__, "unschedulable_s", 2.0)
    marker, release = tmp_path / "running", tmp_path / "release"
    hold = target(1.0).replace("import os, sys", f"import os, sys, time, pathlib\npathlib.Path({str(marker)!r})"
                               f".touch()\nwhile not os.path.exists({str(release)!r}): time.sleep(0.05)")
    # each slot asks for both of the cluster's CPUs: one of the two can be placed
    lab = make_lab(spec=SPEC.replace("pipeline = false", 'kind = "ray"\nslots = 2\nnum_cpus = 2'))
    def after_the_first_holds(ctx):  # proposed once #1 runs: #1 has the one slot, whichever thread is quicker
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return Candidate(parent=ctx.parent, rationale="waits for it", files={"target.py": target(2.0)})

    steps = [{"rationale": "hold the slot", "files": {"target.py": hold}}, after_the_first_holds]
    told = Told()
    eng = Engine(lab, tag="wait", researcher=ScriptedResearcher(steps), sandbox_mode="none", max_experiments=2,
                 reporter=told)
    assert "1 of 2 slot(s) started; 1 could not be placed within" in told.lines[1], told.lines
    assert "each slot asks for CPU=2, the cluster has CPU=2" in told.lines[1], told.lines

    def stop_when_waiting() -> None:  # a graceful stop while #1 holds the one slot and #2 waits for it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (marker.exists() and len(eng.ledger.experiments(
                eng.session.id)) == 3):
            time.sleep(0.05)
        eng.stop.graceful = "STOP file"
        while time.monotonic() < deadline and eng.ledger.experiments(eng.session.id)[-1].status is Status.RUNNING:
            time.sleep(0.05)
        release.touch()

    stopper = threading.Thread(target=stop_when_waiting, daemon=True)
    stopper.start()
    session = eng.run()
    stopper.join(10)
    by = {e.idx: e for e in eng.ledger.experiments(session.id)}
    eng.close()
    assert by[1].status is Status.KEEP  # the run in flight finished
    assert by[2].status is Status.INTERRUPTED and by[2].reason == "interrupted: stopped before its run (STOP file)"
    assert by[2].evidence["attempts"] == 0 and by[2].run_s == 0
    events = [json.loads(line) for line in (lab / ".nightlab" / "audit.jsonl").read_text().splitlines()]
    slots = [e for e in events if e.get("kind") == "ray.slots"]
    assert slots and slots[0]["data"]["started"] == 1 and slots[0]["data"]["unplaced"] == 1, slots


def test_ray_with_an_evaluator_is_refused(make_lab):
    from nightlab.errors import UsageError

    lab = make_lab(spec=SPEC.replace("pipeline = false", 'kind = "ray"')
                   + '\n[evaluate]\ncommand = "python evaluate.py"\noutputs = []\n')
    with pytest.raises(UsageError, match="ray executor"):
        Engine(lab, tag="x", researcher=ScriptedResearcher([]), sandbox_mode="none")


def test_a_hopeless_ray_run_is_pruned_from_its_progress_lines(make_lab, cluster):
    from tests.test_prune import CURVED, PRUNE_SPEC, Steps

    slow = CURVED.replace("time.sleep(0.15)", "time.sleep(0.4)")  # 4 s to the end: the prune comes well before
    lab = make_lab(files={"target.py": slow},
                   spec=PRUNE_SPEC.replace("pipeline = false", 'kind = "ray"\nnum_cpus = 1\npipeline = false'))
    eng = Engine(lab, tag="rp", researcher=Steps([1.0, 9.0]), sandbox_mode="none", max_experiments=2)
    session = eng.run()
    by = {e.idx: e for e in eng.ledger.experiments(session.id)}
    eng.close()
    assert all(e.evidence.get("executor") == "ray" for e in by.values())
    # the curves of the runs that went to their end came home through Ray, step by step
    assert by[0].status is Status.KEEP and [p[0] for p in by[0].evidence["curve"]] == list(range(1, 11))
    assert by[1].status is Status.KEEP and len(by[1].evidence["curve"]) == 10
    bad = by[2]  # X = 9: 64.5 against 4.5 at every step
    assert bad.status is Status.PRUNED, (bad.status, bad.reason)
    assert bad.evidence["pruned_at"] >= 2 and bad.reason.startswith(f"pruned at step {bad.evidence['pruned_at']}")
    assert bad.metric is None and bad.evidence["saved_s"] > 0
    # stopped on the worker by its cancel flag: the task ended by itself and brought its partial log home
    log = (lab / ".nightlab" / "artifacts" / "rp" / str(bad.idx) / "run.log").read_text()
    assert "step=2 " in log and "step=10 " not in log and "---" not in log
    assert session.incumbent_commit == by[1].commit
