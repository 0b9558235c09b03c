"""The command line: LightningCLI's fit / validate / test / predict, plus the project's own commands.

``qkv-lightning fit --config configs/lm/wikitext2.yaml --config configs/variants/q-k=v.yaml`` trains; extra
commands (``study``, ``report``, ``bench``, ...) are registered in :data:`EXTRA_COMMANDS`. Errors about settings and
data are printed as one paragraph without a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jsonargparse
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from qkv_lightning.errors import QKVError
from qkv_lightning.tasks.base import TaskModule

jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

EXTRA_COMMANDS: dict[str, str] = {
    "bench-attention": "qkv_lightning.bench.attention:main",
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
        kwargs.setdefault("parser_kwargs", {"default_env": False})
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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "logs", "name": "default"},
                },
                "trainer.enable_autolog_hparams": False,
            }
        )


def _load(target: str) -> Callable[[list[str]], int | None]:
    module_name, function = target.split(":")
    return getattr(importlib.import_module(module_name), function)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python cli.py`` and the ``qkv-lightning`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        if args and args[0] in ("-h", "--help"):
            print("extra commands: " + ", ".join(sorted(EXTRA_COMMANDS)) + " (each with --help)\n")
        if args and args[0] in EXTRA_COMMANDS:
            return int(_load(EXTRA_COMMANDS[args[0]])(args[1:]) or 0)
        QKVLightningCLI(args=args)
        return 0
    except QKVError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
