"""What a study writes: ``results.csv`` (one row per run), ``summary.json`` / ``summary.md`` (one row per variant,
with statistics against the baseline) and ``summary.png`` (metric versus parameters and KV-cache size)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from qkv_lightning.files import atomic_write_text
from qkv_lightning.study import effects, stats
from qkv_lightning.study.config import StudyConfig
from qkv_lightning.study.results import clip_interval
from qkv_lightning.variants import Variant, row_columns


def result_columns() -> list[str]:
    """The first columns of ``results.csv``: the variant's (:meth:`Variant.as_row`, so a new breaker's setting gets a
    column), the seed and the status; the final metrics (one column each, e.g. ``test/acc``) follow."""
    return [*row_columns(), "seed", "status"]

TRAILING_COLUMNS = [
    "params",
    "attn_params",
    "kv_cache_bytes_per_token",
    "steps",
    "wall_s",
    "cpu_s",
    "error",
    "log_dir",
]
"""The last columns of ``results.csv``, after the metrics."""


def write_results_csv(results: list[dict], path: Path) -> list[str]:
    """One row per run (ok or failed); returns the columns written."""
    metric_names = sorted({name for result in results for name in result.get("metrics", {})})
    first = result_columns()
    sweep_names = list(dict.fromkeys(name for result in results for name in result.get("sweep", {})))
    columns = first[:-2] + sweep_names + first[-2:] + metric_names + TRAILING_COLUMNS
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for result in results:
            row = {key: result.get(key) for key in first + TRAILING_COLUMNS}
            row["n_kv_heads"] = "" if result.get("n_kv_heads") is None else result["n_kv_heads"]
            row.update(result.get("sweep", {}))  # a sweep's task and axis values
            row.update(result.get("metrics", {}))
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return columns


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def _json_safe(value: object) -> object:
    """``value`` with every nan replaced by None (summary.json stays valid JSON)."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def sweep_axes(config: StudyConfig) -> list[str]:
    """The study's grid axes besides the seed (the config keys of issue 11's ``axes``; none on a seed-only grid)."""
    return list(getattr(config, "axes", None) or {})


def summarize(config: StudyConfig, variants: list[Variant], results: list[dict]) -> dict:
    """Per-variant statistics of every metric, each compared with the baseline over the seeds.

    The comparison is a paired t-test when the variant and the baseline finished the same seeds (two or more),
    Welch's t-test otherwise; the p-values of all variants are then Holm-corrected per metric. ``diff_verdict``
    says 'better' / 'worse' when the corrected p-value is below ``alpha``, else 'n.s.'. Every comparison also gets
    its minimum detectable difference at ``alpha`` and ``power``, and the per-seed differences (``diff_points``).

    Where ``equivalence_margin`` gives the metric a margin, the same comparison is read as two one-sided tests
    (``tost_p``, Holm-corrected over the variants as ``tost_p_holm``, with its 1 - 2 alpha CI ``tost_ci``), the
    seeds needed to detect the margin are added, and ``verdict`` is 'equivalent', 'worse' / 'better' or
    'inconclusive' (see :func:`effects.verdict`); without a margin ``verdict`` equals ``diff_verdict``.
    ``sweep`` holds the effects with the cells as blocking factor when the study has grid axes or asks for the
    mixed model.
    """
    by_variant: dict[str, list[dict]] = {v.label: [] for v in variants}
    for result in results:
        if result["variant"] in by_variant:
            by_variant[result["variant"]].append(result)
    base = config.baseline

    def ok_values(label: str, metric: str) -> dict[int, float]:
        return {
            r["seed"]: r["metrics"][metric]
            for r in by_variant[label]
            if r["status"] == "ok" and metric in r["metrics"] and not math.isnan(r["metrics"][metric])
        }

    rows = []
    for variant in variants:
        runs = by_variant[variant.label]
        known = next((r for r in runs if r.get("params")), None)
        rows.append(
            {
                **variant.as_row(),
                "runs": len(runs),
                "runs_ok": sum(r["status"] == "ok" for r in runs),
                "params": known["params"] if known else None,
                "attn_params": known["attn_params"] if known else None,
                "kv_cache_bytes_per_token": known["kv_cache_bytes_per_token"] if known else None,
                "wall_s_mean": _finite(stats.mean([r["wall_s"] for r in runs if r["status"] == "ok"])),
                "metrics": {},
            }
        )
    base_row = next(row for row in rows if row["variant"] == base)
    for row in rows:
        if row["params"] is not None and base_row["params"]:
            row["params_change"] = row["params"] / base_row["params"] - 1.0
        else:
            row["params_change"] = None

    metrics = config.resolve_metrics(results)
    primary = metrics[0] if metrics else None
    margins = {}
    for metric in metrics:
        base_values = ok_values(base, metric)
        base_series = [base_values[s] for s in sorted(base_values)]
        margin, stated = effects.margin_for(config.equivalence_margin, metric, primary, stats.mean(base_series))
        if margin is not None:
            margins[metric] = {"margin": margin, "stated": stated}
        tests, equivalences = {}, {}
        for row in rows:
            values = ok_values(row["variant"], metric)
            series = [values[s] for s in sorted(values)]
            low, high = clip_interval(stats.mean_ci(series), metric)
            entry = {
                "n": len(series),
                "mean": _finite(stats.mean(series)),
                "std": _finite(stats.std(series)),
                "ci95": [_finite(low), _finite(high)],
                "values": {str(seed): value for seed, value in sorted(values.items())},
            }
            if row["variant"] != base:
                if set(values) == set(base_values) and len(values) >= 2:
                    seeds = sorted(values)
                    test = stats.paired_test([values[s] for s in seeds], [base_values[s] for s in seeds])
                    points = {str(s): values[s] - base_values[s] for s in seeds}
                    power = stats.power_analysis(
                        "paired", [stats.std(list(points.values()))], [len(seeds)], config.alpha, config.power, margin
                    )
                else:
                    test = stats.welch_test(series, base_series)
                    base_mean = stats.mean(base_series)
                    points = {str(s): v - base_mean for s, v in sorted(values.items())}
                    power = stats.power_analysis(
                        "welch",
                        [stats.std(series), stats.std(base_series)],
                        [len(series), len(base_series)],
                        config.alpha,
                        config.power,
                        margin,
                    )
                tests[row["variant"]] = test
                entry.update(
                    diff=_finite(test.diff),
                    diff_ci95=[_finite(test.ci_low), _finite(test.ci_high)],
                    test=test.kind,
                    t=_finite(test.t) if not math.isinf(test.t) else test.t,
                    df=_finite(test.df),
                    p=_finite(test.p),
                    no_spread=test.se == 0.0,  # every seed's difference the same: p is exactly 0 or 1
                    diff_points=points,
                    min_detectable=None if power is None else power.min_detectable,
                    seeds_needed=None if power is None else power.seeds_needed,
                )
                if margin is not None:
                    equivalence = stats.tost(test, margin, config.alpha)
                    equivalences[row["variant"]] = equivalence
                    entry.update(
                        margin=margin,
                        tost_ci=[_finite(equivalence.ci_low), _finite(equivalence.ci_high)],
                        tost_p=_finite(equivalence.p),
                    )
            row["metrics"][metric] = entry
        entries = {row["variant"]: row["metrics"][metric] for row in rows}
        effects.holm_verdicts(entries, {label: test.p for label, test in tests.items()},
                              {label: e.p for label, e in equivalences.items()}, config.is_lower_better(metric),
                              config.alpha)
        next(row for row in rows if row["variant"] == base)["metrics"][metric]["verdict"] = "baseline"

    notes = []
    if isinstance(config.equivalence_margin, dict):
        unused = sorted(set(config.equivalence_margin) - set(metrics))
        if unused:
            notes.append(f"equivalence_margin for {unused} unused: the study summarises {metrics}")
    axes = sweep_axes(config)
    sweep = None
    if primary is not None and (axes or config.mixed_model):
        table = effects.results_table(results, axes)
        labels = [v.label for v in variants]
        sweep = _json_safe(effects.sweep_effects(table, primary, labels, base, axes, config.mixed_model, config.alpha))

    return {
        **summary_header(config, metrics, base, results),
        "task": config.task if isinstance(config.task, str) else list(config.task),
        "power": config.power,
        "equivalence_margins": margins,
        "variants": rows,
        "sweep": sweep,
        "notes": notes,
    }


def summary_header(config: StudyConfig, metrics: list[str], base: str, results: list[dict]) -> dict:
    """What every ``summary.json`` starts with, a plain study's and a sweep's alike: the settings that decide how
    the tables read, and the failed runs (each with its folder, where its ``log.txt`` is)."""
    return {
        "overrides": list(config.overrides),
        "seeds": list(config.seeds),
        "baseline": base,
        "primary": metrics[0] if metrics else None,
        "metrics": metrics,
        "lower_is_better": {metric: config.is_lower_better(metric) for metric in metrics},
        "alpha": config.alpha,
        "failed": [
            {"variant": r["variant"], "group": r.get("group", ""), "seed": r["seed"], "error": r["error"],
             "dir": r.get("log_dir")}
            for r in results
            if r["status"] != "ok"
        ],
    }


# ------------------------------------------------------------------------------------------------ formatting
def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<1e-4" if value < 1e-4 else f"{value:.4f}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _marker(verdict: str) -> str:
    return {"worse": "worse *", "better": "better *", "equivalent": "equivalent *"}.get(verdict, verdict)


def _seeds(value: int | None, limit: int = 10_000) -> str:
    return "-" if value is None else (f">{limit:,}" if value > limit else f"{value:,}")


def summary_table(summary: dict, metric: str | None = None) -> str:
    """The markdown table of one metric (the primary one by default): one row per variant."""
    metric = metric or summary["primary"]
    if metric is None:
        return "(no run has finished: no metrics to summarise; see the failed runs)"
    base = summary["baseline"]
    header = (
        f"| variant | runs ok | params | params vs {base} | KV cache B/token | {metric} mean ± std | 95% CI "
        f"| diff vs {base} [95% CI] | test | p | p Holm | verdict |"
    )
    lines = [header, "|" + "---|" * 12]
    for row in summary["variants"]:
        entry = row["metrics"][metric]
        change = "-" if row["params_change"] is None else f"{100 * row['params_change']:+.1f}%"
        mean_std = f"{_num(entry['mean'])} ± {_num(entry['std'])}"
        ci = f"[{_num(entry['ci95'][0])}, {_num(entry['ci95'][1])}]"
        if row["variant"] == base:
            diff = test = p = p_holm = ""
        else:
            diff = f"{_signed(entry['diff'])} [{_signed(entry['diff_ci95'][0])}, {_signed(entry['diff_ci95'][1])}]"
            test, p, p_holm = entry["test"], _p(entry["p"]), _p(entry["p_holm"])
            test += " (no spread)" if entry.get("no_spread") else ""
        lines.append(
            f"| {row['variant']} | {row['runs_ok']}/{row['runs']} | {_count(row['params'])} | {change} "
            f"| {_count(row['kv_cache_bytes_per_token'])} | {mean_std} | {ci} | {diff} | {test} | {p} | {p_holm} "
            f"| {_marker(entry['verdict'])} |"
        )
    return "\n".join(lines)


def equivalence_table(summary: dict, metric: str | None = None) -> str:
    """The equivalence test of one metric (the primary one by default): one row per compared variant, with its
    TOST interval and p-values, what the design can detect and the seeds the margin needs; '' without a margin."""
    metric = metric or summary["primary"]
    margin = summary.get("equivalence_margins", {}).get(metric)
    if metric is None or margin is None:
        return ""
    base = summary["baseline"]
    level = effects.tost_level(summary["alpha"])
    power = f"{100 * summary['power']:g}%"
    lines = [
        f"| variant | diff vs {base} | {level} CI | margin ± | TOST p | TOST p Holm | min detectable diff ({power}) "
        f"| seeds for ±{margin['margin']:.4g} | verdict |",
        "|" + "---|" * 9,
    ]
    for row in summary["variants"]:
        entry = row["metrics"][metric]
        if row["variant"] == base:
            continue
        ci = entry.get("tost_ci", [None, None])
        lines.append(
            f"| {row['variant']} | {_signed(entry['diff'])} | [{_signed(ci[0])}, {_signed(ci[1])}] "
            f"| {margin['stated']} | {_p(entry.get('tost_p'))} | {_p(entry.get('tost_p_holm'))} "
            f"| {_num(entry.get('min_detectable'))} | {_seeds(entry.get('seeds_needed'))} "
            f"| {_marker(entry['verdict'])} |"
        )
    return "\n".join(lines)


def sweep_markdown(summary: dict) -> str:
    """The effects with the cells as blocking factor (paired over matched cells, the mixed model, interactions)."""
    sweep = summary.get("sweep")
    if not sweep:
        return ""
    base, metric = sweep["baseline"], sweep["metric"]
    mixed = sweep.get("mixed")
    header = f"| variant | matched cells | diff vs {base} [95% CI] | p Holm |"
    if mixed:
        header += " mixed model diff [95% CI] | p Holm |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for variant, paired in sweep["paired"].items():
        line = (
            f"| {variant} | {paired['cells']} | {_signed(_finite(paired['diff']))} "
            f"[{_signed(_finite(paired['ci95'][0]))}, {_signed(_finite(paired['ci95'][1]))}] "
            f"| {_p(_finite(paired['p_holm']))} |"
        )
        if mixed:
            effect = mixed["effects"].get(variant)
            if effect is None:
                line += " - | - |"
            else:
                line += (
                    f" {_signed(effect['estimate'])} [{_signed(effect['ci'][0])}, {_signed(effect['ci'][1])}] "
                    f"| {_p(effect['p_holm'])} |"
                )
        lines.append(line)
    parts = [f"Effect on {metric} with the cells as blocking factor:", "", "\n".join(lines)]
    if mixed:
        note = (
            f"Mixed model `{metric} ~ variant + (1 | cell)` (REML, Wald z): {mixed['cells']} cells, "
            f"cell sd {_num(mixed.get('cell_sd'))}, residual sd {_num(mixed.get('residual_sd'))} (one residual spread "
            "pooled over all variants: where the variants' spreads differ a lot, read the paired columns)."
        )
        if mixed["warnings"]:
            note += " statsmodels warned: " + "; ".join(mixed["warnings"])
        parts += ["", note]
    if sweep["interactions"]:
        lines = ["| variant | axis | diff per value [n] | F | p | p Holm | depends |", "|" + "---|" * 7]
        for check in sweep["interactions"]:
            levels = ", ".join(f"{level}: {_signed(v['diff'])} [{v['n']}]" for level, v in check["levels"].items())
            lines.append(
                f"| {check['variant']} | {check['axis']} | {levels} | {check['F']:.3g} | {_p(check['p'])} "
                f"| {_p(check['p_holm'])} | {'yes *' if check['depends'] else 'no'} |"
            )
        parts += ["", "Does the effect depend on an axis? (one-way ANOVA of the per-cell differences)", ""]
        parts += ["\n".join(lines)]
    return "\n".join(parts)


def other_metrics_table(summary: dict) -> str:
    """Mean ± std and difference from the baseline (with its verdict) of the other metrics."""
    others = summary["metrics"][1:]
    if not others:
        return ""
    lines = ["| variant | " + " | ".join(others) + " |", "|" + "---|" * (len(others) + 1)]
    for row in summary["variants"]:
        cells = []
        for metric in others:
            entry = row["metrics"][metric]
            text = f"{_num(entry['mean'])} ± {_num(entry['std'])}"
            if row["variant"] != summary["baseline"]:
                text += f" ({_signed(entry['diff'])}, {_marker(entry['verdict'])})"
            cells.append(text)
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_legend(summary: dict) -> str:
    """One paragraph explaining the verdict column."""
    base, alpha = summary["baseline"], summary["alpha"]
    common = (
        "`95% CI`: t interval of the mean over the seeds, clipped to the values the metric can take (accuracies in "
        "[0, 1], perplexities >= 1, losses >= 0). `test`: `paired` t-test over matching seeds, or `welch` when the "
        "seeds that finished differ. KV cache: bytes per token over all layers at 2 bytes per element."
    )
    if any(row["metrics"].get(summary["primary"], {}).get("no_spread") for row in summary["variants"]):
        common += (
            " `(no spread)`: every seed gave the same difference (both at a metric's ceiling, say, or a deterministic "
            "conversion scored on fixed batches), so its interval has zero width and p is exactly 1 (no difference) "
            "or 0: an exact statement about these runs, not an estimate of the spread that other seeds could show."
        )
    if summary.get("equivalence_margins", {}).get(summary["primary"]):
        return (
            f"`verdict`: `equivalent *` when the difference from {base} lies within the equivalence margin "
            f"(TOST p Holm < {alpha}, table below); else `worse *` / `better *` when the difference is significant "
            f"after Holm's correction over the variants (p Holm < {alpha}); `inconclusive` when neither: these seeds "
            "can tell neither. " + common
        )
    return (
        f"`verdict`: `worse *` / `better *` when the difference from {base} is significant after Holm's correction "
        f"over the variants (p Holm < {alpha}); `n.s.` otherwise, which is not evidence of no difference: set "
        "`equivalence_margin` to test for that. " + common
    )


def summary_markdown(summary: dict, title: str) -> str:
    """The whole ``summary.md``."""
    primary = summary["primary"]
    direction = "lower" if primary and summary["lower_is_better"][primary] else "higher"
    parts = [
        f"# {title}",
        "",
        f"Task config `{summary['task']}`"
        + (f" with `{' '.join(summary['overrides'])}`" if summary["overrides"] else "")
        + f"; seeds {summary['seeds']}; baseline `{summary['baseline']}`; {summary['primary']}: {direction} is "
        "better.",
        "",
        summary_table(summary),
        "",
        verdict_legend(summary),
    ]
    equivalence = equivalence_table(summary)
    if equivalence:
        level = effects.tost_level(summary["alpha"])
        parts += [
            "",
            f"Equivalence of {primary} within the margin (two one-sided tests on the same comparison, Holm-corrected "
            "over the variants):",
            "",
            equivalence,
            "",
            f"`equivalent *`: TOST p Holm < {summary['alpha']}, i.e. the difference lies within ± the margin (its "
            f"{level} CI inside it, stricter after Holm's correction), even where the difference test also detects a "
            "difference smaller than the margin. `min detectable diff`: the smallest true difference that the "
            f"comparison's t-test detects at alpha {summary['alpha']} with {100 * summary['power']:g}% power, at this "
            "spread and number of seeds; `seeds for ±margin`: seeds needed to detect a true difference of the margin "
            "with that power (Holm's correction asks for somewhat more).",
        ]
    sweep = sweep_markdown(summary)
    if sweep:
        parts += ["", sweep]
    parts += [f"\nNote: {note}." for note in summary.get("notes", [])]
    others = other_metrics_table(summary)
    if others:
        parts += ["", "Other metrics (mean ± std; difference from the baseline, verdict):", "", others]
    if summary["failed"]:
        parts += ["", "Failed runs:", ""]
        parts += [f"- {f['variant']} seed {f['seed']}: {f['error'][:300]}" for f in summary["failed"]]
    return "\n".join(parts) + "\n"


def write_summary(summary: dict, study_dir: Path, title: str) -> str:
    """Write ``summary.json`` and ``summary.md``; returns the markdown."""
    atomic_write_text(study_dir / "summary.json", json.dumps(summary, indent=1))
    markdown = summary_markdown(summary, title)
    atomic_write_text(study_dir / "summary.md", markdown)
    return markdown
