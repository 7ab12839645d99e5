"""The sqlite3 reader of the read commands gives what the SQLAlchemy ledger gives, on a real ledger."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.dashlab import make_dash_lab, run_session

from nightlab import ledger as ledger_mod
from nightlab.cli.read import log, status
from nightlab.ledger import Ledger
from nightlab.ledger_read import SCHEMA_VERSION, SqliteReader, open_fast
from nightlab.types import Status


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lab = make_dash_lab(tmp_path_factory.mktemp("lr"))
    run_session(lab)
    run_session(lab, tag="u", steps=[{"rationale": "again", "files": {"target.py": "X = 1\n"}}])
    return lab


def test_the_reader_knows_the_ledgers_schema_version() -> None:
    assert SCHEMA_VERSION == ledger_mod.SCHEMA_VERSION


def test_same_sessions_and_experiments_as_the_ledger(lab: Path) -> None:
    path = lab / ".nightlab" / "ledger.db"
    fast = open_fast(path)
    assert isinstance(fast, SqliteReader)
    with Ledger.for_lab(lab) as led, fast:
        assert fast.list_sessions() == led.list_sessions() and len(led.list_sessions()) == 2
        assert fast.latest_session() == led.latest_session()
        assert fast.get_session("nosuch") is None and led.get_session("nosuch") is None
        for s in led.list_sessions():
            assert fast.get_session(s.tag) == s
            assert fast.session_json(s.id) == led.session_json(s.id)
            assert fast.count_by_status(s.id) == led.count_by_status(s.id)
            assert fast.usage_totals(s.id) == led.usage_totals(s.id)
            assert fast.count_experiments(s.id) == led.count_experiments(s.id) > 0
            assert fast.count_experiments(s.id, Status.KEEP) == led.count_experiments(s.id, Status.KEEP)
            for kw in ({}, {"order": "desc", "limit": 2}, {"status": Status.KEEP}, {"limit": 2, "offset": 1},
                       {"status": Status.CRASH, "order": "desc"}):
                assert fast.experiments(s.id, **kw) == led.experiments(s.id, **kw), kw  # type: ignore[arg-type]
            assert fast.get_experiment(s.id, 1) == led.get_experiment(s.id, 1) is not None
            assert fast.get_experiment(s.id, 999) is None
        assert fast.shown == str(path)


def test_another_schema_version_goes_through_the_ledger(lab: Path, tmp_path: Path) -> None:
    copy = tmp_path / "lab"
    (copy / ".nightlab").mkdir(parents=True)
    con = sqlite3.connect(lab / ".nightlab" / "ledger.db")
    con.execute(f"VACUUM INTO '{copy / '.nightlab' / 'ledger.db'}'")
    con.close()
    con = sqlite3.connect(copy / ".nightlab" / "ledger.db")
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))  # a newer nightlab's
    con.commit()
    con.close()
    assert open_fast(copy / ".nightlab" / "ledger.db") is None
    assert open_fast(copy / "missing.db") is None
    # the read commands go through the ledger, which says what is wrong (not a misread)
    r = CliRunner(env={"COLUMNS": "200"}).invoke(status, ["--lab", str(copy), "--tag", "t"])
    assert r.exit_code == 1 and r.output.startswith("error: ") and "knows up to" in r.output, r.output
    r = CliRunner(env={"COLUMNS": "200"}).invoke(log, ["--lab", str(lab), "--tag", "u"])
    assert r.exit_code == 0 and "again" in r.output, r.output
