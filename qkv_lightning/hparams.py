"""Hyper-parameters as plain data: config dataclasses from their dict form (as checkpoints store them) and back."""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass
from typing import Any, TypeVar

from qkv_lightning.errors import ConfigError

T = TypeVar("T")


def as_config(cls: type[T], value: T | dict | None) -> T:
    """Accept a config dataclass or its dict form (as stored in checkpoints' hyper-parameters)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} settings {unknown}; allowed: {sorted(known)}.")
        return cls(**value)
    raise ConfigError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")


def plain(value: Any) -> Any:
    """Dataclasses to dicts and tuples to lists, so hyper-parameters hold only plain, safely loadable types."""
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
