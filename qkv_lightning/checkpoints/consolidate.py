"""``python cli.py consolidate FOLDER FILE``: a sharded checkpoint folder turned into one plain checkpoint file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qkv_lightning.checkpoints.sharded import load_sharded_checkpoint
from qkv_lightning.checkpoints.write import atomic_save
from qkv_lightning.errors import CheckpointError


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
