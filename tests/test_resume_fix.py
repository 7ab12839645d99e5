"""Resume after the user's fix, and a dirty working tree: the real CLI (a subprocess), real git.

Issue 17, items 1 and 2: a session whose baseline failed on a wrong metric name, fixed and
committed by the user, must re-baseline from the new HEAD with the new metric; a later resume
must not run the baseline again; harmless spec changes continue, material ones are refused
with exit 2 and a fix; uncommitted editable/protected/spec files are refused, or snapshotted
with --allow-dirty without touching the user's index or HEAD.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import GIT_ENV, SRC, commit_all, git

TRAIN = """\
LR = 0.5
X = 3.0
Y = 0.0
print("---")
print(f"loss: {(X - 1.0) ** 2 + (Y - 2.0) ** 2 + LR:.6f}")
"""

SPEC = """\
[files]
editable = ["train.py"]

[run]
command = "python train.py"
budget_s = 5
timeout_s = 30

[metric]
name = "{metric}"
direction = "minimize"

[stop]
max_experiments = 3

[researcher]
kind = "search"
seed = 0

[sandbox]
mode = "none"
"""


def nightlab(lab: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **GIT_ENV, "PYTHONPATH": SRC, "COLUMNS": "200"}
    env.pop("NIGHTLAB_DB", None)
    return subprocess.run([sys.executable, "-m", "nightlab", *args], cwd=lab, env=env, capture_output=True,
                          text=True, timeout=300)


def rows(lab: Path) -> list[dict[str, object]]:
    """Every experiment of the lab's ledger (read with sqlite3, independently of nightlab)."""
    con = sqlite3.connect(lab / ".nightlab" / "ledger.db")
    con.row_factory = sqlite3.Row
    try:
        out = con.execute(
            "SELECT e.idx, e.status, e.description, e.parent_commit, e.metric, c.params_json FROM experiments e "
            "LEFT JOIN candidates c ON c.experiment_id = e.id ORDER BY e.idx").fetchall()
        return [dict(r) for r in out]
    finally:
        con.close()


def session_row(lab: Path) -> dict[str, object]:
    con = sqlite3.connect(lab / ".nightlab" / "ledger.db")
    con.row_factory = sqlite3.Row
    try:
        return dict(con.execute("SELECT * FROM sessions ORDER BY id DESC LIMIT 1").fetchone())
    finally:
        con.close()


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    repo = tmp_path / "lab"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "train.py").write_text(TRAIN)
    (repo / "nightlab.toml").write_text(SPEC.format(metric="val_loss"))
    (repo / "program.md").write_text("Lower the loss.\n")
    commit_all(repo, "lab with a wrong metric name")
    return repo


def test_fixed_metric_name_rebaselines_from_the_new_head_and_never_again(lab: Path) -> None:
    first = nightlab(lab, "run", "--tag", "t", "--plain")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "no 'val_loss'" in first.stderr + first.stdout
    (lab / "nightlab.toml").write_text(SPEC.format(metric="loss"))
    fix = commit_all(lab, "the metric is called loss")

    second = nightlab(lab, "run", "--resume", "--plain")
    assert second.returncode == 0, second.stdout + second.stderr
    out = second.stdout + second.stderr
    assert "re-baselines at " + fix[:10] in out
    assert "[metric] name: \"val_loss\" -> \"loss\"" in out
    s = session_row(lab)
    assert s["base_commit"] == fix and s["metric_name"] == "loss"
    exps = rows(lab)
    assert [e["status"] for e in exps[:2]] == ["crash", "keep"]
    assert exps[1]["description"] == "baseline" and exps[1]["parent_commit"] == fix  # the fix is what ran
    assert git(lab, "merge-base", "--is-ancestor", fix, "nightlab/t") == ""

    # what the read commands show is the metric the session uses now
    status = nightlab(lab, "status")
    assert "loss (minimize)" in status.stdout and "val_loss" not in status.stdout
    assert re.search(r"re-baselined\s+at #1 on " + fix[:10] + r" \(the baseline never succeeded\)", status.stdout)
    log = nightlab(lab, "log")
    assert "t: loss (minimize)" in log.stdout and "val_loss" not in log.stdout
    tsv = nightlab(lab, "export", "--format", "tsv")
    assert tsv.stdout.splitlines()[0].split("\t")[:2] == ["commit", "loss"]

    # a later resume does not run the baseline again, and proposes nothing it proposed before
    third = nightlab(lab, "run", "--resume", "--plain", "--max-experiments", "6")
    assert third.returncode == 0, third.stdout + third.stderr
    exps = rows(lab)
    assert sum(e["description"] == "baseline" for e in exps) == 2  # the failed one and the fixed one
    assert "running: baseline" not in third.stdout
    params = [e["params_json"] for e in exps if e["params_json"]]
    assert len(params) == 6
    assert len(set(params)) == len(params), params
    assert [e["idx"] for e in exps] == list(range(len(exps)))


def _kept_session(lab: Path) -> str:
    (lab / "nightlab.toml").write_text(SPEC.format(metric="loss"))
    commit_all(lab, "right metric")
    r = nightlab(lab, "run", "--tag", "k", "--plain")
    assert r.returncode == 0, r.stdout + r.stderr
    assert session_row(lab)["baseline_metric"] is not None
    return str(session_row(lab)["incumbent_commit"])


def test_harmless_change_continues_and_says_what_changed(lab: Path) -> None:
    _kept_session(lab)
    (lab / "nightlab.toml").write_text(SPEC.format(metric="loss").replace("max_experiments = 3",
                                                                          "max_experiments = 5"))
    commit_all(lab, "a longer night")
    r = nightlab(lab, "run", "--resume", "--plain")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "harmless changes: [stop] max_experiments: 3 -> 5" in r.stdout
    exps = rows(lab)
    assert len(exps) == 6 and sum(e["description"] == "baseline" for e in exps) == 1
    assert json.loads(str(session_row(lab)["spec_json"]))["stop"]["max_experiments"] == 5


@pytest.mark.parametrize("change", ["command", "code", "metric"])
def test_material_change_after_keeps_is_refused_then_rebaselined(lab: Path, change: str) -> None:
    old_incumbent = _kept_session(lab)
    if change == "command":
        (lab / "nightlab.toml").write_text(SPEC.format(metric="loss").replace('"python train.py"',
                                                                              '"python -B train.py"'))
        expect = '[run] command: "python train.py" -> "python -B train.py"'
    elif change == "code":
        (lab / "train.py").write_text(TRAIN.replace("Y = 0.0", "Y = 1.0"))
        expect = "(changed: train.py)"
    else:
        (lab / "train.py").write_text(TRAIN + 'print(f"loss2: {2 * X:.6f}")\n')
        (lab / "nightlab.toml").write_text(SPEC.format(metric="loss2"))
        expect = '[metric] name: "loss" -> "loss2"'
    head = commit_all(lab, "changed after keeps")
    n_before = len(rows(lab))

    r = nightlab(lab, "run", "--resume", "--plain")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: session 'k' changed since it started") and expect in r.stderr
    assert "fix: start a new session from here: `nightlab run --tag k-2`" in r.stderr
    assert "--rebaseline" in r.stderr
    assert len(rows(lab)) == n_before  # nothing ran

    r = nightlab(lab, "run", "--resume", "--rebaseline", "--plain", "--max-experiments", "6")
    assert r.returncode == 0, r.stdout + r.stderr
    s = session_row(lab)
    assert s["base_commit"] == head
    exps = rows(lab)
    assert exps[n_before]["description"] == "baseline" and exps[n_before]["parent_commit"] == head
    # the branch moved to the new base; the old keeps stay reachable under refs/nightlab/k/<n>
    assert git(lab, "merge-base", "--is-ancestor", head, "nightlab/k") == ""
    kept_refs = git(lab, "for-each-ref", "--format=%(objectname)", "refs/nightlab/k/").split()
    assert old_incumbent in kept_refs
    tsv = nightlab(lab, "export", "--format", "tsv").stdout.splitlines()
    if change == "metric":  # rows measured as "loss" are not written under a "loss2" column
        assert tsv[0].split("\t")[1] == "loss2" and len(tsv) == 1 + len(exps) - n_before
        assert "loss2 (minimize)" in nightlab(lab, "log").stdout
    else:
        assert len(tsv) == 1 + len(exps)
    # and the next resume continues from there without another baseline
    r = nightlab(lab, "run", "--resume", "--plain", "--max-experiments", "7")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sum(e["description"] == "baseline" for e in rows(lab)) == 2


def test_rebaseline_needs_resume(lab: Path) -> None:
    r = nightlab(lab, "run", "--tag", "x", "--rebaseline")
    assert r.returncode == 2 and "--rebaseline only applies to --resume" in r.stderr


def test_dirty_tree_is_refused_with_the_files_named(lab: Path) -> None:
    (lab / "nightlab.toml").write_text(SPEC.format(metric="loss"))  # uncommitted spec
    (lab / "train.py").write_text(TRAIN.replace("X = 3.0", "X = 1.0"))  # uncommitted edit
    (lab / "notes.txt").write_text("not a lab file\n")  # neither editable nor protected: not named
    r = nightlab(lab, "run", "--tag", "d", "--plain")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: uncommitted changes in nightlab.toml, train.py:")
    assert "notes.txt" not in r.stderr
    assert "fix: commit them" in r.stderr and "--allow-dirty" in r.stderr
    assert not (lab / ".nightlab" / "ledger.db").exists() or rows(lab) == []


def test_allow_dirty_snapshots_without_touching_index_or_head(lab: Path) -> None:
    (lab / "nightlab.toml").write_text(SPEC.format(metric="loss"))
    commit_all(lab, "right metric")
    head = git(lab, "rev-parse", "HEAD").strip()
    (lab / "train.py").write_text(TRAIN.replace("X = 3.0", "X = 1.0"))  # loss 4.5 -> 0.5 + 4 ... see below
    git(lab, "add", "train.py")  # staged
    (lab / "train.py").write_text(TRAIN.replace("X = 3.0", "X = 2.0"))  # and changed again, unstaged
    (lab / "helper_notes.py").write_text("# untracked\n")
    index_before = git(lab, "diff", "--cached")
    status_before = git(lab, "status", "--porcelain")

    r = nightlab(lab, "run", "--tag", "d", "--plain", "--allow-dirty", "--max-experiments", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--allow-dirty: the working tree (train.py) is snapshot" in r.stdout
    assert git(lab, "rev-parse", "HEAD").strip() == head
    assert git(lab, "diff", "--cached") == index_before
    assert git(lab, "status", "--porcelain") == status_before
    base = str(session_row(lab)["base_commit"])
    assert base != head and git(lab, "rev-parse", f"{base}^").strip() == head
    assert git(lab, "show", f"{base}:train.py") == TRAIN.replace("X = 3.0", "X = 2.0")  # the working tree
    baseline = rows(lab)[0]
    assert baseline["description"] == "baseline" and baseline["parent_commit"] == base
    assert baseline["metric"] == pytest.approx((2.0 - 1.0) ** 2 + 4.0 + 0.5)
