"""``python cli.py study --config configs/study/<name>.yaml``: attention variants x seeds under one budget, with
statistics.

Every cell (variant, seed) is a real Lightning fit of the same task config, with the same data, steps, optimiser and
schedule; only the attention variant and the run seed differ. The study directory gets one TensorBoard run per cell
(``runs/<variant>/seed<k>``, comparable in the HParams view), ``results.csv`` (one row per run), ``summary.md`` and
``summary.json`` (one row per variant, differences from the baseline with confidence intervals and Holm-corrected
p-values) and ``summary.png``. Re-running skips finished cells; a failed cell is recorded and the study goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import jsonargparse
import yaml

from qkv_lightning.errors import ConfigError
from qkv_lightning.study.config import Cell, StudyConfig, cells, expand_grid
from qkv_lightning.study.report import (
    equivalence_table,
    plot_summary,
    summarize,
    summary_table,
    write_results_csv,
    write_summary,
)
from qkv_lightning.study.runner import (
    cell_spec,
    check_cells,
    check_stored_results,
    is_finished,
    make_conversions,
    read_result,
    run_cells,
)
from qkv_lightning.study.safety import check_no_survivors, check_output, study_lock, write_marker
from qkv_lightning.study.sweep import summarize_sweep, sweep_markdown, sweep_table
from qkv_lightning.variants import Variant

__all__ = ["Cell", "StudyConfig", "Variant", "main", "parse_study_args", "run_study"]


def study_dir_of(config: StudyConfig, config_path: str | None) -> Path:
    """The study directory: ``output``, else ``studies/<stem of the study config>`` (or of the task config)."""
    if config.output:
        return Path(config.output)
    return Path("studies") / Path(config_path or config.task_paths[0]).stem


def run_study(
    config: StudyConfig, study_dir: Path, echo: Callable[[str], None] = print, title: str | None = None
) -> dict:
    """Run the pending cells of the study, then write results.csv, summary.{md,json} and summary.png.

    Returns:
        The summary (as written to summary.json), plus ``ran`` and ``skipped`` cell counts.
    """
    check_output(study_dir, config.task)  # a file, an unwritable or a foreign folder: before anything is written
    variants, notes = expand_grid(config)
    grid, skipped = check_cells(config, variants, cells(config))  # impossible cells are known before anything runs
    notes = notes + skipped
    for note in notes:
        echo(f"study: {note}")
    specs = [cell_spec(config, study_dir, cell) for cell in grid]
    check_stored_results(specs)
    study_dir.mkdir(parents=True, exist_ok=True)
    write_marker(study_dir, config.task)
    with study_lock(study_dir):
        attached = set()
        if config.launcher != "local" and config.run:  # a cell whose job still runs is waited on (launchers.py)
            from qkv_lightning.study.launchers import live_jobs

            attached = set(live_jobs(config, specs))
        check_no_survivors([Path(s["dir"]) for s in specs if s["dir"] not in attached])
        return _run_locked(config, study_dir, variants, grid, specs, notes, skipped, echo, title)


def _run_locked(
    config: StudyConfig,
    study_dir: Path,
    variants: list,
    grid: list,
    specs: list[dict],
    notes: list[str],
    skipped: list[str],
    echo: Callable[[str], None],
    title: str | None,
) -> dict:
    """The part of :func:`run_study` that runs under the study folder's lock."""
    (study_dir / "study.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    pending = [s for s in specs if not is_finished(read_result(Path(s["dir"])), s, config.retry_failed)]
    unfinished = len(pending)
    if not config.run:
        pending = []
    if config.max_cells is not None and len(pending) > config.max_cells:
        echo(f"study: max_cells={config.max_cells}: running the first {config.max_cells} of {len(pending)} pending "
             "cells; the others are left for a later run")
        pending = pending[: config.max_cells]
    groups = sorted({cell.group for cell in grid}, key=[cell.group for cell in grid].index)
    shape = f"{len(variants)} variants x {len(config.seeds)} seeds" + (
        f" x {len(groups)} task/axis settings" if config.is_sweep else ""
    )
    tasks = ", ".join(config.task_paths)
    echo(
        f"study: {shape} = {len(grid)} runs of {tasks}{f' ({len(skipped)} impossible skipped)' if skipped else ''} "
        f"-> {study_dir} ({len(grid) - unfinished} already finished, {len(pending)} to run)"
    )
    if not config.run:
        echo(f"study: run=false: {unfinished} cells not finished are left out of the tables")
    primary = config.metrics[0] if config.metrics else None
    done = [0]
    start = time.perf_counter()

    def on_result(result: dict) -> None:
        done[0] += 1
        elapsed = time.perf_counter() - start
        remaining = elapsed / done[0] * (len(pending) - done[0])
        where = f"{result['group']}/" if result.get("group") else ""
        head = f"[{done[0]}/{len(pending)}] {where}{result['variant']} seed {result['seed']}:"
        clock = f"elapsed {_duration(elapsed)}, ETA {_duration(remaining)}"
        if result["status"] == "ok":
            name = primary or config.resolve_metrics([result])[0]
            value = result["metrics"].get(name)
            shown = "-" if value is None else f"{value:.4f}"
            echo(f"{head} {name}={shown} ({result['wall_s']:.1f} s) | {clock}")
        else:
            failure = result["error"].splitlines()[0][:200] if result["error"] else "no message"
            echo(f"{head} FAILED: {failure} | {clock}")

    if pending:
        make_conversions(config, pending, echo)
        how = run_cells(config, pending, study_dir, on_result)
        echo(f"study: ran {len(pending)} runs ({how}) in {time.perf_counter() - start:.1f} s")

    results = [r for r in (read_result(Path(s["dir"])) for s in specs) if r is not None]
    write_results_csv(results, study_dir / "results.csv")
    name = title or f"Study {study_dir.name}"
    if config.is_sweep:
        per_group = []
        for group in groups:
            part = summarize(config, variants, [r for r in results if r.get("group") == group])
            per_group.append({**part, "group": group})
        summary = summarize_sweep(config, variants, results, per_group)
        (study_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        (study_dir / "summary.md").write_text(sweep_markdown(summary, name, notes))
        cells_md = [f"# {name}: every task and axis setting, paired over seeds", ""]
        for part in per_group:
            cells_md += [f"## {part['group']}", "", summary_table(part), ""]
        (study_dir / "cells.md").write_text("\n".join(cells_md))
    else:
        summary = summarize(config, variants, results)
        write_summary(summary, study_dir, name)
        try:
            plot_summary(summary, study_dir / "summary.png")
        except Exception as error:  # noqa: BLE001 - the tables are written; a plotting problem must not lose them
            echo(f"study: could not draw summary.png ({type(error).__name__}: {error})")
    summary["ran"], summary["skipped"] = len(pending), len(grid) - unfinished
    summary["impossible"] = skipped
    return summary


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m07s`` or ``12s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def build_parser() -> jsonargparse.ArgumentParser:
    parser = jsonargparse.ArgumentParser(
        prog="cli.py study",
        description="Train attention variants x seeds on one task config under one budget and compare them.",
        default_env=False,
        exit_on_error=False,
    )
    parser.add_argument("--config", action=jsonargparse.ActionConfigFile, help="a study config (configs/study/)")
    parser.add_class_arguments(StudyConfig, instantiate=False, sub_configs=False)
    return parser


def parse_study_args(argv: Sequence[str]) -> tuple[StudyConfig, str | None]:
    """The study config from the command line (``--config`` file plus overrides) and the config file's path."""
    from qkv_lightning.config_files import resolve_config_args

    parser = build_parser()
    try:
        namespace = parser.parse_args(resolve_config_args(argv))
    except Exception as error:  # jsonargparse reports bad keys and types as ArgumentError
        from qkv_lightning.hints import explain_config_error

        vocabulary = {f.name for f in fields(StudyConfig)} | {"config"}
        raise ConfigError(f"study settings: {explain_config_error(str(error), vocabulary)}") from None
    values = namespace.as_dict()
    config_paths = values.pop("config", None) or []
    config_path = str(config_paths[-1]) if config_paths else None
    names = {f.name for f in fields(StudyConfig)}
    return StudyConfig(**{k: v for k, v in values.items() if k in names}), config_path


def main(argv: Sequence[str]) -> int:
    """``cli.py study``: run the study and print its summary table."""
    argv = list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        build_parser().print_help()
        return 0
    config, config_path = parse_study_args(argv)
    study_dir = study_dir_of(config, config_path)
    title = f"Study {Path(config_path).stem if config_path else study_dir.name}"
    try:
        summary = run_study(config, study_dir, title=title)
    except KeyboardInterrupt:
        print(f"\nstudy interrupted: finished runs are kept in {study_dir}; run the same command to continue.")
        return 130
    print()
    print(sweep_table(summary) if "sweep_table" in summary else summary_table(summary))
    print()
    equivalence = None if "sweep_table" in summary else equivalence_table(summary)
    if equivalence:
        print(equivalence)
        print()
        print(
            f"verdict: equivalent * = within the margin (TOST, Holm, p < {config.alpha}); worse * / better * = "
            f"significant difference after Holm correction; inconclusive = neither."
        )
    else:
        print(
            f"verdict: worse * / better * = significant after Holm correction (p < {config.alpha}); n.s. = no "
            "significant difference, which is not evidence of none (set --equivalence_margin to test for that)."
        )
    print(
        f"Written: {study_dir}/summary.md, summary.json, results.csv, "
        f"{'cells.md' if 'sweep_table' in summary else 'summary.png'}; "
        f"TensorBoard: tensorboard --logdir {study_dir}"
    )
    return 0
