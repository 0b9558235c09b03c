"""The LightningCLI of this project: the strict parser, the task and data chosen by the config, the pre-flight checks
that run before Lightning reads or writes anything, and the ``--optimizer`` flag handed to the task's settings.

:mod:`qkv_lightning.cli` (the command table and the error boundary) runs it for ``fit`` / ``validate`` / ``test`` /
``predict``; the commands that read configs the way ``fit`` does (``study``, ``bench``, ``convert``) use
:meth:`QKVLightningCLI.parse_only` and :meth:`QKVLightningCLI.instantiate_without_trainer`.
"""

from __future__ import annotations

from argparse import ArgumentError
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jsonargparse
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from qkv_lightning.callbacks.attention_maps import AttentionMaps
from qkv_lightning.callbacks.nonfinite import NonFiniteGuard
from qkv_lightning.callbacks.perf import PerfMonitor
from qkv_lightning.data.hf_tokenizer import CHECKPOINT_ENTRY, checkpoint_tokenizer_file
from qkv_lightning.data.loading import use_resuming_fit_loop
from qkv_lightning.errors import CheckpointError, ConfigError, QKVError
from qkv_lightning.guards import (
    SAVE_DIR_NOT_GIVEN,
    check_output_folders,
    check_seed,
    check_trainer_settings,
    install_yaml_guard,
    place_evaluation_logs,
    place_logs,
)
from qkv_lightning.hints import register_parser
from qkv_lightning.loggers import DeferredSummaryWriter, LoggedSaveConfigCallback, flatten, logger_error
from qkv_lightning.quiet import command_filters
from qkv_lightning.quiet import install as install_quiet
from qkv_lightning.resume import (
    CheckpointInfo,
    check_class,
    check_fits,
    is_local_file_or_folder,
    read_checkpoint_info,
    resolve_last,
)
from qkv_lightning.tasks.base import TaskModule
from qkv_lightning.tasks.persist import resolve_class, stored_settings

jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
install_yaml_guard()  # a config that expands past a size limit through YAML aliases is refused
install_quiet()  # Lightning's tips and the warnings known to be harmless here are not printed (quiet.py says why)


DATA_MODULES = ("qkv_lightning.data.wikitext", "qkv_lightning.data.streaming", "qkv_lightning.data.images",
                "qkv_lightning.data.synthetic")
"""The modules of the project's datamodules (its tasks: :data:`qkv_lightning.tasks.persist.TASK_CLASSES`)."""


def import_short_names() -> None:
    """Import the project's task and datamodule classes, so that jsonargparse knows them by their short names
    (``--model.help LanguageModel``, ``--data WikiText``) also without a ``--config`` that imports them."""
    import importlib

    from qkv_lightning.tasks.persist import TASK_CLASSES

    for module in (*(f"qkv_lightning.tasks.{path.rpartition('.')[0]}" for path in TASK_CLASSES), *DATA_MODULES):
        importlib.import_module(module)


class StrictArgumentParser(LightningArgumentParser):
    """Lightning's parser without argparse's abbreviations, also in the nested parsers of ``class_path`` settings:
    a mistyped option (``--model.init_args.attention.sharin``) is an error with a suggestion, not silently taken
    for the option it abbreviates."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


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
        """Lightning's seeding (``seed_everything: true`` gives Lightning's seed, 0), after checking the seed (it runs
        before :meth:`before_instantiate_classes`), without its ``Seed set to N`` line: the seed is in the saved
        ``config.yaml`` and the checkpoint (quiet.py lists what else a run does not print)."""
        from lightning.fabric.utilities.seed import seed_everything

        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand is not None:
            check_seed(config)
        seed = config.get("seed_everything")
        if seed is not False:
            config["seed_everything"] = seed_everything(None if seed is True else seed, workers=True, verbose=False)

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's, with the warnings that do not hold for this command dropped (:func:`quiet.command_filters`)."""
        resuming = bool(self.config[subcommand].get("ckpt_path"))
        with command_filters(subcommand, resuming):
            super()._run_subcommand(subcommand)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        import_short_names()
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        register_parser(self.parser)  # its sections (model, trainer, perf, ...) are suggested for typos

    @classmethod
    def parse_only(cls, args: Sequence[str]) -> jsonargparse.Namespace:
        """The config of ``args`` (``--config FILE`` and options, no subcommand) parsed and checked by this CLI's
        parser, as ``fit`` would read it; nothing is instantiated or run (the study checks its cells with this)."""

        class ParseOnly(cls):
            def instantiate_classes(self) -> None:
                pass

        return ParseOnly(args=list(args), run=False).config

    @classmethod
    def instantiate_without_trainer(cls, args: Sequence[str]) -> tuple[TaskModule, Any, jsonargparse.Namespace]:
        """The task and the datamodule of the config of ``args`` (as :meth:`parse_only`), instantiated, and the parsed
        config; no Trainer is built and nothing runs (``report`` and ``bench`` load their configs with this)."""

        class Loader(cls):
            def instantiate_classes(self) -> None:
                self.config_init = self.parser.instantiate_classes(self.config)
                self.datamodule = self._get(self.config_init, "data")
                self.model = self._get(self.config_init, "model")
                self.trainer = None

        cli = Loader(args=list(args), run=False)
        return cli.model, cli.datamodule, cli.config

    def before_instantiate_classes(self) -> None:
        """Checkpoints load with ``weights_only=True`` unless ``--weights_only false`` is given; and ``--ckpt_path
        last`` is resolved for every subcommand (:func:`qkv_lightning.resume.resolve_last`): ``fit`` resumes the newest
        run that has a ``last.ckpt`` and keeps logging into its folder, the others fail without one.

        Lightning looks for ``last`` only in the new run's checkpoint folder, which a fresh logger version leaves
        empty, so a plain re-run would start from scratch instead of resuming (and an evaluation would report an
        untrained model).
        """
        place_logs(self.config[self.subcommand] if self.subcommand else self.config)  # default_root_dir decides
        apply_optimizer_flag(self.config[self.subcommand] if self.subcommand else self.config)
        apply_lr_scheduler_flag(self.config[self.subcommand] if self.subcommand else self.config)
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        if "weights_only" in config and config.get("weights_only") is None:
            config["weights_only"] = True
        check_trainer_settings(config)
        check_output_folders(config)
        resolve_last(config, self.subcommand)
        self.use_checkpoint_tokenizer(config)
        if self.subcommand != "fit":
            place_evaluation_logs(config, self.subcommand)  # after `last` is resolved: into the evaluated run

    def use_checkpoint_tokenizer(self, config: jsonargparse.Namespace) -> None:
        """With ``ckpt_path`` naming a checkpoint that stores its model's tokenizer (``import``, ``fit`` with
        ``data.tokenizer: hf``, ``convert``), the data reads that tokenizer when its settings name none
        (``data.tokenizer: hf`` without ``data.tokenizer_file``); another kind of tokenizer is refused
        (:func:`qkv_lightning.data.hf_tokenizer.checkpoint_tokenizer_file`). After ``last`` is resolved, so that
        ``--ckpt_path last`` is covered; the checkpoint is read once (:meth:`checkpoint_info`), and the stored
        tokenizer then by the data module, weights-only."""
        data, ckpt_path = config.get("data"), config.get("ckpt_path")
        settings = data.get("init_args") if isinstance(data, jsonargparse.Namespace) else None
        if not isinstance(settings, jsonargparse.Namespace) or not is_local_file_or_folder(ckpt_path):
            return
        if "tokenizer" not in settings or "tokenizer_file" not in settings:
            return  # a datamodule without a choice of tokenizer
        info = self.checkpoint_info(ckpt_path, config.get("weights_only") is not False)
        if info.sharded or CHECKPOINT_ENTRY not in info.entries:
            return
        recorded = (info.hparams.get("data_spec") or {}).get("tokenizer")
        path = checkpoint_tokenizer_file(settings.tokenizer, settings.tokenizer_file, str(info.path), recorded)
        if path is not None:
            settings["tokenizer_file"] = path
            rank_zero_info(f"data.tokenizer_file: {path} (the tokenizer ckpt_path stores, {recorded})")

    def instantiate_classes(self) -> None:
        """Lightning's, with a logger that cannot be created (a missing package, MLflow refusing its file store) said
        in one paragraph naming the extra to install (:func:`qkv_lightning.loggers.logger_error`)."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            config = self.config[self.subcommand] if self.subcommand else self.config
            explained = logger_error((config.get("trainer") or {}).get("logger"), error)
            if explained is None:
                raise
            raise explained from error

    def checkpoint_info(self, ckpt_path: str | Path, weights_only: bool) -> CheckpointInfo:
        """The checkpoint's shapes and hyper-parameters, read once per command (:mod:`qkv_lightning.resume`)."""
        key = (str(ckpt_path), weights_only)
        cache = self.__dict__.setdefault("_checkpoint_infos", {})
        if key not in cache:
            cache[key] = read_checkpoint_info(ckpt_path, weights_only)
        return cache[key]

    def _parse_ckpt_path(self) -> None:
        """Lightning's re-parsing of a checkpoint's hyper-parameters into the model config (``--ckpt_path FILE``),
        reading the file safely: with ``weights_only`` (unless ``--weights_only false``), and a damaged, unsafe or
        foreign checkpoint is a :class:`CheckpointError` naming the file, before anything runs."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not is_local_file_or_folder(ckpt_path):
            return
        info = self.checkpoint_info(ckpt_path, config.get("weights_only") is not False)
        if info.sharded:
            return  # a sharded folder: checked before the run starts (check_checkpoint_fits_model)
        path = info.path
        saved_class, hparams = stored_settings(info.hparams, str(path))  # output settings never come from a file
        if not hparams and not saved_class:
            return
        configured_class = (config.get("model") or {}).get("class_path")
        check_class(info, configured_class)
        if saved_class:  # vetted before jsonargparse imports it
            try:
                resolve_class(saved_class, TaskModule, f"_class_path in {path}", trusted=[configured_class])
            except ConfigError as error:
                raise CheckpointError(str(error)) from None
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
        """Read ``ckpt_path`` safely and check that it fits the configured model, before anything runs."""
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if not is_local_file_or_folder(ckpt_path):
            return
        info = self.checkpoint_info(ckpt_path, config.get("weights_only") is not False)
        if isinstance(self.model, TaskModule):
            check_fits(self.model, info)
            self.model.init_from_skipped = True  # the checkpoint's weights take precedence over model.init_from

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
        from qkv_lightning.callbacks.global_batch import GlobalBatch

        for callback in self.trainer.callbacks:
            if isinstance(callback, GlobalBatch):  # a batch the devices do not divide: said before anything runs
                callback.accumulation(self.trainer, self.datamodule)

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
        """The trainer, with an atomic checkpoint writer, TensorBoard event files opened only when first written, a
        fit loop that resumes at an epoch's end exactly (:class:`qkv_lightning.data.loading.ResumingFitLoop`), the
        model summary's FLOPs from the cost model, and no LearningRateMonitor without a logger."""
        from lightning.pytorch.callbacks import LearningRateMonitor
        from lightning.pytorch.loggers import TensorBoardLogger
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from qkv_lightning.callbacks.summary import with_cost_flops
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
        use_resuming_fit_loop(trainer)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and logger._experiment is None:
                logger._experiment = DeferredSummaryWriter(logger)
        trainer.callbacks = [with_cost_flops(c) for c in trainer.callbacks]  # the summary's FLOPs: ours, not 0
        monitors = [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]
        if monitors and not trainer.loggers:  # Lightning raises for it when fit starts; the shipped configs have one
            trainer.callbacks = [c for c in trainer.callbacks if c not in monitors]
            rank_zero_info("trainer.logger is false: the LearningRateMonitor of the config has no logger to write to "
                           "and is left out.")
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from torch.optim import Optimizer

        # LightningCLI's --optimizer CLASS (any torch.optim class, with its arguments as --optimizer.X); the task builds
        # it after FSDP wraps the network, over its named decay / no_decay groups (apply_optimizer_flag).
        parser.add_optimizer_args((Optimizer,), nested_key="optimizer")
        # and --lr_scheduler CLASS (any torch.optim.lr_scheduler class), which replaces the task's warm-up + cosine
        parser.add_lr_scheduler_args(nested_key="lr_scheduler")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(PerfMonitor, "perf")
        parser.add_lightning_class_args(AttentionMaps, "attention_maps")
        parser.set_defaults(
            {
                "trainer.default_root_dir": "logs",
                "trainer.logger": {  # save_dir: trainer.default_root_dir unless given (guards.place_logs)
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": SAVE_DIR_NOT_GIVEN, "name": "default"},
                },
                "trainer.enable_autolog_hparams": False,
            }
        )


def _take_flag(
    config: jsonargparse.Namespace, key: str, resolve: Callable[[str], type], what: str, saved_key: str, default: str,
    same: Callable[[str, type], bool],
) -> tuple[str, dict[str, Any], Any, type] | None:
    """A LightningCLI class flag (``--optimizer`` / ``--lr_scheduler``): its class path, its init arguments (every one,
    the class's defaults filled in by jsonargparse), the task's ``optimizer`` settings it goes to and the class
    (``resolve``); None when the flag is not given. A resumed run (``ckpt_path``) keeps the checkpoint's optimiser /
    schedule (``settings[saved_key]``, else ``default``): its state fits only that class.

    Raises:
        ConfigError: resuming, the flag names another class than the checkpoint's (``same`` says which are equal).
    """
    flag, model = config.get(key), config.get("model")
    if not flag or model is None:
        return None
    flag = flag.as_dict() if isinstance(flag, jsonargparse.Namespace) else dict(flag)
    target = model.get("init_args") if "class_path" in model else model
    if target.get("optimizer") is None:
        target["optimizer"] = jsonargparse.Namespace()
    class_path, settings = flag["class_path"], target["optimizer"]
    cls = resolve(class_path)
    saved = settings.get(saved_key) or default
    if config.get("ckpt_path") and not same(saved, cls):
        raise ConfigError(
            f"--{key} {class_path} with ckpt_path={config.get('ckpt_path')}: the run resumes with the checkpoint's "
            f"{what} ({saved}) and its state; to train with another {what}, start a new run from the weights instead."
        )
    return class_path, dict(flag.get("init_args") or {}), settings, cls


def _not_defaults(cls: type, values: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``values`` that differ from ``cls.__init__``'s defaults (those are the class's anyway), ``skip`` left out."""
    import inspect

    defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()}
    out = {}
    for key, value in values.items():
        default = defaults.get(key, inspect.Parameter.empty)
        if isinstance(value, list | tuple) and isinstance(default, list | tuple):
            value, default = tuple(value), tuple(default)
        if key not in skip and value != default:
            out[key] = value
    return out


def apply_optimizer_flag(config: jsonargparse.Namespace) -> None:
    """Hand LightningCLI's ``--optimizer CLASS --optimizer.X V`` to the task's ``model.optimizer`` settings, with
    LightningCLI's meaning: that class with its own defaults and the arguments given, nothing of the optimiser the
    config had (its ``lr``, ``weight_decay``, ``betas``, ``eps``, ``kwargs``).

    Lightning's own handling would build the optimiser from ``model.parameters()`` when the CLI starts: before the
    network exists (it is built in ``configure_model``) and before FSDP wraps it, and without the named ``decay`` /
    ``no_decay`` groups. So the class becomes ``model.optimizer.name``, its ``lr``, ``weight_decay``, ``betas`` and
    ``eps`` (as given, or the class's defaults) the settings of those names, its other arguments that differ from the
    class's defaults ``model.optimizer.kwargs``. The schedule is the task's (``--lr_scheduler`` replaces it), and so is
    ``decay_on`` (which parameters the weight decay applies to). ``--optimizer`` is then cleared, so the saved
    ``config.yaml`` and the checkpoint's hyper-parameters hold the optimiser once, in ``model.optimizer``.

    Raises:
        ConfigError: another class than the checkpoint's when resuming (``ckpt_path``): its state would not fit.
    """
    from qkv_lightning.tasks.optim import OPTIMIZER_OWN_SETTINGS, OptimizerConfig, optimizer_class

    taken = _take_flag(config, "optimizer", optimizer_class, "optimiser", "name", "AdamW",
                       lambda saved, cls: optimizer_class(saved) is cls)
    if taken is None:
        return
    class_path, init_args, settings, cls = taken
    own = OptimizerConfig.__dataclass_fields__
    for key in ("lr", "weight_decay", "betas", "eps"):
        value = init_args.get(key, 0.0 if key == "weight_decay" else own[key].default)  # none: the class has none
        settings[key] = tuple(value) if isinstance(value, list) else value
    settings["name"] = class_path
    settings["kwargs"] = _not_defaults(cls, init_args, skip=OPTIMIZER_OWN_SETTINGS)
    config["optimizer"] = None


def apply_lr_scheduler_flag(config: jsonargparse.Namespace) -> None:
    """Hand LightningCLI's ``--lr_scheduler CLASS --lr_scheduler.X V`` (any ``torch.optim.lr_scheduler`` class) to the
    task's settings: ``model.optimizer.schedule`` becomes the class, ``schedule_kwargs`` its arguments that differ
    from its defaults, and the project's schedule is removed (no warm-up; its other settings back at their defaults,
    unused). Cleared afterwards, as ``--optimizer``.

    Raises:
        ConfigError: another scheduler class than the checkpoint's when resuming (``ckpt_path``).
    """
    from qkv_lightning.tasks.optim import BUILTIN_SCHEDULES, OptimizerConfig, scheduler_class

    taken = _take_flag(config, "lr_scheduler", scheduler_class, "schedule", "schedule", "cosine",
                       lambda saved, cls: saved not in BUILTIN_SCHEDULES and scheduler_class(saved) is cls)
    if taken is None:
        return
    class_path, init_args, settings, cls = taken
    own = OptimizerConfig.__dataclass_fields__
    for key in ("warmup_fraction", "min_lr_ratio", "step_gamma"):
        settings[key] = own[key].default
    settings["step_milestones"] = own["step_milestones"].default_factory()
    settings["warmup_steps"] = 0
    settings["schedule"] = class_path
    settings["schedule_kwargs"] = _not_defaults(cls, init_args, skip=("optimizer",))
    config["lr_scheduler"] = None
