"""Benchmark: a page of the dashboard's experiment list, every sort column, on PostgreSQL.

    . .ci/services.sh   # sets NIGHTLAB_TEST_POSTGRES
    PYTHONPATH=src python bench/dashboard_sorts.py [--n 20000] [--offset 5000] [--reps 30] [--explain]

Fills a fresh database with one session of ``n`` experiments (``bench/dashboard.py``'s bulk insert),
creates the dashboard's indexes (``queries.ensure_indexes``), ANALYZEs, then times
``queries.experiments_page`` (50 rows at ``offset``) for six sort columns in each order and prints
the median milliseconds per sort and their mean per order. ``--explain`` prints each sort's plan
(EXPLAIN ANALYZE): ``index`` when an index gives the order, ``SORT`` when PostgreSQL sorted the session.
The database is dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dashboard import fill

from nightlab import queries

TIMED = ("metric", "cost", "tokens", "researcher", "run_s", "started")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--offset", type=int, default=5_000)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--explain", action="store_true")
    args = ap.parse_args()
    admin_url = os.environ.get("NIGHTLAB_TEST_POSTGRES")
    if not admin_url:
        print("set NIGHTLAB_TEST_POSTGRES (`. .ci/services.sh`)", file=sys.stderr)
        return 2
    name = f"nightlab_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        led = fill(sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False), args.n)
        eng = queries.engine_of(led)
        with eng.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
        session = led.get_session("bench")
        assert session is not None
        if args.explain:
            seen: list[tuple[str, object]] = []

            def capture(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
                if statement.lstrip().startswith("SELECT experiments.id") and "ORDER BY" in statement:
                    seen.append((statement, params))

            sa.event.listen(eng, "before_cursor_execute", capture)
            for sort in queries.SORTS:
                for order in ("asc", "desc"):
                    seen.clear()
                    queries.experiments_page(led, session.id, sort=sort, order=order, limit=50, offset=args.offset)
                    statement, params = seen[0]
                    with eng.connect() as conn:
                        plan = [r[0].strip() for r in conn.exec_driver_sql("EXPLAIN ANALYZE " + statement, params)]
                    how = "SORT" if any(line.startswith("->  Sort") for line in plan) else "index"
                    scan = next((line for line in plan if "Scan" in line), "").split("  (")[0]
                    took = next((line for line in plan if line.startswith("Execution Time")), "")
                    print(f"{sort:10s} {order:4s} {how:5s} {scan} | {took}")
            sa.event.remove(eng, "before_cursor_execute", capture)
        for order in ("desc", "asc"):
            medians = []
            for sort in TIMED:
                times = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    queries.experiments_page(led, session.id, sort=sort, order=order, limit=50, offset=args.offset)
                    times.append((time.perf_counter() - t) * 1000)
                medians.append(statistics.median(times))
                print(f"  {order} {sort:10s} median {medians[-1]:.2f} ms")
            print(f"{order}: mean of the medians {statistics.mean(medians):.2f} ms "
                  f"({len(TIMED)} sorts, {args.reps} reps, {args.n} rows, offset {args.offset})")
        led.close()
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
