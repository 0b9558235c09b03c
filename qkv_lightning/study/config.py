"""What a study runs: the settings (:class:`StudyConfig`) and the grid of cells (variant x seed) they expand to."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import CANONICAL_VARIANTS
from qkv_lightning.variants import NO_BREAKER, Variant, expand, parse_breakers

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

    task: str = ""
    """Path of a normal fit config (e.g. configs/synthetic/sort.yaml) that every cell trains; relative to the
    working directory."""

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

    retry_failed: bool = True
    """On re-runs, run failed cells again (finished ones are always skipped)."""

    def __post_init__(self) -> None:
        if not self.task:
            raise ConfigError("study.task is not set: give the path of a fit config, e.g. configs/synthetic/sort.yaml.")
        if not self.seeds:
            raise ConfigError("study.seeds is empty: list at least one seed (two or more for statistics).")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"study.seeds={self.seeds} repeats a seed.")
        if self.metrics is not None and not self.metrics:
            raise ConfigError("study.metrics is empty: name final metrics (e.g. [test/acc]) or set it to null.")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"study.alpha={self.alpha} must lie in (0, 1).")
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
        if not Path(self.task).is_file():
            raise ConfigError(
                f"study.task={self.task!r}: no such fit config (looked in {os.getcwd()}); run from the project root "
                "or give a path that exists."
            )

    def resolve_metrics(self, results: list[dict]) -> list[str]:
        """The metrics to summarise: ``metrics``, else the preferred ones among those the finished runs logged."""
        if self.metrics:
            return list(self.metrics)
        logged = {name for result in results if result.get("status") == "ok" for name in result.get("metrics", {})}
        chosen = [name for name in PREFERRED_METRICS if name in logged]
        return chosen or sorted(logged)

    def is_lower_better(self, metric: str) -> bool:
        """Whether a smaller value of ``metric`` is better."""
        if metric in self.lower_is_better:
            return True
        name = metric.lower().rsplit("/", 1)[-1]
        return any(word in name for word in ("loss", "ppl", "perplexity", "error", "bpc", "nll"))


@dataclass(frozen=True)
class Cell:
    """One run of the study: a variant and a seed."""

    variant: Variant
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant.label}/seed{self.seed}"


def expand_grid(config: StudyConfig) -> tuple[list[Variant], list[str]]:
    """The variants of ``config`` (sharing x n_kv_heads x breakers, :func:`qkv_lightning.variants.expand`) and notes
    on the combinations left out."""
    variants, notes = expand(config.sharing, config.n_kv_heads, config.breakers)
    labels = [v.label for v in variants]
    if config.baseline not in labels:
        raise ConfigError(
            f"study.baseline={config.baseline!r} is not one of the study's variants {labels}: add it to the grid "
            "or set study.baseline to one of them."
        )
    return variants, notes


def cells(config: StudyConfig) -> list[Cell]:
    """Every (variant, seed) of the study, seeds outermost so that a partial study covers all variants."""
    variants, _ = expand_grid(config)
    return [Cell(variant, seed) for seed in config.seeds for variant in variants]


def fingerprint(config: StudyConfig, cell: Cell) -> str:
    """Hash of everything that decides a cell's result: the task config's text, the overrides, variant and seed.

    A finished cell whose stored fingerprint differs was run under other settings and is run again.
    """
    settings = {
        "task": Path(config.task).read_text(),
        "override_files": [Path(path).read_text() for path in override_config_files(config.overrides)],
        "overrides": list(config.overrides),
        "variant": cell.variant.attention_settings(),
        "seed": cell.seed,
        "validate": config.validate,
        "test": config.test,
    }
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
