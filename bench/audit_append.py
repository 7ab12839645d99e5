"""Cost of one audit record: canonical JSON, sha256, write, fsync (and the ledger anchor).

    python bench/audit_append.py [--n 1000]

Appends N typical records (a ``decision`` event) to a fresh log in a temp folder on the
same disk as the lab would be (``--dir``), timing each ``emit``; then again with the
ledger anchor (one SQLite write per record, WAL + synchronous=FULL) and with signing.
Reports median, p95 and max in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nightlab.audit import AuditLog, Signer, store_head
from nightlab.ledger import Ledger


def bench(log: AuditLog, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        log.emit("decision", experiment=i, status="discard", metric=0.98 + i * 1e-6,
                 reason="not better than 0.97", evidence={"policy": "greedy", "incumbent": 0.97},
                 commit="ab" * 20)
        out.append((time.perf_counter() - t) * 1e6)
    return out


def report(name: str, us: list[float]) -> None:
    us = sorted(us)
    print(f"{name:<34} median {statistics.median(us):8.0f} us   p95 {us[int(len(us) * 0.95)]:8.0f} us"
          f"   max {us[-1]:8.0f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        root = Path(d)
        report("file only (write + fsync)", bench(AuditLog(root / "a.jsonl", checkpoint_every=10**9), args.n))
        ledger = Ledger(f"sqlite:///{root / 'ledger.db'}")
        log = AuditLog(root / "b.jsonl", checkpoint_every=10**9,
                       anchor=lambda i, c, h: store_head(ledger, i, c, h))
        report("+ ledger anchor per record", bench(log, args.n))
        try:
            signer = Signer.load_or_create(root / "keys")
        except Exception as e:  # cryptography missing
            print(f"signing skipped: {e}")
            return
        log = AuditLog(root / "c.jsonl", checkpoint_every=100, signer=signer,
                       anchor=lambda i, c, h: store_head(ledger, i, c, h))
        report("+ signed checkpoint every 100", bench(log, args.n))


if __name__ == "__main__":
    main()
