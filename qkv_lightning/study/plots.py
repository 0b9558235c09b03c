"""The study's plots: ``summary.png`` of a study (the primary metric versus parameters and KV-cache size, and a forest
panel of the differences from the baseline), of a sweep (the primary metric per task, and the forest panel of the
matched-cell differences), and the same per task and axis setting of a sweep (drawn for its TensorBoard run)."""

from __future__ import annotations

from pathlib import Path

from qkv_lightning.files import atomic_open
from qkv_lightning.study import effects
from qkv_lightning.study.report import _marker
from qkv_lightning.study.results import metric_range


def _clipped_error(center: float, low: float | None, high: float | None, bounds: tuple[float, float]) -> list:
    """Error-bar lengths below and above ``center`` of the interval [low, high] clipped to ``bounds``."""
    if low is None or high is None:
        return [[0.0], [0.0]]
    low, high = max(low, bounds[0]), min(high, bounds[1])
    return [[max(center - low, 0.0)], [max(high - center, 0.0)]]


def _clip_limits(axis_limits: tuple[float, float], bounds: tuple[float, float], pad: float) -> tuple[float, float]:
    """Axis limits no further than ``pad`` beyond ``bounds``."""
    return max(axis_limits[0], bounds[0] - pad), min(axis_limits[1], bounds[1] + pad)


def summary_figure(summary: dict):  # -> matplotlib.figure.Figure | None
    """The summary plot: the primary metric (mean, 95% CI) versus parameters and versus KV-cache bytes per token,
    and a forest panel of each variant's difference from the baseline (95% CI as a line, the TOST interval as a
    thicker bar, per-seed differences as dots, the equivalence margin as a band).

    Variants with the same x (e.g. the three two-projection variants) are spread slightly sideways. Every interval
    and axis is clipped to the values the metric can take (an accuracy's CI ends at 0 and 1, a difference of
    accuracies at the bounds that the baseline's mean leaves).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    metric = summary["primary"]
    if metric is None:
        return None
    bounds = metric_range(metric)
    rows = [row for row in summary["variants"] if row["metrics"][metric]["mean"] is not None]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    axes[1].sharey(axes[0])
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
            error = _clipped_error(entry["mean"], *entry["ci95"], bounds)
            marker = "s" if row["variant"] == summary["baseline"] else "o"
            axis.errorbar(
                row[key] + shift, entry["mean"], yerr=error, fmt=marker, capsize=4, color=f"C{i}", label=row["variant"]
            )
        axis.set_xlabel(label)
        axis.xaxis.set_major_locator(MaxNLocator(5, steps=[1, 2, 2.5, 5, 10]))
        axis.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        axis.grid(alpha=0.3)
    if rows:
        values = [v for row in rows for v in row["metrics"][metric]["values"].values()]
        pad = 0.03 * ((max(values) - min(values)) or 1.0)
        axes[0].set_ylim(*_clip_limits(axes[0].get_ylim(), bounds, pad))
    axes[0].set_ylabel(f"{metric} (mean, 95% CI)")
    axes[1].legend(fontsize=8, loc="best")
    _forest(axes[2], summary, metric, bounds)
    figure.suptitle(f"{summary['task']}: {metric} per variant over seeds {summary['seeds']}", fontsize=10)
    figure.tight_layout()
    return figure


def _forest(axis, summary: dict, metric: str, bounds: tuple[float, float], dots: str = "per seed") -> None:
    """Forest panel: one line per compared variant, difference from the baseline with its intervals and its
    ``diff_points`` (labelled ``dots``)."""
    base = summary["baseline"]
    base_mean = next(row for row in summary["variants"] if row["variant"] == base)["metrics"][metric]["mean"]
    if base_mean is None:
        base_mean = 0.0
    diff_bounds = (bounds[0] - base_mean, bounds[1] - base_mean)  # a variant's mean stays within the metric's range
    compared = [
        row for row in summary["variants"] if row["variant"] != base and row["metrics"][metric]["mean"] is not None
    ]
    margin = summary.get("equivalence_margins", {}).get(metric)
    if margin is not None:
        m = margin["margin"]
        axis.axvspan(-m, m, color="tab:green", alpha=0.15, lw=0, label=f"margin ±{m:.3g}")
    axis.axvline(0.0, color="black", lw=0.8)
    level = effects.tost_level(summary["alpha"])
    xs: list[float] = [0.0]
    for y, row in enumerate(compared):
        entry = row["metrics"][metric]
        color = f"C{summary['variants'].index(row)}"
        diff = entry["diff"]
        error = _clipped_error(diff, *entry["diff_ci95"], diff_bounds)
        axis.errorbar(diff, y, xerr=error, fmt="o", color=color, capsize=4, lw=1.2,
                      label="diff, 95% CI" if y == 0 else None)  # fmt: skip
        if "tost_ci" in entry and entry["tost_ci"][0] is not None:
            low, high = max(entry["tost_ci"][0], diff_bounds[0]), min(entry["tost_ci"][1], diff_bounds[1])
            axis.plot([low, high], [y, y], color=color, lw=4, alpha=0.6, solid_capstyle="butt",
                      label=f"{level} CI (TOST)" if y == 0 else None)  # fmt: skip
        points = list(entry.get("diff_points", {}).values())
        axis.scatter(points, [y + 0.2] * len(points), s=14, color=color, alpha=0.7, marker=".",
                     label=dots if y == 0 else None)  # fmt: skip
        xs += [diff, *points, *(v for v in entry["diff_ci95"] if v is not None)]
    if margin is not None:
        xs += [-margin["margin"], margin["margin"]]
    span = (max(xs) - min(xs)) or 1.0
    low, high = min(xs) - 0.05 * span, max(xs) + 0.05 * span
    axis.set_xlim(max(low, diff_bounds[0] - 0.02 * span), min(high, diff_bounds[1] + 0.02 * span))
    ticks = [f"{row['variant']}\n{_marker(row['metrics'][metric]['verdict'])}" for row in compared]
    axis.set_yticks(range(len(compared)), ticks, fontsize=8)
    axis.set_ylim(-0.6, len(compared) - 0.4)
    axis.invert_yaxis()
    axis.set_xlabel(f"{metric} minus {base}")
    axis.grid(alpha=0.3, axis="x")
    if compared:
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)


def sweep_figure(summary: dict):  # -> matplotlib.figure.Figure | None
    """The plot of a sweep's summary (:func:`qkv_lightning.study.sweep.summarize_sweep`): the primary metric of each
    variant per task and axis setting (its mean over the seeds, from ``groups``), and the forest panel of each row's
    difference from the baseline over the matched cells (95% CI, one dot per matched cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["primary"]
    if metric is None:
        return None
    base, groups = summary["baseline"], summary.get("groups") or []
    figure, axes = plt.subplots(1, 2, figsize=(14, 4.4), gridspec_kw={"width_ratios": [1, 1.1]})
    labels = list(dict.fromkeys(row["variant"] for row in summary["variants"]))
    for i, label in enumerate(labels):
        points = []
        for x, part in enumerate(groups):
            row = next((r for r in part["variants"] if r["variant"] == label), None)
            mean = row["metrics"].get(metric, {}).get("mean") if row else None
            if mean is not None:
                points.append((x, mean))
        if points:
            axes[0].plot(*zip(*points, strict=True), marker="s" if label == base else "o", color=f"C{i}", label=label)
    axes[0].set_xticks(range(len(groups)), [part["group"] for part in groups], rotation=20, ha="right", fontsize=7)
    axes[0].set_xlim(-0.5, len(groups) - 0.5)
    axes[0].set_ylabel(f"{metric} (mean over seeds)")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    rows = [row if row["variant"] == base else {**row, "variant": row["row"]} for row in summary["variants"]]
    _forest(axes[1], {**summary, "variants": rows}, metric, metric_range(metric), dots="per matched cell")
    axes[1].set_xlabel(f"{metric} minus {base} (mean over matched cells)")
    figure.suptitle(f"{', '.join(summary['tasks'])}: {metric} per variant over every task and axis setting, seeds "
                    f"{summary['seeds']}", fontsize=10)
    figure.tight_layout()
    return figure


def figure_png(figure) -> bytes:  # figure: matplotlib.figure.Figure
    """The figure as PNG bytes at 120 dpi (the resolution of ``summary.png``); the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def plot_summary(summary: dict, path: Path) -> None:
    """Draw the summary's plot (:func:`sweep_figure` for a sweep, else :func:`summary_figure`) into ``path`` (PNG,
    written atomically)."""
    figure = sweep_figure(summary) if "sweep_table" in summary else summary_figure(summary)
    if figure is not None:
        with atomic_open(path, "wb") as file:
            file.write(figure_png(figure))
