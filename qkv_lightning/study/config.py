"""What a study runs: the settings (:class:`StudyConfig`) and the grid of cells (variant x seed) they expand to."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkv_lightning.config_files import resolve_config, resolve_config_args
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.sharing import CANONICAL_VARIANTS
from qkv_lightning.study.effects import check_margins, statsmodels_available
from qkv_lightning.variants import NO_BREAKER, Variant, expand, parse_breakers, parse_label

LAUNCHERS = ("local", "slurm", "submitit_local")
"""``study.launcher`` values: the local worker pool, SLURM through submitit, submitit's local executor."""
INIT_FROM_KEY = "model.init_args.init_from"
"""The config key of the checkpoint a cell starts from (``TaskModule.init_from``)."""

TEACHER_KEY = "model.init_args.distill.teacher"
"""The config key of a cell's distillation teacher."""

CONVERT_PREFIX = "convert:"
"""An ``init_from`` axis value ``convert:METHOD[:ROLE]``: the study's ``convert_from`` made into the cell's variant."""

PREFERRED_METRICS = (
    "test/acc",
    "test/seq_acc",
    "test/ppl",
    "test/loss",
    "val/acc",
    "val/seq_acc",
    "val/ppl",
    "val/loss",
)
"""Metrics summarised when ``study.metrics`` is null, in this order, as far as the task logs them."""

@dataclass
class StudyConfig:
    """A grid of attention variants x seeds, each trained by the same fit config under the same budget."""

    task: str | list[str] = ""
    """Path of a normal fit config (e.g. configs/synthetic/sort.yaml) that every cell trains, or a list of them (one
    column per task in the sweep table); relative to the working directory."""

    axes: dict[str, list[Any]] = field(default_factory=dict)
    """Extra grid axes over any config key, crossed with the variants and seeds, e.g.
    {model.init_args.network.d_model: [32, 64], data.init_args.seq_len: [16, 64]}. Cells that are impossible (heads
    that do not divide the width) are skipped with a note."""

    variants: list[str] | None = None
    """Explicit variant labels (QKV, Q=K-V+score, Q-K=V_kv2, or the paper's (Q=K=V)+) instead of the grid
    sharing x n_kv_heads x breakers; None: that grid."""

    overrides: list[str] = field(default_factory=list)
    """Extra command-line arguments applied to every cell after the task config, e.g. '--trainer.max_steps=300'
    or '--config=configs/other.yaml'."""

    sharing: list[str] = field(default_factory=lambda: list(CANONICAL_VARIANTS))
    """Projection-sharing variants to compare (QKV, Q=K-V, Q-K=V, Q=V-K, Q=K=V or aliases)."""

    n_kv_heads: list[int | None] = field(default_factory=lambda: [None])
    """K/V head counts to cross with the sharing variants (null: as many as query heads; 1: MQA). Variants that
    share Q with K or V are run with null only."""

    breakers: list[str] = field(default_factory=lambda: [NO_BREAKER])
    """Symmetry breakers to cross with the variants: none, or any of qkv_lightning.variants.BREAKERS joined by '+':
    score (the paper's '+' score encoding), noself (mask each token's score with itself), score+noself."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Run seeds (seed_everything: initialisation and data order); the data set itself is fixed by the task
    config. The same seeds for every variant allow paired tests."""

    metrics: list[str] | None = None
    """Final metrics summarised per variant, the first being the primary one (table, plot); None picks those the
    task logs among test/acc, test/seq_acc, test/ppl, test/loss, val/acc, val/seq_acc, val/ppl, val/loss."""

    lower_is_better: list[str] = field(default_factory=list)
    """Metrics for which a smaller value is better, besides those recognised by name (loss, ppl, perplexity,
    error, bpc, nll); the direction decides the 'better' / 'worse' verdict."""

    baseline: str = "QKV"
    """Variant that the others are compared with (a variant label of the grid)."""

    alpha: float = 0.05
    """Family-wise significance level (Holm correction over the variants compared with the baseline)."""

    equivalence_margin: float | str | dict[str, float | str] | None = None
    """Equivalence margin: a difference from the baseline smaller than this counts as no difference. A number is
    in the metric's units (0.02: two accuracy points), a string like '1%' is that fraction of the baseline's mean.
    One value applies to the primary metric; a mapping sets it per metric, e.g. {test/acc: 0.01, test/ppl: '1%'}.
    With a margin the summary adds the TOST p-value (paired, Holm-corrected), its 1 - 2 alpha (90%) CI, the minimum
    detectable difference and the seeds needed, and the verdict becomes equivalent / worse / better / inconclusive."""

    power: float = 0.8
    """Target power of the minimum detectable difference and of the seeds needed for the margin."""

    mixed_model: bool = False
    """Also fit a random-intercept mixed model (metric ~ variant + (1 | cell), statsmodels: pip install
    'qkv-lightning[stats]') and show the variant effects with the cells as blocking factor."""

    output: str | None = None
    """Study directory; None: studies/<name of the study config>."""

    validate: bool = True
    """After training, run a validation pass on the final weights (the final val/... metrics)."""

    test: bool = True
    """After training, run the test set on the final weights (the final test/... metrics)."""

    workers: int | None = None
    """Worker subprocesses running cells in parallel; None: one per visible GPU, or on CPU min(4, cores);
    0 runs every cell sequentially inside this process."""

    threads: int | None = None
    """Torch CPU threads per cell; None: cores divided by workers (at least 1)."""

    quiet: bool = True
    """Send each cell's Lightning output to its log.txt (and turn off progress bars and model summaries); print
    one line per cell instead."""

    keep_checkpoints: bool = False
    """Keep each cell's checkpoints (deleted after the run otherwise; metrics come from the final weights)."""

    run: bool = True
    """Run the pending cells; false runs nothing and writes the tables from the cells finished so far (the report of a
    study that is still running or was stopped)."""

    retry_failed: bool = True
    """On re-runs, run failed cells again (finished ones are always skipped)."""

    max_cells: int | None = None
    """Run at most this many of the pending cells, the first in the grid's order (seeds outermost, then tasks, axis
    values and variants), and leave the others for a later run; e.g. 1 checks a study config end to end with its
    first cell (as CI does for every shipped study). None: every pending cell."""

    convert_from: str | None = None
    """A trained checkpoint of the task (e.g. a QKV model) that cells start from when their
    ``model.init_args.init_from`` is ``convert:METHOD`` (an axis value: ``convert:mean``, ``convert:keep:V``,
    ``convert:fit``): it is converted into each cell's variant once per method (``python cli.py convert``, written to
    ``<study>/converted/<variant>/<method>.ckpt``) and reused by every seed and setting. ``source`` as
    ``model.init_args.distill.teacher`` names this checkpoint too. E.g. axes {model.init_args.init_from: [null,
    convert:mean, convert:fit]} gives "from scratch vs uptrained at the same fine-tune budget" in one table."""

    calibration_batches: int = 8
    """Training batches of the task's data that ``convert:fit`` solves its least squares on."""

    validate_first: bool = False
    """Also validate before training (the starting weights, e.g. right after conversion), recorded as
    ``<metric>@0`` (``val/ppl@0``); metrics at other steps come from a MetricsAtSteps callback of the task config."""

    launcher: str = "local"
    """Where cells run: ``local`` (this machine's worker pool, see workers), ``slurm`` (one SLURM job array through
    submitit, each cell a job running the normal fit; pip install 'qkv-lightning[slurm]'), or ``submitit_local``
    (the same job array on this machine, each cell a separate process)."""

    slurm: dict[str, Any] = field(default_factory=dict)
    """submitit executor settings of every cell's job, e.g. {timeout_min: 600, nodes: 1, tasks_per_node: 8,
    gpus_per_node: 8, cpus_per_task: 12, slurm_partition: gpu}; a multi-GPU cell also needs study.strategy."""

    strategy: str | None = None
    """A strategy config layered on every cell after the task config (e.g. configs/strategy/ddp.yaml), so that a
    cell can itself be multi-GPU or multi-node."""

    reference: str | list[str] | None = None
    """A reference results file (or several, e.g. the authors' two shards) to compare with over matched cells only:
    the paper authors' per-cell CSV (/work/shared/data/paper-results/synthetic_results_shard*.csv) or one of our own
    results.csv (see qkv_lightning/study/reference.py); the report gains the reference, ours and the paired
    difference per matched cell group. A reference that matches no run is an error."""

    reference_metric: str = "test/acc"
    """Our metric compared with the reference's value (the authors' ``accuracy`` column, or this column of ours)."""

    reference_cell: dict[str, Any] = field(default_factory=dict)
    """Values our cells hold fixed that the reference varies (e.g. ``{n_layer: 2, n_head: 2}``), so that each run
    matches one reference row."""

    def __post_init__(self) -> None:
        if not self.task:
            raise ConfigError("study.task is not set: give the path of a fit config, e.g. configs/synthetic/sort.yaml.")
        # qkv:NAME and a configs/NAME missing here name the shipped configs (qkv_lightning.config_files)
        self.task = resolve_config(self.task) if isinstance(self.task, str) else [resolve_config(p) for p in self.task]
        self.overrides = resolve_config_args([str(arg) for arg in self.overrides])
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"study.launcher={self.launcher!r} is not one of {', '.join(LAUNCHERS)}.")
        if self.strategy is not None:
            strategy = resolve_config(self.strategy)
            if not Path(strategy).is_file():
                raise ConfigError(f"study.strategy={self.strategy!r}: no such config (e.g. configs/strategy/ddp.yaml).")
            self.strategy = strategy
        if not isinstance(self.task, str):
            self.task = [str(path) for path in self.task]
            if len(set(self.task)) != len(self.task):
                raise ConfigError(f"study.task={self.task} repeats a task config.")
            if len({task_label(path) for path in self.task}) != len(self.task):
                raise ConfigError(f"study.task={self.task}: two task configs have the same file name; rename one.")
        for key, values in self.axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"study.axes.{key} must be a non-empty list of values, got {values!r}.")
            if len(key.split(".")) < 2 and key != "seed_everything":
                raise ConfigError(
                    f"study.axes key {key!r} is not a config key: write the full dotted key, e.g. "
                    "model.init_args.network.d_model or data.init_args.seq_len."
                )
        if self.variants is not None:
            if not self.variants:
                raise ConfigError("study.variants is empty: list variant labels (e.g. [QKV, Q=K-V+score]) or null.")
            labels = [parse_label(label).label for label in self.variants]
            if len(set(labels)) != len(labels):
                raise ConfigError(f"study.variants={self.variants} names a variant twice.")
        if not self.seeds:
            raise ConfigError("study.seeds is empty: list at least one seed (two or more for statistics).")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"study.seeds={self.seeds} repeats a seed.")
        if self.metrics is not None and not self.metrics:
            raise ConfigError("study.metrics is empty: name final metrics (e.g. [test/acc]) or set it to null.")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"study.alpha={self.alpha} must lie in (0, 1).")
        if not 0.0 < self.power < 1.0:
            raise ConfigError(f"study.power={self.power} must lie in (0, 1), e.g. 0.8.")
        check_margins(self.equivalence_margin)
        if isinstance(self.equivalence_margin, dict) and self.metrics is not None:
            unknown = sorted(set(self.equivalence_margin) - set(self.metrics))
            if unknown:
                raise ConfigError(
                    f"study.equivalence_margin names {unknown}, which study.metrics={self.metrics} does not list: add "
                    "them to study.metrics or remove their margins."
                )
        if self.mixed_model and not statsmodels_available():
            raise ConfigError(
                "study.mixed_model=true needs statsmodels: pip install 'qkv-lightning[stats]' (or set it to false)."
            )
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"study.workers={self.workers} must be >= 0 (0: run in this process).")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"study.threads={self.threads} must be >= 1.")
        for n in self.n_kv_heads:
            if n is not None and n < 1:
                raise ConfigError(f"study.n_kv_heads contains {n}; use null or a count >= 1.")
        try:
            self.sharing = [Variant(name).sharing for name in self.sharing]
        except ConfigError as error:
            raise ConfigError(f"study.sharing={self.sharing}: {error}") from None
        try:
            self.breakers = ["+".join(parse_breakers(name)) or NO_BREAKER for name in self.breakers]
        except ConfigError as error:
            raise ConfigError(f"study.breakers={self.breakers}: {error}") from None
        for path in self.reference_files:
            if not Path(path).is_file():
                raise ConfigError(f"study.reference: {path} is not a file; name a results CSV (the authors' per-cell "
                                  "file or a study's results.csv).")
        if self.max_cells is not None and self.max_cells < 1:
            raise ConfigError(f"study.max_cells={self.max_cells} must be >= 1 (or null: every pending cell).")
        if self.calibration_batches < 1:
            raise ConfigError(f"study.calibration_batches={self.calibration_batches} must be >= 1.")
        converting = any(
            isinstance(value, str) and value.startswith(CONVERT_PREFIX)
            for value in self.axes.get(INIT_FROM_KEY, [])
        )
        if converting and not (self.convert_from and Path(self.convert_from).is_file()):
            raise ConfigError(
                f"study.axes.{INIT_FROM_KEY} has convert:METHOD values, so study.convert_from must name the trained "
                f"checkpoint to convert (got {self.convert_from!r}, which is not a file)."
            )
        for path in self.task_paths:
            if not Path(path).is_file():
                raise ConfigError(
                    f"study.task={path!r}: no such fit config (looked in {os.getcwd()}); run from the project root "
                    "or give a path that exists."
                )

    @property
    def reference_files(self) -> list[str]:
        """The reference results files (none without ``reference``)."""
        if not self.reference:
            return []
        return [self.reference] if isinstance(self.reference, str) else [str(p) for p in self.reference]

    @property
    def task_paths(self) -> list[str]:
        """The task configs, as a list (one or more)."""
        return [self.task] if isinstance(self.task, str) else list(self.task)

    @property
    def is_sweep(self) -> bool:
        """Whether cells differ in more than variant and seed (several tasks, or axes): then a cell's matched cells
        are those of the same task, axis values and seed, and the report adds the sweep table."""
        return len(self.task_paths) > 1 or bool(self.axes)

    def axis_names(self) -> dict[str, str]:
        """Each axis key's short name in labels and columns (:func:`short_axis_names`)."""
        return short_axis_names(self.axes)

    def resolve_metrics(self, results: list[dict]) -> list[str]:
        """The metrics to summarise: ``metrics``, else the preferred ones among those the finished runs logged."""
        if self.metrics:
            return list(self.metrics)
        logged = {name for result in results if result.get("status") == "ok" for name in result.get("metrics", {})}
        chosen = [name for name in PREFERRED_METRICS if name in logged]
        return chosen or sorted(logged)

    def is_lower_better(self, metric: str) -> bool:
        """Whether a smaller value of ``metric`` is better."""
        from qkv_lightning.loggers import lower_is_better

        return metric in self.lower_is_better or lower_is_better(metric)


def short_axis_names(keys: Iterable[str], taken: Iterable[str] = ()) -> dict[str, str]:
    """Each axis key's short name: its last part (``d_model``), or the whole key where two keys end alike or the last
    part is one of the names ``taken`` (another column's)."""
    keys, taken = list(keys), set(taken)
    last = [key.rsplit(".", 1)[-1] for key in keys]
    pairs = zip(keys, last, strict=True)
    return {key: short if last.count(short) == 1 and short not in taken else key for key, short in pairs}


def task_label(path: str) -> str:
    """A task config's name in tables and directories: its file name without the extension (``reverse``)."""
    return Path(path).stem


@dataclass(frozen=True)
class Cell:
    """One run of the study: a variant and a seed, and in a sweep a task config and axis values."""

    variant: Variant
    seed: int
    task: str = ""
    """The task config's path ("": the study's only one)."""
    axes: tuple[tuple[str, Any], ...] = ()
    """(config key, value) of every axis, in the study's order."""
    group: str = ""
    """The cells this one is matched with, but for variant and seed: '' outside sweeps, else e.g.
    ``reverse/d_model=32,seq_len=16``."""

    @property
    def key(self) -> str:
        head = f"{self.group}/" if self.group else ""
        return f"{head}{self.variant.label}/seed{self.seed}"


def axes_label(values: tuple[tuple[str, Any], ...], names: dict[str, str]) -> str:
    """``d_model=32,seq_len=16`` for axis values (config key, value), with the short names of :meth:`axis_names`."""
    return ",".join(f"{names[key]}={'null' if value is None else value}" for key, value in values)


def expand_grid(config: StudyConfig) -> tuple[list[Variant], list[str]]:
    """The variants of ``config`` (sharing x n_kv_heads x breakers, :func:`qkv_lightning.variants.expand`) and notes
    on the combinations left out."""
    if config.variants is not None:
        variants, notes = [parse_label(label) for label in config.variants], []
    else:
        variants, notes = expand(config.sharing, config.n_kv_heads, config.breakers)
    labels = [v.label for v in variants]
    if config.baseline not in labels:
        raise ConfigError(
            f"study.baseline={config.baseline!r} is not one of the study's variants {labels}: add it to the grid "
            "or set study.baseline to one of them."
        )
    return variants, notes


def cells(config: StudyConfig) -> list[Cell]:
    """Every cell of the study: seed x task x axis values x variant, seeds outermost so that a partial study covers
    every variant and setting (impossible cells are taken out later, :func:`~qkv_lightning.study.cell.check_cells`).
    """
    variants, _ = expand_grid(config)
    names = config.axis_names()
    combos = list(itertools.product(*[[(key, value) for value in values] for key, values in config.axes.items()]))
    several = len(config.task_paths) > 1
    grid = []
    for seed in config.seeds:
        for task in config.task_paths:
            for combo in combos:
                parts = ([task_label(task)] if several else []) + ([axes_label(combo, names)] if combo else [])
                group = "/".join(parts)
                grid += [Cell(variant, seed, task if config.is_sweep else "", combo, group) for variant in variants]
    return grid


def fingerprint(config: StudyConfig, cell: Cell) -> str:
    """Hash of everything that decides a cell's result: the task config's text, the overrides, variant and seed.

    A finished cell whose stored fingerprint differs was run under other settings and is run again.
    """
    settings = {
        "task": Path(cell.task or config.task_paths[0]).read_text(),
        "override_files": [Path(path).read_text() for path in override_config_files(config.overrides)],
        "overrides": list(config.overrides),
        **({"strategy": Path(config.strategy).read_text()} if config.strategy else {}),
        "variant": cell.variant.attention_settings(),
        "seed": cell.seed,
        **({"axes": [[key, value] for key, value in cell.axes]} if cell.axes else {}),
        "validate": config.validate,
        "test": config.test,
    }
    if config.validate_first:
        settings["validate_first"] = True
    starts = [value for _, value in cell.axes if str(value).startswith(CONVERT_PREFIX) or value == "source"]
    if config.convert_from and starts:
        source = Path(config.convert_from)
        stat = source.stat()
        settings["convert_from"] = [str(source.resolve()), stat.st_size, stat.st_mtime_ns, config.calibration_batches]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def override_config_files(overrides: list[str]) -> list[str]:
    """Paths of the config files that ``overrides`` layer on the task config (``--config=x`` or ``--config x``)."""
    paths = []
    for i, arg in enumerate(overrides):
        if arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(overrides):
            paths.append(overrides[i + 1])
    return [path for path in paths if Path(path).is_file()]
