"""Checkpoints: atomic writing (:mod:`.write`), safe reading (:mod:`.read`), sharded folders (:mod:`.sharded`), and
turning a sharded (FSDP / FSDP2 distributed-checkpoint) folder into one plain Lightning file (:mod:`.consolidate`).

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

from qkv_lightning.checkpoints.consolidate import consolidate, main
from qkv_lightning.checkpoints.read import ForbiddenCheckpointContent, check_checkpoint_layout, load_checkpoint_file
from qkv_lightning.checkpoints.sharded import (
    DCP_METADATA_FILE,
    METADATA_FILE,
    WEIGHT_KEYS,
    check_shard_files,
    is_sharded_checkpoint,
    leftover_refusal,
    load_sharded_checkpoint,
    read_sharded_metadata,
    recover_interrupted_swap,
    remove_leftover,
    safe_distributed_load,
    sharded_weights_key,
    vet_byte_items,
)
from qkv_lightning.checkpoints.write import (
    TEMPORARY_PREFIX,
    AtomicCheckpointIO,
    atomic_save,
    remove_stale_temporaries,
    start_checkpoint,
)

__all__ = [
    "DCP_METADATA_FILE", "METADATA_FILE", "TEMPORARY_PREFIX", "WEIGHT_KEYS", "AtomicCheckpointIO",
    "ForbiddenCheckpointContent", "atomic_save", "check_checkpoint_layout", "check_shard_files", "consolidate",
    "is_sharded_checkpoint", "load_checkpoint_file", "load_sharded_checkpoint", "main", "read_sharded_metadata",
    "recover_interrupted_swap", "leftover_refusal", "remove_leftover", "remove_stale_temporaries",
    "safe_distributed_load",
    "sharded_weights_key", "start_checkpoint", "vet_byte_items",
]
