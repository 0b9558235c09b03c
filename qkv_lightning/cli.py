"""The command line: LightningCLI's fit / validate / test / predict, plus the project's own commands.

``qkv-lightning fit --config configs/lm/wikitext2.yaml --config configs/variants/q-k=v.yaml`` trains; extra
commands (``study``, ``report``, ``bench``, ...) are registered in :data:`EXTRA_COMMANDS`. Errors about settings and
data are printed as one paragraph without a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import sys
from argparse import ArgumentError
from collections.abc import Callable, Sequence

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qkv_lightning.config_files import resolve_config_args
from qkv_lightning.data.progress import show_data_progress
from qkv_lightning.errors import QKVError
from qkv_lightning.hints import explain_config_error
from qkv_lightning.lightning_cli import QKVLightningCLI

EXTRA_COMMANDS: dict[str, str] = {
    "analyze": "qkv_lightning.analysis.analyze:main",
    "bench": "qkv_lightning.bench.models:main",
    "bench-attention": "qkv_lightning.bench.attention:main",
    "bench-decode": "qkv_lightning.bench.decode:main",
    "configs": "qkv_lightning.config_files:main",
    "consolidate": "qkv_lightning.checkpoints:main",
    "convert": "qkv_lightning.uptrain.convert:main",
    "evaluate": "qkv_lightning.evaluate:main",
    "export": "qkv_lightning.export:main",
    "import": "qkv_lightning.interop.command:main",
    "report": "qkv_lightning.bench.report:main",
    "study": "qkv_lightning.study:main",
}
"""Extra subcommands: name -> ``module:function`` taking the remaining arguments (a list of strings)."""


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
    show_data_progress()  # tokenizing, caching and downloading print their progress (rank 0 only)
    try:
        args = resolve_config_args(args)  # qkv:NAME and configs/NAME name the shipped configs (config_files.py)
        if argv is None:
            sys.argv[1:] = args
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
    except SIGTERMException:  # Lightning stops the loops on SIGTERM with a SystemExit whose code is 0
        if debug:
            raise
        print(
            "error: the run was stopped by SIGTERM before it finished: it is not complete. The checkpoints saved "
            "before the signal are kept; resume a fit with --ckpt_path last.",
            file=sys.stderr,
        )
        return 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
    except MisconfigurationException as error:  # Lightning rejects a trainer setting (devices, precision, ...)
        if debug:
            raise
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"error: invalid configuration: {text} (see --help for the accepted settings)", file=sys.stderr)
        return 2
