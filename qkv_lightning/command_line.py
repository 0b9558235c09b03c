"""The one command-line grammar: every command's parser is built and read here, the way ``fit`` reads its own.

Every command (``fit`` through LightningCLI, and each command of :data:`qkv_lightning.cli.EXTRA_COMMANDS`) parses
with jsonargparse: options are ``--name value``, never abbreviated; lists are one YAML list (``--variants '[QKV,
Q-K=V]'``); booleans take a value (``--overwrite true``); ``--help`` is written from the docstrings of the options'
dataclass or function. A rejected command line is a :class:`~qkv_lightning.errors.ConfigError` of one paragraph
with "did you mean" for a misspelled option or value (:func:`explain_parse_error`; :mod:`qkv_lightning.hints` adds
the training settings' vocabulary for ``fit``'s parser). The old space-separated lists and bare flags are refused
with a one-line hint that shows the new form.

Commands that read a task config the way ``fit`` does (``report``, ``bench``, ``bench-decode``, ``analyze``) take
``--config FILE`` (repeatable) and hand every option of the fit config (``--model.network.n_layer 8``,
``--data.batch_size 4``, ``--seed_everything 3``, ...) to it: :func:`parse_with_overrides`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import re
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jsonargparse

from qkv_lightning.errors import ConfigError

jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help from attribute docstrings

PROG = "cli.py"
"""How usage lines name the command line (``qkv-lightning`` and ``python -m qkv_lightning`` are the same)."""

CONFIG_SECTIONS = frozenset(
    {"config", "seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "nonfinite", "perf",
     "attention_maps"}
)
"""The top-level settings of a fit config (LightningCLI's parser without a subcommand; a test compares them): an
option of a task-config command whose name starts with one of these, or has a dot, goes to the task config."""


# ------------------------------------------------------------------------------------------------- parsers
def command_parser(
    name: str,
    options: type | Callable[..., Any] | None = None,
    *,
    description: str | None = None,
    positional: bool = False,
    config_file: bool = False,
    task_config: str | None = None,
) -> jsonargparse.ArgumentParser:
    """The parser of the command ``name``: jsonargparse, no abbreviations, errors raised (not printed and exited).

    Args:
        name: the command, as typed after ``cli.py``.
        options: a dataclass whose fields (with their docstrings) are the options, or a function whose parameters
            (with its Google-style docstring) are; None: the caller adds arguments itself.
        description: the text under the usage line; default: the first paragraph of ``options``' docstring.
        positional: required fields / parameters are positional arguments (``import SRC DST``).
        config_file: ``--config FILE`` reads the command's own options from a YAML file (``study``).
        task_config: ``"required"`` or ``"optional"``: ``--config FILE`` (repeatable) names a task config and every
            option of the fit config goes to it (:func:`parse_with_overrides`); None: the command reads none.
    """
    doc = inspect.getdoc(options) if options is not None else None
    own_doc = doc and not doc.startswith(f"{getattr(options, '__name__', '')}(")  # not the one dataclass() writes
    if description is None and own_doc:
        description = doc.split("\n\n")[0]
    parser = jsonargparse.ArgumentParser(
        prog=f"{PROG} {name}", description=description, exit_on_error=False, default_env=False, allow_abbrev=False
    )
    if config_file:
        parser.add_argument("--config", action=jsonargparse.ActionConfigFile, help="a YAML file of these settings")
    if task_config is not None:
        parser.add_argument(
            "--config",
            action="append",
            required=task_config == "required",
            help="a task config, as fit takes it (repeat to layer configs; later ones win); every option of the fit "
            "config (--model.network.n_layer 8, --data.batch_size 4, --seed_everything 3, ...) changes it",
        )
    parser.task_config = task_config is not None  # type: ignore[attr-defined]
    if dataclasses.is_dataclass(options):
        parser.add_class_arguments(options, as_group=False, as_positional=positional)  # type: ignore[arg-type]
    elif options is not None:
        parser.add_function_arguments(options, as_group=False, as_positional=positional)
    return parser


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    """The names of ``parser``'s options and positional arguments, without dashes (the vocabulary of its hints)."""
    names = set()
    for action in parser._actions:
        for text in (action.dest, *action.option_strings):
            name = text.lstrip("-").rstrip("+")
            if name and name != "help":
                names.add(name)
    return names


def parse(parser: jsonargparse.ArgumentParser, argv: Sequence[str]) -> jsonargparse.Namespace:
    """``argv`` parsed by ``parser``; ``--help`` prints the help and exits 0 (``SystemExit``).

    Raises:
        ConfigError: for an option the command does not have (with "did you mean"), a value of the wrong type,
            a list or flag written the old way (with the new form), naming the command.
    """
    argv = list(argv)
    check_old_forms(parser, argv)
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as error:
        raise ConfigError(f"{parser.prog}: {explain_parse_error(str(error), option_names(parser))}") from None


def parse_with_overrides(
    parser: jsonargparse.ArgumentParser, argv: Sequence[str]
) -> tuple[jsonargparse.Namespace, list[str]]:
    """``argv`` of a command that reads a task config (``command_parser(..., task_config=...)``): the command's own
    options parsed, and the options that go to the task config (``--model...``, ``--data...``, ``--trainer...``,
    ``--seed_everything``: any option with a dot or named after a section of the fit config), in order.

    Raises:
        ConfigError: as :func:`parse`.
    """
    own_names = {s for action in parser._actions for s in action.option_strings}
    own: list[str] = []
    overrides: list[str] = []
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        name, has_value, _ = token.partition("=")
        section = name[2:].split(".")[0].rstrip("+")
        if token.startswith("--") and name not in own_names and ("." in name or section in CONFIG_SECTIONS):
            overrides.append(token)
            if not has_value and index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
                index += 1
                overrides.append(tokens[index])
        else:
            own.append(token)
        index += 1
    return parse(parser, own), overrides


def function_args(
    name: str, function: Callable[..., Any], argv: Sequence[str], positional: bool = True
) -> dict[str, Any]:
    """``argv`` parsed into ``function``'s parameters (:func:`command_parser`), by name."""
    values = parse(command_parser(name, function, positional=positional), argv).as_dict()
    return {key: value for key, value in values.items() if not key.startswith("__")}


def run_function(name: str, function: Callable[..., Any], argv: Sequence[str], positional: bool = True) -> Any:
    """Parse ``argv`` into ``function``'s parameters (:func:`command_parser`) and call it; returns its result."""
    return function(**function_args(name, function, argv, positional))


# ------------------------------------------------------------------------------------- old forms, with hints
def _unwrap(typehint: Any) -> list[Any]:
    """The types a type hint allows (the members of a Union / Optional)."""
    if typing.get_origin(typehint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [t for member in typing.get_args(typehint) for t in _unwrap(member)]
    return [typehint]


def _kind(action: argparse.Action) -> str | None:
    """``"list"`` for an option that takes only a list (or null), ``"bool"`` for a boolean one, else None."""
    kinds = set()
    for member in _unwrap(getattr(action, "_typehint", None)):
        origin = typing.get_origin(member) or member
        if origin in (list, tuple, set, Sequence, typing.List, typing.Tuple):  # noqa: UP006 (what hints may say)
            kinds.add("list")
        elif member is bool:
            kinds.add("bool")
        elif member is not type(None):
            kinds.add("other")  # a single value is read as it is (``--task a.yaml`` where a list is allowed too)
    return kinds.pop() if len(kinds) == 1 and "other" not in kinds else None


def _is_value(token: str) -> bool:
    """Whether a command-line token is a value rather than an option (``-1`` and ``-0.5`` are values)."""
    return not token.startswith("-") or re.fullmatch(r"-\.?\d.*", token) is not None


def check_old_forms(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Refuse, with the new form, a list written the old way (``--variants QKV Q-K=V``, ``--tasks a,b``) and a
    boolean option given without its value (``--overwrite``).

    Raises:
        ConfigError: one line, showing how to write it.
    """
    actions = {text: action for action in parser._actions for text in action.option_strings}
    for index, token in enumerate(argv):
        if token == "--":
            return
        action = actions.get(token)
        kind = _kind(action) if action is not None and not token.endswith("+") else None
        if kind is None:
            continue
        values = []
        for following in argv[index + 1 :]:
            if not _is_value(following):
                break
            values.append(following)
        if kind == "bool" and not values:
            raise ConfigError(f"{parser.prog}: {token} takes a value: write {token} true (or {token} false).")
        single = len(values) == 1 and (values[0].lstrip().startswith("[") or values[0] in ("null", "None"))
        if kind == "list" and values and not single:
            items = [item.strip() for value in values for item in value.split(",") if item.strip()]
            raise ConfigError(
                f"{parser.prog}: {token} takes one list, written {token} '[{', '.join(items)}]' (the form "
                f"{token} {' '.join(values)} is not read)."
            )


# ------------------------------------------------------------------------------------- wording the errors
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Expected a path but",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)

_STRUCTURE = {"init_args", "class_path", "dict_kwargs"}


def suggest(name: str, vocabulary: Iterable[str]) -> str | None:
    """The known name closest to a misspelled ``name`` (None if none is close, or ``name`` is known)."""
    close = difflib.get_close_matches(name, sorted(vocabulary), n=1, cutoff=0.6)
    return close[0] if close and close[0] != name else None


def _hint_for_option(option: str, vocabulary: set[str]) -> str | None:
    """``'modle': did you mean 'model'?`` for the first part of a dotted option that is not a known name."""
    for segment in option.lstrip("-").split("=")[0].rstrip("+").split("."):
        if not segment or segment in _STRUCTURE or segment.isdigit() or segment in vocabulary:
            continue
        close = suggest(segment, vocabulary)
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
        close = suggest(attribute, names)
        if close:
            hints.append(f"'{module_name}.{attribute}': did you mean '{module_name}.{close}'?")
    return hints


def _hint_for_choice(message: str) -> list[str]:
    """``did you mean 'json'?`` for a value outside argparse's choices or a ``Literal``'s values."""
    found = re.search(r"invalid choice: '([^']+)' \(choose from (.*)\)", message)
    if found is None:
        found = re.search(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", message)
        if found is None:
            return []
        value, allowed = found.group(2).strip(), found.group(1)
    else:
        value, allowed = found.group(1), found.group(2)
    close = suggest(value, re.findall(r"'([^']+)'", allowed))
    return [f"did you mean '{close}'?"] if close else []


def explain_parse_error(message: str, vocabulary: Iterable[str] | Callable[[], Iterable[str]] = ()) -> str:
    """One paragraph from a jsonargparse error: the parts that say what is wrong, and a suggestion for a typo.

    Args:
        message: the error's text.
        vocabulary: the known option names to suggest from, or a function that returns them (called only when an
            option is unknown: the training settings take a while to collect).
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
        known = set(vocabulary() if callable(vocabulary) else vocabulary)
        hints += [hint for hint in (_hint_for_option(o, known) for o in dict.fromkeys(unknown)) if hint]
    hints += _hint_for_class_path(message)
    hints += _hint_for_choice(message)
    if hints:
        text += " " + " ".join(hints)
    return f"invalid configuration: {text} (see --help for the accepted settings)"


# ------------------------------------------------------------------------------------------- shared values
def torch_device(text: str | None, option: str = "--device") -> Any:
    """The ``torch.device`` that a ``--device`` value names (``None`` or ``auto``: CUDA when available, else CPU).

    Raises:
        ConfigError: for a device name torch does not know, or a CUDA / MPS device this machine does not have.
    """
    import torch

    if text in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(text))
    except (RuntimeError, ValueError):
        raise ConfigError(f"{option} {text}: not a torch device; use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ConfigError(
                f"{option} {text}: this machine has {count or 'no'} CUDA GPU{'s' if count != 1 else ''} that torch "
                f"can use (torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}); use --device "
                "cpu, or run on a machine with a GPU."
            )
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{option} {text}: MPS is not available on this machine; use --device cpu.")
    return device


# ---------------------------------------------------------------------------------------- the command list
def command_overview(commands: dict[str, str]) -> str:
    """The usage text of bare ``cli.py`` and ``cli.py --help``: every command with its one-line summary."""
    width = max(map(len, commands)) + 2
    lines = [
        f"usage: {PROG} COMMAND [options]   (the same: qkv-lightning, python -m qkv_lightning)",
        "",
        "commands:",
        *(f"  {name:<{width}}{summary}" for name, summary in commands.items()),
        "",
        f"`{PROG} COMMAND --help` lists a command's options. Options are written --name value (never abbreviated), "
        "lists as --variants '[QKV, Q-K=V]', booleans as --overwrite true; --debug shows the traceback of an error.",
    ]
    return "\n".join(lines)
