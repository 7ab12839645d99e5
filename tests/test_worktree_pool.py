"""Worktrees with reused registrations (workspace.py): fresh folders, parallel checkouts, clean-up.

Real git, real threads, real sessions (scripted researcher, bwrap where installed): a run that leaves
every kind of debris is followed by a run in the same slot that looks for it; eight checkouts at once
share no lock; a killed harness's registrations (and an agent's scratch worktree) go on ``--resume``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from tests.conftest import SPEC, cli_env, git, nightlab_cmd
from tests.test_engine import _fast_steps

from nightlab.engine import Engine
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.workspace import POOL_LOCK, Workspace

HAVE_BWRAP = shutil.which("bwrap") is not None
MODES = ["none", pytest.param("required", marks=pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed"))]


def _registrations(lab: Path) -> list[str]:
    admin = lab / ".git" / "worktrees"
    return sorted(p.name for p in admin.iterdir()) if admin.exists() else []


# ---------------------------------------------------------------------------- the workspace alone


def test_a_registration_is_made_once_and_reused_then_dropped(make_lab):
    lab = make_lab()
    ws = Workspace(lab)
    head = git(lab, "rev-parse", "HEAD").strip()
    git(lab, "commit", "-q", "--allow-empty", "-m", "second")
    second = git(lab, "rev-parse", "HEAD").strip()
    for i, commit in enumerate([head, second, head, second]):
        wt = ws.add_worktree(f"p-{i}", commit)
        assert _registrations(lab) == ["p-0"]  # named after the first folder it served
        assert (wt / ".git").read_text() == f"gitdir: {ws.git_dir / 'worktrees' / 'p-0'}\n"
        assert (ws.git_dir / "worktrees" / "p-0" / "gitdir").read_text() == f"{wt / '.git'}\n"
        assert (ws.git_dir / "worktrees" / "p-0" / "locked").read_text().strip() == POOL_LOCK
        # git itself sees a clean checkout of the commit, from outside and from inside the folder
        assert git(wt, "rev-parse", "HEAD").strip() == commit
        assert git(wt, "status", "--porcelain", "--ignored") == ""
        assert str(wt) in git(lab, "worktree", "list")
        ws.remove_worktree(wt)
        assert not wt.exists()
    git(lab, "worktree", "prune")  # a user's prune between experiments keeps the locked registration
    assert _registrations(lab) == ["p-0"]
    assert ws.drop_registrations() == 1
    assert _registrations(lab) == [] and len(git(lab, "worktree", "list").splitlines()) == 1


def _at_once(ws: Workspace, jobs: list[tuple[str, str]]) -> tuple[dict[int, Path], list[BaseException]]:
    """``add_worktree`` for every (name, commit) from its own thread, released together."""
    out: dict[int, Path] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def checkout(i: int) -> None:
        try:
            barrier.wait()
            out[i] = ws.add_worktree(*jobs[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=checkout, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, errors


def test_eight_checkouts_at_once_each_get_their_own_commit(make_lab):
    """No lock is shared by the checkouts: run in parallel, each folder holds exactly its commit."""
    lab = make_lab()
    commits = []
    for i in range(8):
        (lab / "target.py").write_text(f"X = {i}\n")
        git(lab, "commit", "-qam", f"c{i}")
        commits.append(git(lab, "rev-parse", "HEAD").strip())
    ws = Workspace(lab)
    for rnd in range(3):
        out, errors = _at_once(ws, [(f"c-{rnd}-{i}", commits[i]) for i in range(8)])
        assert errors == []
        for i, wt in out.items():
            assert (wt / "target.py").read_text() == f"X = {i}\n"
            assert git(wt, "rev-parse", "HEAD").strip() == commits[i]
            assert git(wt, "status", "--porcelain") == ""
        assert len(_registrations(lab)) <= 8
        for wt in out.values():
            ws.remove_worktree(wt)
    assert len(_registrations(lab)) <= 8  # reused in rounds 2 and 3, not made anew
    ws.drop_registrations()
    assert _registrations(lab) == [] and not any(ws.worktrees_dir.iterdir())


def test_stage_reports_what_git_diff_reports(make_lab):
    """One ``diff --raw -p -z`` launch: the changes are what ``--no-renames --raw`` lists, the patch is what
    ``git diff --cached`` prints."""
    weird = ["tab\there.py", "é.txt", 'q"uote.txt', "new\nline.txt", "sp ace.py"]
    lab = make_lab(files={"old.py": "a\n" * 20, "gone.py": "g\n", "mode.sh": "echo\n", "bin.dat": "x"})
    ws = Workspace(lab)
    wt = ws.add_worktree("s-1", git(lab, "rev-parse", "HEAD").strip())
    (wt / "old.py").rename(wt / "renamed.py")  # a rename: the patch follows diff.renames, the changes do not
    (wt / "gone.py").unlink()
    os.chmod(wt / "mode.sh", 0o755)
    (wt / "bin.dat").write_bytes(b"\0\1\2binary")
    (wt / "target.py").write_text("X = 9\n")
    os.symlink("target.py", wt / "link.py")
    for name in weird:
        (wt / name).write_text("w\n")
    staged = ws.stage(wt)
    at = [f"--git-dir={ws.git_dir / 'worktrees' / 's-1'}", f"--work-tree={wt}"]
    assert staged.diff == git(wt, *at, "diff", "--cached", "--no-color", "--no-ext-diff", "HEAD")
    raw = git(wt, *at, "diff", "--cached", "--raw", "-z", "--no-renames", "HEAD").split("\0")
    want = sorted((raw[i][1:].split()[4][0], raw[i + 1], raw[i][1:].split()[1])
                  for i in range(0, len(raw) - 1, 2))
    assert sorted((c.status, c.path, c.new_mode) for c in staged.changes) == want
    assert {c.path for c in staged.changes} >= {"old.py", "renamed.py", "gone.py", "mode.sh", "link.py", *weird}
    assert "rename from old.py" in staged.diff
    sha, diff = ws.commit_staged(wt, "msg", staged)
    assert sha == git(lab, "rev-parse", f"{sha}^{{commit}}").strip() and diff == staged.diff
    assert git(wt, "rev-parse", "HEAD").strip() == sha and git(wt, "status", "--porcelain") == ""
    # not a single `git maintenance` behind each commit: the commit ran with maintenance.auto off
    ws.remove_worktree(wt)
    ws.drop_registrations()


# ---------------------------------------------------------------------------- a run's debris


DEBRIS_RUN = '''\
import os, sys
# candidate {n}
found = [p for p in ("ignored.out", "nested", "nested/.git/HEAD", "ro", "ro/inside.txt", "ro_file.txt",
                     "link_out", "dangling", "untracked.txt", "sub/deep/made.txt") if os.path.lexists(p)]
pointer = open(".git").read() if os.path.isfile(".git") else "<not a file>"
if not pointer.startswith("gitdir: ") or "planted" in pointer:
    found.append(".git: " + pointer.strip())
# leave all of it for the next run in this slot
open("ignored.out", "w").write("x")
open("untracked.txt", "w").write("x")
os.makedirs("nested/.git", exist_ok=True)
open("nested/.git/HEAD", "w").write("ref: refs/heads/main\\n")
os.makedirs("ro", exist_ok=True)
open("ro/inside.txt", "w").write("x")
os.chmod("ro", 0o555)
open("ro_file.txt", "w").write("x")
os.chmod("ro_file.txt", 0o444)
os.makedirs("sub/deep", exist_ok=True)
open("sub/deep/made.txt", "w").write("x")
for src, dst in (("/etc", "link_out"), ("/nonexistent", "dangling")):
    if not os.path.lexists(dst):
        os.symlink(src, dst)
try:  # read-only under bwrap; outside a sandbox the harness must not trust it either
    open(".git", "w").write("gitdir: /tmp/planted\\n")
except OSError:
    pass
print("found:", found, file=sys.stderr)
print("---")
print(f"score: {{len(found)}}")
'''


@pytest.mark.parametrize("mode", MODES)
def test_nothing_a_run_leaves_reaches_the_next_run_in_its_slot(make_lab, mode):
    spec = SPEC.replace('secondary = ["seed"]\n', "").replace("max_experiments = 3", "max_experiments = 3\n"
                                                                "max_crashes_in_row = 0")
    lab = make_lab(files={"target.py": DEBRIS_RUN.format(n=0), ".gitignore": "*.out\n"}, spec=spec)
    steps = [{"rationale": f"try {n}", "files": {"target.py": DEBRIS_RUN.format(n=n)}} for n in (1, 2, 3)]
    eng = Engine(lab, tag="d", researcher=ScriptedResearcher(steps), sandbox_mode=mode, max_experiments=3)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    assert len(exps) == 4 and all(e.metric == 0 for e in exps), [(e.status, e.metric, e.log_tail) for e in exps]
    assert [e.status.value for e in exps] == ["keep", "discard", "discard", "discard"]
    assert not any((lab / ".nightlab" / "worktrees").iterdir()) and _registrations(lab) == []
    assert not Path("/tmp/planted").exists()


# ---------------------------------------------------------------------------- kills and resumes


def test_a_killed_harness_s_registrations_go_with_its_prefix_only(make_lab):
    lab = make_lab()
    head = git(lab, "rev-parse", "HEAD").strip()
    ws = Workspace(lab)  # the killed harness: two free registrations and one in use, never dropped
    a, b = ws.add_worktree("s-1", head), ws.add_worktree("s-2", head)
    ws.remove_worktree(a)
    theirs = Workspace(lab)  # another session's harness (its own tag, its own pool)
    theirs.remove_worktree(theirs.add_worktree("other-1", head))
    assert _registrations(lab) == ["other-1", "s-1", "s-2"]
    git(lab, "worktree", "prune")
    assert _registrations(lab) == ["other-1", "s-1", "s-2"]  # locked: git's prune keeps them
    removed = Workspace(lab).remove_stale_worktrees("s-")
    assert removed == [b]
    assert _registrations(lab) == ["other-1"] and not b.exists()


def _run_cli(lab: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--plain", "--sandbox", "none", *args),
                          env=cli_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("other_running", [False, True])
def test_resume_removes_an_agent_s_scratch_worktree(make_lab, other_running):
    """A kill during an agent's proposal leaves its worktree, prompt and log: ``--resume`` removes them,
    the tagged ones always, the untagged ones of older versions when no other session runs in the lab."""
    lab = make_lab(spec=SPEC.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"'))
    _fast_steps(lab)
    res = _run_cli(lab, "--tag", "r", "--max-experiments", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    head = git(lab, "rev-parse", "HEAD").strip()
    wts = lab / ".nightlab" / "worktrees"
    ws = Workspace(lab)  # what the agent researcher made, as a killed harness leaves it
    tagged = ws.add_worktree("r-agent-4", head)
    git(lab, "worktree", "add", "-q", "--detach", str(wts / "agent-3"), head)  # an older version's name
    for name in ("r-agent-4", "agent-3"):
        (wts / f"{name}.prompt.md").write_text("prompt")
        (wts / f"{name}.log").write_text("log")
    if other_running:  # another session's harness holds its lock: this process stands in for it
        (lab / ".nightlab" / "session-other.lock").write_text(f"{os.getpid()}\n")
    res = _run_cli(lab, "--resume", "--max-experiments", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert not tagged.exists() and "r-agent-4" not in _registrations(lab)
    assert not (wts / "r-agent-4.prompt.md").exists() and not (wts / "r-agent-4.log").exists()
    legacy = sorted(p.name for p in wts.iterdir())
    if other_running:
        assert legacy == ["agent-3", "agent-3.log", "agent-3.prompt.md"] and _registrations(lab) == ["agent-3"]
    else:
        assert legacy == [] and _registrations(lab) == []
        assert len(git(lab, "worktree", "list").splitlines()) == 1
