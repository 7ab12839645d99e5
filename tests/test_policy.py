"""Acceptance policies and the statistics under them (pure, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nightlab.policy import Greedy, IncumbentStats, Repeat, Threshold, make_policy, noise_of
from nightlab.spec import AcceptSpec
from nightlab.stats import betainc, bootstrap, diff_ci, mean_ci, t_cdf, t_ppf, welch
from nightlab.types import Direction, Measurement

MIN, MAX = Direction.MINIMIZE, Direction.MAXIMIZE


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(("p", "df", "q"), [
    # Student's t quantiles as tabulated (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
    (0.975, 1, 12.706205), (0.975, 5, 2.570582), (0.95, 5, 2.015048), (0.975, 10, 2.228139),
    (0.995, 3, 5.840909), (0.975, 30, 2.042272), (0.99, 20, 2.527977), (0.9, 100, 1.290075),
])
def test_t_quantiles_match_tables(p, df, q):
    assert t_ppf(p, df) == pytest.approx(q, abs=2e-6)
    assert t_cdf(q, df) == pytest.approx(p, abs=1e-6)
    assert t_cdf(-q, df) == pytest.approx(1 - p, abs=1e-6)


def test_t_cdf_closed_forms_and_numeric_integral():
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # a fractional df (Welch gives those): integrate the density numerically
    df = 3.7
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    xs = np.linspace(0.0, 1.3, 200001)
    pdf = c * (1 + xs ** 2 / df) ** (-(df + 1) / 2)
    integral = float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(xs)))
    assert t_cdf(1.3, df) == pytest.approx(0.5 + integral, abs=1e-9)
    assert t_cdf(1.0, math.inf) == pytest.approx(0.841344746, abs=1e-9)
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - sum_{j<2} C(4,j) .4^j .6^(4-j)


def test_welch_statistic_df_and_p_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0, 6.0]  # smaller is better: a is better by 1.5
    r = welch(a, b, sign=-1)
    va, vb = 5 / 3 / 4, 2.5 / 5  # s^2 / n on each side
    assert r.diff == pytest.approx(1.5)
    assert r.statistic == pytest.approx(1.5 / math.sqrt(va + vb))
    assert r.df == pytest.approx((va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 4))
    assert r.p == pytest.approx(1 - t_cdf(r.statistic, r.df))
    assert 0.05 < r.p < 0.1
    assert welch(a, b, sign=1).p == pytest.approx(1 - r.p)
    # a known variance stands in for a one-sample incumbent
    r1 = welch([0.9, 1.0, 1.1], [1.5], sign=-1, var_b=0.01, df_b=4)
    assert r1.diff == pytest.approx(0.5) and r1.p < 0.01


def test_bootstrap_is_seeded_and_agrees_with_welch_on_clear_cases():
    rng = np.random.default_rng(3)
    a, b = list(rng.normal(0.0, 1.0, 12)), list(rng.normal(1.5, 1.0, 12))
    r1, r2 = bootstrap(a, b, sign=-1), bootstrap(a, b, sign=-1)
    assert r1 == r2 and r1.p < 0.01 and welch(a, b, sign=-1).p < 0.01
    same = list(rng.normal(0.0, 1.0, 12))
    assert bootstrap(a, same, sign=-1).p > 0.05 or welch(a, same, sign=-1).p < 0.05


def test_welch_false_positive_rate_is_alpha():
    rng = np.random.default_rng(0)
    ps = [welch(list(rng.normal(0, 1, 3)), list(rng.normal(0, 1, 5))).p for _ in range(4000)]
    assert np.mean(np.array(ps) < 0.05) == pytest.approx(0.05, abs=0.012)


def test_confidence_intervals():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = t_ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    d, lo, hi = diff_ci([1.0, 1.1, 0.9], [2.0, 2.2, 1.8], sign=-1)
    assert d == pytest.approx(1.0) and 0 < lo < 1.0 < hi
    assert noise_of([1.0, 3.0])["sigma"] == pytest.approx(math.sqrt(2))


# --------------------------------------------------------------------------- policies


def meas(x: float | None, error: str = "") -> Measurement:
    return Measurement(x, error=error)


class Remeasure:
    def __init__(self, values: list[float | None]):
        self.values, self.calls = values, []

    def __call__(self, r: int) -> list[Measurement]:
        self.calls.append(r)
        return [meas(v, "" if v is not None else "crash") for v in self.values[:r]]


def test_greedy_keeps_any_strict_improvement():
    inc = IncumbentStats(1.0)
    assert Greedy().decide(meas(0.999), inc, MIN).keep
    assert not Greedy().decide(meas(1.0), inc, MIN).keep
    assert Greedy().decide(meas(1.001), inc, MAX).keep
    v = Greedy().decide(meas(0.9), inc, MIN)
    assert v.evidence["improvement"] == pytest.approx(0.1) and v.evidence["policy"] == "greedy"


def test_threshold_needs_max_of_min_delta_and_z_sigma():
    inc = IncumbentStats(1.0, sigma=0.05)
    t = Threshold(min_delta=0.02, z=2.0)
    assert not t.decide(meas(0.95), inc, MIN).keep  # 0.05 < 2 sigma = 0.1
    v = t.decide(meas(0.89), inc, MIN)
    assert v.keep and v.evidence["margin"] == pytest.approx(0.1)
    assert not Threshold(min_delta=0.2, z=2.0).decide(meas(0.89), inc, MIN).keep
    assert Threshold(min_delta=0.2, z=0).decide(meas(1.25), inc, MAX).keep


def test_repeat_never_reruns_a_candidate_that_fails_the_screen():
    rm = Remeasure([0.5, 0.5, 0.5])
    v = Repeat(r=3).decide(meas(1.2), IncumbentStats.of([1.0, 1.01, 0.99], 0.01, 2), MIN, rm)
    assert not v.keep and rm.calls == [] and "screen" in v.reason


def test_repeat_keeps_a_real_improvement_and_reports_its_evidence():
    inc = IncumbentStats.of([1.0, 1.02, 0.98, 1.01, 0.99], sigma=0.016, sigma_df=4)
    rm = Remeasure([0.90, 0.91, 0.89])
    v = Repeat(r=3).decide(meas(0.9), inc, MIN, rm)
    assert v.keep and rm.calls == [3]
    ev = v.evidence
    assert ev["samples"] == [0.90, 0.91, 0.89] and ev["estimate"] == pytest.approx(0.9)
    assert ev["result"]["test"] == "welch" and ev["result"]["p"] < 0.05 and ev["result"]["df"] > 0
    assert ev["incumbent_samples"] == [1.0, 1.02, 0.98, 1.01, 0.99] and ev["screen"]["policy"] == "greedy"


def test_repeat_discards_a_lucky_first_run():
    inc = IncumbentStats.of([1.0, 1.05, 0.95, 1.02, 0.98], sigma=0.04, sigma_df=4)
    rm = Remeasure([1.03, 0.97, 1.01])  # the first run (0.9) was luck
    v = Repeat(r=3).decide(meas(0.9), inc, MIN, rm)
    assert not v.keep and "did not hold" in v.reason and v.evidence["result"]["p"] > 0.05


def test_repeat_discards_when_a_rerun_crashes_and_can_use_bootstrap():
    inc = IncumbentStats.of([1.0, 1.01, 0.99], sigma=0.01, sigma_df=2)
    v = Repeat(r=3).decide(meas(0.5), inc, MIN, Remeasure([0.5, None, 0.5]))
    assert not v.keep and "re-run failed" in v.reason
    v = Repeat(r=4, test="bootstrap").decide(meas(0.5), inc, MIN, Remeasure([0.5, 0.51, 0.49, 0.5]))
    assert v.keep and v.evidence["result"]["test"] == "bootstrap"


def test_repeat_with_a_single_sample_incumbent_uses_the_noise_floor():
    v = Repeat(r=3).decide(meas(0.5), IncumbentStats(1.0, (1.0,), sigma=0.02, sigma_df=4), MIN,
                           Remeasure([0.5, 0.51, 0.49]))
    assert v.keep
    v = Repeat(r=3).decide(meas(0.5), IncumbentStats(1.0, (1.0,)), MIN, Remeasure([0.5, 0.51, 0.49]))
    assert not v.keep and "calibrate" in v.reason


def test_make_policy_from_the_spec():
    assert make_policy(AcceptSpec()).name == "greedy"
    assert isinstance(make_policy(AcceptSpec(policy="threshold", z=3.0)), Threshold)
    p = make_policy(AcceptSpec(policy="repeat", repeats=5, screen="threshold", test="bootstrap", alpha=0.01))
    assert isinstance(p, Repeat) and p.r == 5 and isinstance(p.screen, Threshold) and p.alpha == 0.01
    d = make_policy(AcceptSpec(policy="repeat"))  # the defaults the benchmark measured
    assert isinstance(d, Repeat) and (d.r, d.alpha, d.test) == (5, 0.02, "welch")
    assert isinstance(d.screen, Threshold) and d.screen.z == 1.0
    assert p.needs_noise and not Greedy.needs_noise
