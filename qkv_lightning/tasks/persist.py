"""The one way to build a task from stored settings: a checkpoint's hyper-parameters, or a study cell's config.

Every command that rebuilds a task (``convert``, ``export``, ``evaluate``, distillation's teacher, the study's cell
check, ``--ckpt_path`` in LightningCLI) goes through here, so the rules hold everywhere at once:

- **Only task classes are built.** A class path read from a file or a study axis is accepted when it names a
  subclass of the expected base (:class:`~qkv_lightning.tasks.base.TaskModule`, or ``LightningDataModule`` for a
  cell's data) defined in this package, or the very class the user's own config named (LightningCLI has validated
  and imported that one). Anything else is refused *before* its module is imported or anything is called: the
  check looks at the dotted path first, then at the object found.
- **Stored settings never choose where output goes.** :data:`OUTPUT_SETTINGS` (files to write, overwrite flags)
  are dropped from a checkpoint's hyper-parameters; only the user's config and command line set them.
- **A damaged file is an error naming it**, never a traceback: settings the class does not take, weights that do not
  fit (the file's layout itself is checked where it is read, :mod:`qkv_lightning.checkpoints.read`).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qkv_lightning.errors import CheckpointError, ConfigError

PACKAGE = "qkv_lightning."
"""Classes defined under this prefix may be imported by their dotted path: the package's own modules run no code
of a file's choosing when imported."""

OUTPUT_SETTINGS: dict[str, tuple[str, ...]] = {"generation": ("output_file", "overwrite")}
"""Settings (``section: keys``) that decide where a command writes or whether it may replace a file. A checkpoint
records them as the run had them; they are never taken from it."""

BOOKKEEPING = ("_class_path", "_instantiator")
"""Keys Lightning and :meth:`TaskModule.save_task_hyperparameters` add beside a task's own init arguments."""


def resolve_class(class_path: Any, base: type, setting: str, trusted: Iterable[str | None] = ()) -> type:
    """The class ``class_path`` names, if it is a subclass of ``base`` that may be built (see the module docstring).

    Args:
        class_path: the dotted path, as read from a file or a study axis.
        base: the class it must derive from.
        setting: what to name in the error (e.g. ``"model.class_path in ckpt.ckpt"``).
        trusted: class paths the user's own config named (validated and imported by LightningCLI): these are found
            in ``sys.modules``, never imported here.

    Raises:
        ConfigError: the path names something else, or nothing; nothing was imported or called.
    """
    refuse = ConfigError(
        f"{setting}={class_path!r} is not a {base.__name__} of qkv_lightning: only the package's own classes (e.g. "
        f"{_examples(base)}), or the class your own config names, are built from a file or a study axis. Nothing was "
        "imported or run."
    )
    if not isinstance(class_path, str) or not class_path.replace(".", "").replace("_", "").isalnum():
        raise refuse
    module_name, _, name = class_path.rpartition(".")
    if class_path in {t for t in trusted if t}:
        module = sys.modules.get(module_name)
    elif class_path.startswith(PACKAGE):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
    else:
        raise refuse
    cls = getattr(module, name, None) if module is not None else None
    if not (isinstance(cls, type) and issubclass(cls, base)) or inspect.isabstract(cls):
        raise refuse
    return cls


def _examples(base: type) -> str:
    if base.__name__ == "TaskModule" or base.__name__ in {path.rpartition(".")[2] for path in TASK_CLASSES}:
        return ", ".join(f"{PACKAGE}tasks.{path}" for path in TASK_CLASSES)
    return f"a class under {PACKAGE}data"


TASK_CLASSES = ("language_model.LanguageModel", "image_classifier.ImageClassifier", "sequence_tasks.SequenceTask")
"""The package's task classes, for error messages (any TaskModule subclass under the package is accepted)."""


def stored_settings(hparams: Any, source: str) -> tuple[str | None, dict[str, Any]]:
    """A checkpoint's hyper-parameters as (saved class path, init arguments), with the bookkeeping keys and the
    :data:`OUTPUT_SETTINGS` removed.

    The mapping itself was checked where the file was read (:func:`qkv_lightning.checkpoints.load_checkpoint_file`).
    """
    if hparams is None:
        return None, {}
    values = dict(hparams)
    class_path = values.pop("_class_path", None)
    values.pop("_instantiator", None)
    for section, keys in OUTPUT_SETTINGS.items():
        if isinstance(values.get(section), Mapping):
            values[section] = {k: v for k, v in values[section].items() if k not in keys}
    return class_path, values


def build_task(
    hparams: Any,
    source: str,
    *,
    expected: type,
    trusted: Iterable[str | None] = (),
    replace: Mapping[str, Any] | None = None,
    drop: Iterable[str] = (),
) -> Any:
    """The task a checkpoint's hyper-parameters describe, its network built (``configure_model``), no weights loaded.

    Args:
        hparams: the checkpoint's ``hyper_parameters``.
        source: the file, for errors.
        expected: the task class the caller needs (``TaskModule`` for any task, ``LanguageModel`` for ``export``); the
            saved class must be it or a subclass. Without a saved class path, this class is built unless it is
            abstract.
        trusted: class paths the user's own config named (see :func:`resolve_class`).
        replace: settings that replace the saved ones (e.g. another attention variant).
        drop: saved settings left out (e.g. ``init_from``: the rebuilt task starts from the checkpoint's weights).

    Raises:
        CheckpointError: the class is not a task of this package, or the settings do not build it.
    """
    class_path, values = stored_settings(hparams, source)
    if class_path is None:
        if inspect.isabstract(expected):
            raise CheckpointError(
                f"{source} records no task class (_class_path in its hyper_parameters); use a checkpoint that fit "
                "saved."
            )
        cls = expected
    else:
        try:
            cls = resolve_class(class_path, expected, f"_class_path in {source}", trusted)
        except ConfigError as error:
            raise CheckpointError(str(error)) from None
    for key in drop:
        values.pop(key, None)
    values.update(replace or {})
    try:
        task = cls(**values)
        task.configure_model()
    except (TypeError, ValueError, KeyError) as error:
        if isinstance(error, ConfigError | CheckpointError):
            raise CheckpointError(f"{source}: its saved settings do not build {cls.__name__}: {error}") from None
        raise CheckpointError(
            f"{source}: its saved settings do not build {cls.__name__} ({type(error).__name__}: {error}); the file "
            "was written by another version or altered. Use a checkpoint that fit saved with this tool."
        ) from None
    return task


def load_weights(task: Any, state: Mapping[str, Any], source: str) -> None:
    """Load ``state`` into ``task`` strictly; a mismatch is a :class:`CheckpointError` naming the file."""
    try:
        task.load_state_dict(state, strict=True)
    except RuntimeError as error:
        text = " ".join(str(error).split())
        raise CheckpointError(f"the weights in {source} do not fit its own saved settings: {text[:400]}") from None


def load_task(
    path: str | Path,
    *,
    expected: type,
    weights_only: bool = True,
    replace: Mapping[str, Any] | None = None,
    drop: Iterable[str] = (),
) -> tuple[Any, dict[str, Any]]:
    """The task of a single-file checkpoint, built by :func:`build_task` with its weights loaded, and the checkpoint.

    Raises:
        CheckpointError: a sharded folder (consolidate it first), an unreadable or unsafe file, a class that is not
            a task of this package, or weights that do not fit.
    """
    from qkv_lightning.checkpoints import is_sharded_checkpoint, load_checkpoint_file

    if is_sharded_checkpoint(path):
        raise CheckpointError(
            f"{path} is a sharded checkpoint folder; turn it into one file first: python cli.py consolidate {path} "
            "model.ckpt."
        )
    checkpoint = load_checkpoint_file(path, weights_only=weights_only)
    source = str(path)
    state = checkpoint["state_dict"]  # its layout checked by load_checkpoint_file
    task = build_task(checkpoint.get("hyper_parameters"), source, expected=expected, replace=replace, drop=drop)
    task.on_load_checkpoint(checkpoint)  # fills in tied parameters stored once
    load_weights(task, state, source)
    return task, checkpoint
