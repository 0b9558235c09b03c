"""Checkpoint compatibility and resolution: the one place that finds the checkpoint a command should read
(``--ckpt_path last``), reads it once, safely, and checks that it fits the configured task before anything runs.

The checks, in order: the task class that saved it (``model.class_path``), the weights' names and shapes against the
configured network (built on the meta device, so no memory and no data), and what is specific to a task (the
tokenizer and vocabulary of a language model) through :meth:`TaskModule.check_checkpoint_data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonargparse

from qkv_lightning.errors import CheckpointError

SPECIAL_CKPT_PATHS = ("last", "hpc", "registry")
"""``ckpt_path`` values that Lightning resolves itself (``last`` is resolved here first)."""


def is_local_file_or_folder(ckpt_path: Any) -> bool:
    """Whether ``ckpt_path`` names a local checkpoint (file or sharded folder) rather than a keyword or URL."""
    return bool(ckpt_path) and ckpt_path not in SPECIAL_CKPT_PATHS and "://" not in str(ckpt_path)


@dataclass
class CheckpointInfo:
    """What the checks need from a checkpoint, read once: its weights' shapes, its hyper-parameters and the names of
    its top-level entries (e.g. a stored tokenizer's; a sharded folder's are those of its metadata file)."""

    path: Path
    sharded: bool
    shapes: dict[str, tuple[int, ...]]
    hparams: dict[str, Any] = field(default_factory=dict)
    entries: frozenset[str] = frozenset()

    @property
    def class_path(self) -> str | None:
        """The task class that saved it (``model.class_path``), if recorded."""
        return self.hparams.get("_class_path")


def read_checkpoint_info(ckpt_path: str | Path, weights_only: bool = True) -> CheckpointInfo:
    """Read a checkpoint file or sharded folder safely (see :mod:`qkv_lightning.checkpoints`) for the checks.

    Raises:
        CheckpointError: for a missing, damaged or unsafe checkpoint, naming the file.
    """
    from qkv_lightning.checkpoints import (
        METADATA_FILE,
        load_checkpoint_file,
        read_sharded_metadata,
        recover_interrupted_swap,
        sharded_weights_key,
    )

    path = Path(ckpt_path)
    recover_interrupted_swap(path)  # an FSDP2 save that a crash interrupted between its renames
    if not path.exists():
        raise CheckpointError(f"ckpt_path={ckpt_path} does not exist; check the path, or pass --ckpt_path last.")
    if path.is_dir():
        metadata = read_sharded_metadata(path)  # complete, its shards whole, every item safe to unpickle
        prefix = sharded_weights_key(metadata) + "."  # "state_dict." (FSDP2), "model." (Lightning's FSDPStrategy)
        shapes = {
            key.removeprefix(prefix): tuple(item.size)
            for key, item in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and hasattr(item, "size")
        }
        meta = load_checkpoint_file(path / METADATA_FILE, weights_only=weights_only, lightning=False)
        return CheckpointInfo(path, True, shapes, _plain_hparams(meta.get("hyper_parameters")), frozenset(meta))
    checkpoint = load_checkpoint_file(path, weights_only=weights_only)
    shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")}
    hparams = _plain_hparams(checkpoint.get("hyper_parameters"))
    return CheckpointInfo(path, False, shapes, hparams, frozenset(checkpoint))


def _plain_hparams(hparams: Any) -> dict[str, Any]:
    values = dict(hparams or {})
    values.pop("_instantiator", None)
    return values


def weight_problems(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], sharded: bool = False
) -> list[str]:
    """Differences between the weights a model expects and those a checkpoint holds (name -> shape).

    A sharded checkpoint stores tied parameters once, so names it lacks are not reported for it.
    """
    problems = [] if sharded else [f"{k} missing" for k in expected if k not in found]
    problems += [f"{k} unexpected" for k in found if k not in expected]
    problems += [f"{k} {found[k]} vs {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    return problems


def differing_settings(saved: dict[str, Any], configured: dict[str, Any]) -> list[str]:
    """The network and attention settings in which a checkpoint's hyper-parameters differ from the configured task's
    (``network.d_model: checkpoint 64, config 128``), for messages."""
    differ = []
    for group in ("network", "attention"):
        mine = configured.get(group)
        if not isinstance(mine, dict):
            continue
        for key, value in (saved.get(group) or {}).items():
            if key in mine and mine[key] != value and not (key == "vocab_size" and mine[key] is None):
                differ.append(f"{group}.{key}: checkpoint {value!r}, config {mine[key]!r}")
    return differ


def check_class(info: CheckpointInfo, configured_class: str | None) -> None:
    """The checkpoint must come from the configured task class."""
    saved = info.class_path
    if saved and configured_class and saved != configured_class:
        raise CheckpointError(
            f"the checkpoint {info.path} was saved by model.class_path: checkpoint {saved}, but the config builds "
            f"{configured_class}; use a config of the same task (or another checkpoint). Nothing was run."
        )


def check_fits(task: Any, info: CheckpointInfo) -> None:
    """Raise a :class:`CheckpointError` naming the settings to change if the checkpoint does not fit ``task``: its
    class, its weights' names and shapes (the network built on the meta device for the checkpoint's data spec),
    and the task's own data check (:meth:`TaskModule.check_checkpoint_data`)."""
    mine = f"{type(task).__module__}.{type(task).__qualname__}"
    check_class(info, mine)
    spec = task.data_spec or info.hparams.get("data_spec")
    task.check_checkpoint_data(info.hparams.get("data_spec") or {}, str(info.path))
    if not spec:
        return
    problems = weight_problems(task.expected_weight_shapes(dict(spec)), info.shapes, info.sharded)
    if not problems:
        return
    differ = differing_settings(info.hparams, dict(task.hparams))
    raise CheckpointError(
        f"the checkpoint {info.path} does not fit the configured model ({'; '.join(problems[:4])}"
        f"{' ...' if len(problems) > 4 else ''}); nothing was run. Use the model settings it was trained with"
        f"{': ' + '; '.join(differ) if differ else ''}."
    )


LOGGER_DEFAULT_NAMES = {"TensorBoardLogger": "lightning_logs", "CSVLogger": "lightning_logs"}
"""The ``name`` of Lightning's loggers when none is given (their run folders are ``<save_dir>/<name>/version_N``)."""


@dataclass
class RunFolders:
    """Where a configured checkpoint callback writes ``last.ckpt``: the candidates found, each with the logger
    settings that continue its run, and the places searched (glob patterns, for messages)."""

    found: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)

    def add(self, pattern: Path, runs: list[tuple[Path, dict[str, Any]]], where: str | None = None) -> None:
        self.searched.append(where or str(pattern))
        self.found += runs


def _first_logger(trainer: Any) -> Any:
    logger = trainer.get("logger")
    if isinstance(logger, list):
        return logger[0] if logger else None
    return logger


def _mlflow_store(init_args: Any) -> Path | None:
    """The local folder of an MLFlowLogger's file store (``save_dir``, or a ``file:`` tracking URI); None for a
    remote one (then Lightning puts checkpoints under ``trainer.default_root_dir``)."""
    uri = init_args.get("tracking_uri")
    if uri:
        return Path(str(uri).removeprefix("file:").removeprefix("//")) if str(uri).startswith("file:") else None
    return Path(init_args.get("save_dir") or "./mlruns")


def _mlflow_experiments(store: Path, name: str | None) -> list[Path]:
    """The experiment folders of an MLflow file store whose ``meta.yaml`` names ``name`` (all when None)."""
    import yaml

    folders = []
    for folder in sorted(store.iterdir()) if store.is_dir() else []:
        try:
            meta = yaml.safe_load((folder / "meta.yaml").read_text()) if (folder / "meta.yaml").is_file() else None
        except (OSError, yaml.YAMLError):
            meta = None
        if isinstance(meta, dict) and (name is None or meta.get("name") == name):
            folders.append(folder)
    return folders


def _runs(parent: Path, continues: str) -> list[tuple[Path, dict[str, Any]]]:
    """``<parent>/<run>/checkpoints/last.ckpt`` of each run folder, with the logger setting ``continues`` that
    continues it (``version``: an int for ``version_N`` folders, the folder's name otherwise)."""
    from qkv_lightning.checkpoints import recover_interrupted_swap

    runs = []
    for run in sorted(parent.iterdir()) if parent.is_dir() else []:
        last = run / "checkpoints" / "last.ckpt"
        if not run.is_dir():
            continue
        recover_interrupted_swap(last)  # an FSDP2 save that a crash interrupted between its renames
        if continues == "version" and not run.name.startswith("version_"):
            continue
        version = run.name.removeprefix("version_") if continues == "version" else run.name
        runs.append((last, {continues: int(version) if version.isdigit() else run.name}))
    return runs


def run_folders(config: Any) -> RunFolders:
    """Every ``last.ckpt`` the configured checkpoint callback can have written, as Lightning places it: a
    ModelCheckpoint's ``dirpath``; else the first logger's ``<save_dir>/<name>/<version>/checkpoints``
    (TensorBoard and CSV: ``<name>/version_N``; MLflow: ``<experiment id>/<run id>`` of the experiment named
    ``experiment_name``; W&B: ``<project>/<run id>``; another logger: any ``*/*``); without a logger
    ``<trainer.default_root_dir>/checkpoints``."""
    from qkv_lightning.checkpoints import recover_interrupted_swap

    trainer = config.get("trainer", {})
    root = Path(trainer.get("default_root_dir") or ".")
    folders = RunFolders()
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args", {}) if isinstance(callback, jsonargparse.Namespace) else {}
        if "ModelCheckpoint" in str(callback.get("class_path", "")) and init_args.get("dirpath"):
            last = Path(init_args["dirpath"]) / "last.ckpt"
            recover_interrupted_swap(last)
            folders.add(last, [(last, {})])
    if folders.found:
        return folders  # the dirpath is where this run's callback writes, whatever the logger
    logger = _first_logger(trainer)
    if logger is True:  # Lightning's own default logger
        logger = jsonargparse.Namespace(class_path="TensorBoardLogger", init_args=jsonargparse.Namespace(save_dir=root))
    if not isinstance(logger, jsonargparse.Namespace) or "class_path" not in logger:
        last = root / "checkpoints" / "last.ckpt"
        folders.add(last, [(last, {})])
        return folders
    kind = str(logger.class_path).rpartition(".")[2]
    init_args = logger.get("init_args") or jsonargparse.Namespace()
    if kind in LOGGER_DEFAULT_NAMES:
        save_dir = Path(init_args.get("save_dir") or root)
        name = init_args.get("name", LOGGER_DEFAULT_NAMES[kind])
        parent = save_dir / name if name else save_dir
        folders.add(parent / "version_*" / "checkpoints" / "last.ckpt", _runs(parent, "version"))
    elif kind == "MLFlowLogger":
        store = _mlflow_store(init_args)
        name = init_args.get("experiment_name") or "lightning_logs"
        base = store if store is not None else root
        experiments = _mlflow_experiments(base, name if store is not None else None)
        runs = [(last, {}) for experiment in experiments for last, _ in _runs(experiment, "run_id")]  # a new run
        folders.add(base, runs, f"{base}/<id of experiment {name!r}>/<run id>/checkpoints/last.ckpt")
    elif kind == "WandbLogger":
        save_dir = Path(init_args.get("save_dir") or init_args.get("dir") or ".")
        project = init_args.get("project") or "lightning_logs"
        runs = [(last, {}) for last, _ in _runs(save_dir / project, "id")]  # continued in a new run, as MLflow's
        folders.add(save_dir / project / "<run id>" / "checkpoints" / "last.ckpt", runs)
    else:
        save_dir = Path(init_args.get("save_dir") or root)
        runs = [(last, {}) for parent in sorted(save_dir.glob("*")) if parent.is_dir() for last, _ in _runs(parent, "")]
        folders.add(save_dir / "*" / "*" / "checkpoints" / "last.ckpt", runs)  # a run not continued: settings unknown
    return folders


def find_last_checkpoint(config: Any) -> tuple[Path, dict[str, Any]] | None:
    """The newest ``last.ckpt`` of :func:`run_folders` and the logger settings that continue its run, or None."""
    existing = [(path, settings) for path, settings in run_folders(config).found if path.is_file()]
    if not existing:
        return None
    return max(existing, key=lambda item: item[0].stat().st_mtime)


def resolve_last(config: Any, subcommand: str) -> None:
    """Turn ``ckpt_path: last`` into the newest run's ``last.ckpt`` for every subcommand, in place.

    ``fit`` then keeps logging into that run's folder (TensorBoard and CSV: its version; MLflow and W&B start a new run,
    as they refuse or warn about changed parameters in a finished one), and starts from scratch when there is no run
    yet. ``validate``, ``test`` and ``predict`` need a checkpoint: without one, evaluating would
    report an untrained model's numbers, so that is an error.

    Raises:
        CheckpointError: for ``validate`` / ``test`` / ``predict`` when no run has a ``last.ckpt``, naming where it
            looked.
    """
    if config.get("ckpt_path") != "last":
        return
    found = find_last_checkpoint(config)
    if found is None:
        if subcommand == "fit":
            return
        where = " or ".join(run_folders(config).searched)
        raise CheckpointError(
            f"{subcommand} --ckpt_path last: no last.ckpt was found (looked for {where}), so there is no trained "
            f"model to {'generate with' if subcommand == 'predict' else 'evaluate'}. Train it first (fit, with a "
            "ModelCheckpoint(save_last=True) callback), point trainer.default_root_dir or the logger's settings "
            "(save_dir, name, experiment_name, project) at its run, or give --ckpt_path FILE."
        )
    path, settings = found
    config["ckpt_path"] = str(path)
    logger = _first_logger(config.get("trainer", {}))
    if subcommand == "fit" and settings and isinstance(logger, jsonargparse.Namespace) and "init_args" in logger:
        for key, value in settings.items():
            logger.init_args[key] = value


CHECKPOINT_PATH_FIELDS = ("best_model_path", "kth_best_model_path", "last_model_path")
"""The single paths a ``ModelCheckpoint`` state holds (besides the ``best_k_models`` mapping)."""


def confine_callback_paths(checkpoint: dict[str, Any]) -> list[str]:
    """Drop, from every ``ModelCheckpoint`` state in a loaded checkpoint, each path that does not lie inside that
    state's own ``dirpath`` (:func:`qkv_lightning.files.escapes`: ``..`` resolved, no link on the way); returns them.

    Lightning restores ``best_k_models``, ``kth_best_model_path`` and ``last_model_path`` when ``dirpath`` is the
    resumed run's, and deletes them later as it saves newer checkpoints; its own check reads ``dirpath/../x`` as inside
    ``dirpath``. So a checkpoint's callback state never chooses a path outside its folder: a state with such a path
    loses its top-k record (``best_k_models`` emptied, ``kth_best_model_path`` cleared, ``kth_value`` left to the
    callback's initial one) and the single path fields outside are cleared. Called by
    :meth:`TaskModule.on_load_checkpoint`, before Lightning restores the callbacks.
    """
    from qkv_lightning.files import escapes

    dropped: list[str] = []
    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, dict) or "best_k_models" not in state:
            continue
        root = state.get("dirpath")

        def outside(path: Any, root: Any = root) -> bool:
            return not isinstance(path, str) or not isinstance(root, str) or escapes(path, root) is not None

        models = state.get("best_k_models")
        ranked = [*(models if isinstance(models, dict) else [models])]  # not a mapping: dropped as well
        kth = state.get("kth_best_model_path")
        escaped = [str(path) for path in ranked + ([kth] if kth else []) if outside(path)]
        if escaped:  # the top-k record names a path outside: it is dropped whole
            dropped += escaped
            state["best_k_models"], state["kth_best_model_path"] = {}, ""
            state.pop("kth_value", None)
        for name in CHECKPOINT_PATH_FIELDS:
            if state.get(name) and outside(state[name]):
                dropped.append(str(state[name]))
                state[name] = ""
    if dropped:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"the checkpoint's ModelCheckpoint state names {len(dropped)} path(s) outside its checkpoint folder "
            f"({', '.join(sorted(set(dropped)))}); they are dropped, so nothing outside the folder is ever deleted."
        )
    return dropped
