"""The statistics the acceptance policies and ``nightlab verify`` rest on, with no scipy.

- :func:`t_cdf`: Student's t distribution function, through the regularized incomplete beta
  function ``I_x(a, b)`` evaluated by its continued fraction (modified Lentz, as in Numerical
  Recipes' ``betacf``): ``P(T <= t) = 1 - I_{v/(v+t^2)}(v/2, 1/2) / 2`` for ``t > 0``.
  Accurate to about 1e-12 over the range policies use (checked against tabulated quantiles).
- :func:`t_ppf`: its inverse, by bisection (for confidence intervals).
- :func:`welch`: Welch's unequal-variance t-test, one-sided: is ``a``'s mean better than ``b``'s?
  Degrees of freedom by Welch-Satterthwaite.
- :func:`bootstrap`: a one-sided bootstrap test of the same question (numpy, fixed seed, so the
  same samples always give the same p-value).
- :func:`mean_ci`: a t-based confidence interval for a mean, and :func:`diff_ci` (Welch) for a
  difference of means.

"Better" always means in the metric's direction: callers pass ``sign = +1`` when larger is
better and ``-1`` when smaller is better, and every test is about ``sign * (mean_a - mean_b) > 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_EPS = 1e-15
_TINY = 1e-300


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for I_x(a, b) (modified Lentz); converges fast for x < (a+1)/(a+b+2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError("betainc needs a > 0 and b > 0")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom (``df`` may be fractional)."""
    if df <= 0:
        raise ValueError("df must be positive")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_sf(t: float, df: float) -> float:
    """P(T > t), computed without cancellation for large t."""
    return t_cdf(-t, df)


def t_ppf(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`; |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
        if hi > 1e12:
            return hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_var(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased sample variance (variance 0.0 for a single sample)."""
    n = len(xs)
    if n == 0:
        raise ValueError("no samples")
    m = math.fsum(xs) / n
    v = math.fsum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return m, v


@dataclass(frozen=True)
class TestResult:
    """The outcome of a one-sided test that ``a`` is better than ``b``."""

    test: str  # "welch" or "bootstrap"
    p: float  # one-sided p-value
    diff: float  # improvement of a's mean over b's, in metric units (positive: a is better)
    statistic: float | None = None  # Welch's t
    df: float | None = None  # Welch-Satterthwaite degrees of freedom
    n_a: int = 0
    n_b: int = 0

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {"test": self.test, "p": self.p, "diff": self.diff, "statistic": self.statistic,
                "df": self.df, "n_a": self.n_a, "n_b": self.n_b}


def welch(a: Sequence[float], b: Sequence[float], sign: int = 1, *, var_b: float | None = None,
          df_b: float | None = None) -> TestResult:
    """One-sided Welch t-test of ``sign * (mean(a) - mean(b)) > 0``.

    Both samples need at least two values, unless ``var_b`` (and ``df_b``, the degrees of
    freedom behind it) stand in for ``b``'s sample variance: the engine uses the calibrated
    noise variance for an incumbent measured only once. Zero variance on both sides gives
    p = 0 when the means differ in the right direction, 1 otherwise.
    """
    if len(a) < 2:
        raise ValueError("welch needs at least two samples in a")
    ma, va = mean_var(a)
    mb, vb = mean_var(b)
    nb_df = len(b) - 1.0
    if var_b is not None:
        vb, nb_df = var_b, (df_b if df_b is not None else nb_df)
    if len(b) < 2 and var_b is None:
        raise ValueError("welch needs at least two samples in b, or var_b")
    diff = sign * (ma - mb)
    sa, sb = va / len(a), vb / len(b)
    se2 = sa + sb
    if se2 <= 0.0:
        return TestResult("welch", 0.0 if diff > 0 else 1.0, diff, math.inf if diff > 0 else -math.inf,
                          None, len(a), len(b))
    t = diff / math.sqrt(se2)
    terms = (sa * sa / (len(a) - 1.0)) + (sb * sb / nb_df if nb_df > 0 and sb > 0 else 0.0)
    df = se2 * se2 / terms if terms > 0 else math.inf
    return TestResult("welch", t_sf(t, df), diff, t, df, len(a), len(b))


def bootstrap(a: Sequence[float], b: Sequence[float], sign: int = 1, *, n_resamples: int = 10000,
              seed: int = 0) -> TestResult:
    """One-sided bootstrap test of ``sign * (mean(a) - mean(b)) > 0``.

    Both samples are centred on the pooled mean (the null of equal means, each keeping its own
    spread) and resampled with replacement ``n_resamples`` times; the p-value is the share of
    resampled differences at least as good as the observed one, with the +1 correction
    ``(count + 1) / (n_resamples + 1)`` so it is never 0. Deterministic for a given ``seed``.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("bootstrap needs at least two samples on each side")
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = sign * float(xa.mean() - xb.mean())
    pooled = float(np.concatenate([xa, xb]).mean())
    ca, cb = xa - xa.mean() + pooled, xb - xb.mean() + pooled
    rng = np.random.default_rng(seed)
    ra = ca[rng.integers(0, len(ca), size=(n_resamples, len(ca)))].mean(axis=1)
    rb = cb[rng.integers(0, len(cb), size=(n_resamples, len(cb)))].mean(axis=1)
    count = int(np.count_nonzero(sign * (ra - rb) >= diff - 1e-12 * max(1.0, abs(diff))))
    return TestResult("bootstrap", (count + 1) / (n_resamples + 1), diff, None, None, len(a), len(b))


def mean_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: a two-sided t confidence interval for the mean (needs 2+ samples)."""
    if len(xs) < 2:
        raise ValueError("a confidence interval needs at least two samples")
    m, v = mean_var(xs)
    half = t_ppf(0.5 + level / 2.0, len(xs) - 1) * math.sqrt(v / len(xs))
    return m, m - half, m + half


def diff_ci(a: Sequence[float], b: Sequence[float], sign: int = 1,
            level: float = 0.95) -> tuple[float, float, float]:
    """``(diff, low, high)`` for ``sign * (mean(a) - mean(b))``, Welch's interval."""
    r = welch(a, b, sign)
    if r.df is None:
        return r.diff, r.diff, r.diff
    _, va = mean_var(a)
    _, vb = mean_var(b)
    half = t_ppf(0.5 + level / 2.0, r.df) * math.sqrt(va / len(a) + vb / len(b))
    return r.diff, r.diff - half, r.diff + half
