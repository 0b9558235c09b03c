"""Statistics of a study, without scipy: Student's t distribution, confidence intervals, Welch's and the paired
t-test, and Holm's step-down correction for testing several variants against one baseline.

The t distribution's CDF comes from the regularised incomplete beta function, evaluated by its continued fraction
(modified Lentz method); quantiles invert the CDF by bisection. Accuracy is about 1e-12, far beyond what a handful
of seeds can resolve. ``tests/test_study.py`` checks every function against ``scipy.stats``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_TINY = 1e-300
_EPS = 1e-15


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction 1 / (1 + d1 / (1 + d2 / (1 + ...))) of I_x(a, b), by the modified Lentz method."""
    f, c, d = _TINY, _TINY, 0.0  # b0 = 0 is replaced by a tiny number
    for j in range(1, 10_000):
        if j == 1:
            numerator = 1.0
        else:
            k = j - 1  # numerator of the term: d_k
            m = k // 2
            if k % 2:  # d_{2m+1}
                numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
            else:  # d_{2m}
                numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + numerator / c
        c = c if abs(c) > _TINY else _TINY
        delta = c * d
        f *= delta
        if abs(delta - 1.0) < _EPS:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point: use symmetry
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return math.exp(log_front) / a * _beta_continued_fraction(a, b, x)


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with ``df`` degrees of freedom."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    half_tail = 0.5 * t_sf2(t, df)
    return 1.0 - half_tail if t > 0 else half_tail


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t: the t with ``t_cdf(t, df) == q``, for 0 < q < 1."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf needs 0 < q < 1, got {q}")
    if math.isnan(df):
        return math.nan
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    if q == 0.5:
        return 0.0
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < q:
            low = middle
        else:
            high = middle
        if high - low <= 1e-14 * max(1.0, high):
            break
    return 0.5 * (low + high)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (nan for no values)."""
    return math.fsum(values) / len(values) if values else math.nan


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator; nan below two values)."""
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean (nan, nan below two values)."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    half = t_ppf(0.5 + confidence / 2.0, n - 1) * std(values) / math.sqrt(n)
    m = mean(values)
    return m - half, m + half


@dataclass(frozen=True)
class TTest:
    """A two-sample comparison of ``a`` against ``b``: the difference of means ``mean(a) - mean(b)``."""

    kind: str
    """'welch' (independent samples, unequal variances) or 'paired' (matched seeds)."""

    diff: float
    """Difference of the means, a minus b."""

    ci_low: float
    """Lower end of the confidence interval of the difference."""

    ci_high: float
    """Upper end of the confidence interval of the difference."""

    t: float
    """The t statistic."""

    df: float
    """Degrees of freedom (Welch-Satterthwaite for 'welch')."""

    p: float
    """Two-sided p-value of 'no difference'."""


def _t_test(kind: str, diff: float, se: float, df: float, confidence: float) -> TTest:
    if math.isnan(se) or math.isnan(df):
        return TTest(kind, diff, math.nan, math.nan, math.nan, df, math.nan)
    if se == 0.0:  # no spread at all: either identical or surely different (scipy gives nan / 0 here)
        p = 1.0 if diff == 0.0 else 0.0
        t = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
        return TTest(kind, diff, diff, diff, t, df, p)
    t = diff / se
    half = t_ppf(0.5 + confidence / 2.0, df) * se
    return TTest(kind, diff, diff - half, diff + half, t, df, t_sf2(t, df))


def welch_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> TTest:
    """Welch's t-test of mean(a) == mean(b) with its confidence interval of mean(a) - mean(b).

    Needs at least two values in each sample (else the interval and p-value are nan).
    """
    diff = mean(a) - mean(b)
    if len(a) < 2 or len(b) < 2:
        return _t_test("welch", diff, math.nan, math.nan, confidence)
    va, vb = std(a) ** 2 / len(a), std(b) ** 2 / len(b)
    se2 = va + vb
    df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se2 > 0 else float(len(a) + len(b) - 2)
    return _t_test("welch", diff, math.sqrt(se2), df, confidence)


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> TTest:
    """Paired t-test of mean(a - b) == 0 over matched pairs (e.g. the same seeds), with its confidence interval."""
    if len(a) != len(b):
        raise ValueError(f"paired test needs samples of equal length, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if len(diffs) < 2:
        return _t_test("paired", mean(diffs), math.nan, math.nan, confidence)
    return _t_test("paired", mean(diffs), std(diffs) / math.sqrt(len(diffs)), float(len(diffs) - 1), confidence)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control); nan p-values stay nan and don't count.

    Sorted ascending, the i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) * p_(j)).
    A variant is significant at level alpha when its adjusted p-value is below alpha.
    """
    valid = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    m = len(valid)
    for rank, (p, index) in enumerate(valid):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted
