"""Writing checkpoints: atomically (a temporary beside the target, renamed into place), the temporaries an
interrupted save left behind, and the first checkpoint of a converted or imported model."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qkv_lightning.checkpoints.read import _first_line
from qkv_lightning.errors import CheckpointError
from qkv_lightning.files import atomic_open

TEMPORARY_PREFIX = ".checkpoint-"
"""Start of the names of files being written by :func:`atomic_save`."""

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
