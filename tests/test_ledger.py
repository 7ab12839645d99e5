"""The ledger against real databases: contracts, durability, concurrency, migrations.

Tests taking the ``led`` fixture form the backend conformance suite: they run on SQLite,
and on PostgreSQL too when ``NIGHTLAB_TEST_POSTGRES`` holds a server URL (each test gets
a fresh database there), e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``.
"""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import nightlab.ledger as ledger_mod
from nightlab.errors import LedgerError
from nightlab.ledger import Ledger
from nightlab.types import Candidate, Direction, Session, Status, Usage

SRC = str(Path(__file__).resolve().parents[1] / "src")


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def new_session(led: Ledger, tag: str = "night1", direction: Direction = Direction.MINIMIZE) -> Session:
    return led.create_session(
        tag=tag,
        branch=f"nightlab/{tag}",
        base_commit="a" * 40,
        metric_name="val_bpb",
        direction=direction,
        sandbox="bwrap",
        spec_hash="spec-hash",
        spec_json='{"metric": {"name": "val_bpb"}}',
        lab_path="/labs/x",
        machine={"gpu": "H100", "cpus": 16},
        researcher="scripted",
    )


def cand(n: int, *, tokens: int = 0, cost: float = 0.0, secs: float = 0.0) -> Candidate:
    return Candidate(
        parent="a" * 40,
        rationale=f"idea {n}",
        diff=f"--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-lr = 1\n+lr = {n}\n",
        params={"lr": n},
        usage=Usage(
            tokens_in=tokens, tokens_out=tokens // 2, tokens_cached=tokens // 4, cost_usd=cost, seconds=secs
        ),
        researcher="scripted",
    )


def run_py(code: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "deep" / "folder" / "ledger.db"


@pytest.fixture
def sled(db: Path):
    """A SQLite ledger (for tests of SQLite specifics)."""
    with Ledger(url_of(db)) as led:
        yield led


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def led(request: pytest.FixtureRequest, db: Path):
    """A ledger on each backend: SQLite always, PostgreSQL when NIGHTLAB_TEST_POSTGRES is set."""
    url = url_of(db) if request.param == "sqlite" else request.getfixturevalue("pg_url")
    with Ledger(url) as led:
        yield led


# -- opening -----------------------------------------------------------------------------


def test_open_creates_parent_folder_and_sets_pragmas(db: Path, sled: Ledger) -> None:
    led = sled
    assert db.is_file()
    assert led.url == url_of(db)
    with led._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
    assert led.schema_version() == ledger_mod.SCHEMA_VERSION
    names = set(sa.inspect(led._engine).get_table_names())
    assert {"schema_version", "sessions", "experiments", "candidates"} <= names
    indexes = {ix["name"]: ix["column_names"] for ix in sa.inspect(led._engine).get_indexes("experiments")}
    assert indexes["ix_experiments_session_idx"] == ["session_id", "idx"]
    assert indexes["ix_experiments_session_status"] == ["session_id", "status"]


def test_for_lab_default_env_and_explicit_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIGHTLAB_DB", raising=False)
    with Ledger.for_lab(tmp_path) as led:
        assert led.url == f"sqlite:///{tmp_path.resolve()}/.nightlab/ledger.db"
    assert (tmp_path / ".nightlab" / "ledger.db").is_file()
    monkeypatch.setenv("NIGHTLAB_DB", url_of(tmp_path / "env.db"))
    with Ledger.for_lab(tmp_path) as led:
        assert led.url == url_of(tmp_path / "env.db")
    with Ledger.for_lab(tmp_path, url_of(tmp_path / "arg.db")) as led:
        assert led.url == url_of(tmp_path / "arg.db")


def test_reopen_sees_committed_rows_and_does_not_remigrate(db: Path) -> None:
    with Ledger(url_of(db)) as led:
        s = new_session(led)
        e = led.start_experiment(
            s.id, idx=0, parent_commit="a" * 40, seed=1, candidate=None, description="baseline", propose_s=0.0
        )
        led.finish_experiment(e, status=Status.KEEP, metric=1.5, incumbent=("a" * 40, 1.5))
    with Ledger(url_of(db)) as led:
        assert led.schema_version() == ledger_mod.SCHEMA_VERSION
        s2 = led.get_session("night1")
        assert s2 is not None and s2.incumbent_metric == 1.5
        exp = led.get_experiment(s2.id, 0)
        assert exp is not None and exp.status is Status.KEEP and exp.metric == 1.5
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)


def test_schema_newer_than_code_is_refused(db: Path) -> None:
    Ledger(url_of(db)).close()
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE schema_version SET version = 99")
    raw.close()
    with pytest.raises(LedgerError) as err:
        Ledger(url_of(db))
    assert "99" in err.value.message and str(db) in err.value.message
    assert "upgrade nightlab" in err.value.fix


def test_failing_migration_rolls_back_its_ddl(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Ledger(url_of(db)).close()
    current = len(ledger_mod.MIGRATIONS)

    def broken(conn: sa.Connection) -> None:
        conn.exec_driver_sql("CREATE TABLE half_done (x INTEGER)")
        conn.exec_driver_sql("ALTER TABLE sessions ADD COLUMN extra TEXT")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [*ledger_mod.MIGRATIONS, broken])
    monkeypatch.setattr(ledger_mod, "SCHEMA_VERSION", len(ledger_mod.MIGRATIONS))
    with pytest.raises(RuntimeError, match="migration bug"):
        Ledger(url_of(db))
    with sqlite3.connect(db) as raw:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        cols = {r[1] for r in raw.execute("PRAGMA table_info(sessions)")}
        version = raw.execute("SELECT version FROM schema_version").fetchone()[0]
    raw.close()
    assert "half_done" not in tables and "extra" not in cols and version == current


def test_garbage_file_is_a_ledger_error_naming_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "ledger.db"
    bad.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(LedgerError) as err:
        Ledger(url_of(bad))
    assert str(bad) in err.value.message
    assert err.value.fix


def test_directory_as_db_is_a_ledger_error(tmp_path: Path) -> None:
    (tmp_path / "ledger.db").mkdir()
    with pytest.raises(LedgerError, match=r"ledger\.db"):
        Ledger(url_of(tmp_path / "ledger.db"))


# -- sessions ----------------------------------------------------------------------------


def test_create_get_list_latest_sessions(led: Ledger) -> None:
    assert led.latest_session() is None and led.list_sessions() == []
    s1 = new_session(led, "one")
    s2 = new_session(led, "two", Direction.MAXIMIZE)
    assert s1.status == "running" and s1.incumbent_commit == s1.base_commit
    assert s1.incumbent_metric is None and s1.baseline_metric is None
    assert s1.machine == {"gpu": "H100", "cpus": 16}
    assert s2.direction is Direction.MAXIMIZE
    assert led.get_session("one") == s1
    assert led.get_session("nope") is None
    assert led.get_session_by_id(s2.id) == s2
    assert [s.tag for s in led.list_sessions()] == ["one", "two"]
    assert led.latest_session() == s2
    spec_json, noise = led.session_json(s1.id)
    assert spec_json == '{"metric": {"name": "val_bpb"}}' and noise == {}


def test_duplicate_tag_is_refused_with_a_fix(led: Ledger) -> None:
    new_session(led, "dup")
    with pytest.raises(LedgerError) as err:
        new_session(led, "dup")
    assert err.value.message == "session 'dup' exists"
    assert "--resume" in err.value.fix and "--tag" in err.value.fix
    assert len(led.list_sessions()) == 1


def test_update_session(led: Ledger) -> None:
    s = new_session(led)
    time.sleep(0.01)
    s2 = led.update_session(
        s.id, status="stopped", stop_reason="max_experiments", baseline_metric=2.0, noise={"sigma": 0.01}
    )
    assert (s2.status, s2.stop_reason, s2.baseline_metric) == ("stopped", "max_experiments", 2.0)
    assert s2.updated_at > s.updated_at and s2.created_at == s.created_at
    assert led.session_json(s.id)[1] == {"sigma": 0.01}
    assert led.update_session(s.id, incumbent_metric=float("nan")).incumbent_metric is None
    with pytest.raises(TypeError, match="bogus"):
        led.update_session(s.id, bogus=1)
    with pytest.raises(ValueError):
        led.update_session(s.id, status="sleeping")
    with pytest.raises(LedgerError):
        led.update_session(999, status="failed")


# -- experiments -------------------------------------------------------------------------


def test_start_and_finish_keep_moves_incumbent(led: Ledger) -> None:
    s = new_session(led)
    assert led.next_idx(s.id) == 0
    e0 = led.start_experiment(
        s.id,
        idx=0,
        parent_commit="a" * 40,
        seed=7,
        candidate=None,
        description="baseline",
        propose_s=0.0,
        worktree="/wt/0",
        started_at=100.0,
    )
    assert led.next_idx(s.id) == 1
    x = led.get_experiment(s.id, 0)
    assert x is not None and x.status is Status.RUNNING and x.started_at == 100.0 and x.worktree == "/wt/0"
    assert x.diff == "" and x.usage == Usage() and x.commit is None
    led.finish_experiment(e0, status=Status.KEEP, metric=1.0, incumbent=("a" * 40, 1.0), run_s=3.0)

    e1 = led.start_experiment(
        s.id,
        idx=1,
        parent_commit="a" * 40,
        seed=8,
        candidate=cand(1, tokens=100),
        description="lr 1",
        propose_s=2.5,
    )
    led.update_experiment(e1, commit="b" * 40, pid=4242, pid_start=123.5)
    done = led.finish_experiment(
        e1,
        status=Status.KEEP,
        metric=0.9,
        secondary={"peak_vram_mb": 2048.0},
        trust="evaluator",
        reason="better by 0.1",
        log_tail="step 10\n",
        run_s=30.0,
        overhead_s=1.5,
        exit_code=0,
        evidence={"delta": 0.1},
        incumbent=("b" * 40, 0.9),
        finished_at=200.0,
    )
    assert done.status is Status.KEEP and done.metric == 0.9 and done.commit == "b" * 40
    assert done.secondary == {"peak_vram_mb": 2048.0} and done.evidence == {"delta": 0.1}
    assert (done.trust, done.reason, done.log_tail, done.exit_code) == (
        "evaluator",
        "better by 0.1",
        "step 10\n",
        0,
    )
    assert (done.run_s, done.overhead_s, done.propose_s, done.finished_at) == (30.0, 1.5, 2.5, 200.0)
    assert (done.pid, done.pid_start) == (4242, 123.5)
    assert done.rationale == "idea 1" and done.params == {"lr": 1} and done.researcher == "scripted"
    assert done.diff.startswith("--- a/train.py")
    s2 = led.get_session("night1")
    assert s2 is not None and (s2.incumbent_commit, s2.incumbent_metric) == ("b" * 40, 0.9)

    e2 = led.start_experiment(
        s.id, idx=2, parent_commit="b" * 40, seed=9, candidate=cand(2), description="lr 2", propose_s=1.0
    )
    led.finish_experiment(e2, status=Status.DISCARD, metric=0.95, commit="c" * 40)
    s3 = led.get_session("night1")
    assert s3 is not None and (s3.incumbent_commit, s3.incumbent_metric) == ("b" * 40, 0.9)
    got = led.get_experiment(s.id, 2)
    assert got is not None and got.commit == "c" * 40


def test_keep_and_incumbent_are_one_transaction(led: Ledger) -> None:
    s = new_session(led)
    e = led.start_experiment(
        s.id, idx=0, parent_commit="a" * 40, seed=0, candidate=None, description="b", propose_s=0.0
    )
    # the session half of the transaction fails (NOT NULL): the experiment half must not stay
    with pytest.raises(sa.exc.IntegrityError):
        led.finish_experiment(e, status=Status.KEEP, metric=1.0, incumbent=(None, 1.0))  # type: ignore[arg-type]
    s2 = led.get_session("night1")
    assert s2 is not None and s2.incumbent_metric is None and s2.incumbent_commit == "a" * 40
    x = led.get_experiment(s.id, 0)
    assert x is not None and x.status is Status.RUNNING and x.metric is None


def test_start_experiment_is_idempotent(led: Ledger) -> None:
    s = new_session(led)
    first = led.start_experiment(
        s.id,
        idx=3,
        parent_commit="p",
        seed=1,
        candidate=cand(3, tokens=10),
        description="first",
        propose_s=1.0,
    )
    again = led.start_experiment(
        s.id,
        idx=3,
        parent_commit="q",
        seed=2,
        candidate=cand(4, tokens=99),
        description="retry",
        propose_s=9.0,
    )
    assert again == first
    assert led.count_experiments(s.id) == 1
    x = led.get_experiment(s.id, 3)
    assert x is not None and x.description == "first" and x.params == {"lr": 3}
    assert led.usage_totals(s.id).tokens_in == 10


def test_start_experiment_concurrent_threads(led: Ledger) -> None:
    s = new_session(led)
    ids: list[int] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            ids.append(
                led.start_experiment(
                    s.id,
                    idx=1,
                    parent_commit="p",
                    seed=i,
                    candidate=cand(i),
                    description=f"t{i}",
                    propose_s=0.0,
                )
            )
            eid = led.start_experiment(
                s.id,
                idx=10 + i,
                parent_commit="p",
                seed=i,
                candidate=cand(i),
                description=f"u{i}",
                propose_s=0.0,
            )
            led.finish_experiment(eid, status=Status.DISCARD, metric=float(i))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(ids)) == 1
    assert led.count_experiments(s.id) == 7
    assert led.count_experiments(s.id, Status.DISCARD) == 6


def test_start_experiment_unknown_session(led: Ledger) -> None:
    with pytest.raises(LedgerError, match="session 999"):
        led.start_experiment(
            999, idx=0, parent_commit="p", seed=0, candidate=None, description="", propose_s=0
        )


def test_update_experiment_fields_and_diff(led: Ledger) -> None:
    s = new_session(led)
    e0 = led.start_experiment(
        s.id, idx=0, parent_commit="p", seed=0, candidate=None, description="b", propose_s=0.0
    )
    e1 = led.start_experiment(
        s.id, idx=1, parent_commit="p", seed=0, candidate=cand(1), description="c", propose_s=0.0
    )
    led.update_experiment(
        e1, diff="canonical diff\n", worktree="/wt/1", secondary={"m": 1.0}, status=Status.INTERRUPTED
    )
    led.update_experiment(e0, diff="baseline diff\n")
    x1, x0 = led.get_experiment(s.id, 1), led.get_experiment(s.id, 0)
    assert x1 is not None and x0 is not None
    assert (x1.diff, x1.worktree, x1.secondary, x1.status) == (
        "canonical diff\n",
        "/wt/1",
        {"m": 1.0},
        Status.INTERRUPTED,
    )
    assert x1.rationale == "idea 1"  # the rest of the candidate is untouched
    assert x0.diff == "baseline diff\n"
    with pytest.raises(TypeError, match="nope"):
        led.update_experiment(e1, nope=1)
    with pytest.raises(LedgerError):
        led.update_experiment(12345, pid=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_metric_is_stored_as_null(led: Ledger, bad: float) -> None:
    s = new_session(led)
    e = led.start_experiment(
        s.id, idx=0, parent_commit="p", seed=0, candidate=None, description="", propose_s=0.0
    )
    x = led.finish_experiment(e, status=Status.CRASH, metric=bad, exit_code=1)
    assert x.metric is None
    with led._engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT metric FROM experiments WHERE id = :id"), {"id": e}).one()
    assert stored == (None,)
    assert not math.isnan(led.finish_experiment(e, status=Status.KEEP, metric=1.0).metric or math.nan)


def test_listing_filters_orders_and_orphans(led: Ledger) -> None:
    s = new_session(led)
    other = new_session(led, "other")
    statuses = [Status.KEEP, Status.DISCARD, Status.CRASH, Status.DISCARD, Status.RUNNING, Status.RUNNING]
    for i, st in enumerate(statuses):
        e = led.start_experiment(
            s.id, idx=i, parent_commit="p", seed=i, candidate=cand(i), description=f"d{i}", propose_s=0.0
        )
        if st is not Status.RUNNING:
            led.finish_experiment(e, status=st, metric=float(i))
    led.start_experiment(
        other.id, idx=0, parent_commit="p", seed=0, candidate=None, description="o", propose_s=0.0
    )
    assert [x.idx for x in led.experiments(s.id)] == [0, 1, 2, 3, 4, 5]
    assert [x.idx for x in led.experiments(s.id, order="desc", limit=2)] == [5, 4]
    assert [x.idx for x in led.experiments(s.id, limit=2, offset=2)] == [2, 3]
    assert [x.idx for x in led.experiments(s.id, status=Status.DISCARD)] == [1, 3]
    assert [x.idx for x in led.orphaned(s.id)] == [4, 5]
    assert [x.idx for x in led.orphaned(other.id)] == [0]
    assert led.count_experiments(s.id) == 6 and led.count_experiments(s.id, Status.KEEP) == 1
    assert led.count_by_status(s.id) == {
        Status.KEEP: 1,
        Status.DISCARD: 2,
        Status.CRASH: 1,
        Status.RUNNING: 2,
    }
    assert led.get_experiment(s.id, 99) is None
    with pytest.raises(ValueError):
        led.experiments(s.id, order="sideways")


def test_usage_totals(led: Ledger) -> None:
    s = new_session(led)
    other = new_session(led, "other")
    assert led.usage_totals(s.id) == Usage()
    led.start_experiment(s.id, idx=0, parent_commit="p", seed=0, candidate=None, description="", propose_s=0)
    led.start_experiment(
        s.id,
        idx=1,
        parent_commit="p",
        seed=0,
        candidate=cand(1, tokens=1000, cost=0.25, secs=4.0),
        description="",
        propose_s=4.0,
    )
    led.start_experiment(
        s.id,
        idx=2,
        parent_commit="p",
        seed=0,
        candidate=cand(2, tokens=200, cost=0.5, secs=1.0),
        description="",
        propose_s=1.0,
    )
    led.start_experiment(
        other.id,
        idx=1,
        parent_commit="p",
        seed=0,
        candidate=cand(9, tokens=7, cost=9.0),
        description="",
        propose_s=0,
    )
    assert led.usage_totals(s.id) == Usage(1200, 600, 300, 0.75, 5.0)


# -- durability and concurrency across processes ---------------------------------------------


def test_reader_process_is_not_blocked_by_a_writer(db: Path, sled: Ledger) -> None:
    led = sled
    s = new_session(led, "committed")
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(
            "INSERT INTO sessions (tag, branch, base_commit, incumbent_commit, metric_name, direction,"
            " status, stop_reason, sandbox, created_at, updated_at, spec_hash, spec_json, lab_path,"
            " machine_json, researcher)"
            " VALUES ('uncommitted', 'b', 'c', 'c', 'm', 'minimize', 'running', '', 'none', 0, 0,"
            " '', '{}', '', '{}', '')"
        )
        t0 = time.monotonic()
        out = run_py(
            "from nightlab.ledger import Ledger\n"
            f"with Ledger({url_of(db)!r}) as led:\n"
            "    print([s.tag for s in led.list_sessions()])\n"
        )
        elapsed = time.monotonic() - t0
    finally:
        writer.rollback()
        writer.close()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([s.tag])
    assert elapsed < 8  # it did not wait for the writer (busy_timeout is 10 s)


def test_committed_rows_survive_sigkill_of_the_writer(db: Path) -> None:
    code = (
        "import os\n"
        "from nightlab.ledger import Ledger\n"
        "from nightlab.types import Direction, Status\n"
        f"led = Ledger({url_of(db)!r})\n"
        "s = led.create_session(tag='killed', branch='b', base_commit='c', metric_name='m',"
        " direction=Direction.MINIMIZE, sandbox='none', spec_hash='', spec_json='{}', lab_path='',"
        " machine={}, researcher='r')\n"
        "e = led.start_experiment(s.id, idx=0, parent_commit='c', seed=0, candidate=None,"
        " description='base', propose_s=0.0)\n"
        "led.finish_experiment(e, status=Status.KEEP, metric=0.5, incumbent=('c', 0.5))\n"
        "led.start_experiment(s.id, idx=1, parent_commit='c', seed=0, candidate=None,"
        " description='in flight', propose_s=0.0)\n"
        "print('committed', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    out = run_py(code)
    assert out.returncode == -9, out.stderr
    assert out.stdout.strip() == "committed"
    with Ledger(url_of(db)) as led:
        s = led.get_session("killed")
        assert s is not None and s.incumbent_metric == 0.5
        x = led.get_experiment(s.id, 0)
        assert x is not None and x.status is Status.KEEP and x.metric == 0.5
        assert [o.description for o in led.orphaned(s.id)] == ["in flight"]
