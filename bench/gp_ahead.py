"""What proposing one step ahead costs Optuna's GPSampler, without nightlab: raw Optuna on Rosenbrock-4 (the
objective of bench/efficiency.py's ``optuna`` part, evaluated in-process), the baseline point enqueued first,
10 random start-up trials, 60 more; each sampler asked either after the last result is told (``optimize()``'s
order) or while it is still pending (a pipelined session's order: the trial in flight is RUNNING when the next
is asked; GP then uses qLogEI). Optionally every trial carries a feasible constraint ``[0.0]``, as nightlab's
search researcher stores for GP.

    python bench/gp_ahead.py [--seeds 5] [--trials 60]

Prints the best value per seed for each of the four orders.
"""

from __future__ import annotations

import argparse
import warnings

import optuna
from optuna.distributions import FloatDistribution

NAMES = [f"X{i}" for i in range(1, 5)]


def rosen(p: dict[str, float]) -> float:
    xs = [p[k] for k in NAMES]
    return sum(100 * (xs[i + 1] - xs[i] ** 2) ** 2 + (1 - xs[i]) ** 2 for i in range(3))


def best(seed: int, trials: int, ahead: bool, constrained: bool) -> float:
    space = {k: FloatDistribution(-2.0, 2.0) for k in NAMES}
    study = optuna.create_study(sampler=optuna.samplers.GPSampler(seed=seed, n_startup_trials=10))
    study.enqueue_trial({k: 0.0 for k in NAMES})
    pending: tuple[optuna.trial.Trial, float] | None = None
    for _ in range(trials + 1):
        trial = study.ask(space)
        if constrained:
            study._storage.set_trial_system_attr(trial._trial_id, "constraints", [0.0])
        if ahead:  # the previous trial's result is told only now, after this one was asked
            if pending is not None:
                study.tell(*pending)
            pending = (trial, rosen(trial.params))
        else:
            study.tell(trial, rosen(trial.params))
    if pending is not None:
        study.tell(*pending)
    return float(study.best_value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=60)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for ahead in (False, True):
        for constrained in (False, True):
            values = [round(best(s, args.trials, ahead, constrained), 3) for s in range(args.seeds)]
            print(f"asked {'ahead (pending)' if ahead else 'after the result'}, "
                  f"{'with' if constrained else 'without'} [0.0] constraints: {values}", flush=True)


if __name__ == "__main__":
    main()
