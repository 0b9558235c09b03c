"""Callbacks for the distributed and crash tests, run from inside the real training processes.

``RecordRun`` (``--trainer.callbacks+=tests.distributed_support.RecordRun --trainer.callbacks.out DIR``) makes DDP,
FSDP2 and torchrun processes (which re-run the command line) record the same things as a single process: global mean
loss per step, shard sizes of every parameter, the full final weights and the network's output on a fixed probe
batch. ``KillAt`` kills every process of a run with SIGKILL at a given step (optionally half-way through writing that
step's checkpoint); ``PoisonAt`` makes one step's loss or gradient non-finite.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def _full_state_dict(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights on CPU; a collective under FSDP and FSDP2, so every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    fsdp1 = any(type(m).__name__ == "FullyShardedDataParallel" for m in pl_module.modules())
    if fsdp1 or any(hasattr(p, "to_local") for p in pl_module.parameters()):
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
        kinds = [type(m).__name__ for m in pl_module.modules()]
        self.wrappers = {"fsdp_units": kinds.count("FullyShardedDataParallel"),
                         "checkpoint_wrappers": kinds.count("CheckpointWrapper")}
        for name, param in pl_module.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            self.shards[name] = [local.numel(), param.numel()]
        local_sizes = torch.tensor([v[0] for v in self.shards.values()], device=pl_module.device)  # NCCL: on the GPU
        gathered = trainer.strategy.all_gather(local_sizes).cpu()
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
            probe = probe_batch(pl_module.data_spec["vocab_size"]).to(pl_module.device)
            with trainer.precision_plugin.forward_context():  # as in training (FSDP1 keeps bf16 weights under it)
                output = network(probe)  # collective under FSDP2; the sequence encoder's is (logits, maps)
                logits = (output[0] if isinstance(output, tuple) else output).float()  # (B, T, V)
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
            "shard_numel": {
                name: [per_rank[i] for per_rank in self.shards_per_rank] for i, name in enumerate(self.shards)
            },
            "full_numel": {name: value[1] for name, value in self.shards.items()},
            **self.wrappers,
            "precision": trainer.precision,
        }
        (self.out / "run.json").write_text(json.dumps(summary, indent=1))
        torch.save(state, self.out / "state.pt")
        torch.save(logits.cpu(), self.out / "probe.pt")


class KillAt(Callback):
    """Kill this process with SIGKILL (as ``kill -9`` would) at global step ``step``, on every rank.

    Args:
        step: the optimiser step after which to die (checkpoints of earlier steps are complete on disk).
        during_save: instead, die half-way through writing the checkpoint of that step: the next ``torch.save``
            (which every checkpoint writer calls, also FSDP2's shard writer) writes half of its bytes and kills the
            process.
    """

    def __init__(self, step: int, during_save: bool = False) -> None:
        super().__init__()
        self.step = step
        self.during_save = during_save

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        if not self.during_save:
            os.kill(os.getpid(), signal.SIGKILL)
        real_save = torch.save

        def dying_save(obj: Any, f: Any, *save_args: Any, **save_kwargs: Any) -> None:
            buffer = io.BytesIO()
            real_save(obj, buffer, *save_args, **save_kwargs)
            data = buffer.getvalue()
            file = open(f, "wb") if isinstance(f, str | os.PathLike) else f  # noqa: SIM115 - the process dies
            file.write(data[: len(data) // 2])
            file.flush()
            with contextlib.suppress(OSError, ValueError):  # a stream without a file descriptor
                os.fsync(file.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = dying_save  # ModelCheckpoint saves after this hook (Lightning runs checkpoint callbacks last)


class PoisonAt(Callback):
    """Make the loss or a gradient of optimiser step ``step`` (0-based) NaN, as a numerical blow-up would.

    Args:
        step: the step to poison (``trainer.global_step`` while it runs).
        what: ``loss`` (the loss value only; its gradients stay finite) or ``gradient`` (the first parameter's).
    """

    def __init__(self, step: int, what: str = "gradient") -> None:
        super().__init__()
        self.step = step
        self.what = what

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self.what == "loss" and trainer.global_step == self.step:
            loss.data.fill_(math.nan)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.what == "gradient" and trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(math.nan)


class WaitForFile(Callback):
    """Hold the run at the start of training until ``path`` exists (at most ``timeout_s``): a test decides when a
    run that it started may go on.

    Args:
        path: the file to wait for.
        timeout_s: give up waiting after this many seconds (the run then goes on).
    """

    def __init__(self, path: str, timeout_s: float = 120.0) -> None:
        super().__init__()
        self.path, self.timeout_s = Path(path), timeout_s

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        deadline = time.monotonic() + self.timeout_s
        while not self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def _cpu_fsdp2_skip() -> object:
    import pytest
    from torch.torch_version import TorchVersion

    from qkv_lightning.parallel import CPU_FSDP2_TORCH

    return pytest.mark.skipif(
        TorchVersion(torch.__version__) < CPU_FSDP2_TORCH,
        reason=f"FSDP2 on CPUs needs torch >= {CPU_FSDP2_TORCH} (older: fails or sums gradients; FSDP2Strategy "
        "refuses it)",
    )


needs_cpu_fsdp2 = _cpu_fsdp2_skip()
"""Skip marker of the tests that run FSDP2 on CPUs: torch below ``CPU_FSDP2_TORCH`` is refused there."""
