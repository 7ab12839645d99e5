"""The dashboard's incremental aggregates (queries.incremental) equal a computation from scratch while a
session grows: experiments start, several run at once and finish out of order, some are left running."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from tests.conftest import dashboard_client

from nightlab import queries
from nightlab.ledger import Ledger
from nightlab.types import Candidate, Direction, Status, Usage


def _fresh(ledger: Ledger, session_id: int, fn):  # type: ignore[no-untyped-def]
    """``fn()`` with the incremental and memo caches emptied: the aggregate computed from every row."""
    saved_inc, saved_memo = dict(queries._inc), dict(queries._memo)
    queries._inc.clear()
    queries._memo.clear()
    try:
        return fn()
    finally:
        queries._inc.clear()
        queries._inc.update(saved_inc)
        queries._memo.clear()
        queries._memo.update(saved_memo)


def test_incremental_aggregates_match_a_full_recount(tmp_path: Path):
    _grow_and_compare(f"sqlite:///{tmp_path / 'l.db'}", tmp_path)


@pytest.mark.postgres
def test_incremental_aggregates_match_a_full_recount_on_postgresql(pg_url: str, tmp_path: Path):
    _grow_and_compare(pg_url, tmp_path)


def _grow_and_compare(url: str, tmp_path: Path) -> None:
    rng = random.Random(5)
    with Ledger(url) as ledger:
        s = ledger.create_session(tag="t", branch="nightlab/t", base_commit="0" * 40, metric_name="m",
                                  direction=Direction.MINIMIZE, sandbox="none", spec_hash="x", spec_json="{}",
                                  lab_path=str(tmp_path), machine={}, researcher="scripted")
        running: list[tuple[int, int]] = []
        idx = 0
        for step in range(120):
            if rng.random() < 0.6 or not running:  # start one (with a candidate that cost something)
                cand = Candidate(parent="p", rationale=f"r{idx}", researcher="scripted",
                                 usage=Usage(tokens_in=rng.randint(1, 99), tokens_out=3, cost_usd=rng.random() / 100))
                eid = ledger.start_experiment(s.id, idx=idx, parent_commit="p", seed=0, candidate=cand,
                                              description=f"e{idx}", propose_s=rng.random())
                running.append((eid, idx))
                idx += 1
            else:  # finish one of those running, not necessarily the oldest
                eid, _ = running.pop(rng.randrange(len(running)))
                status = rng.choice([Status.KEEP, Status.DISCARD, Status.DISCARD, Status.CRASH])
                metric = None if status is Status.CRASH else rng.uniform(0, 10)
                ledger.finish_experiment(eid, status=status, metric=metric, run_s=rng.uniform(0.1, 3),
                                         overhead_s=rng.random() / 10, secondary={"mem": rng.uniform(1, 9)})
            if step % 7:
                continue
            sess = ledger.get_session("t")
            assert sess is not None
            # the same sums (added in another order: equal to the last bits)
            got_t = dataclasses.astuple(queries.timing(ledger, s.id))
            want_t = dataclasses.astuple(_fresh(ledger, s.id, lambda: queries.timing(ledger, s.id)))
            assert got_t == pytest.approx(want_t)
            chart = queries.chart_data(ledger, sess)
            assert chart == _fresh(ledger, s.id, lambda: queries.chart_data(ledger, sess))  # noqa: B023
            assert sum(1 for p in chart.points if p.status == "running") == len(running)
            for fig, run_s in (("mem", False), ("run_s", True)):
                got = queries.pareto_points(ledger, s.id, fig, run_s)
                assert sorted(got) == sorted(_fresh(ledger, s.id, lambda: queries.pareto_points(
                    ledger, s.id, fig, run_s)))  # noqa: B023
                want = {e.idx for e in ledger.experiments(s.id)
                        if e.status in (Status.KEEP, Status.DISCARD) and e.metric is not None}
                assert {p[0] for p in got} == want


def _session_with(tmp_path: Path, n: int, run_s: float) -> tuple[Ledger, int]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'same.db'}")
    s = ledger.create_session(tag="t", branch="nightlab/t", base_commit="0" * 40, metric_name="m",
                              direction=Direction.MINIMIZE, sandbox="none", spec_hash="x", spec_json="{}",
                              lab_path=str(tmp_path), machine={}, researcher="scripted")
    for i in range(n):
        eid = ledger.start_experiment(s.id, idx=i, parent_commit="p", seed=0, candidate=None, description="",
                                      propose_s=0.0)
        ledger.finish_experiment(eid, status=Status.DISCARD, metric=1.0, run_s=run_s)
    return ledger, s.id


def test_a_recreated_ledger_at_the_same_path_is_not_served_the_old_sums(tmp_path: Path):
    ledger, sid = _session_with(tmp_path, 5, 1.0)
    assert queries.timing(ledger, sid).run_s == 5.0
    ledger.close()
    for p in tmp_path.glob("same.db*"):
        p.unlink()
    ledger, sid2 = _session_with(tmp_path, 3, 2.0)  # same url, same session id, other rows
    assert sid2 == sid
    assert queries.timing(ledger, sid).run_s == 6.0 and queries.timing(ledger, sid).n == 3
    ledger.close()


def test_the_dashboard_builds_the_newest_sessions_aggregates_before_its_first_request(tmp_path: Path):
    # at 100k experiments the first session page after the server started took 2.2 s building them

    from nightlab.web.app import create_app

    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        s = ledger.create_session(tag="t", branch="nightlab/t", base_commit="0" * 40, metric_name="m",
                                  direction=Direction.MINIMIZE, sandbox="none", spec_hash="x", spec_json="{}",
                                  lab_path=str(tmp_path), machine={}, researcher="scripted")
        for idx in range(5):
            eid = ledger.start_experiment(s.id, idx=idx, parent_commit="p", seed=0, candidate=None,
                                          description=f"e{idx}", propose_s=0.1)
            ledger.finish_experiment(eid, status=Status.DISCARD, metric=float(idx), run_s=1.0)
        queries._inc.clear()
        queries._memo.clear()

        def cached() -> set[str]:
            return {k[3] for k in queries._inc if k[2] == s.id}

        app = create_app(ledger, None)
        assert cached() == set()  # nothing is read when the app is built (tests and `ui --home` build many)
        with dashboard_client(app, base_url="http://127.0.0.1:8765") as client:  # the lifespan: as uvicorn starts it
            assert {"chart_rows", "timing", "researchers"} <= cached()
            assert any(name.startswith("pareto:") for name in cached())
            assert client.get("/s/t").status_code == 200
