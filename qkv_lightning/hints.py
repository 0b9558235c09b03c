"""Suggestions for mistyped settings: one paragraph from a jsonargparse error, with "did you mean" for a typo.

The vocabulary is every setting a config can hold: the Trainer's arguments, the init arguments and config-dataclass
fields of the project's tasks, datamodules and callbacks, and the top-level sections of the parsers in use.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from typing import Any

from qkv_lightning.command_line import explain_parse_error


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
    from lightning.pytorch import LightningDataModule

    from qkv_lightning.tasks.base import TaskModule

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


_PARSERS: list[Any] = []
"""The command-line parser of the last command set up in this process (:func:`register_parser`); its top-level
settings are part of the vocabulary for suggestions."""


def register_parser(parser: Any) -> None:
    """Remember the parser whose top-level settings (``model``, ``trainer``, ``perf``, ...) hints may suggest."""
    _PARSERS[:] = [parser]


def top_level_settings() -> set[str]:
    """The first part of every option of the registered parsers (and their subcommands' parsers)."""
    names: set[str] = set()
    pending = list(_PARSERS)
    while pending:
        parser = pending.pop()
        for action in getattr(parser, "_actions", []):
            for dest in (action.dest, *getattr(action, "option_strings", [])):
                name = str(dest).lstrip("-").split(".")[0]
                if name and name != "help":
                    names.add(name)
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):  # a subcommands action: name -> its parser
                pending.extend(value for value in choices.values() if hasattr(value, "_actions"))
    return names


def explain_config_error(message: str, vocabulary: set[str] | None = None) -> str:
    """One paragraph from a jsonargparse error, with "did you mean" for a typo
    (:func:`qkv_lightning.command_line.explain_parse_error`).

    Args:
        message: the error's text.
        vocabulary: known setting names for suggestions; None: every setting of the training commands.
    """
    if vocabulary is None:
        return explain_parse_error(message, lambda: known_setting_names() | top_level_settings())
    return explain_parse_error(message, vocabulary)
