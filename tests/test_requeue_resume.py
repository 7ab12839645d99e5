"""Queued combinations of stale winners survive a stop, a real SIGKILL and ``--resume`` (requeue.py)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from tests.conftest import SPEC, cli_env, git, nightlab_cmd

from nightlab.engine import REBASE, Engine
from nightlab.events import MemorySink
from nightlab.ledger import Ledger
from nightlab.types import Status

# X and Y far apart (a change to one merges on top of a change to the other); #2 (X=1, measured on the
# baseline) is slow, so #1 (Y=1) is kept first and #2 wins stale; their combination (X=1, Y=1) waits
# while the file HOLD exists, so a test can kill the harness while it runs.
LAB = """\
import os, time
X = 3.0
# -
# -
# -
# -
Y = 0.0
time.sleep({{"X=1.0,Y=0.0": 2.0, "X=9.0,Y=0.0": 4.0}}.get(f"X={{X}},Y={{Y}}", 0.1))
t0 = time.time()
while f"X={{X}},Y={{Y}}" == "X=1.0,Y=1.0" and os.path.exists({hold!r}) and time.time() - t0 < 15:
    time.sleep(0.05)
print("---")
print(f"score: {{(X - 1) ** 2 + (Y - 2) ** 2 + 0.5:.6f}}")
"""


def _lab(make_lab, hold: Path, cap: int) -> Path:
    text = LAB.format(hold=str(hold))

    def at(x: float, y: float) -> str:
        return text.replace("X = 3.0", f"X = {x}").replace("Y = 0.0", f"Y = {y}")

    spec = SPEC.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"').replace(
        "pipeline = false", "slots = 2\npipeline = false").replace("max_experiments = 3", f"max_experiments = {cap}")
    steps = [{"rationale": "Y to 1", "files": {"target.py": at(3.0, 1.0)}},   # fast: 8.5 -> 5.5, kept first
             {"rationale": "X to 1", "files": {"target.py": at(1.0, 0.0)}},   # slow, on the baseline: 4.5
             {"rationale": "X to 9", "files": {"target.py": at(9.0, 0.0)}}]   # then a slow regression
    return make_lab(files={"target.py": text, "steps.json": json.dumps(steps)}, spec=spec)


def _combos(lab: Path) -> list:
    with Ledger.for_lab(lab) as led:
        s = led.latest_session()
        assert s is not None
        return [e for e in led.experiments(s.id) if e.researcher == REBASE]


def test_a_combination_in_flight_at_a_sigkill_runs_after_resume(make_lab, tmp_path):
    hold = tmp_path / "hold"
    hold.write_text("")
    lab = _lab(make_lab, hold, cap=4)
    db = lab / ".nightlab" / "ledger.db"
    proc = subprocess.Popen(nightlab_cmd("run", "--lab", str(lab), "--tag", "r", "--plain", "--sandbox", "none"),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, running = time.time() + 60, None
        while running is None and time.time() < deadline:  # the combination's run has started
            try:
                with sqlite3.connect(db) as con:
                    running = con.execute(
                        "select e.idx from requeue q join experiments e on e.idx = q.taken_idx "
                        "and e.session_id = q.session_id where e.status = 'running' and e.pid is not null"
                    ).fetchone()
            except sqlite3.OperationalError:  # no ledger or no requeue table yet
                pass
            time.sleep(0.1)
        assert running is not None, "the combination never started"
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    hold.unlink()
    res = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--resume", "--plain", "--sandbox", "none",
                                      "--max-experiments", "5"),
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    combos = _combos(lab)
    assert [c.status for c in combos] == [Status.INTERRUPTED, Status.KEEP], [(c.idx, c.status, c.reason)
                                                                            for c in combos]
    assert combos[0].idx == running[0] and combos[1].idx > running[0]
    assert combos[1].metric == pytest.approx(1.5) and combos[1].rationale.startswith("combination with #2")
    text = git(lab, "show", "nightlab/r:target.py")
    assert "X = 1.0" in text and "Y = 1.0" in text
    with sqlite3.connect(db) as con:  # the row was taken again, by the run that measured it
        assert con.execute("select taken_idx from requeue").fetchall() == [(combos[1].idx,)]


def test_a_combination_left_queued_at_a_stop_runs_after_resume_and_a_lost_one_is_dropped(make_lab, tmp_path):
    lab = _lab(make_lab, tmp_path / "no-hold", cap=3)  # the cap stops the session with the combination queued
    eng = Engine(lab, tag="q", sandbox_mode="none")
    session = eng.run()
    eng.close()
    assert not _combos(lab)
    refs = git(lab, "for-each-ref", "--format=%(refname) %(objectname)", "refs/nightlab/q/requeue").split()
    assert len(refs) == 2, refs  # one queued combination, its tip pinned
    # a second, bogus row whose tip never existed (a repository restored from an older backup)
    with sqlite3.connect(lab / ".nightlab" / "ledger.db") as con:
        con.execute("insert into requeue (session_id, source_idx, tip, rationale, params_json, taken_idx, "
                    "created_at) values (?, 2, ?, 'lost', '{}', NULL, 0)", (session.id, "f" * 40))
    sink = MemorySink()
    eng = Engine(lab, tag="q", resume=True, sandbox_mode="none", max_experiments=4, events=sink)
    eng.run()
    eng.close()
    combos = _combos(lab)
    assert len(combos) == 1 and combos[0].status is Status.KEEP and combos[0].metric == pytest.approx(1.5)
    drops = [d for k, _, d in sink.events if k == "requeue.drop"]
    assert [d["why"] for d in drops] == ["its commit is gone from the repository"]
    assert [k for k, _, _ in sink.events].count("requeue.restore") == 1
    with sqlite3.connect(lab / ".nightlab" / "ledger.db") as con:
        left = con.execute("select tip, taken_idx from requeue").fetchall()
    assert left == [(refs[1], combos[0].idx)]  # taken: forgotten at the next resume, once it is known to have run


@pytest.mark.postgres
def test_the_requeue_table_works_on_postgres(make_lab, tmp_path, pg_url):
    """The same stop/resume on a PostgreSQL ledger: the table is created there, a queued combination
    runs after resume, a lost one is dropped, a taken row records the experiment that measured it."""
    import sqlalchemy as sa

    lab = _lab(make_lab, tmp_path / "no-hold", cap=3)
    eng = Engine(lab, tag="q", sandbox_mode="none", db_url=pg_url)
    session = eng.run()
    eng.close()
    refs = git(lab, "for-each-ref", "--format=%(refname) %(objectname)", "refs/nightlab/q/requeue").split()
    assert len(refs) == 2, refs
    db = sa.create_engine(pg_url)
    try:
        with db.begin() as conn:
            conn.execute(sa.text("insert into requeue (session_id, source_idx, tip, rationale, params_json, "
                                 "taken_idx, created_at) values (:s, 2, :tip, 'lost', '{}', NULL, 0)"),
                         {"s": session.id, "tip": "f" * 40})
        sink = MemorySink()
        eng = Engine(lab, tag="q", resume=True, sandbox_mode="none", max_experiments=4, events=sink, db_url=pg_url)
        eng.run()
        exps = eng.ledger.experiments(eng.session.id)
        eng.close()
        combos = [e for e in exps if e.researcher == REBASE]
        assert len(combos) == 1 and combos[0].status is Status.KEEP and combos[0].metric == pytest.approx(1.5)
        drops = [d["why"] for k, _, d in sink.events if k == "requeue.drop"]
        assert drops == ["its commit is gone from the repository"]
        with db.connect() as conn:
            left = conn.execute(sa.text("select tip, taken_idx from requeue")).fetchall()
        assert [tuple(r) for r in left] == [(refs[1], combos[0].idx)]
        assert not (lab / ".nightlab" / "ledger.db").exists()
    finally:
        db.dispose()
