"""Benchmark: every dashboard page and API endpoint against a ledger of 100,000 experiments.

    PYTHONPATH=src python bench/dashboard.py [--n 100000] [--reps 15] [--db /tmp/bench-ledger.db]

Fills a SQLite ledger with one session of ``n`` experiments (bulk inserts through
SQLAlchemy Core executemany, not the engine), then requests each URL ``reps`` times
in-process (Starlette TestClient: the whole app, no network) and prints median and p95
milliseconds. The target (issue 6): every page under 300 ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from nightlab import approvals, queries
from nightlab.ledger import Ledger, candidates, experiments
from nightlab.types import Direction, Status

DIFF = (
    "--- a/train.py\n+++ b/train.py\n@@ -10,7 +10,7 @@\n lr = 0.01\n-depth = 8\n+depth = {d}\n batch = 64\n"
)
LOG = "\n".join(f"step {i}: loss {1 / (i + 1):.4f}" for i in range(40)) + "\n---\nval_bpb: {m:.6f}\n"


def fill(url: str, n: int, seed: int = 0) -> Ledger:
    ledger = Ledger(url)
    s = ledger.create_session(
        tag="bench",
        branch="nightlab/bench",
        base_commit="0" * 40,
        metric_name="val_bpb",
        direction=Direction.MINIMIZE,
        sandbox="bwrap",
        spec_hash="x",
        spec_json='{"run": {"env": {}}}',
        lab_path="/tmp/lab",
        machine={"hostname": "bench"},
        researcher="llm",
    )
    rng = random.Random(seed)
    t0 = time.time() - n * 30.0
    best = 1.0
    exps, cands = [], []
    for i in range(n):
        if i == 0:
            status, metric = Status.KEEP, 1.0
        else:
            r = rng.random()
            improves = rng.random() < max(0.002, 0.25 / (1 + i / 200))  # keeps grow rarer, as they do
            metric = best - rng.uniform(0.0, 0.002) if improves else best + abs(rng.gauss(0.0, 0.004))
            if r < 0.06:
                status, metric = Status.CRASH, None
            elif r < 0.07:
                status, metric = Status.TIMEOUT, None
            elif r < 0.08:
                status, metric = Status.INVALID, None
            elif metric < best:
                status = Status.KEEP
            else:
                status = Status.DISCARD
        if status is Status.KEEP and metric is not None:
            best = metric
        started = t0 + i * 30.0
        exps.append(
            dict(
                id=i + 1,
                session_id=s.id,
                idx=i,
                status=status.value,
                parent_commit="p" * 40,
                commit=f"{i:040x}" if status is Status.KEEP else None,
                metric=metric,
                secondary_json='{"mem_mb": 812.0}',
                trust="evaluator",
                description=f"idea {i}: try depth {i % 17}",
                reason="not better" if status is Status.DISCARD else status.value,
                log_tail=LOG.format(m=metric or 0.0),
                seed=0,
                started_at=started,
                finished_at=started + 25.0,
                propose_s=rng.uniform(2, 8),
                run_s=rng.uniform(15, 22),
                overhead_s=rng.uniform(0.5, 2),
                exit_code=0 if metric is not None else 1,
                evidence_json='{"policy": "greedy"}',
                pid=None,
                pid_start=None,
                worktree="",
            )
        )
        cands.append(
            dict(
                experiment_id=i + 1,
                researcher=("llm", "search")[i % 7 == 0],
                rationale=f"rationale {i}",
                diff=DIFF.format(d=i % 17),
                params_json="{}",
                tokens_in=rng.randint(2000, 9000),
                tokens_out=rng.randint(100, 900),
                tokens_cached=rng.randint(0, 2000),
                cost_usd=rng.uniform(0.001, 0.02),
                usage_s=rng.uniform(2, 8),
            )
        )
        c = cands[-1]  # the experiment's copies of its candidate's sort keys (ledger schema v4; older: none)
        if "sort_cost_usd" in experiments.c:
                exps[-1].update(sort_researcher=c["researcher"], sort_cost_usd=c["cost_usd"],
                            sort_tokens=c["tokens_in"] + c["tokens_out"])
    with ledger.engine.begin() if hasattr(ledger, "engine") else ledger._engine.begin() as conn:
        for k in range(0, n, 20000):
            conn.execute(experiments.insert(), exps[k : k + 20000])
            conn.execute(candidates.insert(), cands[k : k + 20000])
    t = time.perf_counter()
    queries.ensure_indexes(ledger)
    print(f"dashboard indexes created in {time.perf_counter() - t:.2f} s")
    ledger.update_session(s.id, baseline_metric=1.0, incumbent_metric=best, status="finished")
    for j in range(3):
        approvals.request(ledger, s.id, n + j, "run", diff=DIFF.format(d=j), rationale="wait")
    return ledger


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--db", default="/tmp/nightlab-bench-ledger.db")
    args = ap.parse_args()
    from fastapi.testclient import TestClient

    from nightlab.web.app import create_app

    db = Path(args.db)
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        p.unlink(missing_ok=True)
    t = time.perf_counter()
    ledger = fill(f"sqlite:///{db}", args.n)
    print(
        f"filled {args.n} experiments in {time.perf_counter() - t:.1f} s ({db.stat().st_size / 1e6:.0f} MB)"
    )
    t = time.perf_counter()
    app = create_app(ledger, None)
    client = TestClient(app, base_url="http://127.0.0.1:8765",
                        cookies={"nightlab_token": app.state.access.token})  # as after the printed URL
    client.__enter__()  # runs the app's lifespan, as uvicorn does: it warms the newest sessions' aggregates
    print(f"server start (lifespan, caches warmed): {(time.perf_counter() - t) * 1000:.0f} ms")
    mid, last = args.n // 2, args.n - 1
    urls = [
        "/",
        "/s/bench",
        "/s/bench?sort=metric&order=asc",
        "/s/bench?status=keep&status=discard&researcher=search",
        f"/s/bench?page={args.n // 50 - 1}",
        "/s/bench?sort=cost&order=desc&page=500",
        f"/s/bench?sort=cost&order=asc&page={args.n // 50 - 1}",
        f"/s/bench?sort=researcher&order=asc&page={args.n // 100}",
        f"/s/bench?sort=tokens&order=desc&page={args.n // 50 - 1}",
        f"/s/bench?sort=run_s&order=asc&page={args.n // 100}",
        f"/s/bench/e/{mid}",
        "/s/bench/costs",
        "/audit",
        "/approvals",
        "/s/bench/fragment/chart",
        "/s/bench/fragment/summary",
        "/s/bench/fragment/table",
        "/api/sessions",
        "/api/sessions/bench",
        "/api/sessions/bench/experiments?limit=500",
        "/api/sessions/bench/experiments?sort=metric&order=asc&status=discard",
        f"/api/sessions/bench/experiments?since={last - 3}",
        f"/api/sessions/bench/experiments/{mid}",
        "/api/sessions/bench/chart",
        "/api/sessions/bench/costs",
        "/api/audit",
        "/api/approvals",
    ]
    print(f"{'endpoint':70s} {'median ms':>10s} {'p95 ms':>8s} {'KB':>6s}")
    worst = 0.0
    for url in urls:
        times, size = [], 0
        for _ in range(args.reps):
            t = time.perf_counter()
            r = client.get(url)
            times.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, (url, r.status_code, r.text[:300])
            size = len(r.content)
        times.sort()
        med, p95 = statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]
        worst = max(worst, p95)
        print(f"{url:70s} {med:10.1f} {p95:8.1f} {size / 1024:6.0f}")
    # cold: the first request after the engine records a new experiment (memoized aggregates recomputed)
    s = ledger.get_session("bench")
    cold_worst = 0.0
    print(f"{'cold (right after a new experiment)':70s} {'ms':>10s}")
    for url in ["/s/bench", "/s/bench/costs", "/api/sessions/bench", "/api/sessions/bench/chart", "/"]:
        idx = ledger.next_idx(s.id)
        eid = ledger.start_experiment(s.id, idx=idx, parent_commit="p", seed=0, candidate=None,
                                      description="new", propose_s=1.0)
        ledger.finish_experiment(eid, status=Status.DISCARD, metric=2.0, run_s=20.0)
        t = time.perf_counter()
        assert client.get(url).status_code == 200
        ms = (time.perf_counter() - t) * 1000
        cold_worst = max(cold_worst, ms)
        print(f"{url:70s} {ms:10.1f}")
    print(f"worst cold: {cold_worst:.1f} ms")
    print(f"worst p95: {worst:.1f} ms ({'under' if worst < 300 else 'OVER'} the 300 ms target)")
    client.__exit__(None, None, None)
    ledger.close()
    return 0 if worst < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
