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
    """What the checks need from a checkpoint, read once: its weights' shapes and its hyper-parameters."""

    path: Path
    sharded: bool
    shapes: dict[str, tuple[int, ...]]
    hparams: dict[str, Any] = field(default_factory=dict)

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
    )

    path = Path(ckpt_path)
    recover_interrupted_swap(path)  # an FSDP2 save that a crash interrupted between its renames
    if not path.exists():
        raise CheckpointError(f"ckpt_path={ckpt_path} does not exist; check the path, or pass --ckpt_path last.")
    if path.is_dir():
        metadata = read_sharded_metadata(path)  # complete, and its index safe to unpickle
        shapes = {
            key.removeprefix("state_dict."): tuple(item.size)
            for key, item in metadata.state_dict_metadata.items()
            if key.startswith("state_dict.") and hasattr(item, "size")
        }
        meta = load_checkpoint_file(path / METADATA_FILE, weights_only=weights_only, lightning=False)
        return CheckpointInfo(path, True, shapes, _plain_hparams(meta.get("hyper_parameters")))
    checkpoint = load_checkpoint_file(path, weights_only=weights_only)
    shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")}
    return CheckpointInfo(path, False, shapes, _plain_hparams(checkpoint.get("hyper_parameters")))


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


def find_last_checkpoint(config: Any) -> tuple[Path, str | int | None] | None:
    """The newest ``last.ckpt`` of the configured logger's runs (``save_dir/name/version_*/checkpoints``) and the
    version it belongs to, or None. A ModelCheckpoint with an explicit ``dirpath`` is searched first."""
    from qkv_lightning.checkpoints import recover_interrupted_swap

    trainer = config.get("trainer", {})
    candidates: list[tuple[Path, str | int | None]] = []
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args", {}) if isinstance(callback, jsonargparse.Namespace) else {}
        if "ModelCheckpoint" in str(callback.get("class_path", "")) and init_args.get("dirpath"):
            candidates.append((Path(init_args["dirpath"]) / "last.ckpt", None))
            recover_interrupted_swap(candidates[-1][0])
    run_dir = logger_run_dir(config)
    if run_dir is not None and run_dir.is_dir():
        for version_dir in run_dir.iterdir():
            last = version_dir / "checkpoints" / "last.ckpt"
            if version_dir.name.startswith("version_") and version_dir.is_dir():
                recover_interrupted_swap(last)  # an FSDP2 save that a crash interrupted between its renames
            if version_dir.name.startswith("version_") and last.exists():
                version = version_dir.name.removeprefix("version_")
                candidates.append((last, int(version) if version.isdigit() else version_dir.name))
    existing = [(path, version) for path, version in candidates if path.exists()]
    if not existing:
        return None
    return max(existing, key=lambda item: item[0].stat().st_mtime)


def logger_run_dir(config: Any) -> Path | None:
    """The configured logger's folder of runs (``save_dir/name``), or None without a logger that has one."""
    trainer = config.get("trainer", {})
    logger = trainer.get("logger")
    if not (isinstance(logger, jsonargparse.Namespace) and "init_args" in logger):
        return None
    save_dir = Path(logger.init_args.get("save_dir") or trainer.get("default_root_dir") or ".")
    name = logger.init_args.get("name")
    return save_dir / name if name else save_dir


def resolve_last(config: Any, subcommand: str) -> None:
    """Turn ``ckpt_path: last`` into the newest run's ``last.ckpt`` for every subcommand, in place.

    ``fit`` then keeps logging into that run's folder (its logger version), and starts from scratch when there is no
    run yet. ``validate``, ``test`` and ``predict`` need a checkpoint: without one, evaluating would report an
    untrained model's numbers, so that is an error.

    Raises:
        CheckpointError: for ``validate`` / ``test`` / ``predict`` when no run has a ``last.ckpt``.
    """
    if config.get("ckpt_path") != "last":
        return
    found = find_last_checkpoint(config)
    if found is None:
        if subcommand == "fit":
            return
        where = logger_run_dir(config)
        raise CheckpointError(
            f"{subcommand} --ckpt_path last: no last.ckpt was found"
            f"{f' under {where}/version_*/checkpoints' if where is not None else ''}, so there is no trained model to "
            f"{'generate with' if subcommand == 'predict' else 'evaluate'}. Train it first (fit, with a "
            "ModelCheckpoint(save_last=True) callback), point trainer.logger.init_args.save_dir / name at its run, or "
            "give --ckpt_path FILE."
        )
    path, version = found
    config["ckpt_path"] = str(path)
    logger = config.get("trainer", {}).get("logger")
    if subcommand == "fit" and version is not None and isinstance(logger, jsonargparse.Namespace):
        if "init_args" in logger:
            logger.init_args["version"] = version
