"""How often `nightlab compare` names a wrong winner, and how often it finds a real one.

    python bench/compare_power.py [--trials 2000]

Simulated comparisons of two arms with a known true difference, through the real verdict code
(:func:`nightlab.compare.analyse`: paired t-test over seeds, Holm-corrected, alpha = 0.05). Each seed's
best metric is ``mu_arm + seed_effect + noise``: the seed effect (sd 1) is shared by both arms (the same seed
gives the same data order, the same start), the noise (sd 1) is the arm's own. Reported: the false-winner rate
(a winner declared when the true difference is 0; goal <= 5%), and the power (the right winner declared) at
3, 5 and 10 seeds for true differences of 0.5, 1 and 2 noise sd.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nightlab.compare import Budget, SeedResult, analyse
from nightlab.types import Direction


def seed_results(means: list[float]) -> list[SeedResult]:
    return [SeedResult(k, f"s{k}", m, None, 10, 10, 1, 0, 0, 60.0, 0.0, 0, ()) for k, m in enumerate(means)]


def trial(rng: random.Random, seeds: int, delta: float) -> str | None:
    shared = [rng.gauss(0, 1) for _ in range(seeds)]
    a = [0.0 + s + rng.gauss(0, 1) for s in shared]  # minimize: b is better by delta
    b = [-delta + s + rng.gauss(0, 1) for s in shared]
    r = analyse("sim", "loss", Direction.MINIMIZE, Budget("experiments", 10), 0.05,
                {"a": ("", seed_results(a)), "b": ("", seed_results(b))})
    return r.winner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    print(f"{args.trials} simulated comparisons per cell, alpha 0.05, shared seed effect sd 1, noise sd 1\n")
    print("| seeds | false winner (true diff 0) | power, diff 0.5 sd | power, diff 1 sd | power, diff 2 sd |")
    print("|---:|---:|---:|---:|---:|")
    for seeds in (3, 5, 10):
        null = sum(trial(rng, seeds, 0.0) is not None for _ in range(args.trials)) / args.trials
        powers = [sum(trial(rng, seeds, d) == "b" for _ in range(args.trials)) / args.trials for d in (0.5, 1, 2)]
        print(f"| {seeds} | {100 * null:.1f}% | " + " | ".join(f"{100 * p:.1f}%" for p in powers) + " |")
    print(f"\n({time.monotonic() - t0:.1f} s)")


if __name__ == "__main__":
    main()
