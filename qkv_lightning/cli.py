"""The command line: LightningCLI's fit / validate / test / predict, plus the project's own commands.

``qkv-lightning fit --config configs/lm/wikitext2.yaml --config configs/variants/q-k=v.yaml`` trains; extra
commands (``study``, ``report``, ``bench``, ...) are registered in :data:`EXTRA_COMMANDS`. Errors about settings and
data are printed as one paragraph without a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jsonargparse
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

from qkv_lightning.callbacks.attention_maps import AttentionMaps
from qkv_lightning.callbacks.nonfinite import NonFiniteGuard
from qkv_lightning.callbacks.perf import PerfMonitor
from qkv_lightning.errors import CheckpointError, ConfigError, QKVError
from qkv_lightning.guards import (
    check_output_folders,
    check_seed,
    check_trainer_settings,
    install_yaml_guard,
    place_evaluation_logs,
)
from qkv_lightning.tasks.base import TaskModule

jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
install_yaml_guard()  # a config that expands past a size limit through YAML aliases is refused
# main() and the study runner hand LightningCLI its arguments explicitly; the warning about also seeing sys.argv
# (pytest's, a study's) is noise there.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")

EXTRA_COMMANDS: dict[str, str] = {
    "bench": "qkv_lightning.bench.models:main",
    "bench-attention": "qkv_lightning.bench.attention:main",
    "consolidate": "qkv_lightning.checkpoints:main",
    "report": "qkv_lightning.bench.report:main",
    "study": "qkv_lightning.study:main",
}
"""Extra subcommands: name -> ``module:function`` taking the remaining arguments (a list of strings)."""


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


class StrictArgumentParser(LightningArgumentParser):
    """Lightning's parser without argparse's abbreviations, also in the nested parsers of ``class_path`` settings:
    a mistyped option (``--model.init_args.attention.sharin``) is an error with a suggestion, not silently taken
    for the option it abbreviates."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


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


class QKVLightningCLI(LightningCLI):
    """LightningCLI whose task and data are chosen by the config (``model.class_path``, ``data.class_path``)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", LoggedSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False, "exit_on_error": False})
        kwargs.setdefault("parser_class", StrictArgumentParser)
        super().__init__(
            model_class=TaskModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def _set_seed(self) -> None:
        """Lightning's seeding, after checking the seed (it runs before :meth:`before_instantiate_classes`)."""
        if self.subcommand is not None:
            check_seed(self.config[self.subcommand])
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        """Checkpoints load with ``weights_only=True`` unless ``--weights_only false`` is given; and ``fit --ckpt_path
        last`` resumes the newest run that has a ``last.ckpt`` and keeps logging into its folder.

        Lightning looks for ``last`` only in the new run's checkpoint folder, which a fresh logger version leaves
        empty, so a plain re-run would start from scratch instead of resuming.
        """
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        if "weights_only" in config and config.get("weights_only") is None:
            config["weights_only"] = True
        check_trainer_settings(config)
        check_output_folders(config)
        if self.subcommand != "fit":
            place_evaluation_logs(config, self.subcommand)
            return
        if config.get("ckpt_path") != "last":
            return
        found = find_last_checkpoint(config)
        if found is None:
            return
        path, version = found
        config["ckpt_path"] = str(path)
        logger = config.get("trainer", {}).get("logger")
        if version is not None and isinstance(logger, jsonargparse.Namespace) and "init_args" in logger:
            logger.init_args["version"] = version

    def _parse_ckpt_path(self) -> None:
        """Lightning's re-parsing of a checkpoint's hyper-parameters into the model config (``--ckpt_path FILE``),
        reading the file safely: with ``weights_only`` (unless ``--weights_only false``), and a damaged, unsafe or
        foreign checkpoint is a :class:`CheckpointError` naming the file, before anything runs."""
        from qkv_lightning.checkpoints import load_checkpoint_file, recover_interrupted_swap

        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "hpc", "registry") or "://" in str(ckpt_path):
            return
        path = Path(ckpt_path)
        recover_interrupted_swap(path)
        if not path.exists():
            raise CheckpointError(f"ckpt_path={ckpt_path} does not exist; check the path, or pass --ckpt_path last.")
        if not path.is_file():
            return  # a sharded folder: checked before the run starts (check_checkpoint_fits_model)
        checkpoint = load_checkpoint_file(path, weights_only=config.get("weights_only") is not False)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        del checkpoint
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        saved_class = hparams.pop("_class_path", None)
        configured = (config.get("model") or {}).get("class_path")
        if saved_class and configured and saved_class != configured:
            raise CheckpointError(
                f"the checkpoint {path} was saved by model.class_path: checkpoint {saved_class}, but the config "
                f"builds {configured}; use a config of the same task (or another checkpoint). Nothing was run."
            )
        model = {"class_path": saved_class, "dict_kwargs": hparams} if saved_class else hparams
        configured_settings = flatten(config.get("model") or {})
        try:
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        except (ArgumentError, SystemExit) as error:
            raise CheckpointError(
                f"the hyper-parameters saved in {path} do not fit the configured model ({error}); use a config of "
                "the task that saved it."
            ) from None
        replaced = [
            f"model.{key}: {value!r} -> {flatten(self.config[subcommand]['model']).get(key)!r}"
            for key, value in configured_settings.items()
            if key.startswith("init_args.") and flatten(self.config[subcommand]["model"]).get(key, value) != value
        ]
        if replaced:
            rank_zero_warn(
                f"ckpt_path={path}: the model settings saved in the checkpoint replace the config's (Lightning's "
                f"rule for --ckpt_path FILE): {'; '.join(replaced)}. To train with other settings, start from the "
                "weights instead (e.g. TaskModule.load_from_checkpoint in your own script)."
            )

    def check_checkpoint_fits_strategy(self) -> None:
        """A sharded checkpoint folder can only be resumed by a sharding strategy: say so instead of a traceback."""
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        from qkv_lightning.checkpoints import is_sharded_checkpoint

        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if not ckpt_path or not is_sharded_checkpoint(ckpt_path):
            return
        if not isinstance(self.trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            raise CheckpointError(
                f"ckpt_path={ckpt_path} is a sharded (FSDP/FSDP2) checkpoint folder, but trainer.strategy is "
                f"{type(self.trainer.strategy).__name__}: resume it with the strategy that saved it (e.g. --config "
                f"configs/strategy/fsdp2.yaml), or turn it into one file with `python cli.py consolidate {ckpt_path} "
                f"consolidated.ckpt` and pass --ckpt_path consolidated.ckpt."
            )

    def check_checkpoint_fits_model(self) -> None:
        """Read ``ckpt_path`` safely and check that its weights fit the configured model, before anything runs."""
        from qkv_lightning.checkpoints import (
            METADATA_FILE,
            load_checkpoint_file,
            read_sharded_metadata,
            recover_interrupted_swap,
            sharded_weights_key,
        )

        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "hpc", "registry") or "://" in str(ckpt_path):
            return
        path = Path(ckpt_path)
        recover_interrupted_swap(path)
        weights_only = config.get("weights_only") is not False
        if path.is_dir():
            metadata = read_sharded_metadata(path)  # complete, its shards whole, every item safe to unpickle
            prefix = sharded_weights_key(metadata) + "."
            shapes = {
                key.removeprefix(prefix): tuple(item.size)
                for key, item in metadata.state_dict_metadata.items()
                if key.startswith(prefix) and hasattr(item, "size")
            }
            meta = load_checkpoint_file(path / METADATA_FILE, weights_only=weights_only, lightning=False)
            hparams, sharded = meta.get("hyper_parameters") or {}, True
        else:
            checkpoint = load_checkpoint_file(path, weights_only=weights_only)
            shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")}
            hparams, sharded = checkpoint.get("hyper_parameters") or {}, False
            del checkpoint
        if isinstance(self.model, TaskModule):
            self.model.check_checkpoint_fits(shapes, dict(hparams), str(path), sharded=sharded)

    def check_settings_fit_data(self) -> None:
        """The model's settings against what the data's settings decide (sequence length, image size), before any
        data is read."""
        settings_spec = getattr(self.datamodule, "settings_spec", None)
        if isinstance(self.model, TaskModule) and settings_spec is not None:
            self.model.check_data_spec(dict(settings_spec()), stage=str(self.subcommand))

    def preflight(self) -> None:
        """Every check that needs no data: settings against the data's settings, then the checkpoint (strategy,
        safe loading, fit to the model). Runs before Lightning writes or reads anything."""
        self.check_settings_fit_data()
        self.check_checkpoint_fits_strategy()
        self.check_checkpoint_fits_model()

    def before_fit(self) -> None:
        self.preflight()

    def before_validate(self) -> None:
        self.preflight()

    def before_test(self) -> None:
        self.preflight()

    def before_predict(self) -> None:
        self.preflight()
        check_output = getattr(self.model, "check_output_file", None)
        if check_output is not None:
            check_output(self.config[self.subcommand].get("ckpt_path"), self.trainer.world_size)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with an atomic checkpoint writer and TensorBoard event files opened only when first written."""
        from lightning.pytorch.loggers import TensorBoardLogger
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from qkv_lightning.checkpoints import AtomicCheckpointIO

        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError, ImportError, MisconfigurationException) as error:  # a trainer setting
            if isinstance(error, QKVError):
                raise
            text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            raise ConfigError(
                f"invalid configuration: Lightning rejects the trainer settings ({type(error).__name__}: {text}); "
                "check trainer.accelerator, trainer.devices, trainer.strategy and trainer.precision."
            ) from error
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and logger._experiment is None:
                logger._experiment = DeferredSummaryWriter(logger)
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(PerfMonitor, "perf")
        parser.add_lightning_class_args(AttentionMaps, "attention_maps")
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "logs", "name": "default"},
                },
                "trainer.enable_autolog_hparams": False,
            }
        )


_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Expected a path but",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)


def known_setting_names() -> set[str]:
    """Names of every setting a config can hold: Trainer arguments, and the init arguments (and dataclass fields)
    of the project's tasks, datamodules and callbacks. Used to suggest the intended name for a typo."""
    import lightning.pytorch as pl

    import qkv_lightning

    names: set[str] = set(inspect.signature(pl.Trainer.__init__).parameters)
    for info in pkgutil.walk_packages(qkv_lightning.__path__, "qkv_lightning."):
        if info.name.split(".")[1] not in ("tasks", "data", "callbacks", "nn", "parallel"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional dependency
            continue
        for obj in vars(module).values():  # config dataclasses: every field is a setting
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                names.update(field.name for field in dataclasses.fields(obj))
    pending: list[type] = [TaskModule, LightningDataModule, pl.Callback]
    seen: set[type] = set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        pending.extend(cls.__subclasses__())
        if not cls.__module__.startswith("qkv_lightning"):
            continue
        names.update(inspect.signature(cls.__init__).parameters)
    return names - {"self", "args", "kwargs"}


TOP_LEVEL_SETTINGS = (
    "model", "data", "trainer", "seed_everything", "ckpt_path", "weights_only", "optimizer", "lr_scheduler",
    "nonfinite", "config", "print_config",
)
"""Sections and settings at the top of a fit / validate / test / predict config."""

_STRUCTURE = {"init_args", "class_path", "dict_kwargs"}


def _suggest(name: str, vocabulary: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(name, list(vocabulary), n=1, cutoff=0.6)
    return close[0] if close and close[0] != name else None


def _hint_for_option(option: str, vocabulary: set[str]) -> str | None:
    """``'modle': did you mean 'model'?`` for the first part of a dotted option that is not a known name."""
    for segment in option.lstrip("-").split("=")[0].split("."):
        if not segment or segment in _STRUCTURE or segment.isdigit() or segment in vocabulary:
            continue
        close = _suggest(segment, sorted(vocabulary))
        return f"'{segment}': did you mean '{close}'?" if close else None
    return None


def _hint_for_class_path(message: str) -> list[str]:
    """``did you mean 'ModelCheckpoint'?`` for a class path naming a missing attribute of an existing module."""
    hints = []
    for module_name, attribute in dict.fromkeys(re.findall(r"module '([\w.]+)' has no attribute '(\w+)'", message)):
        try:
            names = [n for n in dir(importlib.import_module(module_name)) if not n.startswith("_")]
        except ImportError:
            continue
        close = _suggest(attribute, names)
        if close:
            hints.append(f"'{module_name}.{attribute}': did you mean '{module_name}.{close}'?")
    return hints


def explain_config_error(message: str, vocabulary: set[str] | None = None) -> str:
    """One paragraph from a jsonargparse error: the parts that say what is wrong, and a suggestion for a typo.

    Args:
        message: the error's text.
        vocabulary: known setting names for suggestions; None: every setting of the training commands.
    """
    parts: list[str] = []
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if line and not line.startswith(_NOISE) and line not in parts:
            parts.append(line)
    text = " ".join(parts) or message.strip()
    unknown = re.findall(r"does not accept option '([^']+)'", message)
    unknown += re.findall(r"Key '([^']+)' is not expected", message)
    unknown += re.findall(r"Option '([^']+)' is not accepted", message)
    for arguments in re.findall(r"unrecognized arguments: (.*)", message)[:1]:
        unknown += [a.split("=")[0] for a in arguments.split() if a.startswith("--")]
    hints: list[str] = []
    if unknown:
        if vocabulary is None:
            vocabulary = known_setting_names() | set(TOP_LEVEL_SETTINGS)
        hints += [hint for hint in (_hint_for_option(o, vocabulary) for o in dict.fromkeys(unknown)) if hint]
    hints += _hint_for_class_path(message)
    choice = re.search(r"invalid choice: '([^']+)' \(choose from (.*)\)", message)
    if choice:
        close = _suggest(choice.group(1), re.findall(r"'([^']+)'", choice.group(2)))
        if close:
            hints.append(f"did you mean '{close}'?")
    if hints:
        text += " " + " ".join(hints)
    return f"invalid configuration: {text} (see --help for the accepted settings)"


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
    logger = trainer.get("logger")
    if isinstance(logger, jsonargparse.Namespace) and "init_args" in logger:
        save_dir = Path(logger.init_args.get("save_dir") or trainer.get("default_root_dir") or ".")
        name = logger.init_args.get("name")
        run_dir = save_dir / name if name else save_dir
        if run_dir.is_dir():
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


def _load(target: str) -> Callable[[list[str]], int | None]:
    module_name, function = target.split(":")
    return getattr(importlib.import_module(module_name), function)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python cli.py`` and the ``qkv-lightning`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if argv is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = args
    try:
        if args and args[0] in ("-h", "--help"):
            print("extra commands: " + ", ".join(sorted(EXTRA_COMMANDS)) + " (each with --help)\n")
        if args and args[0] in EXTRA_COMMANDS:
            return int(_load(EXTRA_COMMANDS[args[0]])(args[1:]) or 0)
        QKVLightningCLI(args=None if argv is None else args)
        return 0
    except QKVError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ArgumentError as error:
        if debug:
            raise
        print(f"error: {explain_config_error(str(error))}", file=sys.stderr)
        return 2
    except ValueError as error:  # a setting rejected while the config is instantiated
        if debug or "Does not validate against any of the Union subtypes" not in str(error):
            raise
        print(f"error: {explain_config_error(str(error))}", file=sys.stderr)
        return 2
    except MisconfigurationException as error:  # Lightning rejects a trainer setting (devices, precision, ...)
        if debug:
            raise
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"error: invalid configuration: {text} (see --help for the accepted settings)", file=sys.stderr)
        return 2
