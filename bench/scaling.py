"""Cost per experiment as one session grows: does the harness stay constant-time?

    python bench/scaling.py [--max 10000] [--window 50] [--sandbox auto|required|none] [--profile FILE]
                            [--tracemalloc A,B]

One session through the real Engine (git worktrees and commits, the SQLite ledger, the audit log,
the sandbox as the user gets it), with a run command that exits at once (``cat score.txt``), so
what is measured is the harness. A scripted researcher keeps one experiment in five (a new
best score: commit, branch advance, the incumbent's update) and discards the rest.

At each checkpoint (100, 1,000, 10,000, up to ``--max``) it reports, over the ``--window``
experiments before it: the harness's CPU per experiment (this process, user + system; and its
children: git, bwrap, the run), the wall time per experiment (start-to-start), and the process's
RSS, and the number of blocks Python has allocated (``sys.getallocatedblocks()``: live objects,
which grow before RSS does while freed memory is reused). Goal (issue 13): flat within 20% from 100
to 10,000, RSS flat. A ``--max`` that is not one of these
checkpoints is one more. ``--tracemalloc A,B`` snapshots the Python heap at experiments A and B
and prints the 25 allocation sites that grew most between them (tracemalloc slows the harness:
read the CPU columns of such a run as meaningless).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from overhead import make_lab  # bench/ is this script's folder: the same one-file lab

from nightlab.engine import Engine
from nightlab.researchers import Context
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.types import Candidate

CHECKPOINTS = (100, 1_000, 10_000)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int, default=10_000, help="the last checkpoint (100, 1000 or 10000)")
    ap.add_argument("--window", type=int, default=50, help="experiments measured before each checkpoint")
    ap.add_argument("--sandbox", default="auto", choices=["required", "auto", "none"])
    ap.add_argument("--profile", help="write a cProfile of the whole session to this file")
    ap.add_argument("--tracemalloc", metavar="A,B", help="diff heap snapshots taken at experiments A and B")
    args = ap.parse_args()
    points = sorted({*(c for c in CHECKPOINTS if c <= args.max), args.max})
    snap_at = [int(x) for x in args.tracemalloc.split(",")] if args.tracemalloc else []
    snaps: list[tracemalloc.Snapshot] = []
    if snap_at:
        tracemalloc.start(8)
    marks: dict[int, tuple[float, float, float, float, int]] = {}  # idx -> (wall, cpu, cpu children, rss, blocks)

    def step(ctx: Context) -> Candidate:
        t = os.times()
        if ctx.idx in points or ctx.idx + args.window in points:  # only these: the bench keeps no row per step
            marks[ctx.idx] = (time.monotonic(), t.user + t.system, t.children_user + t.children_system,
                              rss_mb() if ctx.idx in points else 0.0, sys.getallocatedblocks())
        if ctx.idx in snap_at:
            snaps.append(tracemalloc.take_snapshot())
        score = 1_000_000 - ctx.idx if ctx.idx % 5 == 0 else 5_000_000 + ctx.idx
        return Candidate(parent=ctx.parent, rationale=f"score {score}", files={"score.txt": f"---\nscore: {score}\n"})

    with tempfile.TemporaryDirectory() as tmp:
        lab = make_lab(tmp, points[-1] + 1, 9_000_000)
        eng = Engine(lab, tag="scaling", researcher=ScriptedResearcher([step]), sandbox_mode=args.sandbox)
        prof = cProfile.Profile() if args.profile else None
        t0 = time.monotonic()
        if prof:
            prof.enable()
        session = eng.run()
        if prof:
            prof.disable()
            prof.dump_stats(args.profile)
            pstats.Stats(args.profile).sort_stats("cumulative").print_stats(40)
        wall = time.monotonic() - t0
        print(f"experiments: {eng.ledger.count_experiments(session.id)}  "
              f"sandbox: {session.sandbox}  total wall {wall:.1f}s")
        print("| experiments | harness CPU ms / exp | children CPU ms / exp | wall ms / exp | RSS MB "
              "| Python heap blocks |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for p in points:
            a, b = marks.get(p - args.window), marks.get(p)
            if a is None or b is None:
                continue
            n = args.window
            print(f"| {p:,} | {1000 * (b[1] - a[1]) / n:.1f} | {1000 * (b[2] - a[2]) / n:.1f} | "
                  f"{1000 * (b[0] - a[0]) / n:.1f} | {b[3]:.0f} | {b[4]:,} |")
        eng.close()
    if len(snaps) == 2:
        n = snap_at[1] - snap_at[0]
        diff = snaps[1].compare_to(snaps[0], "traceback")
        print(f"heap growth from experiment {snap_at[0]} to {snap_at[1]}: "
              f"{sum(d.size_diff for d in diff) / n:.0f} bytes / experiment; top sites:")
        for d in diff[:25]:
            print(f"{d.size_diff / n:8.0f} B/exp {d.count_diff / n:6.1f} blocks/exp")
            for line in d.traceback.format()[-8:]:
                print("    " + line)
        print("by line:")
        for d in snaps[1].compare_to(snaps[0], "lineno")[:25]:
            print(f"{d.size_diff / n:8.0f} B/exp {d.count_diff / n:6.1f} blocks/exp  {d.traceback[0]}")


if __name__ == "__main__":
    main()
