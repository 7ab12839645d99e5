"""The loop end to end with real git, real subprocesses, real SQLite and the scripted researcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from tests.conftest import SPEC, TARGET_PY, cli_env, git, nightlab_cmd

from nightlab.engine import Engine
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.types import STAGES, Status

HAVE_BWRAP = shutil.which("bwrap") is not None
MODES = ["none", pytest.param("required", marks=pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed"))]


def engine(lab: Path, steps, *, mode: str = "none", tag: str = "t", **kw) -> Engine:
    return Engine(lab, tag=tag, researcher=ScriptedResearcher(steps), sandbox_mode=mode, **kw)


def target(x: float, y: float = 0.0) -> str:
    return TARGET_PY.replace("X = 3.0", f"X = {x}").replace("Y = 0.0", f"Y = {y}")


def statuses(eng: Engine) -> list[str]:
    return [e.status.value for e in eng.ledger.experiments(eng.session.id)]


@pytest.mark.parametrize("mode", MODES)
def test_keeps_an_improvement_and_discards_a_regression(make_lab, mode):
    lab = make_lab()
    main_head = git(lab, "rev-parse", "main").strip()
    eng = engine(lab, [{"rationale": "move X to its optimum", "files": {"target.py": target(1.0)}},
                       {"rationale": "overshoot X", "files": {"target.py": target(2.0)}}],
                 mode=mode, max_experiments=2)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    assert [e.status for e in exps] == [Status.KEEP, Status.KEEP, Status.DISCARD]
    assert exps[0].description == "baseline" and exps[0].metric == pytest.approx(8.5)
    assert exps[1].metric == pytest.approx(4.5) and exps[2].metric == pytest.approx(5.5)
    assert exps[0].secondary == {"seed": 0.0}
    assert session.baseline_metric == pytest.approx(8.5) and session.incumbent_metric == pytest.approx(4.5)
    assert session.sandbox == ("bwrap" if mode == "required" else "none")
    # the branch advanced to the kept commit only; main did not move
    head = git(lab, "rev-parse", "nightlab/t").strip()
    assert head == exps[1].commit == session.incumbent_commit
    assert "X = 1.0" in git(lab, "show", "nightlab/t:target.py")
    assert git(lab, "rev-parse", "main").strip() == main_head
    # the discarded idea is still reachable, and its diff is recorded
    assert git(lab, "rev-parse", "refs/nightlab/t/2").strip() == exps[2].commit
    assert "+X = 2.0" in exps[2].diff and "-X = 1.0" in exps[2].diff
    # no worktree is left behind, the lab checkout is untouched
    assert not any((lab / ".nightlab" / "worktrees").iterdir())
    assert (lab / "target.py").read_text() == TARGET_PY
    assert session.status == "finished" and "max_experiments" in session.stop_reason
    assert exps[1].run_s > 0 and exps[1].overhead_s >= 0
    eng.close()


def test_each_stage_is_timed_and_show_prints_it(make_lab):
    """Every experiment's evidence says where its time went; `nightlab show N` prints it as one line."""
    lab = make_lab()
    eng = engine(lab, [{"rationale": "move X to its optimum", "files": {"target.py": target(1.0)}},
                       {"rationale": "edit the evaluator", "files": {"evaluate.py": "print('gamed')\n"}}],
                 max_experiments=2)
    session = eng.run()
    base, kept, rejected = eng.ledger.experiments(session.id)
    eng.close()
    stages = [*STAGES]
    assert stages == ["propose", "guard", "worktree", "run", "measure", "decide", "record", "cleanup"]
    for e in (base, kept):
        timing = e.evidence["timing"]
        assert set(timing) <= set(stages) and set(stages) - {"guard"} <= set(timing)
        assert all(isinstance(v, float) and v >= 0 for v in timing.values())
        assert timing["run"] >= round(e.run_s, 4) - 1e-4  # the stage encloses the run's own wall clock
    assert "guard" in kept.evidence["timing"] and kept.evidence["timing"]["propose"] == round(kept.propose_s, 4)
    # rejected by the guard before any worktree: no run, no cleanup
    assert set(rejected.evidence["timing"]) == {"propose", "record", "guard"}
    out = subprocess.run(nightlab_cmd("show", "--lab", str(lab), "--tag", "t", "1"),
                         env={**cli_env(), "COLUMNS": "250"}, capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("stages"))
    assert [w for w in line.split() if w in stages] == stages, line  # in the pipeline's order
    assert '"timing"' not in out  # not repeated in the evidence line


def test_rejects_protected_and_escaping_edits(make_lab, tmp_path):
    lab = make_lab()
    evil_diff = "--- a/../evil.py\n+++ b/../evil.py\n@@ -0,0 +1 @@\n+print('x')\n"
    eng = engine(lab, [
        {"rationale": "edit the evaluator", "files": {"evaluate.py": "print('gamed')\n"}},
        {"rationale": "escape by ..", "files": {"../evil.py": "print('x')\n"}},
        {"rationale": "escape by abs path", "files": {str(tmp_path / "abs.py"): "x = 1\n"}},
        {"rationale": "escape in a diff", "diff": evil_diff},
        {"rationale": "edit the spec", "replace": {"nightlab.toml": ["budget_s = 5", "budget_s = 500"]}},
    ], max_experiments=5)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)[1:]
    assert [e.status for e in exps] == [Status.REJECTED] * 5
    assert "protected" in exps[0].reason
    assert "escapes" in exps[1].reason and "escapes" in exps[2].reason and "escapes" in exps[3].reason
    assert "protected" in exps[4].reason
    assert not (lab.parent / "evil.py").exists() and not (tmp_path / "abs.py").exists()
    assert (lab / "evaluate.py").read_text() == "print('protected')\n"
    assert git(lab, "rev-parse", "nightlab/t").strip() == session.base_commit
    eng.close()


def test_rejects_a_symlink_created_by_a_diff(make_lab):
    spec = SPEC.replace('editable = ["target.py"]', 'editable = ["target.py", "*.txt"]')
    lab = make_lab(files={"notes.txt": "hi\n"}, spec=spec)
    diff = ("diff --git a/leak.txt b/leak.txt\nnew file mode 120000\nindex 0000000..1111111\n"
            "--- /dev/null\n+++ b/leak.txt\n@@ -0,0 +1 @@\n+/etc/passwd\n\\ No newline at end of file\n")
    eng = engine(lab, [{"rationale": "symlink", "diff": diff}], max_experiments=1)
    session = eng.run()
    exp = eng.ledger.experiments(session.id)[1]
    assert exp.status is Status.REJECTED and "symlink" in exp.reason
    eng.close()


@pytest.mark.parametrize("mode", MODES)
def test_crash_is_recorded_with_its_log_tail_and_the_loop_goes_on(make_lab, mode):
    lab = make_lab()
    crash = "import sys\nprint('about to fail', flush=True)\nraise SystemExit(3)\n"
    nan = "print('---')\nprint('score: nan')\n"
    eng = engine(lab, [{"rationale": "crash", "files": {"target.py": crash}},
                       {"rationale": "nan", "files": {"target.py": nan}},
                       {"rationale": "good", "files": {"target.py": target(1.0, 2.0)}}], mode=mode,
                 max_experiments=3)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    assert [e.status for e in exps] == [Status.KEEP, Status.CRASH, Status.CRASH, Status.KEEP]
    assert exps[1].exit_code == 3 and "about to fail" in exps[1].log_tail and "exit code 3" in exps[1].reason
    assert "nan" in exps[2].reason
    assert session.incumbent_metric == pytest.approx(0.5)
    eng.close()


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_timeout_kills_the_whole_tree(make_lab, tmp_path):
    pidfile = tmp_path / "child.pid"
    stubborn = f'''\
import os, signal, time
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open({str(pidfile)!r}, "w").write(str(os.getpid()))
    while True:
        time.sleep(0.1)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(60)
'''
    spec = SPEC.replace("timeout_s = 20", "timeout_s = 1.5")
    lab = make_lab(spec=spec)
    eng = engine(lab, [{"rationale": "hang", "files": {"target.py": stubborn}}], max_experiments=1)
    session = eng.run()
    exp = eng.ledger.experiments(session.id)[1]
    assert exp.status is Status.TIMEOUT and exp.exit_code is None
    child = int(pidfile.read_text())
    deadline = time.time() + 5
    while _pid_alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(child)
    eng.close()


def test_invalid_edits_and_empty_changes(make_lab):
    lab = make_lab()
    bad_diff = "--- a/target.py\n+++ b/target.py\n@@ -1,1 +1,1 @@\n-THIS LINE IS NOT THERE\n+X = 1\n"
    eng = engine(lab, [{"rationale": "does not apply", "diff": bad_diff},
                       {"rationale": "no change", "files": {"target.py": TARGET_PY}}], max_experiments=2)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)[1:]
    assert [e.status for e in exps] == [Status.INVALID, Status.INVALID]
    assert "did not apply" in exps[0].reason and "changes nothing" in exps[1].reason
    eng.close()


def test_stop_rules_patience_and_crashes_in_row(make_lab):
    lab = make_lab(spec=SPEC.replace("max_experiments = 3", "max_experiments = 50\npatience = 2"))
    eng = engine(lab, [{"rationale": "worse", "files": {"target.py": target(9.0)}}])
    session = eng.run()
    assert session.stop_reason.startswith("patience") and len(statuses(eng)) == 3
    eng.close()
    # crashes of candidates while the incumbent still runs (a health check re-runs it after each
    # streak of 2) go on until 4x the limit: the researcher is told, the lab is not broken
    lab2 = make_lab(spec=SPEC.replace("max_experiments = 3", "max_experiments = 50\nmax_crashes_in_row = 2"))
    eng = engine(lab2, [{"rationale": "crash", "files": {"target.py": "raise SystemExit(1)\n"}}], tag="c")
    session = eng.run()
    assert "finds nothing that runs" in session.stop_reason and statuses(eng) == ["keep"] + ["crash"] * 8
    assert len(list(eng.artifacts_dir.glob("health-c-*.log"))) == 3  # after crashes 2, 4 and 6
    eng.close()


def test_a_broken_lab_stops_after_the_crash_streak(make_lab, tmp_path):
    """The baseline removes the data every run needs: candidates crash, and so does the incumbent's
    health check, so the session stops at max_crashes_in_row saying the lab is broken."""
    flag = tmp_path / "data-present"
    flag.write_text("1")
    broken = TARGET_PY.replace("import os, sys", f"import os, sys, pathlib\nF = pathlib.Path({str(flag)!r})\n"
                               "if not F.exists(): raise SystemExit('data gone')\nF.unlink()")
    assert broken != TARGET_PY
    lab = make_lab(files={"target.py": broken},
                   spec=SPEC.replace("max_experiments = 3", "max_experiments = 50\nmax_crashes_in_row = 2"))
    eng = engine(lab, [{"rationale": "fine", "files": {"target.py": broken.replace("X = 3.0", "X = 2.0")}}])
    session = eng.run()
    assert statuses(eng) == ["keep", "crash", "crash"]
    assert "the lab is broken" in session.stop_reason, session.stop_reason
    eng.close()


def test_stop_file_stops_gracefully(make_lab):
    lab = make_lab(spec=SPEC.replace("max_experiments = 3", "max_experiments = 50"))

    def step(ctx):
        if ctx.idx == 2:
            (lab / ".nightlab" / "STOP").write_text("")
        from nightlab.types import Candidate
        return Candidate(parent=ctx.parent, rationale=f"x{ctx.idx}", files={"target.py": target(3.0 - ctx.idx / 10)})

    eng = engine(lab, [step])
    session = eng.run()
    assert session.stop_reason == "STOP file" and session.status == "stopped"
    assert statuses(eng) == ["keep", "keep"]  # the prepared candidate #2 never started
    assert not (lab / ".nightlab" / "STOP").exists()
    eng.close()


def test_a_lab_in_a_subfolder(make_lab):
    lab = make_lab(sub="labs/one")
    eng = engine(lab, [{"rationale": "opt", "files": {"target.py": target(1.0, 2.0)}}], max_experiments=1)
    session = eng.run()
    assert statuses(eng) == ["keep", "keep"] and session.incumbent_metric == pytest.approx(0.5)
    assert "X = 1.0" in git(lab, "show", "nightlab/t:labs/one/target.py")
    eng.close()


# ---------------------------------------------------------------------------- real signals


def _slow_lab(make_lab, sleep_s: float):
    slow = f"import time\ntime.sleep({sleep_s})\nprint('---')\nprint('score: 0.1')\n"
    lab = make_lab(spec=SPEC.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"'))
    (lab / "steps.json").write_text(json.dumps([{"rationale": "slow", "files": {"target.py": slow}}]))
    return lab


def _wait_for_running(lab: Path, idx: int, timeout: float = 30) -> None:
    db = lab / ".nightlab" / "ledger.db"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if db.exists():
            try:
                with sqlite3.connect(db) as con:
                    row = con.execute("select status, pid from experiments where idx=?", (idx,)).fetchone()
                if row and row[0] == "running" and row[1]:
                    return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"experiment {idx} never started running")


def _fast_steps(lab: Path) -> None:
    (lab / "steps.json").write_text(json.dumps(
        [{"rationale": "fast", "files": {"target.py": target(1.0)}},
         {"rationale": "worse", "files": {"target.py": target(2.0)}}]))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_a_real_signal_loses_nothing(make_lab, sig):
    lab = _slow_lab(make_lab, 30)
    proc = subprocess.Popen(nightlab_cmd("run", "--lab", str(lab), "--tag", "r", "--plain", "--sandbox", "none"),
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_running(lab, 1)
        with sqlite3.connect(lab / ".nightlab" / "ledger.db") as con:
            run_pid = con.execute("select pid from experiments where idx=1").fetchone()[0]
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, out
        assert "Traceback" not in out
    else:
        assert proc.returncode == -9
    _fast_steps(lab)
    res = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--resume", "--plain", "--sandbox", "none"),
                         env=cli_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    with sqlite3.connect(lab / ".nightlab" / "ledger.db") as con:
        rows = con.execute("select idx, status, reason from experiments order by idx").fetchall()
        sess = con.execute("select status, stop_reason, incumbent_metric from sessions").fetchone()
    assert [r[:2] for r in rows] == [(0, "keep"), (1, "interrupted"), (2, "keep"), (3, "discard")]
    assert ("orphaned" in rows[1][2]) if sig == signal.SIGKILL else ("SIGINT" in rows[1][2])
    assert sess[0] == "finished" and sess[2] == pytest.approx(4.5)
    assert not _pid_alive(run_pid)  # the orphaned run was killed (by the signal handler or by resume)
    assert not any((lab / ".nightlab" / "worktrees").iterdir())
    assert len(git(lab, "worktree", "list").strip().splitlines()) == 1


def test_sigterm_stops_after_the_experiment_in_flight(make_lab):
    lab = _slow_lab(make_lab, 2)
    proc = subprocess.Popen(nightlab_cmd("run", "--lab", str(lab), "--tag", "s", "--plain", "--sandbox", "none"),
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_running(lab, 1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    with sqlite3.connect(lab / ".nightlab" / "ledger.db") as con:
        rows = con.execute("select idx, status from experiments order by idx").fetchall()
        sess = con.execute("select status, stop_reason from sessions").fetchone()
    assert rows == [(0, "keep"), (1, "keep")]
    assert sess == ("stopped", "stopped by SIGTERM")


def test_existing_session_without_resume_is_a_usage_error(make_lab):
    lab = make_lab()
    eng = engine(lab, [{"rationale": "x", "files": {"target.py": target(1.0)}}], max_experiments=1)
    eng.run()
    eng.close()
    res = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--tag", "t", "--plain"), env=cli_env(),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--resume" in res.stderr and "Traceback" not in res.stderr
    assert os.environ.get("NIGHTLAB_DB") is None


def test_every_step_is_emitted_as_an_event(make_lab):
    from nightlab.events import MemorySink

    lab = make_lab()
    sink = MemorySink()
    eng = engine(lab, [{"rationale": "opt", "files": {"target.py": target(1.0)}},
                       {"rationale": "bad", "files": {"evaluate.py": "x"}}], max_experiments=2, events=sink)
    eng.run()
    kinds = sink.kinds()
    assert kinds[0] == "session.start" and kinds[-1] == "session.stop"
    for k in ("researcher.request", "researcher.response", "candidate", "guard", "git.commit", "sandbox.start",
              "sandbox.exit", "measurement", "decision", "git.advance"):
        assert k in kinds, k
    decisions = [d for k, _, d in sink.events if k == "decision"]
    assert [d["status"] for d in decisions] == ["keep", "keep", "rejected"]
    eng.close()
