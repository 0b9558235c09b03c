"""What the project adds to Lightning's loggers: the whole config as hyper-parameters, logged once with the run's
final and best metrics; images through whichever logger is configured (TensorBoard, MLflow, W&B); and TensorBoard
event files opened only when something is written."""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
from typing import Any

import jsonargparse
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

from qkv_lightning.files import NotOwnedError, check_replaceable, write_sealed_text

LOWER_IS_BETTER_WORDS = ("loss", "ppl", "perplexity", "error", "bpc", "nll")
"""Metric names (their last part) containing one of these are better when smaller; others when larger."""


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better, by its name (``val/loss``, ``test/ppl``: yes; ``val/acc``:
    no)."""
    name = metric.lower().rsplit("/", 1)[-1]
    return any(word in name for word in LOWER_IS_BETTER_WORDS)


def _takes_metrics(logger: Any) -> bool:
    return "metrics" in inspect.signature(logger.log_hyperparams).parameters


def record_hyperparams(logger: Any, params: dict[str, Any]) -> None:
    """Record ``params`` early (TensorBoard's ``hparams.yaml``, MLflow's params, W&B's config), without metrics: a
    logger whose ``log_hyperparams`` takes metrics gets ``metrics={}``, which writes no HParams summary and no
    placeholder ``hp_metric = -1`` (:func:`log_hyperparams_and_metrics` writes the one summary at the end)."""
    if _takes_metrics(logger):
        logger.log_hyperparams(params, metrics={})
    else:
        logger.log_hyperparams(params)


def log_hyperparams_and_metrics(
    logger: Any, params: dict[str, Any], metrics: dict[str, float], step: int, recorded: bool = False
) -> None:
    """Record ``params`` with ``metrics`` through the logger's API: a logger whose ``log_hyperparams`` takes metrics
    (TensorBoard: its HParams tab, whose columns are these metrics) gets them there; any other (MLflow, W&B, CSV)
    gets ``log_hyperparams(params)`` (unless ``recorded`` already) and ``log_metrics(metrics, step)``. No placeholder
    ``hp_metric`` is written."""
    if _takes_metrics(logger):
        kwargs: dict[str, Any] = {"metrics": dict(metrics)}  # {} (not None) writes no hp_metric = -1
        if "step" in inspect.signature(logger.log_hyperparams).parameters:
            kwargs["step"] = step
        logger.log_hyperparams(params, **kwargs)
        return
    if not recorded:
        logger.log_hyperparams(params)
    if metrics:
        logger.log_metrics(dict(metrics), step=step)


def image_pixels(image: Any) -> Any:
    """An image (H, W) with values in [0, 1] (a tensor) as a uint8 numpy array."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def log_image(logger: Any, tag: str, image: Any, step: int) -> bool:
    """Log a grey-scale image (H, W), values in [0, 1], through ``logger``'s own image API: W&B's
    ``log_image``, TensorBoard's ``add_image``, MLflow's ``log_image`` (an artifact ``<tag>/step_<step>.png``).
    Returns False for a logger that stores no images (e.g. CSV)."""
    pixels = image_pixels(image)  # (H, W) uint8
    if callable(getattr(logger, "log_image", None)):  # W&B (Lightning's WandbLogger.log_image)
        logger.log_image(key=tag, images=[pixels], step=step)
        return True
    experiment = logger.experiment
    if callable(getattr(experiment, "add_image", None)):  # TensorBoard's SummaryWriter
        experiment.add_image(tag, pixels[None], step, dataformats="CHW")
        return True
    run_id = getattr(logger, "run_id", None)
    if run_id is not None and callable(getattr(experiment, "log_image", None)):  # MLflow's client
        experiment.log_image(run_id, pixels, f"{tag}/step_{step:06d}.png")
        return True
    return False


class ImageLogging:
    """Logs images to every logger of a trainer that can store them, and says once which cannot (not silently)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._warned: set[str] = set()

    def __call__(self, trainer: Trainer, images: dict[str, Any], step: int) -> None:
        for logger in trainer.loggers:
            stored = all([log_image(logger, tag, image, step) for tag, image in images.items()])
            name = type(logger).__name__
            if not stored and name not in self._warned:
                self._warned.add(name)
                rank_zero_warn(f"{self.what}: {name} stores no images, so they are not logged there.")


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


def final_and_best(history: list[dict[str, float]], best_seen: dict[str, float] | None = None) -> dict[str, float]:
    """``final/<name>`` (the last value) and ``best/<name>`` (the best value, in the direction of
    :func:`lower_is_better`, also against ``best_seen``) of each metric in ``history`` (one mapping per evaluation)."""
    out: dict[str, float] = {}
    names = dict.fromkeys(name for record in history for name in record)
    for name in names:
        values = [record[name] for record in history if name in record and math.isfinite(record[name])]
        if name in (best_seen or {}) and math.isfinite(best_seen[name]):
            values.append(best_seen[name])
        last = [record[name] for record in history if name in record]
        if last:
            out[f"final/{name}"] = last[-1]
        if values:
            out[f"best/{name}"] = min(values) if lower_is_better(name) else max(values)
    return out


def _scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The scalar metrics named ``<prefix>/...`` (not their token counts)."""
    out = {}
    for name, value in metrics.items():
        if name.startswith(f"{prefix}/") and not name.endswith("/tokens"):
            try:
                out[name] = float(value)
            except (TypeError, ValueError):
                continue
    return out


CONFIG_FILE = "config.yaml"
"""The name of the config a run saves in its log directory (Lightning's default)."""

CONFIG_ADVICE = "set trainer.default_root_dir (or the logger's save_dir or version) to another folder"
"""What a run can do when a ``config.yaml`` it did not write stands where it saves its config."""


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the log directory and records the whole config, optimiser included, as
    hyper-parameters of every logger, once, with the run's metrics: for ``fit`` the final and the best value of every
    validation metric (``final/val/loss``, ``best/val/loss``: TensorBoard's HParams columns; MLflow and W&B get them
    as metrics), for ``validate`` and ``test`` their final metrics.

    ``config.yaml`` is written atomically under a seal (:func:`qkv_lightning.files.sealed`): a re-run replaces the
    config an earlier run saved, but never a file the tool did not write there (the user's own ``config.yaml`` in
    ``trainer.default_root_dir``, or a saved one the user edited); that is refused when the stage is set up, before
    it runs (and, where the folder is known from the settings, before anything: :func:`qkv_lightning.guards
    .check_output_folders`).

    ``config.yaml`` is written when the stage starts running (first validation, training, test or predict batch
    loop), after data and model setup and checkpoint restoring succeeded, so a command that fails before (bad data, a
    checkpoint that does not fit) never overwrites the config of the run it was pointed at (``fit --ckpt_path
    last``); the hyper-parameters are recorded then too (``hparams.yaml``), and logged with the metrics when the
    stage ends (or fails, with the metrics so far). The best value
    of the metric a ``ModelCheckpoint`` monitors also counts its ``best_model_score``, which survives a resume.
    """

    _stage: str = "fit"
    _params: dict[str, Any] | None = None  # class defaults: on_exception can come before setup (bad data)
    _logged: bool = False

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self._stage = stage
        self._params: dict[str, Any] | None = None
        self._history: list[dict[str, float]] = []
        self._logged = False
        self.check_config_file(trainer)

    def check_config_file(self, trainer: Trainer) -> None:
        """Refuse, on every rank, a ``config.yaml`` in the log directory that the tool did not write."""
        if self.already_saved or not self.save_to_log_dir:
            return
        path = os.path.join(trainer.log_dir, self.config_filename)  # log_dir broadcasts
        refusal = None
        if trainer.is_global_zero and "://" not in path:
            try:
                check_replaceable(path, CONFIG_ADVICE)
            except NotOwnedError as error:
                refusal = str(error)
        refusal = trainer.strategy.broadcast(refusal)
        if refusal:
            raise NotOwnedError(refusal)

    def _save_now(self, trainer: Trainer, pl_module: Any) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir if self.save_to_log_dir else None  # broadcasts
        if log_dir is None or "://" in log_dir:  # not saved, or a remote log folder: Lightning's writer
            super().setup(trainer, pl_module, self._stage)
            return
        if trainer.is_global_zero:
            os.makedirs(log_dir, exist_ok=True)
            write_sealed_text(os.path.join(log_dir, self.config_filename), self.dumped_config(), CONFIG_ADVICE)
            self.save_config(trainer, pl_module, self._stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def dumped_config(self) -> str:
        """The config as Lightning saves it (nulls kept)."""
        try:
            return self.parser.dump(self.config, skip_unset=False)  # jsonargparse >= 4.49
        except (TypeError, ValueError):  # an earlier jsonargparse: the old name
            return self.parser.dump(self.config, skip_none=False)

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._save_now(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._save_now(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._save_now(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._save_now(trainer, pl_module)

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """Record the flattened config now (no HParams summary yet); it is logged with the metrics when the stage
        ends."""
        self._params = {k: v for k, v in flatten(self.config).items() if not k.startswith(("config", "__"))}
        for logger in trainer.loggers:
            record_hyperparams(logger, self._params)

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self._history.append(_scalars(trainer.callback_metrics, "val"))
        if trainer.state.fn == "validate":
            self.log_once(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: Any) -> None:
        self._history.append(_scalars(trainer.callback_metrics, "test"))
        self.log_once(trainer)

    def on_predict_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.log_once(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.log_once(trainer)

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        self.log_once(trainer)

    def run_metrics(self, trainer: Trainer) -> dict[str, float]:
        """``final/...`` and ``best/...`` of the evaluations so far (see :func:`final_and_best`)."""
        best_seen = {}
        for callback in trainer.checkpoint_callbacks:
            monitor, score = getattr(callback, "monitor", None), getattr(callback, "best_model_score", None)
            if monitor and score is not None:
                best_seen[monitor] = float(score)
        return final_and_best(self._history, best_seen)

    def log_once(self, trainer: Trainer) -> None:
        """Log the hyper-parameters with :meth:`run_metrics` to every logger, once per stage."""
        if self._logged or self._params is None:
            return
        self._logged = True
        metrics = self.run_metrics(trainer)
        for logger in trainer.loggers:
            log_hyperparams_and_metrics(logger, self._params, metrics, trainer.global_step, recorded=True)


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


# ----------------------------------------------------------------------------------- loggers that cannot start
LOGGER_EXTRAS: dict[str, tuple[str, str]] = {"MLFlowLogger": ("mlflow", "mlflow"), "WandbLogger": ("wandb", "wandb")}
"""Logger class -> (the module it needs, the extra of this package that installs it)."""


def logger_error(logger_settings: Any, error: BaseException) -> Exception | None:
    """One paragraph for a logger that could not be created (``trainer.logger``), from the exception jsonargparse
    raised while instantiating it (a union error whose cause is the logger's own): a missing package names the extra
    that installs it (``pip install -e ".[mlflow]"``), anything else the logger's own message. None when ``error`` did
    not come from creating a logger."""
    from qkv_lightning.errors import ConfigError

    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    settings = logger_settings if isinstance(logger_settings, list) else [logger_settings]
    kinds = [str(s.get("class_path", "")).rpartition(".")[2] for s in settings if hasattr(s, "get")]
    if cause is error or not kinds or "loggers.logger.Logger" not in str(error):
        return None
    kind = next((k for k in kinds if k in str(cause) or k in LOGGER_EXTRAS), kinds[0])
    module, extra = LOGGER_EXTRAS.get(kind, ("", ""))
    # the package is missing: an ImportError, or (jsonargparse < 4.50 reports it as a union error) no such module
    if module and (isinstance(cause, ImportError) or importlib.util.find_spec(module) is None):
        return ConfigError(
            f"trainer.logger={kind} needs the {module} package, which is not installed: pip install -e \".[{extra}]\" "
            f"in the checkout (pip install \"qkv-lightning[{extra}]\" otherwise), or choose another logger (e.g. "
            "--trainer.logger CSVLogger)."
        )
    text = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    if "MLFLOW_ALLOW_FILE_STORE" in text:  # MLflow >= 3.? refuses the file store Lightning's MLFlowLogger uses
        return ConfigError(
            f"trainer.logger={kind} could not be created: MLflow keeps its file store (Lightning's default, save_dir "
            "./mlruns) behind MLFLOW_ALLOW_FILE_STORE=true (\"The filesystem tracking backend is in maintenance "
            "mode\"): set that variable, or give a database store, e.g. --trainer.logger.tracking_uri "
            "sqlite:///mlflow.db."
        )
    return ConfigError(f"trainer.logger={kind} could not be created ({type(cause).__name__}: {text}).")
