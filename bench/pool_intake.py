"""What the pool host pays to take a claim in, over real HTTP on loopback (no verification runs).

    python bench/pool_intake.py [--claims 200] [--workers 4]

Builds a throwaway quickfit lab, opens its pool session (the branch; nothing runs), serves the dashboard app
with the pool router through uvicorn on 127.0.0.1, and sends ``--claims`` claims round-robin from
``--workers`` invited workers, one at a time: distinct changes of new bests (``queued``), resent claim ids
(idempotent, 200), another worker's diff (``duplicate``), a protected file (``rejected``), a diff that does
not apply (422), an oversized body (413). Prints the median and p95 latency per outcome and the claims per
second, and the time to build the sanitised bundle (cold) and serve it again (cached).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--claims", type=int, default=200)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()

    import httpx
    import uvicorn

    from nightlab.pool import store
    from nightlab.pool.serve import open_pool
    from nightlab.scaffold import copy_example
    from nightlab.web.app import create_app

    with tempfile.TemporaryDirectory(prefix="nightlab-pool-bench-") as tmp:
        lab = copy_example("quickfit", Path(tmp) / "lab")
        engine, host, _ = open_pool(lab, sandbox_mode="none")
        try:
            head = host.head()
            assert head is not None
            fit = (lab / "fit.py").read_text().splitlines()
            line = next(i for i, x in enumerate(fit) if x.startswith("LEARNING_RATE"))
            tokens = [store.invite(host.ledger, "main", f"w{k}") for k in range(args.workers)]
            server = uvicorn.Server(uvicorn.Config(create_app(host.ledger, lab, pool=host), host="127.0.0.1",
                                                   port=0, log_level="warning", lifespan="off"))
            th = threading.Thread(target=server.run, daemon=True)
            th.start()
            while not server.started:
                time.sleep(0.02)
            url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/api/pool"

            def diff(new: str, path: str = "fit.py", old: str | None = None) -> str:
                old = old if old is not None else fit[line]
                ctx_a, ctx_b = fit[line - 1], fit[line + 1]
                return (f"diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n"
                        f"@@ -{line},3 +{line},3 @@\n {ctx_a}\n-{old}\n+{new}\n {ctx_b}\n")

            def body(d: str, metric: float, k: int) -> dict:
                cid = hashlib.sha256(f"{k}|{d}".encode()).hexdigest()[:32]
                return {"claim_id": cid, "parent": head, "diff": d, "metric": metric, "samples": [metric],
                        "log_tail": "val_loss: ...", "seed": k, "hardware": "bench", "compute_s": 1.0,
                        "experiments": 1, "researcher": "search"}

            lat: dict[str, list[float]] = {}
            sent: list[tuple[str, dict]] = []
            with httpx.Client(timeout=30) as client:
                t_all = time.perf_counter()
                for k in range(args.claims):
                    tok = tokens[k % len(tokens)]
                    kind = k % 6
                    if kind == 0 or not sent:
                        b = body(diff(f"LEARNING_RATE = {0.001 + k * 1e-6:.6f}"), 0.001, k)
                    elif kind == 1:
                        tok, b = sent[-1]  # the same claim again
                    elif kind == 2:
                        b = {**sent[-1][1], "claim_id": hashlib.sha256(f"dup{k}".encode()).hexdigest()[:32]}
                    elif kind == 3:
                        b = body("diff --git a/prepare.py b/prepare.py\n--- a/prepare.py\n+++ b/prepare.py\n"
                                 "@@ -1 +1 @@\n-x\n+y\n", 0.001, k)
                    elif kind == 4:
                        b = body(diff("LEARNING_RATE = 0.5", old="NOT THE LINE"), 0.001, k)
                    else:
                        b = {**body(diff("LEARNING_RATE = 0.3"), 0.001, k), "log_tail": "x" * 200_000}
                    t0 = time.perf_counter()
                    r = client.post(f"{url}/claims", json=b, headers={"Authorization": f"Bearer {tok}"})
                    dt = time.perf_counter() - t0
                    out = r.json().get("status", "") if r.status_code in (200, 202) else ""
                    label = f"{r.status_code} {out}".strip()
                    lat.setdefault(label, []).append(dt)
                    if kind == 0 and r.status_code == 202:
                        sent.append((tok, b))
                    if out == "rejected":  # a strike: wiped, so that the mix of answers stays the same
                        from nightlab.pool.trust import Record

                        for w in store.list_workers(host.ledger, "main"):
                            store.set_record(host.ledger, "main", w.name, Record())
                    if label == "429":  # max_pending: let this worker's queue go (nothing verifies here)
                        for c in store.list_claims(host.ledger, "main", statuses=["queued"]):
                            store.update_claim(host.ledger, "main", c.worker, c.claim_id, status="checked")
                total = time.perf_counter() - t_all
                t0 = time.perf_counter()
                cold = client.get(f"{url}/bundle", headers={"Authorization": f"Bearer {tokens[0]}"})
                t_cold = time.perf_counter() - t0
                t0 = time.perf_counter()
                client.get(f"{url}/bundle", headers={"Authorization": f"Bearer {tokens[0]}"})
                t_warm = time.perf_counter() - t0
            server.should_exit = True
            th.join(10)
        finally:
            engine.close()
            host.ledger.close()
    print(f"{args.claims} claims from {args.workers} workers in {total:.2f} s ({args.claims / total:.0f} claims/s), "
          "one at a time over loopback HTTP, SQLite ledger")
    print("| answer | claims | median ms | p95 ms |")
    print("| --- | ---: | ---: | ---: |")
    for label, xs in sorted(lat.items()):
        xs = sorted(xs)
        p95 = xs[min(len(xs) - 1, int(0.95 * len(xs)))]
        print(f"| {label} | {len(xs)} | {1000 * statistics.median(xs):.1f} | {1000 * p95:.1f} |")
    print(f"bundle ({len(cold.content)} bytes): {1000 * t_cold:.0f} ms to build and send, "
          f"{1000 * t_warm:.0f} ms cached")


if __name__ == "__main__":
    main()
