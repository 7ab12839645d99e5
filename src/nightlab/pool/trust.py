"""The pool's verification rules, pure functions over a worker's :class:`Record` (BOINC's adaptive replication).

- a claim that says it beats the pool's best is always re-run (:func:`must_verify`);
- other claims are credited for their compute and spot-checked with :func:`check_probability`: always while
  the worker has fewer than ``trust_after`` consecutive valid results, then ``trust_after / streak``, never
  below ``spot_check_min``;
- a re-run that measures clearly worse than the claim (:func:`contradicted`), or a run much cheaper than the
  claimed compute (:func:`compute_inflated`), is an invalid result: :func:`after_result` resets the streak,
  adds a strike and quarantines the worker at ``max_strikes``.

The caller owns the randomness (``rng.random() < check_probability(...)``), so simulations are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from nightlab.spec import PoolSpec
from nightlab.types import Direction

PoolPolicy = PoolSpec  # the validated ``[pool]`` section (frozen)

# a host run shorter than this counts as this long when judging claimed compute: process start and imports
# cost the worker about as much as the run itself on tiny labs
MIN_RUN_S = 1.0


@dataclass(frozen=True)
class Record:
    """One worker's standing."""

    valid_streak: int = 0  # consecutive verified-valid results
    strikes: int = 0
    quarantined: bool = False


def check_probability(r: Record, policy: PoolPolicy) -> float:
    """The chance that a claim of this worker which does not claim a new best is re-run."""
    if r.valid_streak < policy.trust_after:
        return 1.0
    if r.valid_streak <= 0:
        return max(policy.spot_check_min, 0.0)
    return min(1.0, max(policy.spot_check_min, policy.trust_after / r.valid_streak))


def must_verify(claimed: float, incumbent: float | None, direction: Direction) -> bool:
    """True when the claim says it beats the pool's best (or there is no best yet, or it is not a number)."""
    if incumbent is None or not math.isfinite(claimed) or not math.isfinite(incumbent):
        return True
    return direction.better(claimed, incumbent)


def selection_sd(experiments: int) -> float:
    """How many sds the best of ``experiments`` noisy runs lies below their mean, about ``sqrt(2 ln n)``
    (the winner's curse of a greedy keep); ``n`` is capped at 10**6 (at most ~5.3 sds)."""
    n = min(max(1, int(experiments)), 10**6)
    return math.sqrt(2.0 * math.log(n)) if n > 1 else 0.0


def contradicted(claimed: float, measured: float | None, direction: Direction, noise_sd: float | None,
                 policy: PoolPolicy, experiments: int = 1) -> bool:
    """True when the claimed metric is better than the host's re-run beyond the tolerance, or the re-run
    produced no metric (a crash). Tolerance: ``max((tolerance_sd + selection_sd(experiments)) * noise_sd,
    1e-9 * |x|)``: a worker that kept the best of ``experiments`` noisy runs claims an optimistic metric in
    good faith, and is not struck for it."""
    if measured is None or not math.isfinite(measured):
        return True
    if not math.isfinite(claimed):
        return True
    sd = noise_sd if noise_sd is not None and math.isfinite(noise_sd) and noise_sd > 0 else 0.0
    tol = max((policy.tolerance_sd + selection_sd(experiments)) * sd, 1e-9 * max(abs(claimed), abs(measured)))
    return direction.improvement(claimed, measured) > tol


def plausible_experiments(elapsed_s: float, measured_run_s: float, policy: PoolPolicy) -> int:
    """The most experiments a worker can have finished in ``elapsed_s`` seconds (since its invite): ``max_parallel``
    runs at once, each at least ``1 / compute_ratio`` of the host's run of the claim (a faster machine is allowed
    that much; a host run under :data:`MIN_RUN_S` counts as that long)."""
    shortest = max(measured_run_s, MIN_RUN_S) / policy.compute_ratio
    return max(1, math.floor(policy.max_parallel * max(0.0, elapsed_s) / shortest))


def credible_experiments(experiments: int, claimed_before: int, elapsed_s: float, measured_run_s: float,
                         policy: PoolPolicy) -> int:
    """How many of a claim's ``experiments`` the host's clock allows: the worker's experiments of all its claims
    (``claimed_before`` + this one's) cannot exceed :func:`plausible_experiments` since its invite. The count is the
    worker's word and widens the tolerance of :func:`contradicted`; this is the part of it that is believed."""
    room = plausible_experiments(elapsed_s, measured_run_s, policy) - max(0, claimed_before)
    return max(1, min(max(1, int(experiments)), room))


def compute_inflated(claimed_s: float, experiments: int, measured_run_s: float, policy: PoolPolicy, *,
                     claimed_before: int | None = None, elapsed_s: float | None = None) -> bool:
    """True when the claimed seconds per experiment exceed ``compute_ratio`` times the host's run of the claim
    (a host run under :data:`MIN_RUN_S` counts as that long), or, given the worker's clock (``elapsed_s`` since
    its invite and the experiments of its earlier claims), when it claims more experiments than that time allows
    (:func:`credible_experiments`)."""
    if not math.isfinite(claimed_s) or claimed_s < 0:
        return True
    per_exp = claimed_s / max(1, experiments)
    if per_exp > policy.compute_ratio * max(measured_run_s, MIN_RUN_S):
        return True
    if elapsed_s is not None:
        before = claimed_before or 0
        return credible_experiments(experiments, before, elapsed_s, measured_run_s, policy) < max(1, experiments)
    return False


def after_result(r: Record, valid: bool, policy: PoolPolicy) -> Record:
    """The record after one verified result: valid extends the streak; invalid resets it and adds a strike."""
    if valid:
        return replace(r, valid_streak=r.valid_streak + 1)
    strikes = r.strikes + 1
    return Record(valid_streak=0, strikes=strikes, quarantined=r.quarantined or strikes >= policy.max_strikes)


def trust_label(r: Record, policy: PoolPolicy) -> str:
    """A word for the leaderboard: quarantined, new (always checked), or trusted (spot-checked)."""
    if r.quarantined:
        return "quarantined"
    return "new" if check_probability(r, policy) >= 1.0 else "trusted"
