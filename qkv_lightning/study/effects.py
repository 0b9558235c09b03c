"""The variant effect across the cells of a study: equivalence margins, the paired analysis over matched cells, an
optional random-intercept mixed model (statsmodels, the ``stats`` extra) and the interaction check.

Everything here reads a *results table*: a list of rows (dicts), one per finished run, with

- ``variant``: the variant label;
- ``cell``: the key of the matched cell, i.e. everything that is the same for the runs being compared except the
  variant (today the seed; with grid axes over settings, the architecture, length and seed);
- one column per axis (e.g. ``seed``, ``model.init_args.network.d_model``) and one per metric.

So a study with only seeds and a sweep over widths and lengths go through the same functions: the cells are the
blocking factor, and a variant's effect is estimated within cells, never across them.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

from qkv_lightning.errors import ConfigError
from qkv_lightning.study import stats

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


# ----------------------------------------------------------------------------------------- equivalence margins
def parse_margin(value: float | str, setting: str = "study.equivalence_margin") -> tuple[float, bool]:
    """A margin as (amount, relative): ``0.01`` is absolute, ``'1%'`` is 1% of the baseline's mean.

    Raises:
        ConfigError: When the value is not a positive number or a positive percentage.
    """
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int | float):
        amount, relative = float(value), False
    else:
        match = _PERCENT.match(str(value))
        if match:
            amount, relative = float(match.group(1)) / 100.0, True
        else:
            try:
                amount, relative = float(value), False
            except ValueError:
                amount, relative = math.nan, False
    if not (amount > 0 and math.isfinite(amount)):
        raise ConfigError(
            f"{setting}={value!r} is not a margin: give a positive number in the metric's units (e.g. 0.01 for one "
            "accuracy point) or a percentage of the baseline's mean (e.g. '1%')."
        )
    return amount, relative


def check_margins(margin: float | str | Mapping[str, float | str] | None) -> None:
    """Raise a ConfigError naming the setting when ``study.equivalence_margin`` holds a value that is no margin."""
    if margin is None:
        return
    if isinstance(margin, Mapping):
        for metric, value in margin.items():
            parse_margin(value, f"study.equivalence_margin[{metric!r}]")
    else:
        parse_margin(margin)


def margin_for(
    margin: float | str | Mapping[str, float | str] | None, metric: str, primary: str | None, baseline_mean: float
) -> tuple[float | None, str | None]:
    """The absolute margin of ``metric`` and how it was stated (e.g. ``'0.02'``, ``'1% = 0.0097'``).

    A single value applies to the primary metric; a mapping names metrics. A relative margin is that fraction of
    |baseline mean|. Returns (None, None) where no margin applies or the baseline has no mean.
    """
    if margin is None:
        return None, None
    if isinstance(margin, Mapping):
        if metric not in margin:
            return None, None
        value = margin[metric]
    elif metric == primary:
        value = margin
    else:
        return None, None
    amount, relative = parse_margin(value)
    if not relative:
        return amount, f"{amount:g}"
    if baseline_mean is None or math.isnan(baseline_mean) or baseline_mean == 0.0:
        return None, None
    absolute = amount * abs(baseline_mean)
    return absolute, f"{100 * amount:g}% = {absolute:.4g}"


def verdict(p_diff_holm: float, p_tost_holm: float | None, diff: float, lower_is_better: bool, alpha: float) -> str:
    """The row's verdict.

    With a margin (``p_tost_holm`` not None) there are three outcomes: ``equivalent`` when the TOST shows the
    difference within the margin (even if the difference test also detects a difference: it is then smaller than
    the margin), else ``worse`` / ``better`` when the difference test is significant, else ``inconclusive``.
    Without a margin: ``worse`` / ``better`` or ``n.s.``. ``n/a`` when there is no test at all.
    """
    if math.isnan(p_diff_holm):
        return "n/a"
    if p_tost_holm is not None and not math.isnan(p_tost_holm) and p_tost_holm < alpha:
        return "equivalent"
    if p_diff_holm < alpha:
        return "worse" if (diff > 0) == lower_is_better else "better"
    return "n.s." if p_tost_holm is None else "inconclusive"


def tost_level(alpha: float) -> str:
    """The confidence level of the interval two one-sided tests at ``alpha`` read, e.g. ``90%`` at 0.05."""
    return f"{100 * (1 - 2 * alpha):g}%"


def holm_verdicts(
    entries: Mapping[str, dict], p_diff: Mapping[str, float], p_tost: Mapping[str, float], lower_is_better: bool,
    alpha: float,
) -> None:
    """Holm-adjust the difference tests ``p_diff`` and the equivalence tests ``p_tost`` (each by label, over the
    labels it holds; ``p_tost`` only where a margin is set) and write into each ``entries[label]`` (which holds the
    ``diff``): ``p_holm``, ``tost_p_holm``, ``diff_verdict`` (margin-blind) and ``verdict`` (:func:`verdict`); a nan
    p-value is written as None."""
    adjusted_tost = dict(zip(p_tost, stats.holm(list(p_tost.values())), strict=True))
    for label, p_holm in zip(p_diff, stats.holm(list(p_diff.values())), strict=True):
        entry, tost = entries[label], adjusted_tost.get(label)
        entry["p_holm"] = None if math.isnan(p_holm) else p_holm
        if tost is not None:
            entry["tost_p_holm"] = None if math.isnan(tost) else tost
        entry["diff_verdict"] = verdict(p_holm, None, entry["diff"], lower_is_better, alpha)
        entry["verdict"] = verdict(p_holm, tost, entry["diff"], lower_is_better, alpha)


# ---------------------------------------------------------------------------------------------- results table
def results_table(results: Iterable[dict], axes: Sequence[str] = ()) -> list[dict]:
    """The results table of the finished runs: ``variant``, ``cell``, ``seed``, the axis columns and the metrics.

    Args:
        results: Result records (``result.json``: variant, seed, status, metrics, ...).
        axes: Names of the grid axes besides the seed; a run's value is read from its record, or from its
            ``axes`` mapping. The cell is the axes' values and the seed.
    """
    table = []
    for result in results:
        if result.get("status") != "ok":
            continue
        row = {"variant": result["variant"], "seed": result["seed"]}
        for axis in axes:
            row[axis] = result[axis] if axis in result else (result.get("axes") or {}).get(axis)
        row["cell"] = ", ".join(f"{axis}={row[axis]}" for axis in (*axes, "seed"))
        for name, value in result.get("metrics", {}).items():
            if value is not None and not math.isnan(value):
                row[name] = value
        table.append(row)
    return table


def matched_differences(table: Sequence[dict], metric: str, variant: str, baseline: str) -> dict[str, float]:
    """``variant`` minus ``baseline`` in every cell where both have a value of ``metric`` (failed cells drop out)."""
    base = {row["cell"]: row[metric] for row in table if row["variant"] == baseline and metric in row}
    return {
        row["cell"]: row[metric] - base[row["cell"]]
        for row in table
        if row["variant"] == variant and metric in row and row["cell"] in base
    }


def paired_over_cells(
    table: Sequence[dict], metric: str, variant: str, baseline: str, confidence: float = 0.95
) -> tuple[stats.TTest, dict[str, float]]:
    """The paired t-test of ``variant`` against ``baseline`` over matched cells, and the per-cell differences."""
    diffs = matched_differences(table, metric, variant, baseline)
    cells = sorted(diffs)
    test = stats.paired_test([diffs[c] for c in cells], [0.0] * len(cells), confidence)
    return test, diffs


# ------------------------------------------------------------------------------------------------ mixed model
def statsmodels_available() -> bool:
    """Whether statsmodels (``pip install 'qkv-lightning[stats]'``) can be imported."""
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        return False
    return True


def mixed_model(
    table: Sequence[dict], metric: str, variants: Sequence[str], baseline: str, confidence: float = 0.95
) -> dict:
    """Random-intercept mixed model ``metric ~ variant + (1 | cell)`` (statsmodels ``MixedLM``, REML).

    Each cell gets its own level (the random intercept: some widths, lengths or seeds are easier than others); the
    fixed effect of a variant is its difference from ``baseline`` within cells. Unlike the per-variant paired
    tests, the residual spread is pooled over all variants.

    Returns:
        ``effects`` (per variant: estimate, se, ci, p of the Wald z-test), ``cell_sd`` (spread of the cells'
        intercepts), ``residual_sd``, ``cells``, ``runs`` and ``warnings`` (convergence messages, if any).

    Raises:
        ConfigError: When statsmodels is not installed.
    """
    try:
        import numpy as np
        from statsmodels.regression.mixed_linear_model import MixedLM
    except ImportError:
        raise ConfigError(
            "study.mixed_model=true needs statsmodels: pip install 'qkv-lightning[stats]' (or set it to false)."
        ) from None
    others = [v for v in variants if v != baseline]
    rows = [row for row in table if row["variant"] in variants and metric in row]
    cells = sorted({row["cell"] for row in rows})
    if len(cells) < 2 or not any(row["variant"] == baseline for row in rows):
        return {"effects": {}, "cells": len(cells), "runs": len(rows), "warnings": ["fewer than two cells"]}
    endog = np.array([row[metric] for row in rows], dtype=float)
    exog = np.array([[1.0] + [float(row["variant"] == v) for v in others] for row in rows])  # (runs, 1 + variants)
    present = [j for j in range(exog.shape[1]) if j == 0 or exog[:, j].any()]
    exog = exog[:, present]
    names = ["baseline"] + [others[j - 1] for j in present[1:]]
    groups = np.array([cells.index(row["cell"]) for row in rows])
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit = MixedLM(endog, exog, groups).fit(reml=True)
        caught = sorted({str(record.message).splitlines()[0][:160] for record in records})
    params, bse = np.asarray(fit.fe_params), np.asarray(fit.bse_fe)
    pvalues = np.asarray(fit.pvalues)[: len(params)]
    z = float(stats.distributions.norm.ppf(0.5 + confidence / 2.0))
    effects = {}
    for j, name in enumerate(names[1:], start=1):
        estimate, se = float(params[j]), float(bse[j])
        effects[name] = {
            "estimate": estimate,
            "se": se,
            "ci": [estimate - z * se, estimate + z * se],
            "p": float(pvalues[j]),
            "cells": len({row["cell"] for row in rows if row["variant"] == name}),
        }
    cell_variance = float(np.asarray(fit.cov_re).ravel()[0])
    return {
        "effects": effects,
        "cell_sd": math.sqrt(max(cell_variance, 0.0)),
        "residual_sd": math.sqrt(float(fit.scale)),
        "cells": len(cells),
        "runs": len(rows),
        "warnings": caught,
    }


# ---------------------------------------------------------------------------------------------- interactions
def interaction(table: Sequence[dict], metric: str, variant: str, baseline: str, axis: str) -> dict | None:
    """Does the variant's effect depend on ``axis`` (e.g. the width or the length)?

    The per-cell differences from the baseline are grouped by the axis' value and compared by a one-way ANOVA
    (``scipy.stats.f_oneway``): within matched cells this is the test of the variant x axis interaction. Returns
    None when the axis has fewer than two values with two or more cells each.
    """
    diffs = matched_differences(table, metric, variant, baseline)
    axis_of = {row["cell"]: row.get(axis) for row in table}
    levels: dict[object, list[float]] = {}
    for cell, diff in sorted(diffs.items()):
        levels.setdefault(axis_of[cell], []).append(diff)
    usable = {level: values for level, values in levels.items() if len(values) >= 2}
    if len(usable) < 2:
        return None
    by_level = {}
    for level, values in sorted(usable.items(), key=lambda item: str(item[0])):
        low, high = stats.mean_ci(values)
        by_level[str(level)] = {"n": len(values), "diff": stats.mean(values), "ci95": [low, high]}
    spread = [stats.std(values) for values in usable.values()]
    if all(s == 0.0 for s in spread):  # no spread within levels: any change across levels is exact
        same = len({round(stats.mean(v), 15) for v in usable.values()}) == 1
        f, p = (0.0, 1.0) if same else (math.inf, 0.0)
    else:
        result = stats.distributions.f_oneway(*usable.values())
        f, p = float(result.statistic), float(result.pvalue)
    return {"axis": axis, "levels": by_level, "F": f, "p": p}


def sweep_effects(
    table: Sequence[dict],
    metric: str,
    variants: Sequence[str],
    baseline: str,
    axes: Sequence[str] = (),
    mixed: bool = False,
    alpha: float = 0.05,
) -> dict:
    """The variant effects of one metric with the cells as blocking factor.

    Returns:
        ``paired`` (per variant: cells, diff, ci95, p, p_holm over the variants), ``mixed`` (the
        :func:`mixed_model`, when ``mixed``, its p-values also Holm-corrected as ``p_holm``) and ``interactions``
        (per variant and axis: the :func:`interaction` check, p Holm-corrected over all of them; only axes with two
        or more values).
    """
    others = [v for v in variants if v != baseline]
    paired = {}
    for variant in others:
        test, diffs = paired_over_cells(table, metric, variant, baseline)
        paired[variant] = {
            "cells": len(diffs),
            "diff": test.diff,
            "ci95": [test.ci_low, test.ci_high],
            "p": test.p,
        }
    for variant, p_holm in zip(others, stats.holm([paired[v]["p"] for v in others]), strict=True):
        paired[variant]["p_holm"] = p_holm
    out: dict = {"metric": metric, "baseline": baseline, "paired": paired}
    if mixed:
        out["mixed"] = fit = mixed_model(table, metric, variants, baseline)
        names = list(fit["effects"])
        for name, p_holm in zip(names, stats.holm([fit["effects"][n]["p"] for n in names]), strict=True):
            fit["effects"][name]["p_holm"] = p_holm
    checks = []
    for variant in others:
        for axis in axes:
            if axis == "seed":
                continue
            check = interaction(table, metric, variant, baseline, axis)
            if check is not None:
                checks.append({"variant": variant, **check})
    for check, p_holm in zip(checks, stats.holm([c["p"] for c in checks]), strict=True):
        check["p_holm"] = p_holm
        check["depends"] = p_holm < alpha
    out["interactions"] = checks
    return out
