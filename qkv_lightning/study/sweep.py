"""The report of a sweep: a study over several task configs and/or axes (any config key), in the paper's layout.

A cell of a sweep is (task, axis values, variant, seed). The **sweep table** has one row per variant and one column
per task: the mean of the primary metric over that task's cells (every axis value and seed), and their average over
the tasks, as the paper's Table 1 reports. Its statistics stay paired:

* the **difference from the baseline** is the mean over *matched cells*, the cells of the variant and of the baseline
  with the same task, axis values and seed that both finished, with a paired t confidence interval over those
  pairs and a Holm-corrected p-value over the variants compared with the baseline;
* the **95% CI** of a variant's average is a t interval over seeds: for each seed, the average over tasks of the
  mean over that task's cells with that seed, clipped to the values the metric can take;
* with ``study.equivalence_margin`` (:func:`~qkv_lightning.study.effects.margin_for`: a relative margin is that
  share of the baseline row's average), the matched-cell difference is also read as two one-sided tests
  (:func:`~qkv_lightning.study.stats.tost`, Holm-corrected over the variants) and the verdict is
  :func:`~qkv_lightning.study.effects.verdict`'s, as a plain study's: ``equivalent``, ``worse`` / ``better`` or
  ``inconclusive``. ``summary.md`` then also lists the verdict of every task and axis setting at its margin, the
  per-cell summaries' (``cells.md``).

An axis that says where a cell *starts* (``model.init_args.init_from``: from scratch or from a converted checkpoint;
``model.init_args.distill.teacher``: trained alone or distilled) is a treatment, not a nuisance to average over: a
mean over from-scratch and uptrained cells means nothing. Such axes (:data:`KEPT_APART`) are never averaged: the table
gets one row per variant and value of those axes (``Q-K=V (init_from=convert:mean)``), each compared with the
baseline variant at the same values; its columns and average run over the tasks and the other axes only.

The per-cell table (one :func:`~qkv_lightning.study.report.summarize` per task and axis values, paired over seeds)
stays available in ``summary.json`` (``groups``) and ``cells.md``.
"""

from __future__ import annotations

import itertools
import math

from qkv_lightning.study import effects, stats
from qkv_lightning.study.config import INIT_FROM_KEY, TEACHER_KEY, StudyConfig
from qkv_lightning.study.report import _marker, _num, _p, _signed, summary_header
from qkv_lightning.study.results import clip_interval
from qkv_lightning.variants import Variant

KEPT_APART = (INIT_FROM_KEY, TEACHER_KEY)
"""Axes whose values the sweep table keeps in separate rows instead of averaging over them (where a cell starts)."""


TESTED = ("diff", "diff_ci95", "diff_points", "test", "t", "df", "p", "p_holm", "diff_verdict",
          "margin", "margin_stated", "tost_ci", "tost_p", "tost_p_holm")
"""The fields of a sweep-table entry that its row's metric entry repeats (the matched-cell comparison, and with an
equivalence margin its two one-sided tests)."""


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def kept_apart(config: StudyConfig) -> dict[str, list]:
    """The study's axes of :data:`KEPT_APART`, by short name (as in a result's ``sweep``), with their values."""
    names = config.axis_names()
    return {names[key]: list(values) for key, values in config.axes.items() if key in KEPT_APART}


def split_of(result: dict, names: list[str]) -> tuple:
    """The values of the kept-apart axes ``names`` of a cell's result."""
    sweep = result.get("sweep", {})
    return tuple(sweep.get(name) for name in names)


def row_label(label: str, names: list[str], values: tuple) -> str:
    """A sweep-table row: the variant, with the kept-apart axis values if there are any (``Q-K=V
    (init_from=convert:mean)``; null for None)."""
    if not names:
        return label
    shown = ", ".join(f"{name}={'null' if value is None else value}" for name, value in zip(names, values, strict=True))
    return f"{label} ({shown})"


def ok_value(result: dict, metric: str) -> float | None:
    """The cell's final ``metric`` if the cell finished and logged a number, else None."""
    if result.get("status") != "ok":
        return None
    value = result.get("metrics", {}).get(metric)
    return None if value is None or math.isnan(value) else float(value)


def cell_values(results: list[dict], label: str, metric: str) -> dict[tuple[str, int], float]:
    """``{(group, seed): value}`` of the finished cells of variant ``label``."""
    return {
        (r.get("group", ""), r["seed"]): value
        for r in results
        if r["variant"] == label and (value := ok_value(r, metric)) is not None
    }


def matched_pairs(
    results: list[dict], label: str, baseline: str, metric: str
) -> tuple[list[tuple[str, int]], list[float], list[float]]:
    """The matched cells of ``label`` and ``baseline``: those with the same group (task and axis values) and seed
    that both finished with a value of ``metric``. Returns their (group, seed) keys, sorted, and the two series."""
    mine, base = cell_values(results, label, metric), cell_values(results, baseline, metric)
    keys = sorted(set(mine) & set(base))
    return keys, [mine[k] for k in keys], [base[k] for k in keys]


def task_of(result: dict) -> str:
    """The task label of a sweep cell's result."""
    return str(result.get("sweep", {}).get("task", ""))


def variant_sweep(results: list[dict], label: str, tasks: list[str], metric: str) -> dict:
    """Per-task means, their average over the tasks, and the seed-level 95% CI of that average, for one variant."""
    mine = [r for r in results if r["variant"] == label and ok_value(r, metric) is not None]
    per_task = {}
    for task in tasks:
        values = [ok_value(r, metric) for r in mine if task_of(r) == task]
        per_task[task] = _finite(stats.mean(values)) if values else None
    present = [v for v in per_task.values() if v is not None]
    average = _finite(stats.mean(present)) if len(present) == len(tasks) else None  # only over every task
    by_seed = []
    for seed in sorted({r["seed"] for r in mine}):
        means = [
            stats.mean(values)
            for task in tasks
            if (values := [ok_value(r, metric) for r in mine if task_of(r) == task and r["seed"] == seed])
        ]
        if len(means) == len(tasks):
            by_seed.append(stats.mean(means))
    low, high = clip_interval(stats.mean_ci(by_seed), metric)
    return {
        "per_task": per_task,
        "average": average,
        "seed_averages": by_seed,
        "ci95": [_finite(low), _finite(high)],
        "cells_ok": len(mine),
    }


def summarize_sweep(config: StudyConfig, variants: list[Variant], results: list[dict], groups: list[dict]) -> dict:
    """The summary of a sweep, in the shape of :func:`~qkv_lightning.study.report.summarize` (one row per variant,
    and per value of the kept-apart axes, so that its table and the CLI read it alike) plus ``tasks``,
    ``kept_apart`` (the short names of the axes kept in separate rows), ``sweep_table`` (the paper-layout table of
    every metric, keyed by row label) and ``groups`` (the per-cell summaries, given)."""
    base = config.baseline
    tasks = []
    for result in results:
        if task_of(result) not in tasks:
            tasks.append(task_of(result))
    metrics = config.resolve_metrics(results)
    apart = kept_apart(config)
    names = list(apart)
    splits = list(itertools.product(*apart.values()))  # [()] without kept-apart axes
    rows = []
    for split in splits:
        for variant in variants:
            runs = [r for r in results if r["variant"] == variant.label and split_of(r, names) == split]
            rows.append(
                {
                    **variant.as_row(),
                    "row": row_label(variant.label, names, split),
                    "kept_apart": dict(zip(names, split, strict=True)),
                    "runs": len(runs),
                    "runs_ok": sum(r["status"] == "ok" for r in runs),
                    "params": None,  # differs between the cells of a sweep: see results.csv
                    "attn_params": None,
                    "kv_cache_bytes_per_token": None,
                    "params_change": None,
                    "wall_s_mean": _finite(stats.mean([r["wall_s"] for r in runs if r["status"] == "ok"])),
                    "metrics": {},
                }
            )
    sweep: dict[str, dict] = {}
    margins: dict[str, dict] = {}
    for metric in metrics:
        table, tests = {}, {}
        for row in rows:
            label = row["variant"]
            part = [r for r in results if split_of(r, names) == tuple(row["kept_apart"].values())]
            entry = variant_sweep(part, label, tasks, metric)
            entry["variant"], entry["kept_apart"] = label, row["kept_apart"]
            if label != base:
                keys, mine, theirs = matched_pairs(part, label, base, metric)
                test = stats.paired_test(mine, theirs)
                entry.update(
                    pairs=len(keys),
                    diff_points={f"{group}/seed{seed}": a - b for (group, seed), a, b in zip(keys, mine, theirs,
                                                                                              strict=True)},
                    diff=_finite(test.diff),
                    diff_ci95=[_finite(test.ci_low), _finite(test.ci_high)],
                    test="paired (matched cells)",
                    t=_finite(test.t) if not math.isinf(test.t) else test.t,
                    df=_finite(test.df),
                    p=_finite(test.p),
                )
                tests[row["row"]] = test
            table[row["row"]] = entry
        equivalences = {}
        for row in rows:  # with a margin, the same matched-cell comparison read as two one-sided tests
            label = row["row"]
            if label not in tests:
                continue
            base_average = table[row_label(base, names, tuple(row["kept_apart"].values()))]["average"]
            margin, stated = effects.margin_for(config.equivalence_margin, metric, metrics[0], base_average)
            if margin is not None:
                equivalences[label] = equivalence = stats.tost(tests[label], margin, config.alpha)
                table[label].update(margin=margin, margin_stated=stated,
                                    tost_ci=[_finite(equivalence.ci_low), _finite(equivalence.ci_high)],
                                    tost_p=_finite(equivalence.p))
        stated_margins = {(table[label]["margin"], table[label]["margin_stated"]) for label in equivalences}
        if len(stated_margins) == 1:  # one margin for the whole table (a relative one differs between kept-apart rows)
            (amount, stated), = stated_margins
            margins[metric] = {"margin": amount, "stated": stated}
        effects.holm_verdicts(table, {label: test.p for label, test in tests.items()},
                              {label: e.p for label, e in equivalences.items()}, config.is_lower_better(metric),
                              config.alpha)
        for row in rows:
            if row["variant"] == base:
                table[row["row"]]["verdict"] = "baseline"
        sweep[metric] = table
        for row in rows:  # the standard row view: the average, its seed CI and the matched-cell test
            entry = table[row["row"]]
            seeds = entry["seed_averages"]
            row["metrics"][metric] = {
                "n": entry["cells_ok"],
                "mean": entry["average"],
                "std": _finite(stats.std(seeds)),
                "ci95": entry["ci95"],
                **{k: entry[k] for k in TESTED if k in entry},
                "verdict": entry["verdict"],
            }
    return {
        **summary_header(config, metrics, base, results),
        "task": config.task_paths,
        "tasks": tasks,
        "axes": dict(config.axes),
        "kept_apart": names,
        "equivalence_margins": margins,
        "variants": rows,
        "sweep_table": sweep,
        "groups": groups,
    }


def sweep_has_margin(summary: dict, metric: str | None = None) -> bool:
    """Whether the sweep table of ``metric`` (the primary one by default) reads its verdicts at an equivalence
    margin."""
    metric = metric or summary["primary"]
    entries = summary["sweep_table"][metric].values() if metric is not None else ()
    return any(entry.get("margin") is not None for entry in entries)


def sweep_table(summary: dict, metric: str | None = None) -> str:
    """The paper-layout markdown table of one metric: a row per variant (and value of the kept-apart axes), a column
    per task, the average over the tasks with its seed-level 95% CI, and the matched-cell difference from the baseline
    with its CI and Holm p; where ``study.equivalence_margin`` gives the metric a margin, also the TOST interval, the
    margin and the TOST p Holm of the same comparison, and the verdict at the margin."""
    metric = metric or summary["primary"]
    if metric is None:
        return "(no run has finished: no metrics to summarise; see the failed runs)"
    base, tasks = summary["baseline"], summary["tasks"]
    entries = summary["sweep_table"][metric]
    margin = sweep_has_margin(summary, metric)
    level = effects.tost_level(summary["alpha"])
    extra = f" {level} CI (TOST) | margin ± | TOST p Holm |" if margin else ""
    header = (
        f"| variant | {' | '.join(tasks)} | average | 95% CI (seeds) | diff vs {base} [95% CI] (matched cells) "
        f"| pairs | p Holm |{extra} verdict |"
    )
    lines = [header, "|" + "---|" * (len(tasks) + 7 + 3 * margin)]
    for label, entry in entries.items():
        cells = " | ".join(_num(entry["per_task"].get(task)) for task in tasks)
        ci = f"[{_num(entry['ci95'][0])}, {_num(entry['ci95'][1])}]"
        if entry.get("variant", label) == base:
            diff = pairs = p_holm = ""
            tost = "  |  |  |" if margin else ""
        else:
            diff = f"{_signed(entry['diff'])} [{_signed(entry['diff_ci95'][0])}, {_signed(entry['diff_ci95'][1])}]"
            pairs, p_holm = str(entry["pairs"]), _p(entry["p_holm"])
            tost_ci = entry.get("tost_ci") or [None, None]
            tost = (
                f" [{_signed(tost_ci[0])}, {_signed(tost_ci[1])}] | {entry.get('margin_stated') or '-'} "
                f"| {_p(entry.get('tost_p_holm'))} |"
            ) if margin else ""
        lines.append(
            f"| {label} | {cells} | {_num(entry['average'])} | {ci} | {diff} | {pairs} | {p_holm} |{tost} "
            f"{_marker(entry['verdict'])} |"
        )
    return "\n".join(lines)


def cell_equivalence_table(summary: dict, metric: str | None = None) -> str:
    """Every task and axis setting's comparison with the baseline at its equivalence margin, read from the per-cell
    summaries (``groups``, the tables of ``cells.md``): the difference over seeds, its TOST interval, the margin (a
    relative one of that cell's baseline mean), the TOST p Holm and the verdict. '' where no cell has a margin."""
    metric = metric or summary["primary"]
    groups = [part for part in summary.get("groups") or [] if metric in part.get("equivalence_margins", {})]
    if metric is None or not groups:
        return ""
    base = summary["baseline"]
    level = effects.tost_level(summary["alpha"])
    lines = [
        f"| task and axes | variant | diff vs {base} [95% CI] | {level} CI (TOST) | margin ± | TOST p Holm | verdict |",
        "|" + "---|" * 7,
    ]
    for part in groups:
        stated = part["equivalence_margins"][metric]["stated"]
        for row in part["variants"]:
            if row["variant"] == base:
                continue
            entry = row["metrics"][metric]
            ci, tost_ci = entry["diff_ci95"], entry.get("tost_ci") or [None, None]
            lines.append(
                f"| {part['group']} | {row['variant']} | {_signed(entry['diff'])} [{_signed(ci[0])}, {_signed(ci[1])}] "
                f"| [{_signed(tost_ci[0])}, {_signed(tost_ci[1])}] | {stated} | {_p(entry.get('tost_p_holm'))} "
                f"| {_marker(entry['verdict'])} |"
            )
    return "\n".join(lines)


def _verdicts(summary: dict) -> str:
    """How the sweep table's verdict column reads, with or without an equivalence margin for the primary metric."""
    alpha = summary["alpha"]
    if not sweep_has_margin(summary):
        return (
            f"`verdict`: `worse *` / `better *` when p Holm < {alpha}; `n.s.` otherwise, which is not evidence of no "
            "difference: set `equivalence_margin` to test for that."
        )
    level = effects.tost_level(alpha)
    return (
        "With the equivalence margin (`margin ±`; a relative one is that share of the baseline row's `average`) the "
        f"same matched-cell difference is also read as two one-sided tests (its {level} interval, `TOST p Holm` "
        f"Holm-corrected over the variants): `verdict` is `equivalent *` when TOST p Holm < {alpha} (the difference "
        f"is shown within ± the margin), else `worse *` / `better *` when p Holm < {alpha}, else `inconclusive` "
        "(neither is shown)."
    )


def sweep_markdown(summary: dict, title: str, notes: list[str]) -> str:
    """The ``summary.md`` of a sweep: the paper-layout table, how to read it, with an equivalence margin the
    verdicts of every task and axis setting at it (:func:`cell_equivalence_table`), skipped and failed cells."""
    primary = summary["primary"]
    direction = "lower" if primary and summary["lower_is_better"][primary] else "higher"
    axes = ", ".join(f"`{key}` {values}" for key, values in summary["axes"].items()) or "none"
    parts = [
        f"# {title}",
        "",
        f"Tasks {', '.join(f'`{t}`' for t in summary['task'])}; axes {axes}; seeds {summary['seeds']}; baseline "
        f"`{summary['baseline']}`; {primary}: {direction} is better.",
        "",
        sweep_table(summary),
        "",
        f"Each task column is the mean of {primary} over that task's cells (every axis value and seed); `average` is "
        "their mean over the tasks; `95% CI (seeds)` is a t interval over the seeds of that average (clipped to the "
        "values the metric can take). The difference "
        f"from {summary['baseline']} is the mean over matched cells (same task, axis values and seed, both "
        f"finished), with a paired t interval; `p Holm`: Holm-corrected over the variants. {_verdicts(summary)} "
        "Per-cell tables: `cells.md`; every run: `results.csv`.",
    ]
    if summary.get("kept_apart"):
        kept = ", ".join(f"`{name}`" for name in summary["kept_apart"])
        parts[-1] += (
            f" Rows are kept apart by {kept} (where a cell starts: averaging from-scratch and uptrained or distilled "
            f"cells would mean nothing): each row's columns and average run over that row's cells only, and its "
            f"difference is from {summary['baseline']} with the same {kept}."
        )
    for metric in summary["metrics"][1:]:
        parts += ["", f"{metric}:", "", sweep_table(summary, metric)]
    for metric in summary["metrics"]:
        cells = cell_equivalence_table(summary, metric)
        if cells:
            parts += [
                "",
                f"Equivalence of {metric} per task and axis setting (the verdicts of `cells.md`: each setting's seeds "
                "paired, Holm-corrected over the variants within the setting; a relative margin is that share of the "
                "setting's baseline mean):",
                "",
                cells,
            ]
    if notes:
        parts += ["", "Skipped or left out:", ""] + [f"- {note}" for note in notes]
    if summary["failed"]:
        parts += ["", "Failed runs:", ""]
        parts += [f"- {f['group']}/{f['variant']} seed {f['seed']}: {f['error'][:300]}" for f in summary["failed"]]
    return "\n".join(parts) + "\n"
