"""The Python API (nightlab.api.Lab) does what the CLI does; `nightlab init` writes an AGENTS.md section; labs
on a shared PostgreSQL ledger appear in `status --all` without registration."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from tests.conftest import SPEC, TARGET_PY, cli_env, commit_all, git, nightlab_cmd

from nightlab.api import Lab
from nightlab.engine import Engine
from nightlab.errors import UsageError
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.scaffold import AGENTS_BEGIN, AGENTS_END
from nightlab.types import Status


def step(x: float) -> dict[str, Any]:
    return {"rationale": f"move X to {x}", "files": {"target.py": TARGET_PY.replace("X = 3.0", f"X = {x}")}}


def test_the_api_runs_reads_and_stops_a_lab(make_lab):
    lab_dir = make_lab(spec=SPEC + '\n[sandbox]\nmode = "none"\n')
    lab = Lab(lab_dir)
    with pytest.raises(UsageError, match="no nightlab session"):
        lab.session()
    session = lab.run(tag="api", researcher=ScriptedResearcher([step(2.0), step(4.0), step(1.0)]))
    assert session.status == "finished" and lab.session().tag == "api"
    exps = lab.experiments()
    assert [e.status for e in exps] == [Status.KEEP, Status.KEEP, Status.DISCARD, Status.KEEP]
    assert [e.idx for e in lab.experiments(status="discard")] == [2]
    commit, metric = lab.incumbent()
    assert metric == pytest.approx(4.5) and commit == git(lab_dir, "rev-parse", "nightlab/api").strip()
    assert "+X = 2.0" in lab.diff(1) and lab.experiment(1).rationale == "move X to 2.0"
    st = lab.status()
    assert st["experiments"] == {"keep": 3, "discard": 1} and st["improvement_pct"] == pytest.approx(47.0588, 1e-3)
    assert lab.audit()["ok"] is True
    with pytest.raises(UsageError, match="no pending approval"):
        lab.approve(1)
    stop = lab.stop()
    assert stop.read_text().startswith("stopped through the API")


def test_init_writes_an_agents_md_section_and_keeps_the_rest(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "train.py").write_text("LR = 0.1\nprint('---')\nprint('loss: 1.0')\n")
    (repo / "AGENTS.md").write_text("# House rules\n\nBe kind.\n")
    commit_all(repo)
    for _ in range(2):  # a second init replaces only its own section
        res = subprocess.run(nightlab_cmd("init", str(repo), "--force"), env=cli_env(), capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    text = (repo / "AGENTS.md").read_text()
    assert text.startswith("# House rules\n\nBe kind.\n") and text.count(AGENTS_BEGIN) == 1
    assert text.count(AGENTS_END) == 1 and "nightlab mcp" in text and "`train.py`" in text


@pytest.mark.postgres
def test_labs_on_a_shared_postgresql_ledger_appear_without_registration(make_lab, pg_url, tmp_path):
    lab_dir = make_lab(spec=SPEC + '\n[sandbox]\nmode = "none"\n')
    eng = Engine(lab_dir, tag="pg1", db_url=pg_url, researcher=ScriptedResearcher([step(2.0)]))
    eng.run()
    eng.close()
    res = subprocess.run(nightlab_cmd("status", "--all", "--db", pg_url, "--registry", str(tmp_path / "none.toml")),
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith(lab_dir.name))
    assert "finished" in row and "pg1" in row and "+35.29%" in row
