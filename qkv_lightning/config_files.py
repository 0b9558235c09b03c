"""The shipped configs, reachable from a checkout and from an installed wheel alike.

The top-level ``configs/`` folder of the repository is packaged into the wheel as ``qkv_lightning/configs``
(``setup.py`` maps it; git holds one copy). ``--config qkv:lm/wikitext2.yaml`` names a shipped config wherever the
package is installed; a relative ``configs/...`` path that does not exist in the working directory falls back to the
shipped file of that name, so the README's commands also work outside a checkout (a file of the working directory
always wins).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path

from qkv_lightning.errors import ConfigError

SCHEME = "qkv:"
"""Prefix of a shipped config's name: ``qkv:lm/wikitext2.yaml`` is ``configs/lm/wikitext2.yaml`` of the package."""


def config_root() -> Path:
    """The folder of the shipped configs: ``qkv_lightning/configs`` in an installed wheel, else the checkout's
    ``configs/`` (a source tree or an editable install)."""
    package = Path(__file__).resolve().parent
    packaged = package / "configs"
    return packaged if packaged.is_dir() else package.parent / "configs"


def shipped_configs() -> list[str]:
    """Every shipped config, as ``lm/wikitext2.yaml``-style names relative to :func:`config_root`."""
    root = config_root()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def resolve_config(path: str) -> str:
    """The file that a config argument names: ``qkv:NAME`` is the shipped config NAME; a relative ``configs/NAME``
    missing from the working directory is the shipped NAME when there is one; anything else is returned unchanged.

    Raises:
        ConfigError: for a ``qkv:`` name that is not shipped (with the closest shipped names).
    """
    text = str(path)
    if text.startswith(SCHEME):
        name = text[len(SCHEME) :].lstrip("/")
        candidate = config_root() / name
        if not candidate.is_file():
            names = shipped_configs()
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(SCHEME + c for c in close)}?" if close else f"shipped: {len(names)} files"
            raise ConfigError(
                f"--config {text}: no shipped config {name!r} in {config_root()} ({hint}); list them with "
                "`python -m qkv_lightning configs`."
            )
        return str(candidate)
    posix = text.replace(os.sep, "/")
    if posix.startswith("configs/") and not Path(text).exists():
        candidate = config_root() / posix[len("configs/") :]
        if candidate.is_file():
            return str(candidate)
    return text


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with the value of every ``--config X`` / ``--config=X`` passed through :func:`resolve_config`."""
    out: list[str] = []
    follows_flag = False
    for arg in args:
        if follows_flag:
            out.append(resolve_config(arg))
            follows_flag = False
        elif arg == "--config":
            out.append(arg)
            follows_flag = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


COMMAND_KEYS = ("ckpt_path", "weights_only")
"""Keys of a subcommand (not of the task) that the config.yaml LightningCLI saves beside a run also holds."""


def run_config_text(path: str | Path, option: str = "--config") -> str:
    """A fit config (a run's saved ``config.yaml``, or the user's) as YAML text that loads as a task config: a
    mapping, without :data:`COMMAND_KEYS`. The one reader of a run's saved config for ``analyze`` and ``convert``.

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping of settings, naming it and ``option``.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        detail = " ".join(str(error).split())
        raise ConfigError(f"{option} {path}: cannot read it as a YAML fit config ({detail}).") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{option} {path} holds a YAML {type(data).__name__}, not the mapping of settings of a fit config "
            "(model:, data:, trainer:, ...); pass the config the run was trained with."
        )
    for key in COMMAND_KEYS:
        data.pop(key, None)
    return yaml.safe_dump(data, sort_keys=False)


def main(argv: Sequence[str]) -> int:
    """``configs``: print the shipped configs, one ``qkv:NAME`` per line (``--path true``: the folder they are in)."""
    from qkv_lightning.command_line import run_function

    def run(path: bool = False) -> None:
        """Print the shipped configs, one qkv:NAME per line (give one to --config), or the folder they are in.

        Args:
            path: print the folder of the shipped configs instead.
        """
        print(config_root() if path else "\n".join(SCHEME + name for name in shipped_configs()))

    run_function("configs", run, argv, positional=False)
    return 0
