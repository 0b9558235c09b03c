"""Suggestions for mistyped settings: one paragraph from a jsonargparse error, with "did you mean" for a typo.

The vocabulary is every setting a config can hold: the Trainer's arguments, the init arguments and config-dataclass
fields of the project's tasks, datamodules and callbacks, and the top-level sections of the parsers in use.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import pkgutil
import re
from collections.abc import Sequence
from typing import Any

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
    unknown = re.findall(r"does not accept (?:option|nested key) '([^']+)'", message)  # nested key: jsonargparse<4.4x
    unknown += re.findall(r"Key '([^']+)' is not expected", message)
    unknown += re.findall(r"Option '([^']+)' is not accepted", message)
    for arguments in re.findall(r"[Uu]nrecognized arguments: (.*)", message)[:1]:  # capital U: jsonargparse<4.4x
        unknown += [a.split("=")[0] for a in arguments.split() if a.startswith("--")]
    hints: list[str] = []
    if unknown:
        if vocabulary is None:
            vocabulary = known_setting_names() | top_level_settings()
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
