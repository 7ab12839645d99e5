"""Acceptance policies on synthetic targets whose truth is known: false keeps, missed gains, runs spent.

    python bench/acceptance.py [--sessions 400] [--candidates 100] [--sigma 1.0] [--seed 0]

A pure in-process simulation (no subprocesses, no git) that drives the *same* policy classes
the engine uses (``nightlab.policy``) with a simulated ``remeasure``. Each session starts from a
baseline whose true metric is 0 (minimised); every candidate has a known true effect on the
current incumbent, drawn from a distribution where most changes do nothing or harm:

- 50%: no effect at all (a new seed, a renamed variable);
- 30%: harmful, effect ``-|N(0, 2 sigma)|``;
- 20%: helpful, effect ``+|N(0, 1 sigma)|`` (typically smaller than one run's noise).

A run measures ``true metric + N(0, sigma)``. The incumbent is handled as the engine handles it
(``Verifier.incumbent_stats``): the baseline's samples are its run plus the calibration runs; a
candidate kept by ``repeat`` brings its fresh re-run samples; a candidate kept by ``greedy`` or
``threshold`` brings its one (selected, hence lucky) sample. Calibration runs (k) are charged to
the policies that need them.

Reported per policy: the false-keep rate (kept changes whose true effect is <= 0, as a share of
all keeps), the missed-improvement rate (helpful changes not kept, as a share of helpful
changes), runs per candidate, runs relative to greedy, the true improvement reached and the
improvement the ledger claims (the recorded incumbent metric against the baseline's run).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nightlab.policy import AcceptancePolicy, Greedy, IncumbentStats, Repeat, Threshold
from nightlab.types import Direction, Measurement

DIRECTION = Direction.MINIMIZE


@dataclass
class Tally:
    keeps: int = 0
    false_keeps: int = 0
    helpful: int = 0
    missed: int = 0
    runs: int = 0
    candidates: int = 0
    gain: float = 0.0  # true improvement over the baseline at the end of the session, summed
    claimed: float = 0.0  # the improvement the ledger shows (recorded incumbent vs baseline run), summed


def draw_effect(rng: np.random.Generator, sigma: float) -> float:
    u = rng.random()
    if u < 0.5:
        return 0.0
    if u < 0.8:
        return -abs(rng.normal(0.0, 2.0 * sigma))
    return abs(rng.normal(0.0, sigma))


def session(policy: AcceptancePolicy, rng: np.random.Generator, n: int, sigma: float, k: int,
            t: Tally) -> None:
    """One simulated session of ``n`` candidates."""
    true_inc = 0.0  # true metric of the incumbent (minimised; the baseline's is 0)

    def run(true_metric: float) -> float:
        t.runs += 1
        return true_metric + rng.normal(0.0, sigma)

    base = run(true_inc)
    noise_sigma, noise_df = None, 0
    samples = [base]
    if policy.needs_noise:
        cal = [run(true_inc) for _ in range(k)]
        noise_sigma, noise_df = float(np.std(cal, ddof=1)), k - 1
        samples += cal
    recorded = base  # the ledger's incumbent metric
    for _ in range(n):
        effect = draw_effect(rng, sigma)
        true_cand = true_inc - effect  # minimised: a helpful effect lowers the metric
        inc = (IncumbentStats.of(samples, noise_sigma, noise_df) if len(samples) > 1
               else IncumbentStats(recorded, tuple(samples), noise_sigma, noise_df))
        remeasure: Callable[[int], list[Measurement]] = lambda r, tc=true_cand: [  # noqa: E731
            Measurement(run(tc)) for _ in range(r)]
        m = Measurement(run(true_cand))
        verdict = policy.decide(m, inc, DIRECTION, remeasure)
        t.candidates += 1
        t.helpful += effect > 0
        if verdict.keep:
            t.keeps += 1
            t.false_keeps += effect <= 0
            true_inc = true_cand
            samples = list(verdict.evidence.get("samples") or [m.metric])
            recorded = float(verdict.evidence.get("estimate", m.metric))
        elif effect > 0:
            t.missed += 1
    t.gain += -true_inc
    t.claimed += base - recorded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=400)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--calibrate", type=int, default=5, help="calibration runs (k)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    policies: list[tuple[str, AcceptancePolicy]] = [
        ("greedy", Greedy()),
        ("threshold (z = 2)", Threshold(z=2.0)),
        ("repeat (greedy screen, r = 3, Welch, alpha = 0.05)", Repeat(screen=Greedy(), r=3)),
        ("repeat, [accept] defaults (threshold screen z = 1, r = 5, Welch, alpha = 0.02)",
         Repeat(screen=Threshold(z=1.0), r=5, alpha=0.02)),
        ("repeat (threshold screen z = 1, r = 5, bootstrap, alpha = 0.02)",
         Repeat(screen=Threshold(z=1.0), r=5, alpha=0.02, test="bootstrap")),
    ]
    rows = []
    t0 = time.perf_counter()
    for name, pol in policies:
        t = Tally()
        rng = np.random.default_rng(args.seed)  # the same candidate stream for every policy
        for _ in range(args.sessions):
            session(pol, rng, args.candidates, args.sigma, args.calibrate, t)
        rows.append((name, t))
    greedy_runs = rows[0][1].runs
    print(f"{args.sessions} sessions x {args.candidates} candidates, sigma = {args.sigma:g}, "
          f"calibration k = {args.calibrate}, seed {args.seed} ({time.perf_counter() - t0:.1f} s)\n")
    print("| policy | keeps | false-keep rate | missed-improvement rate | runs / candidate | runs vs greedy "
          "| true gain / session | claimed gain / session |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, t in rows:
        fk = t.false_keeps / t.keeps if t.keeps else math.nan
        print(f"| {name} | {t.keeps} | {100 * fk:.1f}% | {100 * t.missed / t.helpful:.1f}% | "
              f"{t.runs / t.candidates:.2f} | {t.runs / greedy_runs:.2f}x | "
              f"{t.gain / args.sessions:.2f} sigma | "
              f"{t.claimed / args.sessions:.2f} sigma |")


if __name__ == "__main__":
    main()
