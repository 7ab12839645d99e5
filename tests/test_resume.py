"""What a SIGKILLed harness leaves behind, and what ``nightlab run --resume`` must clean up.

Real harness processes (``python -m nightlab run`` in a subprocess), real SIGKILLs, real git
(a ``git worktree add`` killed mid-checkout), real bwrap, real /proc. Survivors are found by
a marker in their command line, independently of the ``NIGHTLAB_RUN_ID`` tag resume relies on.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import SPEC, cli_env, git, nightlab_cmd
from tests.test_engine import _fast_steps, _wait_for_running

from nightlab import sandbox
from nightlab.workspace import Workspace

HAVE_BWRAP = shutil.which("bwrap") is not None
MODES = ["none", pytest.param("required", marks=pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed"))]

# A run that leaves children every way a process can leave its parent's group and session.
# The marker (a sleep length) makes them findable without trusting the run-id tag.
CHILDREN_RUN = '''\
import os, subprocess, sys, time
M = "{marker}"
subprocess.Popen(f"setsid sleep {{M}}1 &", shell=True)
subprocess.Popen(f"nohup sleep {{M}}2 >/dev/null 2>&1 &", shell=True)
if os.fork() == 0:  # double fork + setsid: reparented to init, its own session
    if os.fork() == 0:
        os.setsid()
        os.execvp("sleep", ["sleep", M + "3"])
    os._exit(0)
{extra}
time.sleep(60)
print("---")
print("score: 0.1")
'''
# Only inside bwrap is this covered: the child clears its environment (no tag), but it lives in the
# sandbox's PID namespace, which dies with the killed bwrap.
ENV_CLEARED = 'subprocess.Popen(f"env -i setsid sleep {M}4 &", shell=True)'


def _marker() -> str:
    return f"{1000 + secrets.randbelow(8000)}.{secrets.randbelow(10**6):06d}"


def _with_marker(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``marker``."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def _kill_markers(marker: str) -> None:
    for pid in _with_marker(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _children_lab(make_lab, marker: str, extra: str = ""):
    run = CHILDREN_RUN.format(marker=marker, extra=extra)
    lab = make_lab(spec=SPEC.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"'))
    (lab / "steps.json").write_text(json.dumps([{"rationale": "children", "files": {"target.py": run}}]))
    return lab


def _wait(cond, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _resume(lab: Path, mode: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--resume", "--plain", "--sandbox", mode, *extra),
                          env=cli_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", MODES)
def test_no_run_process_survives_a_sigkill_and_resume(make_lab, mode):
    marker = _marker()
    extra = ENV_CLEARED if mode == "required" else ""
    want = 4 if mode == "required" else 3
    lab = _children_lab(make_lab, marker, extra)
    proc = subprocess.Popen(nightlab_cmd("run", "--lab", str(lab), "--tag", "r", "--plain", "--sandbox", mode),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_running(lab, 1)
        _wait(lambda: len(_with_marker(marker)) >= want, what="the run's background children")
        proc.kill()
        proc.wait(timeout=10)
        if mode == "none":  # without a PID namespace they outlive the harness, as on main
            assert len(_with_marker(marker)) >= want
        _fast_steps(lab)
        res = _resume(lab, mode)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _with_marker(marker) == []
        with sqlite3.connect(lab / ".nightlab" / "ledger.db") as con:
            rows = con.execute("select idx, status, reason from experiments order by idx").fetchall()
            kinds = {r[0] for r in con.execute("select kind from runs")}
        assert rows[1][1] == "interrupted"
        if mode == "none":  # under bwrap the namespace died with the harness (--die-with-parent)
            assert "run killed" in rows[1][2]
        assert kinds == {"run"}
        assert not any((lab / ".nightlab" / "worktrees").iterdir())
        assert len(git(lab, "worktree", "list").splitlines()) == 1  # no registration left, reused ones included
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_markers(marker)


def test_finished_runs_leave_no_background_children(make_lab):
    """Unsandboxed, a run that exits normally used to leave its setsid/double-forked children."""
    marker = _marker()
    lab = _children_lab(make_lab, marker)
    quick = CHILDREN_RUN.format(marker=marker, extra="").replace("time.sleep(60)", "time.sleep(0.5)")
    (lab / "steps.json").write_text(json.dumps([{"rationale": "children", "files": {"target.py": quick}}]))
    try:
        res = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--tag", "f", "--plain", "--sandbox", "none",
                                          "--max-experiments", "1"),
                             env=cli_env(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _with_marker(marker) == []
    finally:
        _kill_markers(marker)


def _harness_children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return out


@pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed")
def test_harness_killed_right_after_starting_bwrap(make_lab):
    """The harness dies within milliseconds of exec'ing bwrap: before the pid reaches the ledger and,
    some of the time, before ``--die-with-parent`` takes hold. Resume must still find the sandbox."""
    marker = _marker()
    lab = _children_lab(make_lab, marker)
    first = True
    try:
        for _attempt in range(3):
            args = ["--tag", "race"] if first else ["--resume"]
            proc = subprocess.Popen(nightlab_cmd("run", "--lab", str(lab), *args, "--plain", "--sandbox", "required"),
                                    env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            first = False
            deadline = time.time() + 60
            hit = False
            while time.time() < deadline and proc.poll() is None and not hit:
                for child in _harness_children(proc.pid):
                    try:
                        comm = Path(f"/proc/{child}/comm").read_text().strip()
                    except OSError:
                        continue
                    # the baseline's bwrap comes first; kill at the candidate's (its run id, committed
                    # before the spawn, is the second; its row is written only after the spawn)
                    if comm == "bwrap" and _run_ids(lab) >= 2:
                        proc.kill()
                        hit = True
                        break
            proc.wait(timeout=10)
            assert hit, "the harness never started bwrap"
        _fast_steps(lab)
        res = _resume(lab, "required")
        assert res.returncode == 0, res.stdout + res.stderr
        assert _with_marker(marker) == []
        run_ids = {r for (r,) in _query(lab, "select run_id from runs")}
        assert sandbox.find_tagged(run_ids) == {}
    finally:
        _kill_markers(marker)
        sandbox.kill_tagged(lambda rid: rid.startswith("race."))


def _query(lab: Path, sql: str) -> list[tuple]:
    db = lab / ".nightlab" / "ledger.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as con:
            return con.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


def _runs(lab: Path) -> int:
    """Experiment rows (a run's row is written right after its spawn)."""
    rows = _query(lab, "select count(*) from experiments")
    return int(rows[0][0]) if rows else 0


def _run_ids(lab: Path) -> int:
    """Run ids committed (each before its process is spawned)."""
    rows = _query(lab, "select count(*) from runs")
    return int(rows[0][0]) if rows else 0


# The harness dies in the window between a run's spawn and its row (a SIGKILL at that exact point): the
# run id was committed before the spawn, so resume finds the run and its children by their tag.
DIE_AFTER_SPAWN = '''\
import os, signal, sys
from nightlab import ledger
real = ledger.Ledger.start_experiment
def start_experiment(self, *a, **kw):
    if kw.get("pid") and kw.get("idx") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *a, **kw)
ledger.Ledger.start_experiment = start_experiment
from nightlab.cli.main import main
sys.argv[0] = "nightlab"
main()
'''


NEEDS_BWRAP = pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed")


@pytest.mark.parametrize(("mode", "pipeline"), [("none", False), pytest.param("required", False, marks=NEEDS_BWRAP),
                                                ("none", True)])
def test_a_harness_killed_between_a_spawn_and_its_row_leaves_no_run_behind(make_lab, tmp_path, mode, pipeline):
    marker = _marker()
    lab = _children_lab(make_lab, marker)
    if pipeline:  # #1 is staged while the baseline runs: its run id is committed by the staging thread
        spec = (lab / "nightlab.toml").read_text().replace("pipeline = false", "pipeline = true")
        (lab / "nightlab.toml").write_text(spec)
        git(lab, "commit", "-qam", "pipelined")
    script = tmp_path / "die_after_spawn.py"
    script.write_text(DIE_AFTER_SPAWN)
    res = subprocess.run([sys.executable, str(script), "run", "--lab", str(lab), "--tag", "d", "--plain",
                          "--sandbox", mode], env=cli_env(), capture_output=True, text=True, timeout=120)
    try:
        assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr
        assert _runs(lab) == 1 and _run_ids(lab) >= 2  # the baseline's row; #1's run id (#2's, staged), no row
        if mode == "none":  # its children outlive the harness: only the tag finds them
            _wait(lambda: len(_with_marker(marker)) >= 3, what="the run's background children")
        _fast_steps(lab)
        res = _resume(lab, mode)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _with_marker(marker) == []
        rows = _query(lab, "select idx, status from experiments order by idx")
        assert rows[0] == (0, "keep") and all(status != "running" for _, status in rows)
        assert not any((lab / ".nightlab" / "worktrees").iterdir())
        assert len(git(lab, "worktree", "list").splitlines()) == 1
        run_ids = {r for (r,) in _query(lab, "select run_id from runs")}
        assert sandbox.find_tagged(run_ids) == {}
    finally:
        _kill_markers(marker)


# ---------------------------------------------------------------------------- locked worktrees


def _kill_inside_worktree_add(repo: Path, path: Path) -> None:
    """Run ``git worktree add`` and SIGKILL its process group once git has locked the registration."""
    proc = subprocess.Popen(["git", "worktree", "add", "--detach", str(path), "HEAD"], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    admin = repo / ".git" / "worktrees" / path.name
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None and not (admin / "locked").exists():
        time.sleep(0.0005)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _many_files(make_lab, n: int = 4000, **kw) -> Path:
    lab = make_lab(**kw)
    for i in range(n):
        (lab / f"data_{i}.txt").write_text(f"{i}\n" * 20)
    git(lab, "add", "-A")
    git(lab, "commit", "-q", "-m", "many files: a slow checkout")
    return lab


def test_resume_unlocks_and_prunes_a_worktree_git_left_locked(make_lab):
    lab = _many_files(make_lab, spec=SPEC.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"'))
    _fast_steps(lab)
    res = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--tag", "w", "--plain", "--sandbox", "none",
                                      "--max-experiments", "1"), env=cli_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    # a user's own locked worktree, outside .nightlab, must survive the cleanup (made first: once a kill has
    # cut git's writes short, git cannot add another worktree until the half-made registration is gone)
    git(lab, "worktree", "add", "--detach", "--lock", str(lab.parent / "w-mine"), "HEAD")
    wts = lab / ".nightlab" / "worktrees"
    wts.mkdir(exist_ok=True)
    for _ in range(20):  # until the kill lands mid-add (git's "initializing" lock left behind)
        _kill_inside_worktree_add(lab, wts / "w-7")
        if (lab / ".git" / "worktrees" / "w-7" / "locked").exists():
            break
        shutil.rmtree(wts / "w-7", ignore_errors=True)
        git(lab, "worktree", "prune")
    locked = lab / ".git" / "worktrees" / "w-7" / "locked"
    assert locked.read_text().strip() in ("initializing", "")  # "" when killed inside git's write
    git(lab, "worktree", "prune")
    assert locked.exists()  # git alone keeps it forever (listed as locked once gitdir was written)
    if (locked.parent / "gitdir").exists():
        # listed as locked — or, when the kill cut git's own writes short, a registration git cannot even
        # list (`git worktree list` exits 128): stuck either way until nightlab cleans it up below
        listed = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=lab, capture_output=True, text=True)
        assert "w-7" in listed.stdout or listed.returncode == 128, listed.stdout + listed.stderr
    res = _resume(lab, "none", "--max-experiments", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    listing = git(lab, "worktree", "list", "--porcelain")
    assert "w-7" not in listing and not (wts / "w-7").exists()
    assert not (lab / ".git" / "worktrees" / "w-7").exists()
    assert "w-mine" in listing and (lab.parent / "w-mine").exists()
    # the name is usable again
    ws = Workspace(lab)
    ws.remove_worktree(ws.add_worktree("w-7", git(lab, "rev-parse", "HEAD").strip()))


def test_locked_registration_without_gitdir_is_ours_only_when_named_and_initializing(make_lab):
    """git dies between writing ``locked`` and ``gitdir``: only the name and git's lock text tell it apart."""
    lab = make_lab()
    ws = Workspace(lab)
    admin_root = ws.git_dir / "worktrees"
    for name, text in (("s-3", "initializing\n"), ("s-5", ""), ("s-4", "my reason\n"),
                       ("other-1", "initializing\n")):
        (admin_root / name).mkdir(parents=True)
        (admin_root / name / "locked").write_text(text)
    # killed inside the write of `gitdir`: a path cut short, naming no file
    (admin_root / "s-6").mkdir()
    (admin_root / "s-6" / "locked").write_text("initializing\n")
    (admin_root / "s-6" / "gitdir").write_text(str(ws.worktrees_dir)[:-4])
    ws.remove_stale_worktrees("s-")
    assert not (admin_root / "s-3").exists() and not (admin_root / "s-5").exists()
    assert not (admin_root / "s-6").exists()
    assert (admin_root / "s-4" / "locked").exists() and (admin_root / "other-1" / "locked").exists()


def test_resume_while_the_session_still_runs_is_refused_and_kills_nothing(make_lab):
    marker = _marker()
    lab = _children_lab(make_lab, marker)
    proc = subprocess.Popen(nightlab_cmd("run", "--lab", str(lab), "--tag", "live", "--plain", "--sandbox", "none"),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_running(lab, 1)
        _wait(lambda: len(_with_marker(marker)) >= 3, what="the run's background children")
        before = set(_with_marker(marker))
        res = _resume(lab, "none")
        assert res.returncode == 2, res.stdout + res.stderr
        assert "running in another nightlab process" in res.stderr and f"pid {proc.pid}" in res.stderr
        assert "Traceback" not in res.stderr
        assert before <= set(_with_marker(marker)) and proc.poll() is None
        rows = _query(lab, "select status from experiments where idx = 1")
        assert rows == [("running",)]
    finally:
        proc.kill()
        proc.wait()
        _kill_markers(marker)


@pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed")
def test_resume_kills_a_sandbox_that_outlived_its_harness(make_lab):
    """The state the bwrap start race leaves, made deterministically: a bwrap (without a parent to die
    with) whose PID namespace holds a setsid child and one that cleared its environment. Its run id is
    in the ledger, as the engine writes it before every spawn; resume kills bwrap and the namespace."""
    from nightlab.ledger import Ledger

    marker = _marker()
    lab = make_lab(spec=SPEC.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"'))
    _fast_steps(lab)
    res = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--tag", "ns", "--plain", "--sandbox", "none",
                                      "--max-experiments", "1"), env=cli_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    with Ledger.for_lab(lab) as ledger:
        session = ledger.get_session("ns")
        assert session is not None
        ledger.record_run(session.id, "ns.9.run.deadbeefdeadbeef", "run", 9)
    inner = f"setsid sleep {marker}1 & env -i setsid sleep {marker}2 & exec sleep {marker}3"
    bwrap = subprocess.Popen(["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid",
                              "--", "/bin/sh", "-c", inner],
                             env={**os.environ, "NIGHTLAB_RUN_ID": "ns.9.run.deadbeefdeadbeef"},
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: len(_with_marker(marker)) >= 3, what="the sandbox's processes")
        res = _resume(lab, "none", "--max-experiments", "1")
        assert res.returncode == 0, res.stdout + res.stderr
        assert bwrap.wait(timeout=10) == -signal.SIGKILL
        assert _with_marker(marker) == []  # the env-cleared child too: it died with the namespace
        assert "killed" in res.stdout
    finally:
        if bwrap.poll() is None:
            bwrap.kill()
        _kill_markers(marker)


EVAL_SPEC = SPEC.replace("[metric]", '''[evaluate]
command = "python evaluate.py"
outputs = ["out.json"]

[metric]''')
TARGET_OUT = 'import json\njson.dump({"score": 1.5}, open("out.json", "w"))\n'
SLOW_EVALUATE = '''\
import json, os, subprocess, time
if os.path.exists("{flag}"):
    subprocess.run(["sleep", "{marker}"])
print("---")
print("score: %f" % json.load(open("out.json"))["score"])
'''


def test_resume_removes_the_clean_trees_and_evaluator_a_killed_harness_left(make_lab, tmp_path):
    """A harness SIGKILLed while its evaluator ran left ``.nightlab/eval/<tag>/eval-*`` (the clean tree,
    with the run's outputs in it) and the evaluator process; resume kills the one and removes the other,
    and leaves another session's folder alone."""
    marker, flag = _marker(), tmp_path / "slow-evaluator"
    flag.write_text("1")
    lab = make_lab(files={"target.py": TARGET_OUT, "evaluate.py": SLOW_EVALUATE.format(flag=flag, marker=marker)},
                   spec=EVAL_SPEC.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"'))
    (lab / "steps.json").write_text(json.dumps(
        [{"rationale": "better", "files": {"target.py": TARGET_OUT.replace("1.5", "0.5")}}]))
    other = lab / ".nightlab" / "eval" / "other" / "eval-live"
    other.mkdir(parents=True)
    proc = subprocess.Popen(nightlab_cmd("run", "--lab", str(lab), "--tag", "r", "--plain", "--sandbox", "none"),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: len(_with_marker(marker)) >= 1, what="the evaluator of the baseline")
        root = lab / ".nightlab" / "eval"

        def trees() -> list[Path]:
            return [p for p in root.rglob("eval-*") if p != other]

        assert len(trees()) == 1
        proc.kill()
        proc.wait(timeout=10)
        flag.unlink()
        res = _resume(lab, "none")
        assert res.returncode == 0, res.stdout + res.stderr
        assert _with_marker(marker) == []
        assert trees() == []
        assert other.is_dir()
        with sqlite3.connect(lab / ".nightlab" / "ledger.db") as con:
            rows = con.execute("select idx, status from experiments order by idx").fetchall()
        assert rows[0][1] == "interrupted" and [s for _, s in rows[1:3]] == ["keep", "keep"]
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_markers(marker)
