"""Reading a single-file checkpoint safely: weights-only unpickling, and every way a file can be unusable explained
in one paragraph naming it."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from qkv_lightning.errors import CheckpointError


class ForbiddenCheckpointContent(CheckpointError):
    """A checkpoint holds (or its index names) Python objects that weights-only loading refuses."""


def load_checkpoint_file(path: str | Path, weights_only: bool = True, lightning: bool = True) -> dict[str, Any]:
    """Read a single-file Lightning checkpoint on CPU (memory-mapped), explaining every way it can be unusable.

    Args:
        path: the file.
        weights_only: refuse Python objects other than tensors and plain containers (torch's safe loading).
        lightning: require a Lightning checkpoint (with a ``state_dict``).

    Raises:
        CheckpointError: the file is missing, truncated, corrupted, not a Lightning checkpoint, or (with
            ``weights_only``) holds Python objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path, or pass --ckpt_path last.")
    damaged = (
        "An interrupted save never replaces a checkpoint here, so this file was damaged or copied incompletely; use "
        "another checkpoint (e.g. last.ckpt or an earlier step)."
    )
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError as error:
            if "_use_new_zipfile_serialization" not in str(error):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)  # the legacy format
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if "Weights only load failed" not in str(error) or (found is None and "Unsupported operand" in str(error)):
            detail = "no pickle or zip archive found" if "Unsupported operand" in str(error) else _first_line(error)
            raise CheckpointError(
                f"cannot read checkpoint {path}: it is truncated or not a torch checkpoint ({detail}). {damaged}"
            ) from None
        raise ForbiddenCheckpointContent(
            f"refusing to load checkpoint {path}: it holds Python objects other than tensors and plain containers"
            f"{f' ({found.group(1)})' if found else ''}, which could run code when loaded. Only if you trust its "
            "source, load it with --weights_only false."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated or not a torch checkpoint ({_first_line(error)}). "
            f"{damaged}"
        ) from None
    if not isinstance(checkpoint, dict) or (lightning and "state_dict" not in checkpoint):
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no state_dict); pass a .ckpt file that fit saved."
        )
    check_checkpoint_layout(checkpoint, path)
    return checkpoint


def check_checkpoint_layout(checkpoint: dict[str, Any], path: str | Path) -> None:
    """The entries every reader of a checkpoint relies on have the types Lightning writes: ``state_dict`` maps
    parameter names to tensors, ``hyper_parameters`` and ``datamodule_hyper_parameters`` are mappings.

    Raises:
        CheckpointError: naming the file and the entry.
    """
    for key, kind in (("state_dict", "a mapping of parameter names to tensors"),
                      ("hyper_parameters", "a mapping of settings"),
                      ("datamodule_hyper_parameters", "a mapping of settings")):
        value = checkpoint.get(key)
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(
                f"checkpoint {path}: its {key} is a {type(value).__name__}, not {kind} as Lightning writes it; the "
                "file was edited or not written by fit, convert or import. Use another checkpoint."
            )
    for name, tensor in (checkpoint.get("state_dict") or {}).items():
        if not isinstance(name, str) or not (isinstance(tensor, torch.Tensor) or name.endswith("_extra_state")):
            raise CheckpointError(
                f"checkpoint {path}: its state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor; the "
                "file was edited or not written by fit, convert or import. Use another checkpoint."
            )


def _first_line(error: BaseException) -> str:
    """The first sentence of an error's message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__


