"""``python cli.py study --config configs/study/<name>.yaml``: attention variants x seeds under one budget, with
statistics.

Every cell (variant, seed) is a real Lightning fit of the same task config, with the same data, steps, optimiser and
schedule; only the attention variant and the run seed differ. The study directory gets one TensorBoard run per cell
(``runs/<variant>/seed<k>``, comparable in the HParams view), ``results.csv`` (one row per run), ``summary.md`` and
``summary.json`` (one row per variant, differences from the baseline with confidence intervals and Holm-corrected
p-values), ``summary.png`` and the study's own TensorBoard run ``summary/`` (tables, plots, progress: see
``dashboard.py``). Re-running skips finished cells; a failed cell is recorded and the study goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import jsonargparse

from qkv_lightning.command_line import command_parser, parse
from qkv_lightning.study.config import Cell, StudyConfig
from qkv_lightning.study.reference import markdown as reference_markdown
from qkv_lightning.study.report import equivalence_table, summary_table
from qkv_lightning.study.runner import run_study, study_dir_of
from qkv_lightning.study.sweep import sweep_has_margin, sweep_table
from qkv_lightning.variants import Variant

__all__ = ["Cell", "StudyConfig", "Variant", "main", "parse_study_args", "run_study"]


def build_parser() -> jsonargparse.ArgumentParser:
    """The parser of ``study`` (:mod:`qkv_lightning.command_line`): a study config file and its settings."""
    return command_parser(
        "study",
        StudyConfig,
        description="Train attention variants x seeds on one task config under one budget and compare them.",
        config_file=True,
    )


def parse_study_args(argv: Sequence[str]) -> tuple[StudyConfig, str | None]:
    """The study config from the command line (``--config`` file plus overrides) and the config file's path.

    Raises:
        ConfigError: for a setting the study does not have (with "did you mean") or a value of the wrong type.
    """
    from qkv_lightning.config_files import resolve_config_args

    values = parse(build_parser(), resolve_config_args(argv)).as_dict()
    config_paths = values.pop("config", None) or []
    config_path = str(config_paths[-1]) if config_paths else None
    names = {f.name for f in fields(StudyConfig)}
    return StudyConfig(**{k: v for k, v in values.items() if k in names}), config_path


def main(argv: Sequence[str]) -> int:
    """``cli.py study``: run the study and print its summary table."""
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
    sweep = "sweep_table" in summary
    equivalence = sweep_has_margin(summary) if sweep else equivalence_table(summary)
    if equivalence:
        if not sweep:
            print(equivalence)
            print()
        print(
            f"verdict: equivalent * = within the margin (TOST, Holm, p < {config.alpha}); worse * / better * = "
            f"significant difference after Holm correction; inconclusive = neither."
            + (" Every task and axis setting's verdict at its margin: summary.md." if sweep else "")
        )
    else:
        print(
            f"verdict: worse * / better * = significant after Holm correction (p < {config.alpha}); n.s. = no "
            "significant difference, which is not evidence of none (set --equivalence_margin to test for that)."
        )
    if summary.get("reference"):  # study.reference: the matched cells against the reference file
        print(reference_markdown(summary["reference"]))
    print(
        f"Written: {study_dir}/summary.md, summary.json, results.csv, summary.png"
        f"{', cells.md' if 'sweep_table' in summary else ''}; TensorBoard (every cell, and the study's own run "
        f"summary/ with these tables, plots and progress): tensorboard --logdir {study_dir}"
    )
    return failed_runs(summary, study_dir)


def failed_runs(summary: dict, study_dir: Path) -> int:
    """Exit code of a finished study: 0 when every run is ok; else 1, after saying on stderr how many runs failed
    and where their logs are (the tables are written all the same, and list the failed runs too)."""
    failed = summary.get("failed") or []
    if not failed:
        return 0
    total = summary.get("ran", 0) + summary.get("skipped", 0)
    print(f"error: {len(failed)} of {total} runs of the study failed; the tables hold only the runs that finished.",
          file=sys.stderr)
    for run in failed[:10]:
        where = Path(run["dir"]) if run.get("dir") else study_dir
        lines = [line.strip() for line in (run.get("error") or "").splitlines() if line.strip()]
        print(f"  {where}/log.txt: {(lines[-1] if lines else 'no message')[:200]}", file=sys.stderr)
    if len(failed) > 10:
        print(f"  ... and {len(failed) - 10} more (summary.md lists them all)", file=sys.stderr)
    print(
        "Fix the cause and run the same command: finished runs are kept (failed ones run again unless "
        "study.retry_failed is false).",
        file=sys.stderr,
    )
    return 1
