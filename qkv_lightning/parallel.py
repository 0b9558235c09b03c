"""Scaling out: an FSDP2 strategy that shards over every rank, and per-block sharding of our networks."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.blocks import Block


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over all ranks of all nodes: Lightning's ``ModelParallelStrategy`` with data-parallel
    size = world size and no tensor parallelism by default. Runs on GPUs (NCCL) and on CPUs (gloo).

    The task modules apply ``fully_shard`` to every transformer block and then to the whole network in
    ``configure_model`` (see :func:`shard_network`).

    Args:
        tensor_parallel_size: tensor-parallel degree (1: plain FSDP). The data-parallel degree is the rest.
        save_distributed_checkpoint: save one shard per rank (a folder); False gathers one file on rank 0.
        process_group_backend: ``nccl``, ``gloo`` or None for the accelerator's default.
        timeout: collective timeout in seconds.
    """

    def __init__(
        self,
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: float = 1800.0,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=timeout),
        )

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimiser state, keyed by parameter name also in full (single-file) checkpoints.

        Lightning re-keys full checkpoints by integer ids assuming ``model.parameters()`` order, which optimisers with
        decay / no-decay groups do not follow; names load correctly both here and into a plain optimiser.
        """
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        options = StateDictOptions(full_state_dict=not self._save_distributed_checkpoint, cpu_offload=True)
        return get_optimizer_state_dict(self.model, optimizer, options=options)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Save a sharded checkpoint atomically: every rank writes into ``<name>.partial``, then rank 0 swaps it in.

        A crash while saving leaves the previous checkpoint of that name intact.
        """
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from qkv_lightning.checkpoints import leftover_refusal, recover_interrupted_swap, remove_leftover
        from qkv_lightning.files import NotOwnedError, swap_in

        path = Path(self.broadcast(str(filepath)))
        staging = path.with_name(path.name + ".partial")
        retired = path.with_name(path.name + ".old")

        def clear(leftover: Path) -> None:  # on every rank: a refusal stops them all, before any collective hangs
            refusal = self.broadcast(leftover_refusal(leftover) if self.global_rank == 0 else None)
            if refusal is not None:
                raise NotOwnedError(
                    f"{refusal}, so it is not deleted (qkv-lightning deletes only what it made); the sharded save of "
                    f"{path} writes through it. Move it away, then resume with fit --ckpt_path last."
                )
            if self.global_rank == 0:
                remove_leftover(leftover)

        if self.global_rank == 0:
            recover_interrupted_swap(path)  # a crash between the two renames of an earlier save
        clear(staging)
        self.barrier("fsdp2_save_staging")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("fsdp2_save_written")
        clear(retired)
        if self.global_rank == 0:
            swap_in(staging, path, retired=retired)  # recover_interrupted_swap repairs a crash between its renames
        self.barrier("fsdp2_save_done")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint; a sharded folder's index is first checked to hold only checkpoint metadata (torch
        unpickles it without restriction), its shards to be whole, and its non-tensor items are read weights-only."""
        from unittest import mock

        import lightning.fabric.strategies.model_parallel as fabric_model_parallel

        from qkv_lightning.checkpoints import read_sharded_metadata, safe_distributed_load

        path = Path(str(checkpoint_path))
        if path.is_dir() and weights_only is not False:
            read_sharded_metadata(path)  # index, shards and non-tensor items checked before any collective
            # Lightning reads with torch's default planner, which unpickles non-tensor items (the optimiser's
            # param_groups) with weights_only=False; ours uses the weights-only unpickler.
            with mock.patch.object(fabric_model_parallel, "_distributed_checkpoint_load", safe_distributed_load):
                return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def setup_environment(self) -> None:
        check_cpu_fsdp2_torch(self.root_device.type)
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // self._tensor_parallel_size
        super().setup_environment()


CPU_FSDP2_TORCH = "2.9"
"""The lowest torch whose FSDP2 trains on CPUs (gloo) as one process does: 2.6 fails in ``fully_shard`` ('Stream'
object has no attribute 'record_event'); 2.7 and 2.8 sum the gradients over the processes instead of averaging them
(AdamW hides the factor, SGD and gradient clipping do not). tests/test_floors.py checks it."""


def check_cpu_fsdp2_torch(device_type: str, version: str | None = None) -> None:
    """Refuse FSDP2 on CPUs with a torch older than :data:`CPU_FSDP2_TORCH` (one paragraph, naming the setting).

    Raises:
        ConfigError: on a CPU device with an older torch.
    """
    import torch
    from torch.torch_version import TorchVersion

    version = TorchVersion(version or torch.__version__)
    if device_type == "cpu" and version < CPU_FSDP2_TORCH:
        raise ConfigError(
            f"trainer.strategy=FSDP2Strategy on CPUs needs torch >= {CPU_FSDP2_TORCH}; this is torch {version}, whose "
            "FSDP2 over gloo fails (2.6) or sums the processes' gradients instead of averaging them (2.7, 2.8). "
            f"Upgrade torch (pip install 'torch>={CPU_FSDP2_TORCH}'), run FSDP2 on GPUs, or use "
            "--config configs/strategy/ddp.yaml on CPUs."
        )


def shard_network(network: nn.Module, mesh: Any) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every :class:`Block`, then to the whole network (embeddings, head, norms).

    Methods other than ``forward`` that tasks call on the network (listed in its ``fsdp_methods``, e.g. ``GPT.loss``)
    are registered so that they too gather the root's parameters first.

    Args:
        network: the network (built on real or meta device).
        mesh: the device mesh; a 2-D mesh from ``ModelParallelStrategy`` is reduced to its data-parallel dimension.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if mesh.ndim > 1:
        mesh = mesh["data_parallel"]
    for module in network.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(network, mesh=mesh)
    for method in getattr(network, "fsdp_methods", ()):
        register_fsdp_forward_method(network, method)
    return network
