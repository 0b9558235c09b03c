"""Statistics of a study, through ``scipy.stats``: confidence intervals, Welch's and the paired t-test, the two
one-sided tests (TOST) of equivalence within a margin, the power of a t-test (the minimum detectable difference and
the number of seeds needed), and Holm's step-down correction for testing several variants against one baseline.

scipy does the distributions (``ttest_rel``, ``ttest_ind(equal_var=False)`` with ``confidence_interval``,
``t.ppf``, ``nct``). What is ours: the zero-spread case, where scipy answers nan (all seeds identical is common on
easy synthetic tasks: then the difference is either exactly zero or surely non-zero), and the small Holm step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import optimize
from scipy import stats as distributions


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (nan for no values)."""
    return math.fsum(values) / len(values) if values else math.nan


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator; nan below two values)."""
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``)."""
    return float(distributions.t.ppf(q, df))


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
    """'welch' (independent samples, unequal variances) or 'paired' (matched seeds or cells)."""

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

    se: float = math.nan
    """Standard error of the difference (0 when there is no spread at all; nan below two values)."""


def _without_spread(kind: str, diff: float, df: float) -> TTest:
    """No spread at all: either identical (p = 1) or surely different (p = 0); scipy gives nan here."""
    p = 1.0 if diff == 0.0 else 0.0
    t = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return TTest(kind, diff, diff, diff, t, df, p, 0.0)


def _undefined(kind: str, diff: float) -> TTest:
    return TTest(kind, diff, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)


def welch_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> TTest:
    """Welch's t-test of mean(a) == mean(b) (``scipy.stats.ttest_ind(equal_var=False)``) with its confidence
    interval of mean(a) - mean(b).

    Needs at least two values in each sample (else the interval and p-value are nan).
    """
    diff = mean(a) - mean(b)
    if len(a) < 2 or len(b) < 2:
        return _undefined("welch", diff)
    se = math.sqrt(std(a) ** 2 / len(a) + std(b) ** 2 / len(b))
    if se == 0.0:
        return _without_spread("welch", diff, float(len(a) + len(b) - 2))
    with warnings.catch_warnings():  # nearly identical values: scipy warns of precision loss, the result is right
        warnings.simplefilter("ignore", RuntimeWarning)
        result = distributions.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    return TTest("welch", diff, float(ci.low), float(ci.high), float(result.statistic), float(result.df),
                 float(result.pvalue), se)  # fmt: skip


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> TTest:
    """Paired t-test of mean(a - b) == 0 over matched pairs (``scipy.stats.ttest_rel``), with its confidence
    interval; pairs are the same seeds, or the same cells of a sweep."""
    if len(a) != len(b):
        raise ValueError(f"paired test needs samples of equal length, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if len(diffs) < 2:
        return _undefined("paired", mean(diffs))
    se = std(diffs) / math.sqrt(len(diffs))
    if se == 0.0:
        return _without_spread("paired", mean(diffs), float(len(diffs) - 1))
    with warnings.catch_warnings():  # see welch_test
        warnings.simplefilter("ignore", RuntimeWarning)
        result = distributions.ttest_rel(a, b)
    ci = result.confidence_interval(confidence)
    return TTest("paired", mean(diffs), float(ci.low), float(ci.high), float(result.statistic),
                 float(result.df), float(result.pvalue), se)  # fmt: skip


@dataclass(frozen=True)
class Equivalence:
    """Two one-sided tests (TOST) of |difference| < margin, read from a :class:`TTest`'s difference, standard error
    and degrees of freedom (so the same for the paired and the Welch case)."""

    margin: float
    """The absolute equivalence margin (> 0): equivalence means -margin < difference < margin."""

    ci_low: float
    """Lower end of the 1 - 2 alpha (90% at alpha 0.05) confidence interval of the difference."""

    ci_high: float
    """Upper end of that interval: TOST rejects at alpha exactly when the interval lies inside the margin."""

    p_lower: float
    """p-value of the one-sided test of H0: difference <= -margin."""

    p_upper: float
    """p-value of the one-sided test of H0: difference >= +margin."""

    p: float
    """The TOST p-value, max(p_lower, p_upper): small when the difference lies within the margin."""


def tost(test: TTest, margin: float, alpha: float = 0.05) -> Equivalence:
    """The two one-sided tests of equivalence within ``margin`` for the difference that ``test`` estimated."""
    if not margin > 0:
        raise ValueError(f"the equivalence margin must be > 0, got {margin}")
    diff, se, df = test.diff, test.se, test.df
    if math.isnan(se) or math.isnan(df):
        return Equivalence(margin, math.nan, math.nan, math.nan, math.nan, math.nan)
    if se == 0.0:  # no spread: the difference is known exactly
        p_lower = 0.0 if diff > -margin else 1.0
        p_upper = 0.0 if diff < margin else 1.0
        return Equivalence(margin, diff, diff, p_lower, p_upper, max(p_lower, p_upper))
    p_lower = float(distributions.t.sf((diff + margin) / se, df))
    p_upper = float(distributions.t.cdf((diff - margin) / se, df))
    half = t_ppf(1.0 - alpha, df) * se
    return Equivalence(margin, diff - half, diff + half, p_lower, p_upper, max(p_lower, p_upper))


# ----------------------------------------------------------------------------------------------------- power
def t_test_power(effect: float, se: float, df: float, alpha: float) -> float:
    """Power of the two-sided t-test at level ``alpha`` when the true difference is ``effect``: the probability
    that |T| exceeds the critical value, T following the non-central t with non-centrality effect / se."""
    critical = t_ppf(1.0 - alpha / 2.0, df)
    nc = abs(effect) / se  # the power is symmetric in the sign of the effect
    far_tail = float(distributions.nct.cdf(-critical, df, nc))  # scipy gives nan where this is far below 1e-16
    return float(distributions.nct.sf(critical, df, nc)) + (0.0 if math.isnan(far_tail) else far_tail)


def _welch_se_df(sd_a: float, sd_b: float, n_a: int, n_b: int) -> tuple[float, float]:
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    se2 = va + vb
    df = se2**2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1)) if se2 > 0 else float(n_a + n_b - 2)
    return math.sqrt(se2), df


def _se_df(kind: str, sds: tuple[float, ...], n: tuple[int, ...]) -> tuple[float, float]:
    if kind == "paired":
        return sds[0] / math.sqrt(n[0]), float(n[0] - 1)
    return _welch_se_df(sds[0], sds[1], n[0], n[1])


@dataclass(frozen=True)
class Power:
    """What a t-test with this spread can detect, at level alpha and the target power."""

    min_detectable: float
    """Smallest true |difference| that the test detects with the target power at today's number of seeds."""

    seeds_needed: int | None
    """Seeds (pairs for 'paired', per variant for 'welch') with which a true difference of the margin is detected
    with the target power; None without a margin, ``max_seeds + 1`` when more than ``max_seeds`` would be needed."""


def power_analysis(
    kind: str,
    sds: Sequence[float],
    n: Sequence[int],
    alpha: float,
    power: float = 0.8,
    margin: float | None = None,
    max_seeds: int = 10_000,
) -> Power | None:
    """Minimum detectable difference and seeds needed for a two-sided t-test (exact, through the non-central t).

    Args:
        kind: 'paired' (``sds`` = [sd of the paired differences], ``n`` = [pairs]) or 'welch' (``sds`` = [sd of a,
            sd of b], ``n`` = [size of a, size of b]).
        sds: The observed standard deviations.
        n: The sample sizes (two or more each).
        alpha: Level of the test (two-sided).
        power: Target power, e.g. 0.8.
        margin: The difference to detect for ``seeds_needed``; None leaves it out.
        max_seeds: Upper end of the search for ``seeds_needed``.

    Returns:
        The :class:`Power`, or None when the spread is unknown (fewer than two values).
    """
    sds, n = tuple(sds), tuple(n)
    if min(n) < 2 or any(math.isnan(s) for s in sds):
        return None
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    if all(s == 0.0 for s in sds):  # no spread: any difference is detected, with two seeds already
        return Power(0.0, None if margin is None else 2)
    se, df = _se_df(kind, sds, n)
    # the power grows with the non-centrality nc = difference / se: alpha at nc = 0; bracket the target, then solve
    high = t_ppf(1.0 - alpha / 2.0, df) + 1.0
    while t_test_power(high, 1.0, df, alpha) < power:
        high *= 2.0
    nc = optimize.brentq(lambda x: t_test_power(x, 1.0, df, alpha) - power, 0.0, high, xtol=1e-12, rtol=1e-12)
    needed = None
    if margin is not None:

        def enough(seeds: int) -> bool:
            se_k, df_k = _se_df(kind, sds, (seeds,) * len(n))
            return t_test_power(margin, se_k, df_k, alpha) >= power

        low, high = 1, 2  # enough(low) is False by convention (no test below two seeds)
        while not enough(high):
            low, high = high, 2 * high
            if high > max_seeds:
                high = max_seeds + 1
                break
        while high - low > 1:  # the power grows with the seeds: bisect for the smallest enough count
            middle = (low + high) // 2
            low, high = (low, middle) if enough(middle) else (middle, high)
        needed = high
    return Power(float(nc * se), needed)


# ------------------------------------------------------------------------------------------------- correction
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
