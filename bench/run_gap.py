"""The time between two runs, as the runs see it: nightlab (1 slot, pipelined search, no sandbox) vs
``optuna.create_study().optimize()`` on bench/efficiency.py's Rosenbrock-4 lab.

    python bench/run_gap.py [--trials 40] [--sleep 0.2] [--seed 1] [--sampler gp]

Each run appends the time to a file at its first line and after its result: the gap is one run's last
line to the next run's first line (interpreter start-up included on both sides, as it is in both).
Whatever the harness does between two runs -- Optuna's sampling, nightlab's records -- is in it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import efficiency as eff


def gaps(path: Path) -> tuple[list[float], list[float], list[float]]:
    """(one run's last line to the next one's first, a run's first line to its last, start to start), ms."""
    between: list[float] = []
    inside: list[float] = []
    cycle: list[float] = []
    last_end = last_start = None
    for line in path.read_text().splitlines():
        t, what = line.split()
        if what == "start":
            if last_end is not None:
                between.append(1000 * (float(t) - last_end))
            if last_start is not None:
                cycle.append(1000 * (float(t) - last_start))
            last_start = float(t)
        if what == "end":
            last_end = float(t)
            if last_start is not None:
                inside.append(1000 * (last_end - last_start))
    return between, inside, cycle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--sleep", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sampler", choices=["tpe", "gp"], default="tpe", help="the sampler on both sides")
    args = ap.parse_args()
    rosen = eff.ROSEN
    with tempfile.TemporaryDirectory(prefix="nl-gap-") as tmp:
        for who in ("nightlab", "optuna"):
            marks = Path(tmp) / f"{who}.txt"
            eff.ROSEN = (f"import time as _t\nopen({str(marks)!r}, 'a').write(f'{{_t.time()}} start\\n')\n"
                         + rosen.replace('print(f"value: {v:.10g}")', 'print(f"value: {v:.10g}")\n'
                                         f"open({str(marks)!r}, 'a').write(f'{{_t.time()}} end\\n')"))
            run = eff.nightlab_rosen if who == "nightlab" else eff.optuna_rosen
            run(args.seed, args.trials, args.sleep, Path(tmp), args.sampler)
            g, inside, cycle = gaps(marks)
            print(f"{who}: between two runs (ms) median {statistics.median(g):.1f}, "
                  f"p90 {sorted(g)[int(0.9 * len(g))]:.1f}, n={len(g)}; inside a run median "
                  f"{statistics.median(inside):.1f}; start to start median {statistics.median(cycle):.1f}")


if __name__ == "__main__":
    main()
