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
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from qkv_lightning.callbacks.attention_maps import AttentionMaps
from qkv_lightning.callbacks.nonfinite import NonFiniteGuard
from qkv_lightning.callbacks.perf import PerfMonitor
from qkv_lightning.errors import CheckpointError, QKVError
from qkv_lightning.tasks.base import TaskModule

jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
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
    included, as hyper-parameters of every logger (TensorBoard's HParams tab)."""

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        params = {k: v for k, v in flatten(self.config).items() if not k.startswith(("config", "__"))}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)


class QKVLightningCLI(LightningCLI):
    """LightningCLI whose task and data are chosen by the config (``model.class_path``, ``data.class_path``)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", LoggedSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False, "exit_on_error": False})
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

    def before_instantiate_classes(self) -> None:
        """``fit --ckpt_path last``: resume the newest run that has a ``last.ckpt`` and keep logging into its folder.

        Lightning looks for ``last`` only in the new run's checkpoint folder, which a fresh logger version leaves
        empty, so a plain re-run would start from scratch instead of resuming.
        """
        if self.subcommand != "fit":
            return
        config = self.config["fit"]
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

    def before_fit(self) -> None:
        self.check_checkpoint_fits_strategy()

    def before_validate(self) -> None:
        self.check_checkpoint_fits_strategy()

    def before_test(self) -> None:
        self.check_checkpoint_fits_strategy()

    def before_predict(self) -> None:
        self.check_checkpoint_fits_strategy()

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


def explain_config_error(message: str) -> str:
    """One paragraph from a jsonargparse error: the parts that say what is wrong, and a suggestion for a typo."""
    parts = []
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if line and not line.startswith(_NOISE):
            parts.append(line)
    text = " ".join(parts) or message.strip()
    unknown = re.findall(r"does not accept option '([^']+)'", message)
    unknown += re.findall(r"Key '([^']+)' is not expected", message)
    unknown += [a.lstrip("-").split("=")[0] for a in re.findall(r"unrecognized arguments: (.*)", message)[:1][0].split()] if (
        "unrecognized arguments" in message
    ) else []
    if unknown:
        vocabulary = sorted(known_setting_names())
        hints = []
        for option in unknown:
            leaf = option.split(".")[-1]
            close = difflib.get_close_matches(leaf, vocabulary, n=1, cutoff=0.6)
            if close and close[0] != leaf:
                hints.append(f"'{option}': did you mean '{close[0]}'?")
        if hints:
            text += " " + " ".join(hints)
    return f"invalid configuration: {text} (see --help for the accepted settings)"


def find_last_checkpoint(config: Any) -> tuple[Path, str | int | None] | None:
    """The newest ``last.ckpt`` of the configured logger's runs (``save_dir/name/version_*/checkpoints``) and the
    version it belongs to, or None. A ModelCheckpoint with an explicit ``dirpath`` is searched first."""
    trainer = config.get("trainer", {})
    candidates: list[tuple[Path, str | int | None]] = []
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args", {}) if isinstance(callback, jsonargparse.Namespace) else {}
        if "ModelCheckpoint" in str(callback.get("class_path", "")) and init_args.get("dirpath"):
            candidates.append((Path(init_args["dirpath"]) / "last.ckpt", None))
    logger = trainer.get("logger")
    if isinstance(logger, jsonargparse.Namespace) and "init_args" in logger:
        save_dir = Path(logger.init_args.get("save_dir") or trainer.get("default_root_dir") or ".")
        name = logger.init_args.get("name")
        run_dir = save_dir / name if name else save_dir
        if run_dir.is_dir():
            for version_dir in run_dir.iterdir():
                last = version_dir / "checkpoints" / "last.ckpt"
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
