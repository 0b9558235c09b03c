"""Checkpoint utilities: turn a sharded (FSDP / FSDP2 distributed-checkpoint) folder into one plain Lightning file.

``python cli.py consolidate logs/run/version_0/checkpoints/last.ckpt consolidated.ckpt`` writes a single file with
the full weights, the optimiser state and Lightning's loop, callback, scheduler and hyper-parameter state.

The optimiser state stays keyed by parameter name. ``torch.optim.Optimizer.load_state_dict`` matches saved and live
parameters by their position in ``param_groups`` whatever the keys are, and the FSDP2 loader reads names directly,
whereas integer ids would be taken to follow ``model.parameters()`` order, which our decay / no-decay groups do not. It loads without FSDP (``Task.load_from_checkpoint``), resumes a
single-device run (``fit --ckpt_path consolidated.ckpt``) and resumes an FSDP2 run, which reads full checkpoints too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from qkv_lightning.errors import CheckpointError

METADATA_FILE = "meta.pt"
"""Lightning's file with the non-tensor state inside a sharded checkpoint folder."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed-checkpoint folder (``.metadata`` plus ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / METADATA_FILE).is_file()


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a distributed-checkpoint folder saved by Lightning into one plain checkpoint dict (on CPU)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a sharded checkpoint folder (it needs .metadata and {METADATA_FILE}); pass the folder "
            "that FSDP / FSDP2 saved, e.g. .../checkpoints/last.ckpt."
        )
    with tempfile.TemporaryDirectory() as tmp:
        flat_file = Path(tmp) / "flat.pt"
        try:
            dcp_to_torch_save(path, flat_file)
            flat = torch.load(flat_file, map_location="cpu", weights_only=True)
        except Exception as error:  # a missing or truncated shard
            raise CheckpointError(f"cannot read the sharded checkpoint {path}: {error}") from error
    try:
        checkpoint = torch.load(path / METADATA_FILE, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path / METADATA_FILE}: {error}") from error
    checkpoint["state_dict"] = flat.pop("state_dict")
    optimizer_keys = sorted((k for k in flat if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [flat[k] for k in optimizer_keys]
    return checkpoint


def consolidate(source: str | Path, destination: str | Path) -> dict[str, Any]:
    """Write the sharded checkpoint ``source`` as the single file ``destination`` (atomically); returns it."""
    checkpoint = load_sharded_checkpoint(source)
    atomic_save(checkpoint, destination)
    return checkpoint


def main(argv: list[str]) -> int:
    """``consolidate SOURCE DESTINATION``: one plain file from a sharded checkpoint folder."""
    import jsonargparse

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

    jsonargparse.auto_cli(run, args=argv)
    return 0
