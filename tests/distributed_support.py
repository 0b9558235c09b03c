"""A callback for the distributed tests: records what each run did, from inside the real training processes.

Used as ``--trainer.callbacks+=tests.distributed_support.RecordRun --trainer.callbacks.out DIR`` so that DDP, FSDP2
and torchrun processes (which re-run the command line) record the same things as a single process:
global mean loss per step, shard sizes of every parameter, the full final weights and the network's output on a
fixed probe batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def _full_state_dict(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights on CPU; a collective under FSDP2, so every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if any(hasattr(p, "to_local") for p in pl_module.parameters()):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(pl_module, options=options)
    return {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}


def probe_batch(vocab_size: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    """A fixed batch of token ids (B, T), the same in every process."""
    return (torch.arange(batch * length).view(batch, length) * 7 + 3) % vocab_size


class RecordRun(Callback):
    """Writes ``run.json`` (losses, world size, shard fractions), ``state.pt`` and ``probe.pt`` into ``out`` on rank 0.

    Args:
        out: folder to write into.
    """

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)
        self.losses: list[float] = []
        self.shards: dict[str, list[int]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, param in pl_module.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            self.shards[name] = [local.numel(), param.numel()]
        gathered = trainer.strategy.all_gather(torch.tensor([v[0] for v in self.shards.values()]))
        self.shards_per_rank = gathered.reshape(trainer.world_size, -1).tolist()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(trainer.strategy.reduce(loss.detach(), reduce_op="mean")))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = _full_state_dict(pl_module)
        network = pl_module.network
        was_training = network.training
        network.eval()
        with torch.no_grad():
            logits = network(probe_batch(pl_module.data_spec["vocab_size"]))  # (B, T, V), collective under FSDP2
        network.train(was_training)
        if trainer.global_rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        summary = {
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "strategy": type(trainer.strategy).__name__,
            "global_step": trainer.global_step,
            "losses": self.losses,
            "shard_numel": {name: [per_rank[i] for per_rank in self.shards_per_rank] for i, name in enumerate(self.shards)},
            "full_numel": {name: value[1] for name, value in self.shards.items()},
        }
        (self.out / "run.json").write_text(json.dumps(summary, indent=1))
        torch.save(state, self.out / "state.pt")
        torch.save(logits.cpu(), self.out / "probe.pt")
