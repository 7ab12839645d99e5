"""Ledger schema v4: each experiment carries its candidate's researcher, cost and tokens, so the dashboard
sorts by them through one index (issue 13, "any sort column at any page"). On SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from nightlab import ledger as ledger_mod
from nightlab import queries
from nightlab.ledger import Ledger, candidates, experiments, schema_version, sessions
from nightlab.types import Candidate, Direction, Session, Status, Usage


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def _sort_row(led: Ledger, exp_id: int) -> tuple[object, ...]:
    e = experiments.c
    with led.transaction() as conn:
        return tuple(conn.execute(sa.select(e.sort_researcher, e.sort_cost_usd, e.sort_tokens)
                                  .where(e.id == exp_id)).one())


def _session(led: Ledger) -> Session:
    return led.create_session(tag="t", branch="nightlab/t", base_commit="b" * 40, metric_name="score",
                              direction=Direction.MINIMIZE, sandbox="none", spec_hash="x", spec_json="{}",
                              lab_path="/x", machine={}, researcher="llm")


@contextlib.contextmanager
def _page_queries(eng: sa.Engine) -> Iterator[list[tuple[str, object]]]:
    """The dashboard page queries (statement, parameters) sent to ``eng`` inside the block."""
    seen: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().startswith("SELECT experiments.id") and "ORDER BY" in statement:
            seen.append((statement, params))

    sa.event.listen(eng, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        sa.event.remove(eng, "before_cursor_execute", capture)


def _v3_ledger(url: str, n: int) -> None:
    """A ledger as nightlab wrote it at schema v3 (migrations 1-3 only), with ``n`` experiments; every third
    has no candidate."""
    eng = sa.create_engine(url)
    with eng.begin() as conn:
        schema_version.create(conn)
        for migrate in ledger_mod.MIGRATIONS[:3]:
            migrate(conn)
        conn.execute(schema_version.insert().values(version=3))
        cols = {c["name"] for c in sa.inspect(conn).get_columns("experiments")}
        assert not cols & set(ledger_mod.V4_COLUMNS)  # v1 still creates v1
        sid = conn.execute(sessions.insert().values(
            tag="old", branch="nightlab/old", base_commit="b" * 40, incumbent_commit="b" * 40,
            incumbent_metric=None, baseline_metric=None, metric_name="score", direction="minimize",
            status="finished", stop_reason="", sandbox="none", created_at=1.0, updated_at=1.0, spec_hash="x",
            spec_json="{}", lab_path="/x", machine_json="{}", researcher="llm", noise_json="{}")
        ).inserted_primary_key[0]
        for i in range(n):
            eid = conn.execute(experiments.insert().values(
                session_id=sid, idx=i, status="discard", parent_commit="p", commit=None, metric=float(i),
                secondary_json="{}", trust="inline", description=f"d{i}", reason="", log_tail="", seed=0,
                started_at=1.0 + i, finished_at=2.0 + i, propose_s=0.1, run_s=0.2, overhead_s=0.1, exit_code=0,
                evidence_json="{}", pid=None, pid_start=None, worktree="")).inserted_primary_key[0]
            if i % 3:
                conn.execute(candidates.insert().values(
                    experiment_id=eid, researcher=("llm", "search")[i % 2], rationale="", diff="",
                    params_json="{}", tokens_in=10 * i, tokens_out=i % 4, tokens_cached=0,
                    cost_usd=(i * 7 % 11) / 100, usage_s=0.1))
    eng.dispose()


def test_a_v3_ledger_upgrades_to_v4_with_the_sort_columns_filled(url: str) -> None:
    _v3_ledger(url, 30)
    with Ledger(url) as led:
        assert led.schema_version() == 4 == ledger_mod.SCHEMA_VERSION
        s = led.get_session("old")
        assert s is not None
        rows = led.experiments(s.id)
        assert len(rows) == 30
        for e in rows:
            want = (None, None, None) if e.idx % 3 == 0 else (
                e.researcher, e.usage.cost_usd, e.usage.tokens_in + e.usage.tokens_out)
            assert _sort_row(led, e.id) == want
        # the dashboard's sorts read the copies: the same order Python gives on the candidates' values
        page = queries.experiments_page(led, s.id, sort="cost", order="desc", limit=500)
        with_cost = sorted((e for e in rows if e.idx % 3), key=lambda e: (-e.usage.cost_usd, -e.idx))
        assert [r.idx for r in page.rows] == [e.idx for e in with_cost] + \
            [e.idx for e in sorted(rows, key=lambda e: -e.idx) if e.idx % 3 == 0]  # no candidate: last
        page = queries.experiments_page(led, s.id, researcher="search", sort="tokens", order="asc", limit=500)
        want_idx = [e.idx for e in sorted((e for e in rows if e.idx % 3 and e.researcher == "search"),
                                          key=lambda e: (e.usage.tokens_in + e.usage.tokens_out, e.idx))]
        assert [r.idx for r in page.rows] == want_idx and page.total == len(want_idx)


def test_the_sort_columns_follow_the_candidate(url: str) -> None:
    with Ledger(url) as led:
        s = _session(led)
        base = led.start_experiment(s.id, idx=0, parent_commit="p", seed=0, candidate=None, description="b",
                                    propose_s=0.0)
        cand = Candidate(parent="p", rationale="r", researcher="llm", usage=Usage(tokens_in=100, tokens_out=7,
                                                                                  cost_usd=0.25))
        one = led.start_experiment(s.id, idx=1, parent_commit="p", seed=0, candidate=cand, description="c",
                                   propose_s=0.0)
        assert _sort_row(led, base) == (None, None, None)
        assert _sort_row(led, one) == ("llm", 0.25, 107)
        led.update_experiment(base, diff="baseline diff\n")  # an empty candidate row appears: so do its figures
        assert _sort_row(led, base) == ("", 0.0, 0)
        led.finish_experiment(one, status=Status.DISCARD, metric=1.0)
        assert _sort_row(led, one) == ("llm", 0.25, 107)


def test_every_sort_at_any_page_walks_an_index(tmp_path: Path) -> None:
    """SQLite's plan for the query that picks a page of every sort column, either order, unfiltered and
    filtered by researcher: one index, no temporary B-tree (a sort of the whole session cost 300 ms at page
    500 of 100,000 experiments)."""
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as led:
        s = _session(led)
        queries.ensure_indexes(led)
        eng = queries.engine_of(led)
        with _page_queries(eng) as seen:
            for sort in queries.SORTS:
                for order in ("asc", "desc"):
                    for researcher in (None, "llm"):
                        seen.clear()
                        queries.experiments_page(led, s.id, sort=sort, order=order, researcher=researcher,
                                                 limit=50, offset=25_000)
                        assert len(seen) == 1, (sort, order, seen)
                        statement, params = seen[0]
                        with eng.connect() as conn:
                            plan = " | ".join(str(r[-1]) for r in conn.exec_driver_sql(
                                "EXPLAIN QUERY PLAN " + statement, params))
                        assert "TEMP B-TREE" not in plan and "INDEX" in plan, (sort, order, researcher, plan)


@pytest.mark.postgres
def test_every_sort_walks_an_index_on_postgres_too(pg_url: str) -> None:
    """PostgreSQL walks a plain index backwards only as ``DESC NULLS FIRST``: a page sorted ``DESC NULLS LAST``
    sorted the whole session there. With sorting and sequential scans priced out (``enable_sort``,
    ``enable_seqscan`` off), a plan that still has a Sort node has no index to give the order."""
    with Ledger(pg_url) as led:
        s = _session(led)
        for i in range(8):  # NULLs, ties and values in every nullable sort column: the order is checked too
            cand = None if i % 3 == 0 else Candidate(parent="p", rationale="r", researcher=("llm", "search")[i % 2],
                                                       usage=Usage(tokens_in=10 * (i % 4), cost_usd=(i % 5) / 100))
            e = led.start_experiment(s.id, idx=i, parent_commit="p", seed=0, candidate=cand, description="d",
                                     propose_s=0.1 * (i % 4))
            led.finish_experiment(e, status=(Status.DISCARD, Status.KEEP)[i % 2], metric=None if i == 4 else i % 3)
        queries.ensure_indexes(led)
        eng = queries.engine_of(led)
        with _page_queries(eng) as seen:
            for sort, col in queries.SORTS.items():
                with eng.connect() as conn:
                    values = dict(conn.execute(sa.select(experiments.c.idx, col)).all())
                for order in ("asc", "desc"):
                    seen.clear()
                    page = queries.experiments_page(led, s.id, sort=sort, order=order, limit=50)
                    # the answer is unchanged: NULLs last either way, ties by idx in the asked order
                    sign = 1 if order == "asc" else -1
                    known = sorted((i for i in values if values[i] is not None),
                                   key=lambda i: (values[i], i), reverse=sign < 0)
                    assert [r.idx for r in page.rows] == known + sorted(
                        (i for i in values if values[i] is None), reverse=sign < 0), (sort, order)
                    statement, params = seen[0]
                    with eng.connect() as conn:
                        conn.exec_driver_sql("SET enable_sort = off")
                        conn.exec_driver_sql("SET enable_seqscan = off")
                        plan = " | ".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, params))
                    assert "Sort" not in plan.replace("Sort Key", "") and "Index" in plan, (sort, order, plan)
