"""What the project adds to Lightning's loggers: the whole config as hyper-parameters, and TensorBoard event files
opened only when something is written."""

from __future__ import annotations

from typing import Any

import jsonargparse
from lightning.pytorch import Trainer
from lightning.pytorch.cli import SaveConfigCallback


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config into ``{"model.init_args.attention.sharing": "QKV", ...}`` with loggable values."""
    if isinstance(config, jsonargparse.Namespace):
        config = config.as_dict()
    if isinstance(config, dict):
        items: dict[str, Any] = {}
        for key, value in config.items():
            items.update(flatten(value, f"{prefix}{key}."))
        return items
    if isinstance(config, list | tuple):
        if all(isinstance(v, int | float | str | bool) or v is None for v in config):
            return {prefix[:-1]: str(list(config))}
        items = {}
        for i, value in enumerate(config):
            items.update(flatten(value, f"{prefix}{i}."))
        return items
    if config is None or isinstance(config, int | float | str | bool):
        return {prefix[:-1]: "null" if config is None else config}
    return {prefix[:-1]: str(config)}


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the log directory (overwriting on re-runs) and records the whole config, optimiser
    included, as hyper-parameters of every logger (TensorBoard's HParams tab).

    Both are written when the stage starts running (first validation, training, test or predict batch loop), after
    data and model setup and checkpoint restoring succeeded, so a command that fails before (bad data, a checkpoint
    that does not fit) never overwrites the config of the run it was pointed at (``fit --ckpt_path last``).
    """

    _stage: str = "fit"

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self._stage = stage

    def _save_now(self, trainer: Trainer, pl_module: Any) -> None:
        if not self.already_saved:
            super().setup(trainer, pl_module, self._stage)

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._save_now(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._save_now(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._save_now(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._save_now(trainer, pl_module)

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        params = {k: v for k, v in flatten(self.config).items() if not k.startswith(("config", "__"))}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)


class DeferredSummaryWriter:
    """Stands in for a TensorBoard logger's ``SummaryWriter`` until something is written.

    Lightning opens the writer, which creates an event file in the run's folder, before the data and the model are set
    up. Deferring it keeps the folder of a run untouched by a command that fails during setup, e.g. ``fit --ckpt_path
    last`` with a damaged data file.
    """

    def __init__(self, logger: Any) -> None:
        self._logger = logger
        self._writer: Any = None

    def _open(self) -> Any:
        if self._writer is None:
            self._logger._experiment = None
            self._writer = self._logger.experiment  # the real writer (creates the folder and the event file)
        return self._writer

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_logger", "_writer"):  # copying and pickling look these up
            raise AttributeError(name)
        return getattr(self._open(), name)
