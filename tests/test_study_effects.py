"""Equivalence (TOST), power, the verdicts, the effects across cells (paired over matched cells, the mixed model, the
interaction check) and the forest panel, on fixed and constructed numbers (no training)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from qkv_lightning.errors import ConfigError
from qkv_lightning.study import StudyConfig, parse_study_args
from qkv_lightning.study import effects as E
from qkv_lightning.study import stats as S
from qkv_lightning.study.config import Variant
from qkv_lightning.study.plots import summary_figure
from qkv_lightning.study.report import equivalence_table, summarize, summary_markdown

scipy_stats = pytest.importorskip("scipy.stats")

ROOT = Path(__file__).resolve().parents[1]
A = [0.912, 0.934, 0.901, 0.948, 0.925]
B = [0.871, 0.889, 0.902, 0.866, 0.880]
C = [0.915, 0.921, 0.899, 0.950, 0.930, 0.941]


# ------------------------------------------------------------------------------------------------------- TOST
@pytest.mark.parametrize(("margin", "alpha"), [(0.05, 0.05), (0.03, 0.05), (0.08, 0.1)])
def test_paired_tost_equals_a_hand_computation_with_scipy(margin: float, alpha: float) -> None:
    result = S.tost(S.paired_test(A, B), margin, alpha)
    # H0 diff <= -margin falls when (a + margin) - b is significantly > 0; H0 diff >= margin when (a - margin) - b < 0
    p_lower = scipy_stats.ttest_rel([x + margin for x in A], B, alternative="greater").pvalue
    p_upper = scipy_stats.ttest_rel([x - margin for x in A], B, alternative="less").pvalue
    assert result.p_lower == pytest.approx(p_lower, rel=1e-9)
    assert result.p_upper == pytest.approx(p_upper, rel=1e-9)
    assert result.p == pytest.approx(max(p_lower, p_upper), rel=1e-9)
    ci = scipy_stats.ttest_rel(A, B).confidence_interval(1 - 2 * alpha)
    assert (result.ci_low, result.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    # the duality that the verdict reads: TOST rejects at alpha exactly when the 1 - 2 alpha CI lies in the margin
    assert (result.p < alpha) == (-margin < result.ci_low and result.ci_high < margin)


@pytest.mark.parametrize(("a", "b", "margin"), [(C, B, 0.06), (B, C, 0.02), (A, C, 0.03)])
def test_welch_tost_equals_a_hand_computation_with_scipy(a: list[float], b: list[float], margin: float) -> None:
    result = S.tost(S.welch_test(a, b), margin, 0.05)
    p_lower = scipy_stats.ttest_ind([x + margin for x in a], b, equal_var=False, alternative="greater").pvalue
    p_upper = scipy_stats.ttest_ind([x - margin for x in a], b, equal_var=False, alternative="less").pvalue
    assert (result.p_lower, result.p_upper) == pytest.approx((p_lower, p_upper), rel=1e-9)
    ci = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.90)
    assert (result.ci_low, result.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_tost_agrees_with_statsmodels() -> None:
    weightstats = pytest.importorskip("statsmodels.stats.weightstats")
    import numpy as np

    a, b, c = np.array(A), np.array(B), np.array(C)
    p, lower, upper = weightstats.ttost_paired(a, b, -0.05, 0.05)
    assert S.tost(S.paired_test(A, B), 0.05).p == pytest.approx(p, rel=1e-9)
    p, lower, upper = weightstats.ttost_ind(c, b, -0.06, 0.06, usevar="unequal")
    assert S.tost(S.welch_test(C, B), 0.06).p == pytest.approx(p, rel=1e-9)


def test_tost_without_spread() -> None:
    same = S.tost(S.paired_test([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]), 0.01)
    assert same.p == 0.0 and (same.ci_low, same.ci_high) == (0.0, 0.0)
    off = S.tost(S.paired_test([0.97, 0.97], [1.0, 1.0]), 0.01)  # exactly -0.03 every time: outside the margin
    assert off.p == 1.0 and off.p_upper == 0.0
    assert math.isnan(S.tost(S.paired_test([0.9], [1.0]), 0.01).p)


# ------------------------------------------------------------------------------------------------------ power
@pytest.mark.parametrize(("n", "sd", "alpha"), [(3, 0.02, 0.05), (5, 0.1322, 0.05), (10, 0.05, 0.01), (40, 0.3, 0.05)])
def test_min_detectable_difference_has_the_target_power(n: int, sd: float, alpha: float) -> None:
    power = S.power_analysis("paired", [sd], [n], alpha, 0.8)
    # closed form of the paired t-test's power, computed here: P(|T| > t_crit), T ~ non-central t(n - 1, d sqrt(n) / sd)
    df, critical = n - 1, scipy_stats.t.ppf(1 - alpha / 2, n - 1)
    nc = power.min_detectable * math.sqrt(n) / sd
    achieved = scipy_stats.nct.sf(critical, df, nc) + scipy_stats.nct.cdf(-critical, df, nc)
    assert achieved == pytest.approx(0.8, abs=1e-9)
    # the normal approximation (z_{1-alpha/2} + z_{0.8}) sd / sqrt(n) is a lower bound, close for many seeds
    normal = (scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(0.8)) * sd / math.sqrt(n)
    assert normal < power.min_detectable < normal * (1.03 if n >= 40 else 2.5)


@pytest.mark.parametrize(("a", "b"), [(A, C), (C, B), (B, [0.70, 0.95, 0.81]), ([0.50, 0.52], C)])
def test_welch_power_uses_scipys_degrees_of_freedom(a: list[float], b: list[float]) -> None:
    """Welch's power analysis reads the standard error and Welch-Satterthwaite degrees of freedom that scipy's
    ``ttest_ind(equal_var=False)`` reports, and its minimum detectable difference is the non-central t's at them."""
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    se = abs((S.mean(a) - S.mean(b)) / reference.statistic)
    sds, n = [S.std(a), S.std(b)], [len(a), len(b)]
    assert S._welch_se_df(*sds, *n) == pytest.approx((se, reference.df), rel=1e-12)
    optimize = pytest.importorskip("scipy.optimize")
    critical = scipy_stats.t.ppf(0.975, reference.df)

    def power(nc: float) -> float:  # P(|T| > critical); the far tail is nan (far below 1e-16) for large nc
        far = scipy_stats.nct.cdf(-critical, reference.df, nc)
        return scipy_stats.nct.sf(critical, reference.df, nc) + (0.0 if math.isnan(far) else far)

    nc = optimize.brentq(lambda x: power(x) - 0.8, 0.0, 200.0, xtol=1e-13)
    assert S.power_analysis("welch", sds, n, 0.05, 0.8).min_detectable == pytest.approx(nc * se, rel=1e-8)


@pytest.mark.parametrize(("n", "sd", "margin"), [(5, 0.1322, 0.02), (3, 0.004, 0.01), (10, 0.05, 0.05)])
def test_power_matches_statsmodels_solver(n: int, sd: float, margin: float) -> None:
    power_module = pytest.importorskip("statsmodels.stats.power")
    solver = power_module.TTestPower()
    ours = S.power_analysis("paired", [sd], [n], 0.05, 0.8, margin=margin)
    effect = solver.solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert ours.min_detectable == pytest.approx(effect * sd, rel=1e-5)
    seeds = solver.solve_power(effect_size=margin / sd, nobs=None, alpha=0.05, power=0.8, alternative="two-sided")
    assert ours.seeds_needed == math.ceil(seeds)


def test_seeds_needed_is_the_smallest_count_with_the_power() -> None:
    sd, margin = 0.05, 0.02
    needed = S.power_analysis("paired", [sd], [5], 0.05, 0.8, margin=margin).seeds_needed
    at = [S.t_test_power(margin, sd / math.sqrt(k), k - 1, 0.05) for k in (needed - 1, needed)]
    assert at[0] < 0.8 <= at[1]
    welch = S.power_analysis("welch", [0.05, 0.01], [5, 6], 0.05, 0.8, margin=margin)
    se, df = S._welch_se_df(0.05, 0.01, welch.seeds_needed, welch.seeds_needed)
    assert S.t_test_power(margin, se, df, 0.05) >= 0.8
    se, df = S._welch_se_df(0.05, 0.01, welch.seeds_needed - 1, welch.seeds_needed - 1)
    assert S.t_test_power(margin, se, df, 0.05) < 0.8
    assert S.power_analysis("paired", [0.0], [4], 0.05, margin=0.01) == S.Power(0.0, 2)
    assert S.power_analysis("paired", [0.3], [2], 0.05, margin=1e-4).seeds_needed == 10_001  # capped


# -------------------------------------------------------------------------------------------- verdicts, margins
def _results(values: dict[str, list[float]], metric: str = "test/acc") -> list[dict]:
    return [
        {
            "variant": label,
            "seed": seed,
            "status": "ok",
            "metrics": {metric: value},
            "params": 1000,
            "attn_params": 100,
            "kv_cache_bytes_per_token": 64,
            "wall_s": 1.0,
            "error": None,
        }
        for label, series in values.items()
        for seed, value in enumerate(series)
    ]


def _task(tmp_path: Path) -> str:
    path = tmp_path / "task.yaml"
    path.write_text("trainer: {}\n")
    return str(path)


def test_study_verdict_reads_holm_corrected_p(tmp_path: Path) -> None:
    """The study summary's verdict (one task): raw paired p 0.039 and 0.032 over two comparisons are 0.064 after
    Holm, so neither is significant at 0.05 (the sweep's verdict: tests/test_study_sweep.py)."""
    from tests.test_study_sweep import BASE, lower_with_p

    values = {"QKV": BASE, "Q-K=V": lower_with_p(0.039), "Q=K=V": lower_with_p(0.032)}
    config = StudyConfig(task=_task(tmp_path), sharing=list(values), seeds=list(range(len(BASE))))
    summary = summarize(config, [Variant(label) for label in values], _results(values))
    entries = {row["variant"]: row["metrics"]["test/acc"] for row in summary["variants"]}
    assert [entries[label]["p"] for label in ("Q-K=V", "Q=K=V")] == pytest.approx([0.039, 0.032], rel=1e-9)
    assert [entries[label]["p_holm"] for label in ("Q-K=V", "Q=K=V")] == pytest.approx([0.064, 0.064], rel=1e-9)
    assert {label: entry["verdict"] for label, entry in entries.items()} == {
        "QKV": "baseline", "Q-K=V": "n.s.", "Q=K=V": "n.s."}


def test_verdicts_on_constructed_data(tmp_path: Path) -> None:
    rng = random.Random(0)
    base = [0.90 + rng.gauss(0, 0.03) for _ in range(8)]  # seeds differ a lot, the variants follow them
    values = {
        "QKV": base,
        "Q=K-V": [b + rng.gauss(0, 0.002) for b in base],  # clearly equivalent
        "Q-K=V": [b - 0.08 + rng.gauss(0, 0.004) for b in base],  # clearly worse
        "Q=V-K": [b + rng.gauss(0, 0.08) for b in base],  # too noisy to tell
        "Q=K=V": [b - 0.006 + rng.gauss(0, 0.001) for b in base],  # detectably different, but inside the margin
    }
    config = StudyConfig(task=_task(tmp_path), sharing=list(values), seeds=list(range(8)), equivalence_margin=0.02)
    variants = [Variant(label) for label in values]
    summary = summarize(config, variants, _results(values))
    entries = {row["variant"]: row["metrics"]["test/acc"] for row in summary["variants"]}
    assert {label: entry["verdict"] for label, entry in entries.items()} == {
        "QKV": "baseline",
        "Q=K-V": "equivalent",
        "Q-K=V": "worse",
        "Q=V-K": "inconclusive",
        "Q=K=V": "equivalent",
    }
    assert entries["Q=K=V"]["diff_verdict"] == "worse"  # the difference is real, and smaller than the margin
    assert entries["Q=V-K"]["diff_verdict"] == "n.s." and entries["Q=V-K"]["seeds_needed"] > 8
    # the TOST p-values are Holm-corrected over the four variants, as the difference test's are
    raw = [entries[label]["tost_p"] for label in ("Q=K-V", "Q-K=V", "Q=V-K", "Q=K=V")]
    assert [entries[label]["tost_p_holm"] for label in ("Q=K-V", "Q-K=V", "Q=V-K", "Q=K=V")] == pytest.approx(
        S.holm(raw)
    )
    table = equivalence_table(summary)
    assert "| Q=V-K |" in table and "| inconclusive |" in table and "| equivalent * |" in table
    assert table.count("\n") == 1 + 4  # header, rule, four variants
    # without a margin the old two-way verdict stays, and there is no equivalence table
    plain = summarize(
        StudyConfig(task=_task(tmp_path), sharing=list(values), seeds=list(range(8))), variants, _results(values)
    )
    verdicts = {row["variant"]: row["metrics"]["test/acc"]["verdict"] for row in plain["variants"]}
    assert verdicts["Q=V-K"] == "n.s." and verdicts["Q=K-V"] == "n.s." and verdicts["Q-K=V"] == "worse"
    assert equivalence_table(plain) == "" and "equivalence_margin" in summary_markdown(plain, "t")


def test_margins_absolute_relative_and_per_metric(tmp_path: Path) -> None:
    assert E.parse_margin(0.01) == (0.01, False)
    assert E.parse_margin("1%") == (0.01, True)
    assert E.parse_margin("0.5 %") == (0.005, True)
    assert E.parse_margin("0.02") == (0.02, False)
    for bad in (0, -0.1, "ten", "-1%", float("nan"), True):
        with pytest.raises(ConfigError, match="study.equivalence_margin"):
            E.parse_margin(bad)
    with pytest.raises(ConfigError, match=r"study.equivalence_margin\['test/ppl'\]"):
        StudyConfig(task=_task(tmp_path), equivalence_margin={"test/acc": 0.01, "test/ppl": "x"})
    with pytest.raises(ConfigError, match=r"names \['test/ppl'\], which study.metrics"):
        StudyConfig(task=_task(tmp_path), metrics=["test/acc"], equivalence_margin={"test/ppl": "1%"})
    assert E.margin_for("2%", "test/ppl", "test/ppl", 50.0) == (pytest.approx(1.0), "2% = 1")
    assert E.margin_for(0.01, "test/loss", "test/acc", 1.0) == (None, None)  # one value: the primary metric only
    assert E.margin_for({"test/loss": 0.1}, "test/loss", "test/acc", 1.0) == (0.1, "0.1")
    config, _ = parse_study_args(
        ["--config", str(ROOT / "configs/study/synthetic.yaml"), "--equivalence_margin", "0.02"]
    )
    assert config.equivalence_margin == 0.02
    config, _ = parse_study_args(["--config", str(ROOT / "configs/study/synthetic.yaml"), "--equivalence_margin", "1%"])
    assert config.equivalence_margin == "1%"


# ------------------------------------------------------------------------------------------------------ sweeps
def _sweep_table(effects: dict[str, object], seed: int = 0, noise: float = 0.004) -> list[dict]:
    """Widths x lengths x seeds; each cell has its own level (easy and hard cells), each variant its effect."""
    rng = random.Random(seed)
    table = []
    for width in (32, 64, 256):
        for length in (16, 64):
            for s in range(3):
                level = rng.gauss(0.8, 0.1)
                for variant, effect in effects.items():
                    shift = effect(width, length) if callable(effect) else effect
                    cell = f"d_model={width}, seq_len={length}, seed={s}"
                    value = level + shift + rng.gauss(0, noise)
                    table.append(
                        {"variant": variant, "cell": cell, "seed": s, "d_model": width, "seq_len": length, "acc": value}
                    )
    return table


def test_mixed_model_recovers_a_planted_effect() -> None:
    pytest.importorskip("statsmodels")
    table = _sweep_table({"QKV": 0.0, "Q=K=V": -0.03, "Q-K=V": 0.0})
    fit = E.mixed_model(table, "acc", ["QKV", "Q=K=V", "Q-K=V"], "QKV")
    planted = fit["effects"]["Q=K=V"]
    assert planted["ci"][0] < -0.03 < planted["ci"][1] and abs(planted["estimate"] + 0.03) < 0.004
    assert planted["p"] < 1e-6 and planted["cells"] == 18
    sweep = E.sweep_effects(table, "acc", ["QKV", "Q=K=V", "Q-K=V"], "QKV", mixed=True)
    raw = [sweep["mixed"]["effects"][v]["p"] for v in ("Q=K=V", "Q-K=V")]
    assert [sweep["mixed"]["effects"][v]["p_holm"] for v in ("Q=K=V", "Q-K=V")] == pytest.approx(S.holm(raw))
    null = fit["effects"]["Q-K=V"]
    assert null["ci"][0] < 0.0 < null["ci"][1]
    assert fit["cell_sd"] == pytest.approx(0.1, rel=0.5) and fit["residual_sd"] == pytest.approx(0.004, rel=0.5)
    # the cells as blocking factor: the within-cell estimate is as tight as the noise, while ignoring the cells
    # (Welch over all runs) buries the effect in the cells' spread
    paired, diffs = E.paired_over_cells(table, "acc", "Q=K=V", "QKV")
    assert len(diffs) == 18 and paired.ci_low < -0.03 < paired.ci_high and paired.ci_high - paired.ci_low < 0.01
    values = {v: [r["acc"] for r in table if r["variant"] == v] for v in ("QKV", "Q=K=V")}
    unblocked = S.welch_test(values["Q=K=V"], values["QKV"])
    assert unblocked.p > 0.05 and unblocked.ci_high - unblocked.ci_low > 5 * (paired.ci_high - paired.ci_low)


def test_matched_cells_drop_cells_where_either_side_failed() -> None:
    table = _sweep_table({"QKV": 0.0, "Q=K=V": -0.03})
    lost = {"d_model=32, seq_len=16, seed=0", "d_model=256, seq_len=64, seed=2"}
    table = [r for r in table if not (r["variant"] == "QKV" and r["cell"] in lost)]
    table = [r for r in table if not (r["variant"] == "Q=K=V" and r["cell"] == "d_model=64, seq_len=16, seed=1")]
    diffs = E.matched_differences(table, "acc", "Q=K=V", "QKV")
    assert len(diffs) == 18 - 3 and not (set(diffs) & (lost | {"d_model=64, seq_len=16, seed=1"}))
    by_cell = {(r["variant"], r["cell"]): r["acc"] for r in table}
    assert all(diffs[c] == by_cell["Q=K=V", c] - by_cell["QKV", c] for c in diffs)


def test_interaction_check_finds_an_effect_that_depends_on_the_width() -> None:
    table = _sweep_table({"QKV": 0.0, "Q=K=V": lambda width, length: -0.06 if width == 32 else 0.0, "Q-K=V": -0.02})
    sweep = E.sweep_effects(table, "acc", ["QKV", "Q=K=V", "Q-K=V"], "QKV", axes=["d_model", "seq_len", "seed"])
    checks = {(c["variant"], c["axis"]): c for c in sweep["interactions"]}
    assert set(checks) == {(v, a) for v in ("Q=K=V", "Q-K=V") for a in ("d_model", "seq_len")}  # never the seed
    assert checks["Q=K=V", "d_model"]["depends"] and checks["Q=K=V", "d_model"]["p_holm"] < 1e-6
    assert checks["Q=K=V", "d_model"]["levels"]["32"]["diff"] == pytest.approx(-0.06, abs=0.005)
    assert not checks["Q=K=V", "seq_len"]["depends"] and not checks["Q-K=V", "d_model"]["depends"]
    assert sweep["paired"]["Q-K=V"]["cells"] == 18 and sweep["paired"]["Q-K=V"]["p_holm"] < 1e-6
    diffs = E.matched_differences(table, "acc", "Q=K=V", "QKV")
    by_width: dict[int, list[float]] = {}
    for row in table:
        if row["variant"] == "QKV":
            by_width.setdefault(row["d_model"], []).append(diffs[row["cell"]])
    assert checks["Q=K=V", "d_model"]["p"] == pytest.approx(scipy_stats.f_oneway(*by_width.values()).pvalue)


def test_results_table_keys_cells_by_axes_and_seed() -> None:
    results = _results({"QKV": [0.9, 0.8], "Q=K=V": [0.7, 0.6]})
    results[0]["axes"] = {"d_model": 32}
    results.append({"variant": "QKV", "seed": 5, "status": "failed", "metrics": {}})
    table = E.results_table(results)
    assert [r["cell"] for r in table] == ["seed=0", "seed=1", "seed=0", "seed=1"]
    assert E.results_table(results, ["d_model"])[0]["cell"] == "d_model=32, seed=0"


# ------------------------------------------------------------------------------------------------ forest panel
def test_summary_plot_has_a_forest_panel_clipped_to_the_metric_range(tmp_path: Path) -> None:
    values = {"QKV": [1.0, 0.99, 1.0, 0.98], "Q-K=V": [0.99, 0.60, 0.98, 0.97], "Q=K-V": [1.0, 0.99, 0.99, 0.98]}
    config = StudyConfig(task=_task(tmp_path), sharing=list(values), seeds=[0, 1, 2, 3], equivalence_margin=0.02)
    summary = summarize(config, [Variant(label) for label in values], _results(values))
    noisy = next(row for row in summary["variants"] if row["variant"] == "Q-K=V")["metrics"]["test/acc"]
    # the mean's CI column is clipped at 1 already in the summary; the difference's t interval leaves the range
    assert noisy["ci95"][1] == 1.0 and noisy["diff_ci95"][1] > 1.0 - 0.9925
    figure = summary_figure(summary)
    left, _, forest = figure.axes[:3]
    assert left.get_ylim()[1] <= 1.0 + 0.03 * 0.4 + 1e-12
    tops = [segment[:, 1].max() for c in left.collections for segment in c.get_segments()]
    assert tops and max(tops) <= 1.0  # every error bar ends at 1 at most
    base_mean = sum(values["QKV"]) / 4
    lines = [c for c in forest.collections if hasattr(c, "get_segments")]
    ends = [segment[:, 0].max() for c in lines for segment in c.get_segments()]
    assert ends and max(ends) <= 1.0 - base_mean + 1e-12  # a variant's accuracy cannot exceed 1
    band = [p for p in forest.patches if p.get_label().startswith("margin")]
    assert len(band) == 1  # axvspan's patch: a Rectangle from matplotlib 3.9, a Polygon before (the floor is 3.8)
    band_x = band[0].get_patch_transform().transform(band[0].get_path().vertices)[:, 0]  # in data units
    assert (band_x.min(), band_x.max()) == pytest.approx((-0.02, 0.02))
    points = [c for c in forest.collections if c.get_label() == "per seed" or c.get_offsets().shape[0] == 4]
    offsets = sorted(x for c in points for x, _ in c.get_offsets())
    diffs = sorted(v - b for label in ("Q-K=V", "Q=K-V") for v, b in zip(values[label], values["QKV"], strict=True))
    assert offsets == pytest.approx(diffs)  # one point per seed and variant, at its paired difference
    assert [t.get_text() for t in forest.get_yticklabels()] == ["Q-K=V\ninconclusive", "Q=K-V\nequivalent *"]
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_summary_gets_the_sweep_section_once_the_study_has_axes(tmp_path: Path) -> None:
    """The wiring for grid axes (issue 11): a config with ``axes`` and results carrying their values."""
    table = _sweep_table({"QKV": 0.0, "Q=K=V": lambda width, length: -0.06 if width == 32 else 0.0})
    results = [
        {
            "variant": row["variant"],
            "seed": row["seed"],
            "axes": {"d_model": row["d_model"], "seq_len": row["seq_len"]},
            "status": "ok",
            "metrics": {"test/acc": row["acc"]},
            "params": 1,
            "attn_params": 1,
            "kv_cache_bytes_per_token": 1,
            "wall_s": 1.0,
            "error": None,
        }
        for row in table
    ]
    config = StudyConfig(task=_task(tmp_path), sharing=["QKV", "Q=K=V"], seeds=[0, 1, 2])
    variants = [Variant("QKV"), Variant("Q=K=V")]
    assert summarize(config, variants, results)["sweep"] is None  # no axes, no mixed model: the table says it all
    config.axes = {"d_model": [32, 64, 256], "seq_len": [16, 64]}
    summary = summarize(config, variants, results)
    assert summary["sweep"]["paired"]["Q=K=V"]["cells"] == 18
    value = {(row["variant"], row["cell"]): row["acc"] for row in table}
    by_hand = [value["Q=K=V", cell] - value["QKV", cell] for (variant, cell) in value if variant == "QKV"]
    assert summary["sweep"]["paired"]["Q=K=V"]["diff"] == pytest.approx(sum(by_hand) / 18)  # the sweep average
    assert summary["sweep"]["paired"]["Q=K=V"]["ci95"][0] < -0.02 < summary["sweep"]["paired"]["Q=K=V"]["ci95"][1]
    depends = {c["axis"]: c["depends"] for c in summary["sweep"]["interactions"]}
    assert depends == {"d_model": True, "seq_len": False}
    markdown = summary_markdown(summary, "sweep")
    assert "blocking factor" in markdown and "| Q=K=V | d_model | 256: " in markdown


def test_a_difference_without_spread_is_marked_in_the_table_and_explained(tmp_path: Path) -> None:
    """Every seed of Q-K=V is exactly 0.125 below its QKV seed (as a deterministic conversion scored on fixed batches
    is): p = 0, and the table says that it comes from no spread at all; Q=K-V, with spread, is not marked."""
    values = {"QKV": [1.0, 0.75, 0.5], "Q-K=V": [0.875, 0.625, 0.375], "Q=K-V": [1.0, 0.5, 0.75]}
    config = StudyConfig(task=_task(tmp_path), sharing=list(values), seeds=[0, 1, 2])
    summary = summarize(config, [Variant(label) for label in values], _results(values))
    rows = {row["variant"]: row["metrics"]["test/acc"] for row in summary["variants"]}
    assert rows["Q-K=V"]["p"] == 0.0 and rows["Q-K=V"]["no_spread"] is True and rows["Q=K-V"]["no_spread"] is False
    markdown = summary_markdown(summary, "t")
    marked = [line for line in markdown.splitlines() if "paired (no spread)" in line]
    assert len(marked) == 1 and marked[0].startswith("| Q-K=V |")
    assert "`(no spread)`: every seed gave the same difference" in markdown
    spread = {"QKV": [1.0, 0.75, 0.5], "Q-K=V": [0.875, 0.5, 0.375]}
    config = StudyConfig(task=_task(tmp_path), sharing=list(spread), seeds=[0, 1, 2])
    plain = summary_markdown(summarize(config, [Variant(label) for label in spread], _results(spread)), "t")
    assert "no spread" not in plain
