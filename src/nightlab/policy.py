"""Acceptance policies: turn a measurement into keep or discard, with the evidence.

A policy only decides; it never proposes and never touches git. Every verdict carries the
numbers it rests on (samples, the test, its result), stored with the experiment.

Policies are small pieces that compose (STYLE.md habit 10):

- :class:`Greedy` keeps what is strictly better than the incumbent (karpathy/autoresearch's
  rule). It keeps lucky runs.
- :class:`Threshold` keeps an improvement of at least ``max(min_delta, z * sigma)``, where
  sigma is the metric's noise floor measured by calibration (``nightlab calibrate``).
- :class:`Repeat` wraps a *screen* (greedy or threshold): a candidate that passes the screen
  is promising, and is re-run ``r`` times with new seeds; it is kept only when the fresh
  samples beat the incumbent's samples under a one-sided test (Welch's t, or a bootstrap)
  at level ``alpha``. The screening run itself is *not* part of the test: it was selected for
  looking good, so including it would bias the test toward keeping (the winner's curse).

The incumbent is described by :class:`IncumbentStats`: its best estimate (the mean of its
unbiased samples), those samples, and the session's noise floor. ``remeasure(r)`` is given
by the engine: it re-runs the same committed candidate with ``r`` new seeds (run command and
evaluator, in fresh worktrees) and returns the measurements. A policy that does not need it
never calls it. A verdict's evidence may carry ``estimate`` (the candidate's best estimate,
which becomes the incumbent's metric on a keep) and ``samples`` (its unbiased samples, which
become the incumbent's samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nightlab.errors import SpecError
from nightlab.spec import AcceptSpec
from nightlab.stats import bootstrap, mean_var, welch
from nightlab.types import Direction, Measurement, Verdict

Remeasure = Callable[[int], list[Measurement]]


@dataclass(frozen=True)
class IncumbentStats:
    """What is known about the incumbent.

    ``metric``: its best estimate (the mean of ``samples`` when there are any, else the one
    recorded metric; None before the baseline). ``samples``: its unbiased samples (calibration
    runs for the baseline, fresh repeats for a candidate kept by :class:`Repeat`). ``sigma``:
    the session's noise floor (standard deviation of one run) and ``sigma_df`` its degrees of
    freedom (calibration runs - 1), or None when the session is not calibrated.
    """

    metric: float | None
    samples: tuple[float, ...] = ()
    sigma: float | None = None
    sigma_df: int = 0

    @classmethod
    def of(cls, samples: Sequence[float], sigma: float | None = None, sigma_df: int = 0) -> IncumbentStats:
        m = math.fsum(samples) / len(samples) if samples else None
        return cls(m, tuple(samples), sigma, sigma_df)


class AcceptancePolicy(Protocol):
    """Decide keep or discard for a *valid* measurement. Contract:

    - ``decide`` is called once per candidate, after its first run, with the incumbent's stats;
    - it may call ``remeasure(r)`` (at most once per call is the norm) and must treat an invalid
      re-measurement (crash, no metric) as a reason to discard;
    - it returns a :class:`Verdict` whose evidence is JSON-serialisable and names the policy;
    - ``needs_noise`` is True when it needs ``incumbent.sigma`` (the engine calibrates first).
    """

    @property
    def name(self) -> str: ...

    @property
    def needs_noise(self) -> bool: ...

    def decide(self, measurement: Measurement, incumbent: IncumbentStats, direction: Direction,
               remeasure: Remeasure) -> Verdict: ...


def _no_remeasure(r: int) -> list[Measurement]:
    raise RuntimeError("this policy was given no remeasure function")


def _sign(direction: Direction) -> int:
    return 1 if direction is Direction.MAXIMIZE else -1


class Greedy:
    """Keep when strictly better than the incumbent (karpathy/autoresearch's rule)."""

    name = "greedy"
    needs_noise = False

    def decide(self, measurement: Measurement, incumbent: IncumbentStats, direction: Direction,
               remeasure: Remeasure = _no_remeasure) -> Verdict:
        assert measurement.metric is not None
        value, inc = measurement.metric, incumbent.metric
        evidence: dict[str, Any] = {"policy": self.name, "candidate": value, "incumbent": inc}
        if inc is None:
            return Verdict(True, "first valid measurement", evidence)
        delta = direction.improvement(value, inc)
        evidence["improvement"] = delta
        if direction.better(value, inc):
            return Verdict(True, f"better than the incumbent by {delta:.6g}", evidence)
        return Verdict(False, f"not better than the incumbent ({value:.6g} vs {inc:.6g})", evidence)


@dataclass(frozen=True)
class Threshold:
    """Keep when better by at least ``max(min_delta, z * sigma)`` (sigma: the noise floor)."""

    min_delta: float = 0.0
    z: float = 2.0
    name: str = "threshold"
    needs_noise: bool = True

    def margin(self, incumbent: IncumbentStats) -> float:
        sigma = incumbent.sigma if incumbent.sigma is not None else 0.0
        return max(self.min_delta, self.z * sigma)

    def decide(self, measurement: Measurement, incumbent: IncumbentStats, direction: Direction,
               remeasure: Remeasure = _no_remeasure) -> Verdict:
        assert measurement.metric is not None
        value, inc = measurement.metric, incumbent.metric
        margin = self.margin(incumbent)
        evidence: dict[str, Any] = {"policy": self.name, "candidate": value, "incumbent": inc,
                                    "sigma": incumbent.sigma, "z": self.z, "min_delta": self.min_delta,
                                    "margin": margin}
        if inc is None:
            return Verdict(True, "first valid measurement", evidence)
        delta = direction.improvement(value, inc)
        evidence["improvement"] = delta
        if delta > 0 and delta >= margin:
            return Verdict(True, f"better by {delta:.6g} >= margin {margin:.6g}", evidence)
        return Verdict(False, f"improvement {delta:.6g} below the margin {margin:.6g} "
                              f"(max(min_delta, {self.z:g} sigma))", evidence)


@dataclass(frozen=True)
class Repeat:
    """Re-run a candidate that passes ``screen`` ``r`` times; keep it if the improvement holds.

    The test is one-sided at level ``alpha``: ``welch`` (Welch's t, t CDF from
    :mod:`nightlab.stats`) or ``bootstrap`` (10,000 resamples, seeded). The fresh samples are
    compared with the incumbent's samples; an incumbent with fewer than two samples is given
    the calibrated noise variance instead (Welch needs a variance on both sides). A kept
    candidate must also clear ``min_delta`` on the mean of its fresh samples.
    """

    screen: AcceptancePolicy = field(default_factory=Greedy)
    r: int = 3
    test: str = "welch"
    alpha: float = 0.05
    min_delta: float = 0.0
    name: str = "repeat"
    needs_noise: bool = True

    def __post_init__(self) -> None:
        if self.r < 2:
            raise ValueError("repeat needs r >= 2 fresh samples")
        if self.test not in ("welch", "bootstrap"):
            raise ValueError(f"unknown test {self.test!r}")

    def decide(self, measurement: Measurement, incumbent: IncumbentStats, direction: Direction,
               remeasure: Remeasure = _no_remeasure) -> Verdict:
        assert measurement.metric is not None
        first = self.screen.decide(measurement, incumbent, direction, remeasure)
        evidence: dict[str, Any] = {"policy": self.name, "screen": first.evidence,
                                    "candidate": measurement.metric, "incumbent": incumbent.metric,
                                    "incumbent_samples": list(incumbent.samples), "repeats": self.r,
                                    "test": self.test, "alpha": self.alpha}
        if incumbent.metric is None:
            return Verdict(True, "first valid measurement", evidence)
        if not first.keep:
            return Verdict(False, f"screen ({self.screen.name}): {first.reason}", evidence)
        fresh = remeasure(self.r)
        evidence["remeasured"] = [m.metric for m in fresh]
        bad = [m for m in fresh if not m.valid]
        if bad or len(fresh) < self.r:
            why = bad[0].error if bad else f"only {len(fresh)} of {self.r} re-runs came back"
            return Verdict(False, f"a re-run failed: {why or 'no metric'}", evidence)
        samples = [float(m.metric) for m in fresh if m.metric is not None]
        evidence["samples"] = samples
        evidence["estimate"] = math.fsum(samples) / len(samples)
        sign = _sign(direction)
        inc = list(incumbent.samples) or [incumbent.metric]
        if self.test == "bootstrap" and len(inc) >= 2:
            result = bootstrap(samples, inc, sign)
        elif len(inc) >= 2:
            result = welch(samples, inc, sign)
        else:
            if incumbent.sigma is None:
                return Verdict(False, "cannot test: the incumbent has one sample and the session no "
                                      "noise floor (run `nightlab calibrate`)", evidence)
            result = welch(samples, inc, sign, var_b=incumbent.sigma ** 2, df_b=max(1, incumbent.sigma_df))
        evidence["result"] = result.as_dict()
        evidence["improvement"] = result.diff
        if result.p < self.alpha and result.diff > 0 and result.diff >= self.min_delta:
            return Verdict(True, f"holds over {self.r} re-runs: +{result.diff:.6g}, "
                                 f"p = {result.p:.3g} < {self.alpha:g} ({result.test})", evidence)
        why = f"p = {result.p:.3g} >= {self.alpha:g}" if result.p >= self.alpha else \
            f"mean improvement {result.diff:.6g} below min_delta {self.min_delta:g}"
        return Verdict(False, f"did not hold over {self.r} re-runs ({result.test}: {why}; "
                              f"mean {evidence['estimate']:.6g} vs {incumbent.metric:.6g})", evidence)


def noise_of(samples: Sequence[float]) -> dict[str, Any]:
    """The noise record stored on a session: ``{k, samples, mean, sigma}`` (sigma: one run's sd)."""
    m, v = mean_var(samples)
    return {"k": len(samples), "samples": list(samples), "mean": m, "sigma": math.sqrt(v)}


def make_policy(spec: AcceptSpec) -> AcceptancePolicy:
    """Build the policy named by ``[accept] policy`` from its keys."""
    threshold = Threshold(min_delta=spec.min_delta, z=spec.z)
    if spec.policy == "greedy":
        return Greedy()
    if spec.policy == "threshold":
        return threshold
    if spec.policy == "repeat":
        screen: AcceptancePolicy = Greedy()
        if spec.screen == "threshold":
            screen = Threshold(min_delta=spec.min_delta, z=spec.screen_z)
        return Repeat(screen=screen, r=spec.repeats, test=spec.test, alpha=spec.alpha,
                      min_delta=spec.min_delta)
    raise SpecError(f"[accept] policy = {spec.policy!r} is not known",
                    "use 'greedy', 'threshold' or 'repeat'")
