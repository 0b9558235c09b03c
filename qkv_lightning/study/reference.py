"""A study's results against a reference results file (``study.reference``), over matched cells only.

The reference is a CSV with one row per run: the paper authors' per-cell files (``variant, task, n_embd, n_layer,
n_head, seq_len, seed, accuracy``, their variant names ``Q=K!=V``, ``(Q=K!=V)+``, ``Q!=K=V``, ...; their vision
files' ``dataset, patch, lr, ..., run``) or one of our own ``results.csv``. Each of our finished runs is a cell
named by its variant, seed, task and axis values (a dotted axis key by its last part, ``d_model`` as ``n_embd``)
plus ``study.reference_cell``, the values our cells hold fixed (e.g. ``{n_layer: 2, n_head: 2}``). A run matches a
reference row when they agree on every key both have; the report then lists, per cell group (every key but the
seed), the reference mean, ours, and the paired difference (ours - reference, paired by seed) with its confidence
interval, and how many runs matched. A reference that matches no run is a :class:`ConfigError`, not an empty table;
so is a run that matches two rows (a key our cells do not say: add it to ``study.reference_cell``).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from qkv_lightning.errors import ConfigError

AUTHORS_VARIANTS = {"QKV": "QKV", "Q=K!=V": "Q=K-V", "(Q=K!=V)+": "Q=K-V+score", "Q!=K=V": "Q-K=V",
                    "Q=K=V": "Q=K=V", "(Q=K=V)+": "Q=K=V+score"}
"""The authors' variant names in our labels."""

KEY_NAMES = {"d_model": "n_embd", "patch_size": "patch", "run": "seed", "dataset": "task"}
"""Key names as compared: our settings in the authors' spelling (``d_model``: ``n_embd``, ``patch_size``: ``patch``),
and their vision files' ``run`` (their runs' torch seed) and ``dataset`` (our task config's name)."""

VALUE_NAMES = {"fmnist": "fashion-mnist"}
"""The authors' data set names that our task configs (configs/vit/paper/) call otherwise."""

NOT_KEYS = {"status", "params", "attn_params", "kv_cache_bytes_per_token", "steps", "wall_s", "cpu_s", "error",
            "log_dir", "sharing", "n_kv_heads", "accuracy"}
"""Columns of a results file that do not name a cell."""


def key_name(name: str) -> str:
    """A cell key's name: the last part of a dotted config key, in the authors' spelling."""
    last = name.rsplit(".", 1)[-1]
    return KEY_NAMES.get(last, last)


def key_value(value: Any) -> str:
    """A value as compared across files: numbers by value (``32`` equals ``32.0``), text case-insensitively."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        text = str(value).strip()
        text = AUTHORS_VARIANTS.get(text, text).lower()
        return VALUE_NAMES.get(text, text)
    return repr(int(number)) if number.is_integer() else repr(number)


def read_reference(paths: list[str], metric: str) -> tuple[list[dict[str, str]], list[float]]:
    """The cells (key -> normalised value) and values of the reference files; ``accuracy`` (the authors' column) or
    the column named ``metric`` (our ``results.csv``) is the value."""
    cells: list[dict[str, str]] = []
    values: list[float] = []
    for path in paths:
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise ConfigError(f"study.reference: cannot read {path} ({error}).") from None
        for number, row in enumerate(rows, start=2):
            if row.get("status", "ok") != "ok":
                continue
            column = "accuracy" if "accuracy" in row else metric
            try:
                value = float(row[column])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"study.reference: {path} line {number} has no number in column {column!r} (the "
                                  "authors' 'accuracy' or our study.reference_metric).") from None
            skip = NOT_KEYS | {column} | {name for name in row if "/" in name}  # metric columns (test/acc) are values
            cells.append({key_name(k): key_value(v) for k, v in row.items() if k not in skip and v not in ("", None)})
            values.append(value)
    return cells, values


def our_cell(result: dict, fixed: dict[str, Any]) -> dict[str, str]:
    """A finished run's cell: variant, seed, task and axis values, and the study's fixed reference keys."""
    cell = {key_name(k): key_value(v) for k, v in fixed.items()}
    for name, value in (result.get("axes") or result.get("sweep") or {}).items():
        cell[key_name(name)] = key_value(value)
    cell["variant"], cell["seed"] = key_value(result["variant"]), key_value(result["seed"])
    return cell


def match(results: list[dict], cells: list[dict[str, str]], values: list[float], metric: str,
          fixed: dict[str, Any], where: str) -> list[tuple[dict[str, str], float, float]]:
    """(our cell, reference value, our value) for every finished run that matches exactly one reference row."""
    built: dict[tuple[str, ...], dict[tuple, list[int]]] = {}
    pairs = []
    for result in results:
        ours = result.get("metrics", {}).get(metric)
        if result.get("status") != "ok" or ours is None or not math.isfinite(ours):
            continue
        cell = our_cell(result, fixed)
        shared = tuple(sorted(set(cell) & set().union(*cells))) if cells else ()
        if "variant" not in shared:
            continue
        if shared not in built:  # the reference rows by their values of the keys this run shares with them
            table: dict[tuple, list[int]] = defaultdict(list)
            for i, row in enumerate(cells):
                if all(k in row for k in shared):
                    table[tuple(row[k] for k in shared)].append(i)
            built[shared] = table
        found = built[shared].get(tuple(cell[k] for k in shared), [])
        if len(found) > 1:
            differ = sorted({k for i in found for k in cells[i] if cells[i][k] != cells[found[0]].get(k)})
            raise ConfigError(
                f"study.reference: the run {result['variant']} seed {result['seed']} matches {len(found)} rows of "
                f"{where}, which differ in {', '.join(differ)}; say our value of those in study.reference_cell (e.g. "
                f"{{{differ[0]}: ...}})."
            )
        if found:  # shown with our variant label (matched case-insensitively)
            shown = {**{k: cell[k] for k in shared}, "variant": result["variant"]}
            pairs.append((shown, values[found[0]], float(ours)))
    return pairs


def compare(paths: list[str], results: list[dict], metric: str, fixed: dict[str, Any],
            alpha: float = 0.05) -> dict[str, Any]:
    """The matched-cell comparison: one row per cell group (paired over seeds) and the count of matched runs.

    Raises:
        ConfigError: if no run matches a reference row.
    """
    from qkv_lightning.study.stats import mean, paired_test

    where = " + ".join(paths)
    cells, values = read_reference(paths, metric)
    pairs = match(results, cells, values, metric, fixed, where)
    if not pairs:
        ours = our_cell(results[0], fixed) if results else {}
        raise ConfigError(
            f"study.reference: no finished run of this study matches a row of {where} on {metric} (our cells look "
            f"like {ours}; its rows like {cells[0] if cells else 'nothing'}); check the variants, sizes, lengths and "
            "seeds, and study.reference_cell for the values our cells hold fixed."
        )
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for cell, theirs, ours in pairs:
        groups[tuple((k, v) for k, v in cell.items() if k != "seed")].append((theirs, ours))
    rows = []
    for key, values_ in sorted(groups.items()):
        theirs, ours = [t for t, _ in values_], [o for _, o in values_]
        test = paired_test(ours, theirs, 1 - alpha)
        rows.append({**dict(key), "n": len(values_), "reference": mean(theirs), "ours": mean(ours),
                     "difference": test.diff, "ci_low": test.ci_low, "ci_high": test.ci_high})
    return {"files": paths, "metric": metric, "matched_runs": len(pairs), "runs": sum(r.get("status") == "ok"
            for r in results), "reference_rows": len(cells), "confidence": 1 - alpha, "rows": rows}


def markdown(comparison: dict[str, Any]) -> str:
    """The comparison as a Markdown section."""
    rows = comparison["rows"]
    keys = [k for k in rows[0] if k not in ("n", "reference", "ours", "difference", "ci_low", "ci_high")]
    level = round(100 * comparison["confidence"])

    def number(value: float) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"

    lines = [
        f"## Against the reference ({comparison['metric']})", "",
        f"{comparison['matched_runs']} of {comparison['runs']} finished runs matched a row of "
        f"{', '.join(Path(p).name for p in comparison['files'])} ({comparison['reference_rows']} rows); only those "
        f"are compared. Difference = ours - reference, paired by seed, with its {level}% interval.", "",
        "| " + " | ".join([*keys, "n", "reference", "ours", "difference", f"{level}% CI"]) + " |",
        "|" + "---|" * (len(keys) + 5),
    ]
    for row in rows:
        interval = f"[{number(row['ci_low'])}, {number(row['ci_high'])}]"
        lines.append("| " + " | ".join([*(str(row[k]) for k in keys), str(row["n"]), number(row["reference"]),
                                       number(row["ours"]), number(row["difference"]), interval]) + " |")
    return "\n".join(lines) + "\n"


def add_reference(config: Any, results: list[dict], study_dir: Path, summary: dict) -> None:
    """With ``study.reference`` set: compare, put the comparison in ``summary`` (key ``reference``), write
    ``reference.md`` and ``reference.json`` and append the section to ``summary.md``."""
    if not config.reference:
        return
    from qkv_lightning.files import atomic_write_json, atomic_write_text

    comparison = compare(config.reference_files, results, config.reference_metric, config.reference_cell,
                         config.alpha)
    summary["reference"] = comparison
    text = markdown(comparison)
    atomic_write_text(study_dir / "reference.md", text)
    atomic_write_json(study_dir / "reference.json", comparison, indent=1)
    summary_md = study_dir / "summary.md"
    if summary_md.is_file():
        atomic_write_text(summary_md, summary_md.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + text)
