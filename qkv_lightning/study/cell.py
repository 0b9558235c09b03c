"""One study cell: its folder and spec, the pre-check of every cell's settings, and running it: a real Lightning
fit of the task config through the same CLI machinery as ``fit``, followed by validation and test on the final
weights."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from qkv_lightning.callbacks.milestones import MetricsAtSteps
from qkv_lightning.files import atomic_write_text, make_owned_dir, remove_owned
from qkv_lightning.study.config import (
    CONVERT_PREFIX,
    INIT_FROM_KEY,
    TEACHER_KEY,
    Cell,
    StudyConfig,
    fingerprint,
    task_label,
)
from qkv_lightning.study.results import blank_result, write_result
from qkv_lightning.study.safety import check_no_survivors, claim_cell, release_cell


def cell_dir(study_dir: Path, cell: Cell) -> Path:
    """The cell's directory, which is also its TensorBoard run: ``<study>/runs/<variant>/seed<k>``, or in a sweep
    ``<study>/runs/<task>/<axis values>/<variant>/seed<k>``."""
    group = [part for part in cell.group.split("/") if part]
    return study_dir.joinpath("runs", *group, cell.variant.label, f"seed{cell.seed}")


def cell_spec(config: StudyConfig, study_dir: Path, cell: Cell) -> dict:
    """Everything :func:`run_cell` needs, as plain JSON (it travels to worker processes)."""
    task = cell.task or config.task_paths[0]
    names = config.axis_names()
    return {
        "key": cell.key,
        "label": cell.variant.label,
        "attention": cell.variant.attention_settings(),
        "row": cell.variant.as_row(),
        "seed": cell.seed,
        "task": str(Path(task).resolve()),
        "task_name": task,
        "group": cell.group,
        "sweep": {"task": task_label(task), **{names[key]: value for key, value in cell.axes}} if cell.group else {},
        "axes": [[key, value] for key, value in cell.axes],
        "overrides": [*(["--config", config.strategy] if config.strategy else []), *config.overrides],
        "dir": str(cell_dir(study_dir, cell).resolve()),
        "metrics": list(config.metrics) if config.metrics else None,
        "validate": config.validate,
        "test": config.test,
        "quiet": config.quiet,
        "keep_checkpoints": config.keep_checkpoints,
        "fingerprint": fingerprint(config, cell),
        "validate_first": config.validate_first,
        **resolve_starts(config, study_dir, cell, task),
        "logger": configured_logger(str(Path(task).resolve()), tuple(config.overrides)),
        "logger_args": configured_logger_args(str(Path(task).resolve()), tuple(config.overrides)),
    }


def conversion_path(study_dir: Path, variant_label: str, value: str) -> Path:
    """Where the study keeps ``convert_from`` converted to a variant by the ``convert:METHOD[:ROLE]`` of ``value``."""
    method = value.removeprefix(CONVERT_PREFIX).replace(":", "-")
    return study_dir / "converted" / variant_label / f"{method}.ckpt"


def resolve_starts(config: StudyConfig, study_dir: Path, cell: Cell, task: str) -> dict:
    """The cell's axis values with ``convert:METHOD`` (``init_from``) and ``source`` (``distill.teacher``) replaced
    by checkpoint paths, and the conversions they need (made once, before the cells run: :func:`make_conversions`)."""
    axes, conversions = [], []
    for key, value in cell.axes:
        if key == INIT_FROM_KEY and isinstance(value, str) and value.startswith(CONVERT_PREFIX):
            path = conversion_path(study_dir, cell.variant.label, value)
            method, _, keep = value.removeprefix(CONVERT_PREFIX).partition(":")
            conversions.append(
                {
                    "path": str(path.resolve()),
                    "sharing": cell.variant.sharing,
                    "n_kv_heads": cell.variant.n_kv_heads,
                    "method": method,
                    "keep": keep or None,
                    "args": ["--config", str(Path(task).resolve()), *config.overrides],
                }
            )
            value = str(path.resolve())
        elif key == TEACHER_KEY and value == "source" and config.convert_from:
            value = str(Path(config.convert_from).resolve())
        axes.append([key, value])
    return {"run_axes": axes, "conversions": conversions}


def make_conversions(config: StudyConfig, specs: list[dict], echo: Callable[[str], None]) -> None:
    """Write every converted checkpoint that the pending cells start from and that does not exist yet."""
    from qkv_lightning.uptrain.convert import convert

    done: set[str] = set()
    for spec in specs:
        for job in spec.get("conversions", []):
            path = Path(job["path"])
            if job["path"] in done or path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            echo(f"study: converting {config.convert_from} to {path.parent.name} by {job['method']} -> {path}")
            convert(
                config.convert_from, path, job["sharing"], job["n_kv_heads"], job["method"], job["keep"],
                config.calibration_batches, calibration_args=job["args"],
            )
            done.add(job["path"])


def set_key(tree: dict, key: str, value: object) -> None:
    """Set the dotted config ``key`` (``model.init_args.network.d_model``) in the nested dict ``tree``."""
    *parents, last = key.split(".")
    for part in parents:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[last] = value


def has_key(tree: dict, key: str) -> bool:
    """Whether the parsed config ``tree`` has the dotted ``key`` (every setting appears there, at its default)."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def check_cells(config: StudyConfig, variants: list, grid: list[Cell]) -> tuple[list[Cell], list[str]]:
    """Find the impossible cells before anything runs or is written: every task config is parsed once with the
    study's overrides, and the task module of every (task, axis values, variant) is built (cheap: networks are
    built later) and checked against the data's settings.

    Returns:
        The possible cells, in order, and one note per impossible (task, axis values, variant), which is skipped.

    Raises:
        ConfigError: for an axis key the task config does not have, or a variant that is impossible in every cell
            (naming the variant and the setting to change, e.g. n_kv_heads that does not divide n_head).
    """
    import copy
    from argparse import ArgumentError

    from lightning.pytorch import LightningDataModule

    from qkv_lightning.errors import ConfigError, QKVError
    from qkv_lightning.hints import explain_config_error
    from qkv_lightning.lightning_cli import QKVLightningCLI
    from qkv_lightning.tasks.base import TaskModule
    from qkv_lightning.tasks.persist import resolve_class

    def vetted(section: dict, base: type, validated: str | None, key: str) -> type:
        """The section's class, vetted by the one task builder's rule: an axis may name a class (``data.class_path``)
        that LightningCLI never saw, so only the config's own class or the package's are built."""
        return resolve_class(section.get("class_path"), base, f"{key} (study.axes)", trusted=[validated])

    parsed: dict[str, dict] = {}
    for task in config.task_paths:
        where = f"study.task={task}" + (f" with study.overrides={config.overrides}" if config.overrides else "")
        try:  # the cells instantiate; here only the config is read
            parsed[task] = QKVLightningCLI.parse_only(["--config", str(task), *config.overrides]).as_dict()
        except QKVError as error:
            raise ConfigError(f"{where}: {error}") from None
        except (ArgumentError, ValueError) as error:  # jsonargparse reports bad keys and values as ArgumentError
            raise ConfigError(f"{where}: {explain_config_error(str(error))}") from None
        for key in config.axes:
            if not has_key(parsed[task], key):
                raise ConfigError(
                    f"study.axes key {key!r} is not a setting of {task} (write the full dotted key as in the task "
                    "config, e.g. model.init_args.network.d_model or data.init_args.seq_len); nothing was run."
                )

    verdicts: dict[tuple, str | None] = {}  # (task, axes, variant label) -> None if possible, else the reason

    def problem(cell: Cell) -> str | None:
        task = cell.task or config.task_paths[0]
        key = (task, cell.axes, cell.variant.label)
        if key not in verdicts:
            tree = copy.deepcopy(parsed[task])
            for axis, value in cell.axes:
                set_key(tree, axis, value)
            init_args = tree["model"].setdefault("init_args", {})
            init_args["attention"] = {**(init_args.get("attention") or {}), **cell.variant.attention_settings()}
            model_class = vetted(tree["model"], TaskModule, parsed[task]["model"].get("class_path"), "model.class_path")
            data_class = vetted(
                tree["data"], LightningDataModule, parsed[task]["data"].get("class_path"), "data.class_path"
            )
            try:
                model = model_class(**(tree["model"].get("init_args") or {}))
                datamodule = data_class(**(tree["data"].get("init_args") or {}))
                settings_spec = getattr(datamodule, "settings_spec", None)
                if settings_spec is not None and hasattr(model, "check_data_spec"):
                    model.check_data_spec(dict(settings_spec()))
                verdicts[key] = None
            except QKVError as error:
                verdicts[key] = str(error)
        return verdicts[key]

    kept, notes, seen = [], [], set()
    for cell in grid:
        reason = problem(cell)
        if reason is None:
            kept.append(cell)
            continue
        where = f"{cell.group}/{cell.variant.label}" if cell.group else cell.variant.label
        if where not in seen:
            seen.add(where)
            notes.append(f"skipped {where} (every seed): impossible: {reason}")
    for variant in variants:
        if not any(cell.variant == variant for cell in kept):
            cell = next(cell for cell in grid if cell.variant == variant)
            task = cell.task or config.task_paths[0]
            raise ConfigError(
                f"study cell {variant.label} is impossible for {task}: {problem(cell)} Change study.sharing / "
                "study.n_kv_heads / study.breakers / study.variants / study.axes, or the task config; nothing was run."
            )
    return kept, notes


TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


@functools.cache
def _configured_logger(task: str, overrides: tuple[str, ...]) -> str:
    """The one ``trainer.logger`` that the task config (with the study's overrides) sets, as JSON (``null`` for none,
    Lightning's default or several)."""
    from qkv_lightning.lightning_cli import QKVLightningCLI

    logger = QKVLightningCLI.parse_only(["--config", task, *overrides]).as_dict()["trainer"].get("logger")
    if isinstance(logger, list) and len(logger) == 1:
        logger = logger[0]
    return json.dumps(logger if isinstance(logger, dict) else None, default=str)


def configured_logger(task: str, overrides: tuple[str, ...]) -> str | None:
    """The ``class_path`` of the one ``trainer.logger`` that the task config (with the study's overrides) sets; None
    for none, Lightning's default or several (the cells then log to TensorBoard)."""
    logger = json.loads(_configured_logger(task, overrides))
    return logger.get("class_path") if logger else None


def configured_logger_args(task: str, overrides: tuple[str, ...]) -> dict:
    """The ``init_args`` of that logger ({} for none): where the study's own MLflow run goes
    (:mod:`qkv_lightning.study.dashboard`)."""
    logger = json.loads(_configured_logger(task, overrides))
    return dict((logger or {}).get("init_args") or {})


def logger_placement(class_path: str, directory: Path) -> dict:
    """``init_args`` that put a cell's logging where the study reads it: TensorBoard and CSV log into the cell
    directory (``<study>/runs/<variant>/seed<k>``); MLflow gets an experiment named after the study and a run named
    after the cell (its tracking URI stays as configured); W&B a run named after the cell, grouped by the study, with
    its files in the cell directory; any other logger keeps its settings."""
    parts = directory.parts
    runs = len(parts) - 1 - parts[::-1].index("runs") if "runs" in parts else len(parts) - 3
    study, run = parts[runs - 1], "/".join(parts[runs + 1 :])
    name = class_path.rsplit(".", 1)[-1]
    if name in ("TensorBoardLogger", "CSVLogger"):
        placement = {"save_dir": str(directory.parent.parent), "name": directory.parent.name, "version": directory.name}
        return {**placement, "default_hp_metric": False} if name == "TensorBoardLogger" else placement
    if name == "MLFlowLogger":
        return {"experiment_name": study, "run_name": run}
    if name == "WandbLogger":
        return {"name": run, "group": study, "save_dir": str(directory)}
    return {}


def cell_overrides(spec: dict) -> dict:
    """The config layered last for a cell: the variant, the seed, and the configured logger (TensorBoard if none)
    placed in the cell (:func:`logger_placement`)."""
    directory = Path(spec["dir"])
    class_path = spec.get("logger") or TENSORBOARD
    trainer: dict = {
        "default_root_dir": str(directory),
        "logger": {"class_path": class_path, "init_args": logger_placement(class_path, directory)},
    }
    if spec["quiet"]:
        trainer.update(enable_progress_bar=False, enable_model_summary=False)
    overrides = {
        "seed_everything": spec["seed"],
        "model": {"init_args": {"attention": dict(spec["attention"])}},
        "trainer": trainer,
    }
    for key, value in spec.get("run_axes", spec.get("axes", [])):  # the cell's axis values (checkpoints resolved)
        set_key(overrides, key, value)
    return overrides


def cell_args(spec: dict) -> list[str]:
    """Command-line arguments of the cell's fit: task config, the study's overrides, then the cell's own config."""
    return ["--config", spec["task"], *spec["overrides"], "--config", str(Path(spec["dir"]) / "cell.yaml")]


@contextlib.contextmanager
def output_to(path: Path | None) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C code and loggers too) to ``path``."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def model_accounting(model: object) -> dict:
    """Parameters of the model and of its attention layers, and KV-cache bytes per token (all layers, 2-byte
    elements), in closed form (:meth:`TaskModule.cost`, the accounting that ``report`` prints)."""
    cost = model.cost()
    return {
        "params": cost.params_total,
        "attn_params": cost.params_attention,
        "kv_cache_bytes_per_token": cost.kv_cache_bytes_per_token,
    }


def log_cell_record(trainer: object, spec: dict, result: dict) -> None:
    """Record the cell through every logger's API (:func:`qkv_lightning.study.dashboard.log_cell_hparams`): its
    hyper-parameters (:func:`~qkv_lightning.study.dashboard.cell_hparams`: variant, task, axis values, seed, status,
    accounting) and its final metrics (TensorBoard: a session of the study's HParams view; MLflow, W&B, CSV: params
    and metrics of the run). A failed cell records its hyper-parameters and its status only."""
    from qkv_lightning.study.dashboard import cell_hparams, log_cell_hparams

    params = cell_hparams(spec, result)
    names = spec["metrics"] or sorted(result["metrics"])
    metrics = {name: result["metrics"][name] for name in names if name in result["metrics"]}
    ok = result["status"] == "ok"
    for logger in getattr(trainer, "loggers", None) or []:
        log_cell_hparams(logger, params, metrics if ok else {}, result.get("steps") or 0, ok, spec["key"])
        logger.finalize("success" if ok else "failed")


def prepare_cell(spec: dict) -> None:
    """A fresh cell folder with its ``cell.yaml`` (a half-finished or outdated run of this study starts afresh)."""
    directory = Path(spec["dir"])
    check_no_survivors([directory])
    remove_owned(directory, advice="remove the link in study.output that leads there", role="the study cell")
    make_owned_dir(directory)
    atomic_write_text(directory / "cell.yaml", yaml.safe_dump(cell_overrides(spec), sort_keys=False))


def run_cell(spec: dict, prepared: bool = False, writer: bool = True) -> dict:
    """Train, validate and test one cell in this process; write and return its result.

    Any exception is recorded as a failed result (error message in the result, traceback in ``error.txt``).
    A keyboard interrupt (which Lightning turns into ``SystemExit``) leaves no result, so the cell is redone later.

    Args:
        spec: the cell (:func:`cell_spec`).
        prepared: its folder was made by :func:`prepare_cell` already (a SLURM job's tasks share it).
        writer: this process writes the result and cleans up (False on the other ranks of a multi-task job).
    """
    from lightning.pytorch.cli import SaveConfigCallback

    from qkv_lightning.lightning_cli import QKVLightningCLI

    directory = Path(spec["dir"])
    if not prepared:
        prepare_cell(spec)
    if writer:
        claim_cell(directory)
    result = blank_result(spec)
    trainer = None
    start, cpu_start = time.perf_counter(), time.process_time()
    with output_to(directory / "log.txt" if spec["quiet"] else None):
        try:
            cli = QKVLightningCLI(
                args=cell_args(spec),
                run=False,
                save_config_callback=SaveConfigCallback,
                parser_kwargs={"default_env": False, "exit_on_error": False},
            )
            trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
            before: dict[str, float] = {}
            if spec.get("validate_first"):
                before = {f"{k}@0": float(v) for k, v in trainer.validate(model, datamodule, verbose=False)[0].items()}
            trainer.fit(model, datamodule=datamodule)
            if trainer.interrupted:
                raise KeyboardInterrupt
            result["steps"] = trainer.global_step
            result.update(model_accounting(model))
            metrics: dict[str, float] = dict(before)
            for callback in trainer.callbacks:  # metrics at chosen steps (MetricsAtSteps)
                if isinstance(callback, MetricsAtSteps):
                    metrics.update(callback.recorded)
            if spec["validate"]:
                metrics.update(trainer.validate(model, datamodule=datamodule, verbose=False)[0])
            if spec["test"]:
                metrics.update(trainer.test(model, datamodule=datamodule, verbose=False)[0])
            result["metrics"] = {name: float(value) for name, value in sorted(metrics.items())}
            missing = [m for m in spec["metrics"] or [] if m not in result["metrics"]]
            if missing:
                raise KeyError(
                    f"the task logged no final {missing} (it logged {sorted(result['metrics'])}): set study.metrics "
                    "to metrics the task logs, or enable study.validate / study.test."
                )
            result["status"] = "ok"
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - a failed cell is recorded and the study goes on
            result["error"] = f"{type(error).__name__}: {error}".strip()
            atomic_write_text(directory / "error.txt", traceback.format_exc())
            traceback.print_exc()
        finally:
            result["wall_s"] = round(time.perf_counter() - start, 3)
            result["cpu_s"] = round(time.process_time() - cpu_start, 3)
        if result["params"] is None and trainer is not None and trainer.lightning_module is not None:
            with contextlib.suppress(Exception):
                result.update(model_accounting(trainer.lightning_module))
        with contextlib.suppress(Exception):
            log_cell_record(trainer, spec, result)
    if not writer:
        return result
    if not spec["keep_checkpoints"]:
        for checkpoint in directory.rglob("*.ckpt"):
            checkpoint.unlink()
        with contextlib.suppress(OSError):
            (directory / "checkpoints").rmdir()
    write_result(directory, result)
    release_cell(directory)
    return result


# ------------------------------------------------------------------------------------------------- scheduling
