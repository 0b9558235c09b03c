"""Checkpoint utilities: atomic writing, safe reading, and turning a sharded (FSDP / FSDP2 distributed-checkpoint)
folder into one plain Lightning file.

``python cli.py consolidate logs/run/version_0/checkpoints/last.ckpt consolidated.ckpt`` writes a single file with
the full weights, the optimiser state and Lightning's loop, callback, scheduler and hyper-parameter state.

The optimiser state stays keyed by parameter name. ``torch.optim.Optimizer.load_state_dict`` matches saved and live
parameters by their position in ``param_groups`` whatever the keys are, and the FSDP2 loader reads names directly,
whereas integer ids would be taken to follow ``model.parameters()`` order, which our decay / no-decay groups do not.
It loads without FSDP (``Task.load_from_checkpoint``), resumes a single-device run (``fit --ckpt_path
consolidated.ckpt``) and resumes an FSDP2 run, which reads full checkpoints too.

Safety: single files are read with ``torch.load(weights_only=True)`` (tensors and plain containers only). A sharded
folder's ``.metadata`` is a plain pickle that torch reads without restriction; :func:`read_sharded_metadata` reads it
with an unpickler that only rebuilds torch's checkpoint-metadata classes, and every sharded load here checks it first.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qkv_lightning.errors import CheckpointError
from qkv_lightning.files import atomic_open

METADATA_FILE = "meta.pt"
"""Lightning's file with the non-tensor state inside a sharded checkpoint folder."""

TEMPORARY_PREFIX = ".checkpoint-"
"""Start of the names of files being written by :func:`atomic_save`."""

DCP_METADATA_FILE = ".metadata"
"""torch.distributed.checkpoint's index of a sharded checkpoint folder (a pickle)."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete distributed-checkpoint folder (``.metadata`` plus ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA_FILE).is_file() and (path / METADATA_FILE).is_file()


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` into a temporary file in the destination folder, flush it to disk, then rename it over ``path``.

    A crash or ``kill -9`` at any moment leaves either the previous file or the new one, complete, never a mix.
    The temporary name (``.checkpoint-<host>-<pid>-*.tmp``) never contains "last", so Lightning's
    ``ckpt_path="last"`` search cannot pick up a half-written file; a process killed while writing leaves one such
    file behind, which :func:`remove_stale_temporaries` deletes on the next save into that folder.
    """
    try:
        with atomic_open(path, "wb", prefix=f"{TEMPORARY_PREFIX}{socket.gethostname()}-{os.getpid()}-") as file:
            torch.save(obj, file)
    except (OSError, RuntimeError) as error:  # torch reports a failed write as a RuntimeError of its zip writer
        raise CheckpointError(
            f"could not write the checkpoint {path} ({type(error).__name__}: {_first_line(error)}); a full disk or a "
            f"file-size limit (ulimit -f) stops a save this way. {Path(path).name} is unchanged (an earlier one is "
            "kept whole); free space or raise the limit, then resume with --ckpt_path last."
        ) from error


def start_checkpoint(task: Any, **records: Any) -> dict[str, Any]:
    """A checkpoint of the built ``task`` at step 0, in the layout ``fit`` saves: ``state_dict``, the
    ``hyper_parameters`` that rebuild the task, Lightning's version and the task's own entries (a language model's
    ``tokens_seen``), with no optimiser state. ``import`` and ``convert`` write these; start a fine-tune from one with
    ``--model.init_args.init_from``, or evaluate it with ``validate``/``test --ckpt_path``. ``records`` are stored as
    top-level entries that say where the weights came from (``qkv_import=...``, ``converted_from=...``)."""
    import lightning

    from qkv_lightning.hparams import plain

    checkpoint: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": {k: v.detach().clone() for k, v in task.state_dict().items()},
        "hparams_name": None,
        "hyper_parameters": plain(dict(task.hparams)),
        **records,
    }
    task.on_save_checkpoint(checkpoint)
    return checkpoint


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that :func:`atomic_save` processes of this host left behind when they were killed
    (their process no longer exists); returns them."""
    removed = []
    host = socket.gethostname()
    for tmp in Path(folder).glob(f"{TEMPORARY_PREFIX}*.tmp"):
        owner_pid = tmp.name[len(TEMPORARY_PREFIX) : -len(".tmp")].rpartition("-")[0]  # <host>-<pid>-<random>
        owner, _, pid = owner_pid.rpartition("-")
        if owner != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except PermissionError:  # alive, another user's
            pass
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but atomic on local file systems: see :func:`atomic_save`.

    Lightning's own writer moves a temporary file from the system's temporary folder into place (``shutil.move``),
    which is a copy, not an atomic rename, when that folder is on another file system than the checkpoints (common
    on clusters), and it holds two copies of the checkpoint in memory. Remote URLs (``s3://`` ...) still go through
    Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        text = str(path)
        if storage_options is not None or ("://" in text and not text.startswith("file://")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(text.removeprefix("file://"))
        if path.parent.is_dir():
            remove_stale_temporaries(path.parent)
        atomic_save(checkpoint, path)


# ------------------------------------------------------------------------------------------- safe reading
class ForbiddenCheckpointContent(CheckpointError):
    """A checkpoint holds (or its index names) Python objects that weights-only loading refuses."""


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


def recover_interrupted_swap(path: str | Path) -> bool:
    """Finish or undo an FSDP2 checkpoint swap that a crash interrupted between its two renames.

    :meth:`qkv_lightning.parallel.FSDP2Strategy.save_checkpoint` renames ``<name>`` to ``<name>.old`` and then the
    complete ``<name>.partial`` to ``<name>``. If ``<name>`` is missing, the complete new folder (else the old one)
    is put back in its place. Returns whether anything was moved.
    """
    path = Path(path)
    if path.exists():
        return False
    for candidate in (path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")):
        if is_sharded_checkpoint(candidate):
            try:
                os.replace(candidate, path)
            except FileNotFoundError:  # another process (node) repaired it first
                return False
            return True
    return False


def remove_path(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


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


def _first_line(error: BaseException) -> str:
    """The first sentence of an error's message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__


def consolidate(source: str | Path, destination: str | Path) -> dict[str, Any]:
    """Write the sharded checkpoint ``source`` as the single file ``destination`` (atomically); returns it."""
    source, destination = Path(source), Path(destination)
    if destination.is_dir():
        raise CheckpointError(f"the destination {destination} is a folder; name the file to write, e.g. model.ckpt.")
    if destination.resolve() == source.resolve() or source.resolve() in destination.resolve().parents:
        raise CheckpointError(
            f"the destination {destination} lies in the checkpoint {source} itself; write it elsewhere."
        )
    checkpoint = load_sharded_checkpoint(source)
    atomic_save(checkpoint, destination)
    return checkpoint


def main(argv: list[str]) -> int:
    """``consolidate SOURCE DESTINATION``: one plain file from a sharded checkpoint folder."""
    from qkv_lightning.command_line import run_function

    def run(source: str, destination: str) -> None:
        """Turn a sharded (FSDP / FSDP2) checkpoint folder into one plain Lightning checkpoint file.

        Args:
            source: the checkpoint folder, e.g. logs/NAME/version_0/checkpoints/last.ckpt.
            destination: the file to write (written atomically).
        """
        checkpoint = consolidate(source, destination)
        n_params = sum(t.numel() for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor))
        print(
            f"wrote {destination}: {len(checkpoint['state_dict'])} tensors ({n_params:,} values), "
            f"{len(checkpoint['optimizer_states'])} optimizer state(s), epoch {checkpoint.get('epoch')}, "
            f"global step {checkpoint.get('global_step')}"
        )

    run_function("consolidate", run, argv)
    return 0
