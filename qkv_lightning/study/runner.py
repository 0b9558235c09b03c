"""Running the cells of a study: each cell is a real Lightning fit of the task config through the same CLI machinery
as ``fit``, followed by validation and test on the final weights. Cells run in this process or in worker
subprocesses (one per visible GPU, or several single-threaded ones on CPU); finished cells are skipped on re-runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from qkv_lightning.callbacks.milestones import MetricsAtSteps
from qkv_lightning.files import atomic_write_json, make_owned_dir, remove_owned
from qkv_lightning.study.config import (
    CONVERT_PREFIX,
    INIT_FROM_KEY,
    TEACHER_KEY,
    Cell,
    StudyConfig,
    fingerprint,
    task_label,
)
from qkv_lightning.study.safety import PARENT_ENV, check_no_survivors, claim_cell, release_cell

RESULT_FILE = "result.json"
"""Written into a cell's directory when the cell has finished (ok or failed); its absence marks a half-finished run."""


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
    import importlib
    from argparse import ArgumentError

    from qkv_lightning.lightning_cli import QKVLightningCLI
    from qkv_lightning.errors import ConfigError, QKVError
    from qkv_lightning.hints import explain_config_error

    def build(section: dict) -> object:
        module_name, _, class_name = section["class_path"].rpartition(".")
        return getattr(importlib.import_module(module_name), class_name)(**(section.get("init_args") or {}))

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
            try:
                model = build(tree["model"])
                datamodule = build(tree["data"])
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


def read_result(directory: Path) -> dict | None:
    """The stored result of a cell, or None when it has not finished (or its file is unreadable)."""
    try:
        return json.loads((directory / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None


RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "variant": (str,),
    "seed": (int,),
    "status": (str,),
    "metrics": (dict,),
    "fingerprint": (str,),
    "error": (str,),
    "params": (int, type(None)),
    "attn_params": (int, type(None)),
    "kv_cache_bytes_per_token": (int, type(None)),
    "steps": (int, type(None)),
    "wall_s": (int, float, type(None)),
    "cpu_s": (int, float, type(None)),
}
"""The fields of ``result.json`` that the report reads, and their types."""


def result_problem(result: object, spec: dict) -> str | None:
    """What is wrong with a stored result of the cell ``spec`` (as this code never writes it), or None."""
    if not isinstance(result, dict):
        return f"it holds a JSON {type(result).__name__}, not a mapping"
    for name, types in RESULT_FIELDS.items():
        value = result.get(name)
        if name not in result or not isinstance(value, types) or isinstance(value, bool):
            return f"its field {name!r} is {value!r}, not {' or '.join(t.__name__ for t in types)}"
    if result["status"] not in ("ok", "failed"):
        return f"its status is {result['status']!r}, not 'ok' or 'failed'"
    bad = {k: v for k, v in result["metrics"].items() if isinstance(v, bool) or not isinstance(v, int | float)}
    if bad:
        return f"its metrics {bad} are not numbers"
    if result["variant"] != spec["label"] or result["seed"] != spec["seed"]:
        found, wanted = f"{result['variant']} seed {result['seed']}", f"{spec['label']} seed {spec['seed']}"
        return f"it is the result of {found}, not of {wanted}"
    return None


def check_stored_results(specs: list[dict]) -> None:
    """Every stored ``result.json`` of the grid is as this code writes it (an unreadable one is redone).

    Raises:
        DataError: naming the file, what is wrong, and how to redo the cell.
    """
    from qkv_lightning.errors import DataError

    for spec in specs:
        path = Path(spec["dir"]) / RESULT_FILE
        result = read_result(path.parent)
        if result is None:
            continue
        problem = result_problem(result, spec)
        if problem is not None:
            raise DataError(
                f"the study result {path} was edited or damaged: {problem}. Delete it (the cell is then run again) "
                "or restore it; nothing was run."
            )


def write_result(directory: Path, result: dict) -> None:
    """Write ``result.json`` atomically, so that an interrupted write never looks like a finished cell."""
    atomic_write_json(directory / RESULT_FILE, result, default=_json_default)


def _json_default(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


@functools.cache
def configured_logger(task: str, overrides: tuple[str, ...]) -> str | None:
    """The ``class_path`` of the one ``trainer.logger`` that the task config (with the study's overrides) sets; None
    for none, Lightning's default or several (the cells then log to TensorBoard)."""
    from qkv_lightning.lightning_cli import QKVLightningCLI

    logger = QKVLightningCLI.parse_only(["--config", task, *overrides]).as_dict()["trainer"].get("logger")
    if isinstance(logger, list) and len(logger) == 1:
        logger = logger[0]
    return logger.get("class_path") if isinstance(logger, dict) else None


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
    """Record the cell through every logger's API (:func:`qkv_lightning.loggers.log_hyperparams_and_metrics`):
    variant, seed, status and accounting as hyper-parameters, the final metrics as metrics (TensorBoard: its HParams
    view; MLflow and W&B: params and metrics of the run). A failed cell records its hyper-parameters only."""
    from qkv_lightning.loggers import log_hyperparams_and_metrics

    params = {  # the variant's columns as text: null K/V heads are "all", booleans "true" / "false"
        **{key: "all" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
           for key, value in spec["row"].items()},
        "seed": spec["seed"],
        "task": spec["task_name"],
        "status": result["status"],
        "params": result.get("params") or 0,
        "kv_cache_bytes_per_token": result.get("kv_cache_bytes_per_token") or 0,
    }
    names = spec["metrics"] or sorted(result["metrics"])
    metrics = {name: result["metrics"][name] for name in names if name in result["metrics"]}
    ok = result["status"] == "ok"
    for logger in getattr(trainer, "loggers", None) or []:
        log_hyperparams_and_metrics(logger, params, metrics if ok else {}, result.get("steps") or 0)
        logger.finalize("success" if ok else "failed")


def blank_result(spec: dict) -> dict:
    """A cell's result before it has run: identity filled in, status failed, no metrics."""
    return {
        **spec["row"],
        **({"group": spec["group"], "sweep": dict(spec["sweep"])} if spec.get("group") else {}),
        # every axis value by its config key, the task too (qkv_lightning.study.effects reads cells from them)
        **({"axes": {"task": spec["sweep"]["task"], **dict(spec["axes"])}} if spec.get("group") else {}),
        "seed": spec["seed"],
        "status": "failed",
        "metrics": {},
        "params": None,
        "attn_params": None,
        "kv_cache_bytes_per_token": None,
        "steps": None,
        "wall_s": None,
        "cpu_s": None,
        "error": "",
        "log_dir": spec["dir"],
        "fingerprint": spec["fingerprint"],
    }


def prepare_cell(spec: dict) -> None:
    """A fresh cell folder with its ``cell.yaml`` (a half-finished or outdated run of this study starts afresh)."""
    directory = Path(spec["dir"])
    check_no_survivors([directory])
    remove_owned(directory, advice="remove the link in study.output that leads there", role="the study cell")
    make_owned_dir(directory)
    (directory / "cell.yaml").write_text(yaml.safe_dump(cell_overrides(spec), sort_keys=False))


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
            (directory / "error.txt").write_text(traceback.format_exc())
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
def visible_gpus() -> list[str]:
    """Ids of the GPUs this process may use (as CUDA_VISIBLE_DEVICES names them), without creating a CUDA context."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def plan_workers(config: StudyConfig, pending: int) -> tuple[int, int | None, list[str]]:
    """(workers, torch threads per cell, GPU ids) for ``pending`` cells; 0 workers means in this process."""
    gpus = visible_gpus()
    cores = os.cpu_count() or 1
    workers = config.workers
    if workers is None:
        workers = len(gpus) if gpus else min(4, cores)
    workers = min(workers, pending)
    threads = config.threads
    if threads is None and workers > 0:
        threads = max(1, cores // workers)
    return workers, threads, gpus


def gpu_share(gpus: list[str], workers: int, slot: int) -> list[str]:
    """The GPUs worker ``slot`` sees: every ``workers``-th GPU from its slot (all of them for a single worker, so
    that a cell can use DDP), or one GPU shared round-robin when there are more workers than GPUs."""
    if workers <= len(gpus):
        return gpus[slot::workers]
    return [gpus[slot % len(gpus)]]


def crash_result(spec: dict, message: str) -> dict:
    """The result of a cell whose worker process died without reporting (e.g. killed for memory)."""
    result = {**blank_result(spec), "error": message}
    write_result(Path(spec["dir"]), result)
    return result


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_in_workers(
    specs: list[dict],
    workers: int,
    threads: int | None,
    gpus: list[str],
    log_dir: Path,
    on_result: Callable[[dict], None],
) -> None:
    """Run ``specs`` on ``workers`` subprocesses (``python -m qkv_lightning.study.worker``), each taking the next
    cell when free, each seeing only its share of the GPUs (:func:`gpu_share`). A worker that dies fails its cell
    and is replaced. Ctrl-C stops every worker; the cells they were running are redone on the next run."""
    import qkv_lightning

    log_dir.mkdir(parents=True, exist_ok=True)
    queue = deque(specs)
    lock = threading.Lock()
    stop = threading.Event()
    processes: dict[int, subprocess.Popen] = {}
    package_root = str(Path(qkv_lightning.__file__).resolve().parents[1])

    def start(slot: int) -> subprocess.Popen:
        env = dict(os.environ)
        env[PARENT_ENV] = str(os.getpid())  # the worker dies with this process (see safety.die_with_parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_share(gpus, workers, slot))
        if threads:
            env["QKV_STUDY_THREADS"] = str(threads)
            env["OMP_NUM_THREADS"] = str(threads)
        log = open(log_dir / f"worker-{slot}.log", "ab")  # noqa: SIM115 - handed to the child process
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "qkv_lightning.study.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
                bufsize=1,
            )
        finally:
            log.close()

    def serve(slot: int) -> None:
        process = None
        while not stop.is_set():
            with lock:
                if not queue:
                    break
                spec = queue.popleft()
            if process is None or process.poll() is not None:
                process = start(slot)
                processes[slot] = process
            try:
                process.stdin.write(json.dumps(spec) + "\n")
                process.stdin.flush()
                line = process.stdout.readline()
            except OSError:
                line = ""
            if stop.is_set():
                break
            if line:
                result = json.loads(line)
            else:
                code = process.wait()
                process = None
                tail = _tail(Path(spec["dir"]) / "log.txt") or _tail(log_dir / f"worker-{slot}.log")
                result = crash_result(spec, f"worker process died (exit code {code}); last output: {tail}")
            with lock:
                on_result(result)
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.stdin.close()
            process.wait()

    threads_ = [threading.Thread(target=serve, args=(slot,), daemon=True) for slot in range(workers)]
    for thread in threads_:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads_):
            for thread in threads_:
                thread.join(timeout=0.2)
    except KeyboardInterrupt:
        stop.set()
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        raise


def run_cells(config: StudyConfig, specs: list[dict], study_dir: Path, on_result: Callable[[dict], None]) -> str:
    """Run the pending cells, calling ``on_result`` after each; returns a line describing how they ran."""
    if config.launcher != "local":  # SLURM (or submitit's local executor): qkv_lightning.study.launchers
        from qkv_lightning.study.launchers import run_with_submitit

        return run_with_submitit(config, specs, study_dir, on_result)
    workers, threads, gpus = plan_workers(config, len(specs))
    if workers == 0:
        if threads:
            import torch

            torch.set_num_threads(threads)
        how = "in this process" + (f", {threads} thread(s)" if threads else "")
        for spec in specs:
            on_result(run_cell(spec))
        return how
    how = f"{workers} worker process(es)" + (f" on GPU(s) {','.join(gpus)}" if gpus else f" x {threads} thread(s)")
    run_in_workers(specs, workers, threads, gpus, study_dir / "workers", on_result)
    return how


def is_finished(result: dict | None, spec: dict, retry_failed: bool) -> bool:
    """Whether a stored result counts as done: same settings, and ok (or failed when failures are not retried)."""
    if result is None or result.get("fingerprint") != spec["fingerprint"]:
        return False
    return result.get("status") == "ok" or (result.get("status") == "failed" and not retry_failed)
