"""Sharded (FSDP/FSDP2, torch.distributed.checkpoint) checkpoint folders: vetting their metadata and shards before
anything is unpickled, safe load planners, recovery of an interrupted folder swap, and loading one as a plain
state dict."""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from qkv_lightning.checkpoints.read import ForbiddenCheckpointContent, _first_line, load_checkpoint_file
from qkv_lightning.errors import CheckpointError
from qkv_lightning.files import recover_swap

METADATA_FILE = "meta.pt"
"""Lightning's file with the non-tensor state inside a sharded checkpoint folder."""

DCP_METADATA_FILE = ".metadata"
"""torch.distributed.checkpoint's index of a sharded checkpoint folder (a pickle)."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete distributed-checkpoint folder (``.metadata`` plus ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA_FILE).is_file() and (path / METADATA_FILE).is_file()


def _allowed_metadata_global(module: str, name: str) -> bool:
    """What a distributed-checkpoint ``.metadata`` pickle may name: torch's metadata classes, sizes, dtypes, layouts
    and paths; nothing that can run code."""
    if module == "torch.distributed.checkpoint.metadata":
        return isinstance(getattr(__import__(module, fromlist=[name]), name, None), type)
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
    }


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if _allowed_metadata_global(module, name):
            return super().find_class(module, name)
        raise ForbiddenCheckpointContent(f"{module}.{name}")


def read_sharded_metadata(path: str | Path, vet: bool = True) -> Any:
    """The ``.metadata`` index of a sharded checkpoint folder, read with a restricted unpickler; with ``vet``, every
    shard it names is checked to exist whole and every non-tensor item to hold only plain types.

    Raises:
        CheckpointError: if the folder is incomplete, the index is unreadable, or it names any other Python object
            (it could run code when loaded by torch, which unpickles it without restriction), a shard is missing or
            truncated, or (``ForbiddenCheckpointContent``) a non-tensor item names a Python object.
    """
    path = Path(path)
    if path.is_file():
        raise CheckpointError(
            f"{path} is a single-file checkpoint, not a sharded (FSDP / FSDP2) checkpoint folder; it needs no "
            "consolidation and loads as it is."
        )
    if not is_sharded_checkpoint(path):
        partial = path.with_name(path.name + ".partial")
        hint = f" ({partial} is an interrupted save)" if partial.exists() else ""
        raise CheckpointError(
            f"{path} is not a complete sharded checkpoint folder: it needs {DCP_METADATA_FILE} and {METADATA_FILE}"
            f"{hint}. Pass a folder that FSDP / FSDP2 saved completely, e.g. .../checkpoints/last.ckpt."
        )
    try:
        with open(path / DCP_METADATA_FILE, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except ForbiddenCheckpointContent as error:
        raise ForbiddenCheckpointContent(
            f"refusing to load the sharded checkpoint {path}: its {DCP_METADATA_FILE} names the Python object "
            f"{error}, which a checkpoint index has no reason to hold (loading it could run code). Only load "
            "checkpoints from sources you trust."
        ) from None
    except Exception as error:  # a truncated or corrupted pickle raises many types
        raise CheckpointError(
            f"cannot read {path / DCP_METADATA_FILE} ({type(error).__name__}: {error}): the sharded checkpoint is "
            "truncated or corrupted; use an earlier checkpoint."
        ) from None
    if vet:
        check_shard_files(path, metadata)
        vet_byte_items(path, metadata)
    return metadata


def check_shard_files(path: Path, metadata: Any) -> None:
    """Every shard file the index names exists and holds the bytes the index locates in it.

    Raises:
        CheckpointError: naming the missing or truncated shard.
    """
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        relative = getattr(info, "relative_path", None)
        if relative is None:
            continue
        needed[relative] = max(needed.get(relative, 0), int(info.offset) + int(info.length))
    for relative, size in sorted(needed.items()):
        shard = path / relative
        if not shard.resolve().is_relative_to(path.resolve()):
            raise CheckpointError(
                f"refusing to load the sharded checkpoint {path}: its index names the shard {relative}, outside the "
                "folder. Only load checkpoints from sources you trust."
            )
        if not shard.is_file():
            raise CheckpointError(
                f"the sharded checkpoint {path} is missing its shard {relative} (copied incompletely?); restore it, "
                "or use an earlier checkpoint."
            )
        if shard.stat().st_size < size:
            raise CheckpointError(
                f"the shard {shard} of the sharded checkpoint {path} is truncated ({shard.stat().st_size} bytes, the "
                f"index needs {size}); restore it, or use an earlier checkpoint."
            )


def _weights_only_bytes(value: Any, fqn: str) -> Any:
    """Unpickle one non-tensor item of a distributed checkpoint with torch's weights-only unpickler."""
    try:
        return torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise ForbiddenCheckpointContent(
            f"its item {fqn} holds Python objects other than tensors and plain containers"
            f"{f' ({found.group(1)})' if found else ''}, which could run code when loaded"
        ) from None


def _safe_planners() -> tuple[type, type, type]:
    """Load planners of torch.distributed.checkpoint that unpickle non-tensor items with ``weights_only=True`` (torch's
    own planners use ``weights_only=False``, which runs whatever the item's pickle says)."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            loaded = _weights_only_bytes(value, read_item.dest_index.fqn)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    class SafeEmptyLoadPlanner(_EmptyStateDictLoadPlanner):
        load_bytes = SafeLoadPlanner.load_bytes

    class BytesOnlyPlanner(SafeEmptyLoadPlanner):
        """Reads only the non-tensor items (no tensor is allocated), each through the weights-only unpickler."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False)

        def _should_include_key(self, key: str, metadata: Any) -> bool:
            return isinstance(metadata.state_dict_metadata[key], BytesStorageMetadata)

        def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
            for key, item in metadata.state_dict_metadata.items():
                if isinstance(item, BytesStorageMetadata):
                    state_dict[key] = None
            DefaultLoadPlanner.set_up_planner(self, state_dict, metadata, is_coordinator)

    return SafeLoadPlanner, SafeEmptyLoadPlanner, BytesOnlyPlanner


def _dcp_read(path: Path, state_dict: dict[str, Any], planner: Any) -> None:
    """Read ``state_dict`` from the folder in this process alone, explaining a missing or damaged shard."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    try:
        _load_state_dict(state_dict, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        raise _explain_dcp_error(path, error) from None


def _explain_dcp_error(path: Path, error: BaseException) -> CheckpointError:
    """One paragraph for a failed distributed-checkpoint read (DCP wraps every rank's error in its own)."""
    failures = getattr(error, "failures", None) or {}
    causes = [f for f in failures.values()] if isinstance(failures, dict) else []
    for cause in [*causes, error]:
        inner = getattr(cause, "exc", cause)
        if isinstance(inner, ForbiddenCheckpointContent):
            return ForbiddenCheckpointContent(
                f"refusing to load the sharded checkpoint {path}: {inner}. Only load checkpoints from sources you "
                "trust."
            )
        text = str(inner)
        if "ForbiddenCheckpointContent" in text or "holds Python objects other than tensors" in text:
            detail = re.search(r"its item .*? could run code when loaded", text)
            return ForbiddenCheckpointContent(
                f"refusing to load the sharded checkpoint {path}: "
                f"{detail.group(0) if detail else text.splitlines()[0]}. Only load checkpoints from sources you trust."
            )
    return CheckpointError(
        f"cannot read the sharded checkpoint {path} ({type(error).__name__}: {_first_line(error)}): a shard is "
        "missing, truncated or corrupted; use an earlier checkpoint."
    )


def vet_byte_items(path: Path, metadata: Any) -> None:
    """Read every non-tensor item of a distributed checkpoint (optimiser ``param_groups``, ...) with torch's
    weights-only unpickler, which refuses anything that could run code.

    Raises:
        ForbiddenCheckpointContent: an item names another Python object.
        CheckpointError: an item cannot be read.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    if not any(isinstance(item, BytesStorageMetadata) for item in metadata.state_dict_metadata.values()):
        return
    _dcp_read(path, {}, _safe_planners()[2]())


def safe_distributed_load(state: dict[str, Any], path: Any) -> None:
    """Lightning's distributed-checkpoint load, with non-tensor items unpickled ``weights_only`` (a collective)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load(state, checkpoint_id=path, planner=_safe_planners()[0]())
    except CheckpointException as error:
        raise _explain_dcp_error(Path(str(path)), error) from None


def recover_interrupted_swap(path: str | Path) -> bool:
    """Finish or undo an FSDP2 checkpoint swap that a crash interrupted between its two renames.

    :meth:`qkv_lightning.parallel.FSDP2Strategy.save_checkpoint` renames ``<name>`` to ``<name>.old`` and then the
    complete ``<name>.partial`` to ``<name>``. If ``<name>`` is missing, the complete new folder (else the old one)
    is put back in its place. Returns whether anything was moved.
    """
    path = Path(path)
    candidates = (path.with_name(path.name + ".partial"), path.with_name(path.name + ".old"))
    return recover_swap(path, candidates, is_sharded_checkpoint)


SAVE_ENTRY = re.compile(r"__\d+_\d+\.distcp|\.metadata|meta\.pt")
"""What a sharded save writes into its folder: torch.distributed.checkpoint's shards and index, Lightning's
``meta.pt``."""


def leftover_refusal(path: Path) -> str | None:
    """Why ``path`` (``<name>.partial`` or ``<name>.old`` beside a sharded checkpoint) may not be deleted before a save,
    or None: it is missing, or a real folder holding only files a sharded save writes (:data:`SAVE_ENTRY`), so the
    tool made it (an interrupted save, or the previous checkpoint set aside). A link, a file, or a folder with anything
    else in it is the user's."""
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_dir():
        return f"{path} is {'a link' if path.is_symlink() else 'not a folder'}"
    others = [entry.name for entry in os.scandir(path)
              if not (SAVE_ENTRY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False))]
    return f"{path} holds {', '.join(sorted(others)[:3])}, which no sharded save writes" if others else None


def remove_leftover(path: Path) -> None:
    """Delete what :func:`leftover_refusal` allows (call it first, and stop on a reason)."""
    if os.path.lexists(path):
        shutil.rmtree(path)


WEIGHT_KEYS = ("state_dict", "model")
"""Where a sharded folder keeps the weights: ``state_dict`` (FSDP2 / ModelParallelStrategy), ``model`` (Lightning's
FSDPStrategy)."""


def sharded_weights_key(metadata: Any) -> str:
    """The top-level key holding the weights in a sharded checkpoint's index (see :data:`WEIGHT_KEYS`)."""
    tops = {key.split(".", 1)[0] for key in metadata.state_dict_metadata}
    for key in WEIGHT_KEYS:
        if key in tops:
            return key
    return WEIGHT_KEYS[0]


def load_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a distributed-checkpoint folder saved by Lightning (FSDP2 / ModelParallelStrategy, or FSDPStrategy, which
    keeps the weights under ``model``) into one plain checkpoint dict (on CPU). Non-tensor items are unpickled with
    ``weights_only=True``."""
    path = Path(path)
    metadata = read_sharded_metadata(path)  # complete, whole, and safe to unpickle
    flat: dict[str, Any] = {}
    _dcp_read(path, flat, _safe_planners()[1]())
    checkpoint = load_checkpoint_file(path / METADATA_FILE, weights_only=True, lightning=False)
    checkpoint["state_dict"] = flat.pop(sharded_weights_key(metadata))
    optimizer_keys = sorted((k for k in flat if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [flat[k] for k in optimizer_keys]
    return checkpoint


