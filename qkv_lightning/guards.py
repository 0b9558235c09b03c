"""Checks of a parsed command that need no data, model or checkpoint, run before anything is written: config files
that expand past a size limit (YAML alias bombs), trainer settings Lightning would accept silently or fail late on,
output folders that cannot be written or hold a ``config.yaml`` the tool did not write, and where ``validate`` /
``test`` / ``predict`` log (inside the run they evaluate, never a new ``version_N``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from qkv_lightning.errors import ConfigError
from qkv_lightning.files import check_replaceable
from qkv_lightning.loggers import CONFIG_ADVICE, CONFIG_FILE

MAX_CONFIG_NODES = 100_000
"""A config file may expand to at most this many YAML nodes (aliases counted at every use)."""

MAX_SEED = 2**32 - 1
"""The largest seed numpy and Lightning's ``seed_everything`` accept."""


class ConfigTooLarge(yaml.YAMLError):
    """A YAML document expands (through aliases) to more nodes than :data:`MAX_CONFIG_NODES`."""


def expanded_nodes(node: yaml.Node, limit: int) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (counted with memoisation, so in time linear
    in the document's size); stops counting past ``limit``."""
    sizes: dict[int, int] = {}

    def size(item: yaml.Node) -> int:
        known = sizes.get(id(item))
        if known is not None:
            return known
        total = 1
        if isinstance(item, yaml.SequenceNode):
            for child in item.value:
                total += size(child)
                if total > limit:
                    break
        elif isinstance(item, yaml.MappingNode):
            for key, value in item.value:
                total += size(key) + size(value)
                if total > limit:
                    break
        sizes[id(item)] = total
        return total

    return size(node)


def guarded_yaml_load(stream: str) -> Any:
    """jsonargparse's YAML loader, refusing documents that expand past :data:`MAX_CONFIG_NODES` nodes first."""
    from jsonargparse._loaders_dumpers import get_yaml_default_loader, yaml_load

    if isinstance(stream, str) and "*" in stream:  # without aliases a document cannot expand
        node = yaml.compose(stream, Loader=get_yaml_default_loader())
        if node is not None and expanded_nodes(node, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
            raise ConfigTooLarge(
                f"the config expands to more than {MAX_CONFIG_NODES:,} YAML nodes through its aliases (*name), far "
                "more than any config needs (a YAML alias bomb?); refusing to load it"
            )
    return yaml_load(stream)


def install_yaml_guard() -> None:
    """Make jsonargparse (every parser: fit / validate / test / predict and study) load YAML through
    :func:`guarded_yaml_load`."""
    import jsonargparse

    jsonargparse.set_loader("yaml", guarded_yaml_load, exceptions=(yaml.YAMLError,))


# ---------------------------------------------------------------------------------------------------- trainer
def check_trainer_settings(config: Any) -> None:
    """Settings Lightning accepts silently, rejects only once running, or rejects with a traceback.

    Raises:
        ConfigError: naming the setting.
    """
    trainer = config.get("trainer") or {}
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and (isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1):
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate} must be an integer >= 1.")
    interval = trainer.get("val_check_interval")
    if interval is not None and not (isinstance(interval, int | float) and interval > 0):  # also NaN
        raise ConfigError(
            f"trainer.val_check_interval={interval} must be positive: a number of training batches (int) or a "
            "fraction of the epoch in (0, 1] (float), or null for once per epoch."
        )
    check_seed(config)


def check_seed(config: Any) -> None:
    """``seed_everything`` must be a seed numpy accepts (Lightning fails with a traceback otherwise).

    Raises:
        ConfigError: naming the setting and the range.
    """
    seed = config.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed_everything={seed} must lie in [0, {MAX_SEED}] (2^32 - 1), the seeds numpy accepts.")


def check_writable_folder(path: str | os.PathLike, setting: str) -> None:
    """That ``path`` is (or can be created as) a folder this process can write into.

    Raises:
        ConfigError: naming ``setting`` when ``path`` is a file, or it (or the nearest existing folder above it) is
            not writable.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{setting}={path} is a file, not a folder; name a folder to write into.")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{setting}={path}: {existing} is a file, so the folder cannot be created; name another.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created ({existing} is not writable)"
        raise ConfigError(f"{setting}={path} {what}; set {setting} to a folder you can write into. Nothing was run.")


def _loggers(trainer: Any) -> list[Any]:
    logger = trainer.get("logger")
    if isinstance(logger, list):
        return logger
    return [] if logger in (None, True, False) else [logger]


def check_output_folders(config: Any) -> None:
    """``trainer.default_root_dir`` and every logger's ``save_dir`` must be writable, and without a logger the
    ``config.yaml`` the run saves into ``default_root_dir`` (else the working folder) must not replace a file the tool
    did not write (checked before any work; with a logger, when the stage is set up:
    :class:`qkv_lightning.loggers.LoggedSaveConfigCallback`)."""
    trainer = config.get("trainer") or {}
    if trainer.get("default_root_dir") and "://" not in str(trainer["default_root_dir"]):
        check_writable_folder(trainer["default_root_dir"], "trainer.default_root_dir")
    if trainer.get("logger") is False and "://" not in str(trainer.get("default_root_dir") or ""):
        log_dir = Path(trainer.get("default_root_dir") or os.getcwd()).expanduser()
        check_replaceable(log_dir / CONFIG_FILE, CONFIG_ADVICE)
    for i, logger in enumerate(_loggers(trainer)):
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        save_dir = init_args.get("save_dir") if init_args is not None else None
        if save_dir and "://" not in str(save_dir):
            name = "trainer.logger" if len(_loggers(trainer)) == 1 else f"trainer.logger[{i}]"
            check_writable_folder(save_dir, f"{name}.init_args.save_dir")


# ---------------------------------------------------------------------------------------------- where logs go
SAVE_DIR_NOT_GIVEN = "<trainer.default_root_dir>"
"""The CLI's default ``save_dir`` of a logger (the shipped configs give none): :func:`place_logs` replaces it, so that
``trainer.default_root_dir`` (default ``logs``) decides where a run's logs and checkpoints go, as in Lightning, unless
the logger's ``save_dir`` says otherwise."""


def _own_save_dir_default(class_path: str) -> Any:
    """The default ``save_dir`` of a logger class already imported (MLflow's ``./mlruns``, W&B's ``.``), or None."""
    import inspect
    import sys

    module, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    try:
        default = inspect.signature(cls).parameters["save_dir"].default if cls is not None else None
    except (KeyError, TypeError, ValueError):
        return None
    return None if default is inspect.Parameter.empty else default


def place_logs(config: Any) -> None:
    """Every logger whose ``save_dir`` was not given (:data:`SAVE_DIR_NOT_GIVEN`) writes under
    ``trainer.default_root_dir``, or, for a logger that has a default of its own (MLflow's ``./mlruns`` store, W&B's
    ``.``), where that default says, as Lightning would build it."""
    trainer = config.get("trainer") or {}
    root = trainer.get("default_root_dir") or "."
    for logger in _loggers(trainer):
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is not None and init_args.get("save_dir") == SAVE_DIR_NOT_GIVEN:
            own = _own_save_dir_default(str(logger.get("class_path", "")))
            init_args["save_dir"] = str(own if own is not None else root)


# ------------------------------------------------------------------------------------------- evaluation logs
EVALUATION_COMMANDS = ("validate", "test", "predict")


def evaluation_log_version(config: Any, subcommand: str) -> str | None:
    """Where ``validate`` / ``test`` / ``predict`` log with a TensorBoard or CSV logger whose version is not set:
    ``version_K/<subcommand>`` inside the run whose checkpoint they evaluate (``<save_dir>/<name>/version_K/...``),
    else ``<subcommand>`` beside the runs; never a new ``version_N``, so repeated evaluations do not shift the version
    numbers of later ``fit`` runs. None: leave the logger as configured."""
    trainer = config.get("trainer") or {}
    loggers = _loggers(trainer)
    if subcommand not in EVALUATION_COMMANDS or len(loggers) != 1:
        return None
    logger = loggers[0]
    class_path = str(logger.get("class_path", "")) if hasattr(logger, "get") else ""
    init_args = logger.get("init_args") if hasattr(logger, "get") else None
    if init_args is None or not class_path.endswith(("TensorBoardLogger", "CSVLogger")):
        return None
    if init_args.get("version") is not None:
        return None
    save_dir = Path(init_args.get("save_dir") or trainer.get("default_root_dir") or ".")
    name = init_args.get("name")
    run_dir = save_dir / name if name else save_dir
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and "://" not in str(ckpt_path) and Path(ckpt_path).exists():
        try:
            relative = Path(ckpt_path).resolve().relative_to(run_dir.resolve())
        except ValueError:
            relative = None
        if relative is not None and len(relative.parts) > 1 and re.fullmatch(r"version_\d+", relative.parts[0]):
            return f"{relative.parts[0]}/{subcommand}"
    return subcommand


def place_evaluation_logs(config: Any, subcommand: str) -> None:
    """Set the logger's version to :func:`evaluation_log_version` (when it is not None)."""
    version = evaluation_log_version(config, subcommand)
    if version is not None:
        _loggers(config["trainer"])[0].init_args["version"] = version
