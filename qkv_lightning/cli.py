"""The command line: the command table and :func:`main`, the one error boundary of every command.

``qkv-lightning fit --config configs/lm/wikitext2.yaml --config configs/variants/q-k=v.yaml`` trains (LightningCLI,
:mod:`qkv_lightning.lightning_cli`); the other commands (``study``, ``report``, ``bench``, ...) are registered in
:data:`EXTRA_COMMANDS`, each a ``main(argv) -> int`` that parses with :mod:`qkv_lightning.command_line`. A known error
(a setting, a file or a checkpoint to fix) is printed as one paragraph ``error: ...`` with exit code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys
from argparse import ArgumentError
from collections.abc import Callable, Sequence

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qkv_lightning.command_line import command_overview, suggest
from qkv_lightning.config_files import resolve_config_args
from qkv_lightning.data.progress import show_data_progress
from qkv_lightning.errors import ConfigError, QKVError
from qkv_lightning.hints import explain_config_error
from qkv_lightning.lightning_cli import QKVLightningCLI

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a task: --config configs/...yaml (repeatable), then --model..., --data..., --trainer... options",
    "validate": "the validation metrics of a checkpoint (--ckpt_path FILE, or last: the newest run's last.ckpt)",
    "test": "the test metrics of a checkpoint (--ckpt_path FILE or last)",
    "predict": "run a checkpoint on the predict split (a language model generates text)",
}
"""LightningCLI's subcommands, with their one-line summaries."""

EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "analyze": ("qkv_lightning.analysis.analyze:main", "what a trained checkpoint's attention learned: ranks, angles"),
    "bench": ("qkv_lightning.bench.models:main", "time and memory of every variant of a task config on this device"),
    "bench-attention": ("qkv_lightning.bench.attention:main", "the attention core against timm and torch's MHA"),
    "bench-decode": ("qkv_lightning.bench.decode:main", "prefill and KV-cached decoding of every variant of an LM"),
    "configs": ("qkv_lightning.config_files:main", "list the shipped configs, as qkv:NAME for --config"),
    "consolidate": ("qkv_lightning.checkpoints.consolidate:main", "one file from a sharded checkpoint folder"),
    "convert": ("qkv_lightning.uptrain.convert:main", "turn a trained checkpoint into another attention variant"),
    "evaluate": ("qkv_lightning.evaluate:main", "downstream tasks of a language model through lm-eval-harness"),
    "export": ("qkv_lightning.export:main", "a GPT as graphs with an explicit KV cache, or as a GPT-2 folder"),
    "import": ("qkv_lightning.interop.command:main", "GPT-2/Llama/GGUF/timm/the authors' weights as a checkpoint"),
    "report": ("qkv_lightning.bench.report:main", "parameters, FLOPs and KV-cache bytes of every variant, closed form"),
    "study": ("qkv_lightning.study:main", "train variants x seeds under one budget and compare them, with statistics"),
}
"""The other commands: name -> (``module:function`` taking the remaining arguments, one-line summary)."""


def _load(target: str) -> Callable[[list[str]], int | None]:
    module_name, function = target.split(":")
    return getattr(importlib.import_module(module_name), function)


def _paragraph(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe(error: BaseException) -> str | None:
    """The one paragraph that :func:`main` prints for a known error (None: not a known one, shown as a traceback)."""
    if isinstance(error, QKVError):
        return _paragraph(str(error))
    if isinstance(error, ArgumentError) or (  # a setting LightningCLI's parser rejects, when parsed or instantiated
        isinstance(error, ValueError) and "Does not validate against any of the Union subtypes" in str(error)
    ):
        return explain_config_error(str(error))
    if isinstance(error, MisconfigurationException):  # Lightning rejects a trainer setting (devices, precision, ...)
        return f"invalid configuration: {_paragraph(str(error))} (see --help for the accepted settings)"
    if isinstance(error, OSError):
        where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        what = error.strerror or _paragraph(str(error)) or type(error).__name__
        return f"{where}: {what}" if where else f"{what} ({type(error).__name__})"
    if isinstance(error, yaml.YAMLError):
        return f"cannot read a YAML file: {_paragraph(str(error))}"
    return None


def run(args: list[str], from_sys_argv: bool) -> int:
    """Run the command of ``args`` (the arguments after ``cli.py``); returns its exit code."""
    commands = {**LIGHTNING_COMMANDS, **{name: summary for name, (_, summary) in EXTRA_COMMANDS.items()}}
    if not args or args[0] in ("-h", "--help"):
        print(command_overview(commands))
        return 0 if args else 2
    args = resolve_config_args(args)  # qkv:NAME and configs/NAME name the shipped configs (config_files.py)
    if args[0] in EXTRA_COMMANDS:
        return int(_load(EXTRA_COMMANDS[args[0]][0])(args[1:]) or 0)
    if not args[0].startswith("-") and args[0] not in LIGHTNING_COMMANDS:
        close = suggest(args[0], commands)
        raise ConfigError(
            f"invalid choice: '{args[0]}' is not a command{f'; did you mean {close!r}?' if close else '.'} The "
            f"commands: {', '.join(commands)} (`cli.py --help` lists them with one line each)."
        )
    if from_sys_argv:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = args
    QKVLightningCLI(args=None if from_sys_argv else args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python cli.py`` and the ``qkv-lightning`` console script; returns the exit code.

    The one error boundary: a known error (:func:`describe`) of any command is printed as one paragraph
    ``error: ...`` and gives exit code 2; ``--debug`` anywhere on the command line re-raises it with its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if argv is None:
        sys.argv[1:] = args
    show_data_progress()  # tokenizing, caching and downloading print their progress (rank 0 only)
    try:
        return run(args, argv is None)
    except SIGTERMException:  # Lightning stops the loops on SIGTERM with a SystemExit whose code is None (exit 0)
        if debug:
            raise
        print(
            "error: the run was stopped by SIGTERM before it finished: it is not complete. The checkpoints saved "
            "before the signal are kept; resume a fit with --ckpt_path last.",
            file=sys.stderr,
        )
        return 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
    except SystemExit as done:  # --help of a command (0); an exit code a command chose
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    except Exception as error:  # noqa: BLE001 - every error passes here; unknown ones are re-raised as they are
        message = None if debug else describe(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
