"""`nightlab demo`: the quickfit lab, the search researcher, a real improvement with a fixed seed."""

from __future__ import annotations

import sqlite3
import subprocess

import pytest
from tests.conftest import cli_env, nightlab_cmd


@pytest.mark.slow
def test_demo_search_beats_the_baseline(tmp_path):
    dest = tmp_path / "demo"
    proc = subprocess.run(nightlab_cmd("demo", str(dest), "--experiments", "12", "--plain"), env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "best     val_loss" in proc.stdout and str(dest / ".nightlab" / "ledger.db") in proc.stdout
    with sqlite3.connect(dest / ".nightlab" / "ledger.db") as con:
        base, best, status = con.execute("select baseline_metric, incumbent_metric, status from sessions").fetchone()
        n = con.execute("select count(*) from experiments where idx > 0").fetchone()[0]
        kinds = {r[0] for r in con.execute("select researcher from candidates")}
    assert status == "finished" and n == 12 and "search" in kinds and kinds <= {"search", "rebase"}
    assert best < 0.5 * base  # search really helps: at least halves the baseline's val_loss in 12 experiments
    # the kept commits are real diffs of fit.py on the session branch
    log = subprocess.run(["git", "log", "--oneline", "nightlab/demo"], cwd=dest, capture_output=True, text=True)
    assert "search(tpe)" in log.stdout
    # a second demo into the same folder is refused cleanly
    again = subprocess.run(nightlab_cmd("demo", str(dest), "--plain"), env=cli_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
