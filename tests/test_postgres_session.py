"""A whole session on a PostgreSQL ledger, read back by the CLI from another process."""

from __future__ import annotations

import subprocess

import pytest
from tests.conftest import SPEC, TARGET_PY, cli_env, nightlab_cmd

from nightlab.engine import Engine
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.types import Status

pytestmark = pytest.mark.postgres


def test_a_session_on_postgres(make_lab, pg_url):
    lab = make_lab(spec=SPEC.replace("pipeline = false", "slots = 2"))
    steps = [{"rationale": "opt", "files": {"target.py": TARGET_PY.replace("X = 3.0", "X = 1.0")}},
             {"rationale": "worse", "files": {"target.py": TARGET_PY.replace("X = 3.0", "X = 8.0")}}]
    eng = Engine(lab, tag="pg", researcher=ScriptedResearcher(steps), sandbox_mode="none", db_url=pg_url,
                 max_experiments=3)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    assert eng.ledger.url.startswith("postgresql")
    assert [e.idx for e in exps] == [0, 1, 2, 3] and exps[0].status is Status.KEEP
    assert session.incumbent_metric is not None and session.incumbent_metric <= 4.5 + 1e-9
    assert not (lab / ".nightlab" / "ledger.db").exists()  # nothing went to SQLite
    # another process (a dashboard or a second head) reads the same ledger by URL
    out = subprocess.run(nightlab_cmd("status", "--lab", str(lab), "--db", pg_url), env=cli_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pg" in out.stdout and "score" in out.stdout
    tsv = subprocess.run(nightlab_cmd("export", "--lab", str(lab), "--db", pg_url, "--format", "tsv"),
                         env=cli_env(), capture_output=True, text=True, timeout=60)
    assert tsv.stdout.splitlines()[0] == "commit\tscore\tmemory_gb\tstatus\tdescription"
    assert len(tsv.stdout.splitlines()) == 5
