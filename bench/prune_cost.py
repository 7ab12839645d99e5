"""What reading progress lines costs the harness: the pruner's CPU seconds per run, as a session grows.

    python bench/prune_cost.py [--steps 5000] [--runs 30] [--flood 100000]

Each run's lines go through nightlab's real watcher and pruner (``Pruner.watch``, ``Watch.feed``: the
path a run's log lines take once read; the median pruner, ``reference = "all"``, 1 startup run), one
run after another: a baseline, then ``--runs`` candidates that each finish a little better than the one
before (none is pruned, so each reports every step: the costliest honest case, a train.py that prints
every optimizer step). Then one run prints ``--flood`` lines (a run flooding its log with progress
lines). Printed: the pruner's seconds for the first, 10th and last candidate, and for the flood.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from nightlab.prune import Pruner
from nightlab.spec import PruneSpec
from nightlab.types import Direction, Status


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5000, help="progress lines a run prints")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--flood", type=int, default=100_000, help="lines the last run prints (0: none)")
    args = ap.parse_args()
    pruner = Pruner(PruneSpec(pruner="median", startup_runs=1), "loss", Direction.MINIMIZE)
    stop = threading.Event()
    took: list[float] = []
    for i in range(args.runs + 1):
        w = pruner.watch(None, stop, prunable=i > 0)
        t = time.perf_counter()
        for s in range(1, args.steps + 1):
            w.feed(f"nightlab: step={s} loss={5 - i * 0.001 + 10 / s}")
        took.append(time.perf_counter() - t)
        w.close()
        w.finish(Status.DISCARD if w.pruned_at is None else Status.PRUNED, 5.0 - i * 0.001, 1.0)
    print(f"{args.steps} lines a run, load {os.getloadavg()[0]:.2f}: candidate 1 {took[1]:.2f} s, "
          f"candidate {min(10, args.runs)} {took[min(10, args.runs)]:.2f} s, candidate {args.runs} {took[-1]:.2f} s, "
          f"all {sum(took):.1f} s")
    if args.flood:
        w = pruner.watch(None, stop, prunable=True)
        t = time.perf_counter()
        for s in range(1, args.flood + 1):
            w.feed(f"nightlab: step={s} loss=0.5")
        print(f"a run printing {args.flood} lines: {time.perf_counter() - t:.2f} s ({len(w.curve)} points stored)")
        w.close()


if __name__ == "__main__":
    main()
