"""What a study writes: ``results.csv`` (one row per run), ``summary.json`` / ``summary.md`` (one row per variant,
with statistics against the baseline) and ``summary.png`` (metric versus parameters and KV-cache size)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from qkv_lightning.study import stats
from qkv_lightning.study.config import StudyConfig
from qkv_lightning.variants import Variant, row_columns

RESULT_COLUMNS = [*row_columns(), "seed", "status"]
"""The first columns of ``results.csv``; the final metrics (one column each, e.g. ``test/acc``) follow."""

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
    sweep_names = list(dict.fromkeys(name for result in results for name in result.get("sweep", {})))
    columns = RESULT_COLUMNS[:-2] + sweep_names + RESULT_COLUMNS[-2:] + metric_names + TRAILING_COLUMNS
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for result in results:
            row = {key: result.get(key) for key in RESULT_COLUMNS + TRAILING_COLUMNS}
            row["n_kv_heads"] = "" if result.get("n_kv_heads") is None else result["n_kv_heads"]
            row.update(result.get("sweep", {}))  # a sweep's task and axis values
            row.update(result.get("metrics", {}))
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return columns


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def summarize(config: StudyConfig, variants: list[Variant], results: list[dict]) -> dict:
    """Per-variant statistics of every metric, each compared with the baseline over the seeds.

    The comparison is a paired t-test when the variant and the baseline finished the same seeds (two or more),
    Welch's t-test otherwise; the p-values of all variants are then Holm-corrected per metric. ``verdict`` says
    'better' / 'worse' when the corrected p-value is below ``alpha``, else 'n.s.'.
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
    for metric in metrics:
        base_values = ok_values(base, metric)
        tests = {}
        for row in rows:
            values = ok_values(row["variant"], metric)
            series = [values[s] for s in sorted(values)]
            low, high = stats.mean_ci(series)
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
                else:
                    test = stats.welch_test(series, [base_values[s] for s in sorted(base_values)])
                tests[row["variant"]] = test
                entry.update(
                    diff=_finite(test.diff),
                    diff_ci95=[_finite(test.ci_low), _finite(test.ci_high)],
                    test=test.kind,
                    t=_finite(test.t) if not math.isinf(test.t) else test.t,
                    df=_finite(test.df),
                    p=_finite(test.p),
                )
            row["metrics"][metric] = entry
        labels = list(tests)
        adjusted = stats.holm([tests[label].p for label in labels])
        lower_better = config.is_lower_better(metric)
        for label, p_holm in zip(labels, adjusted, strict=True):
            entry = next(row for row in rows if row["variant"] == label)["metrics"][metric]
            entry["p_holm"] = _finite(p_holm)
            if math.isnan(p_holm):
                entry["verdict"] = "n/a"
            elif p_holm < config.alpha:
                worse = (entry["diff"] > 0) == lower_better
                entry["verdict"] = "worse" if worse else "better"
            else:
                entry["verdict"] = "n.s."
        next(row for row in rows if row["variant"] == base)["metrics"][metric]["verdict"] = "baseline"

    return {
        "task": config.task if isinstance(config.task, str) else list(config.task),
        "overrides": list(config.overrides),
        "seeds": list(config.seeds),
        "baseline": base,
        "primary": metrics[0] if metrics else None,
        "metrics": metrics,
        "lower_is_better": {metric: config.is_lower_better(metric) for metric in metrics},
        "alpha": config.alpha,
        "variants": rows,
        "failed": [
            {"variant": r["variant"], "seed": r["seed"], "error": r["error"]} for r in results if r["status"] != "ok"
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
    return {"worse": "worse *", "better": "better *"}.get(verdict, verdict)


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
        lines.append(
            f"| {row['variant']} | {row['runs_ok']}/{row['runs']} | {_count(row['params'])} | {change} "
            f"| {_count(row['kv_cache_bytes_per_token'])} | {mean_std} | {ci} | {diff} | {test} | {p} | {p_holm} "
            f"| {_marker(entry['verdict'])} |"
        )
    return "\n".join(lines)


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
        f"`verdict`: `worse *` / `better *` when the difference from {summary['baseline']} is significant after Holm's "
        f"correction over the variants (p Holm < {summary['alpha']}); `n.s.` otherwise. `test`: `paired` t-test over "
        "matching seeds, or `welch` when the seeds that finished differ. KV cache: bytes per token over all layers "
        "at 2 bytes per element.",
    ]
    others = other_metrics_table(summary)
    if others:
        parts += ["", "Other metrics (mean ± std; difference from the baseline, verdict):", "", others]
    if summary["failed"]:
        parts += ["", "Failed runs:", ""]
        parts += [f"- {f['variant']} seed {f['seed']}: {f['error'][:300]}" for f in summary["failed"]]
    return "\n".join(parts) + "\n"


def write_summary(summary: dict, study_dir: Path, title: str) -> str:
    """Write ``summary.json`` and ``summary.md``; returns the markdown."""
    (study_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    markdown = summary_markdown(summary, title)
    (study_dir / "summary.md").write_text(markdown)
    return markdown


def plot_summary(summary: dict, path: Path) -> None:
    """Primary metric (mean with 95% CI error bars) versus parameters and versus KV-cache bytes per token.

    Variants with the same x (e.g. the three two-projection variants) are spread slightly sideways.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import StrMethodFormatter

    metric = summary["primary"]
    if metric is None:
        return
    rows = [row for row in summary["variants"] if row["metrics"][metric]["mean"] is not None]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, key, label in (
        (axes[0], "params", "parameters"),
        (axes[1], "kv_cache_bytes_per_token", "KV-cache bytes per token (all layers, 2 B/element)"),
    ):
        placed = [row for row in rows if row[key] is not None]
        xs = [row[key] for row in placed]
        span = (max(xs) - min(xs)) if xs and max(xs) > min(xs) else max(1.0, abs(xs[0]) if xs else 1.0)
        for i, row in enumerate(placed):
            entry = row["metrics"][metric]
            same = [r for r in placed if r[key] == row[key]]
            shift = (same.index(row) - (len(same) - 1) / 2) * 0.015 * span
            low, high = entry["ci95"]
            error = [[0.0], [0.0]] if low is None else [[entry["mean"] - low], [high - entry["mean"]]]
            marker = "s" if row["variant"] == summary["baseline"] else "o"
            axis.errorbar(
                row[key] + shift, entry["mean"], yerr=error, fmt=marker, capsize=4, color=f"C{i}", label=row["variant"]
            )
        axis.set_xlabel(label)
        axis.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} (mean, 95% CI)")
    axes[1].legend(fontsize=8, loc="best")
    figure.suptitle(f"{summary['task']}: {metric} per variant over seeds {summary['seeds']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
