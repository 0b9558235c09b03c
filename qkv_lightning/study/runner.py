"""Running a study: the grid checked, conversions made, the pending cells handed to a launcher (the local worker
pool or submitit), every result collected into ``results.csv`` and the summary, under the study's lock."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import yaml

from qkv_lightning.files import atomic_write_text
from qkv_lightning.study.cell import cell_spec, check_cells, make_conversions
from qkv_lightning.study.config import StudyConfig, cells, expand_grid
from qkv_lightning.study.dashboard import StudyBoard
from qkv_lightning.study.launchers import plan_workers, run_cells
from qkv_lightning.study.plots import plot_summary
from qkv_lightning.study.progress import HEARTBEAT_S, StudyProgress
from qkv_lightning.study.reference import add_reference
from qkv_lightning.study.report import (
    summarize,
    summary_table,
    write_results_csv,
    write_summary,
)
from qkv_lightning.study.results import check_stored_results, is_finished, read_result
from qkv_lightning.study.safety import check_no_survivors, check_output, study_lock, write_marker
from qkv_lightning.study.sweep import summarize_sweep, sweep_markdown


def study_dir_of(config: StudyConfig, config_path: str | None) -> Path:
    """The study directory: ``output``, else ``studies/<stem of the study config>`` (or of the task config)."""
    if config.output:
        return Path(config.output)
    return Path("studies") / Path(config_path or config.task_paths[0]).stem


def run_study(
    config: StudyConfig, study_dir: Path, echo: Callable[[str], None] = print, title: str | None = None
) -> dict:
    """Run the pending cells of the study, then write results.csv, summary.{md,json}, summary.png and the study's
    TensorBoard run ``summary/`` (:mod:`qkv_lightning.study.dashboard`).

    Returns:
        The summary (as written to summary.json), plus ``ran`` and ``skipped`` cell counts.
    """
    check_output(study_dir, config.task)  # a file, an unwritable or a foreign folder: before anything is written
    variants, notes = expand_grid(config)
    grid = cells(config)
    echo(f"study: checking the {len(grid)} runs of {', '.join(config.task_paths)} (each variant's task built as fit "
         "would, nothing trained) ...")
    grid, skipped = check_cells(config, variants, grid)  # impossible cells are known before anything runs
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
    atomic_write_text(study_dir / "study.yaml", yaml.safe_dump(asdict(config), sort_keys=False))
    pending = [s for s in specs if not is_finished(read_result(Path(s["dir"])), s, config.retry_failed)]
    unfinished = len(pending)
    if not config.run:
        pending = []
    if config.max_cells is not None and len(pending) > config.max_cells:
        echo(f"study: max_cells={config.max_cells}: running the first {config.max_cells} of {len(pending)} pending "
             "cells; the others are left for a later run")
        pending = pending[: config.max_cells]
    board = StudyBoard(config, study_dir, specs, echo)  # <study>/summary/: the study's TensorBoard run
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
    start = time.perf_counter()
    slots = plan_workers(config, len(pending))[0] if config.launcher == "local" else None
    progress = StudyProgress(len(pending), max(1, slots) if slots is not None else None, echo)

    def on_result(result: dict) -> None:
        board.progress()
        progress.finished(result.get("wall_s"))
        where = f"{result['group']}/" if result.get("group") else ""
        head = f"[{progress.done}/{len(pending)}] {where}{result['variant']} seed {result['seed']}:"
        if result["status"] == "ok":
            name = primary or config.resolve_metrics([result])[0]
            value = result["metrics"].get(name)
            shown = "-" if value is None else f"{value:.4f}"
            progress.line(f"{head} {name}={shown} ({result['wall_s']:.1f} s) | {progress.clock()}")
        else:
            failure = result["error"].splitlines()[0][:200] if result["error"] else "no message"
            progress.line(f"{head} FAILED: {failure} | {progress.clock()}")

    if pending:
        make_conversions(config, pending, echo)
        if slots:
            progress.line(f"study: starting {slots} worker process(es) for {len(pending)} runs (each run's output: "
                          f"{study_dir}/runs/<variant>/seed<k>/log.txt); a status line every {HEARTBEAT_S:.0f} s")
        with progress.ticking():
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
        atomic_write_text(study_dir / "summary.json", json.dumps(summary, indent=1))
        atomic_write_text(study_dir / "summary.md", sweep_markdown(summary, name, notes))
        cells_md = [f"# {name}: every task and axis setting, paired over seeds", ""]
        for part in per_group:
            cells_md += [f"## {part['group']}", "", summary_table(part), ""]
        atomic_write_text(study_dir / "cells.md", "\n".join(cells_md))
    else:
        summary = summarize(config, variants, results)
        write_summary(summary, study_dir, name)
    try:
        plot_summary(summary, study_dir / "summary.png")
    except Exception as error:  # noqa: BLE001 - the tables are written; a plotting problem must not lose them
        echo(f"study: could not draw summary.png ({type(error).__name__}: {error})")
    add_reference(config, results, study_dir, summary)  # study.reference: matched cells against a results file
    board.finish(summary)
    summary["ran"], summary["skipped"] = len(pending), len(grid) - unfinished
    summary["impossible"] = skipped
    return summary

