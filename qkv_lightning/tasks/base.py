"""What every task LightningModule shares: the variant, the optimiser and schedule, and lazy network building."""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Literal, TypeVar

import lightning as L
import torch
from torch import nn

from qkv_lightning.accounting import NetworkCost, check_declares_cost, network_cost
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.blocks import Block, Trunk
from qkv_lightning.parallel import shard_network

T = TypeVar("T")


@dataclass
class OptimizerConfig:
    """AdamW with weight decay on matrices only, and a learning-rate schedule with linear warm-up."""

    lr: float = 3e-4
    """Peak learning rate."""

    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""

    eps: float = 1e-8
    """AdamW epsilon."""

    weight_decay: float = 0.1
    """Decoupled weight decay, applied to parameters with 2 or more dimensions only (not biases or norms)."""

    warmup_steps: int = 100
    """Steps of linear warm-up from 0 to ``lr`` (ignored when warmup_fraction is set)."""

    warmup_fraction: float | None = None
    """Warm-up over this fraction of the run's optimiser steps instead of warmup_steps: max(1, int(fraction *
    total steps)) steps, e.g. 0.05 as in the paper's synthetic tasks; None uses warmup_steps."""

    schedule: Literal["cosine", "constant"] = "cosine"
    """After warm-up: cosine decay to ``min_lr_ratio * lr`` at the last step, or constant."""

    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""

    def __post_init__(self) -> None:
        if not self.lr > 0:  # also NaN
            raise ConfigError(f"optimizer.lr={self.lr} must be positive.")
        if not math.isfinite(self.lr):
            raise ConfigError(f"optimizer.lr={self.lr} must be a finite number.")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"optimizer.eps={self.eps} must be a finite number >= 0.")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):  # NaN fails every comparison
            raise ConfigError(f"optimizer.betas={list(self.betas)} must be two numbers in [0, 1).")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay={self.weight_decay} must be a finite number >= 0.")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps={self.warmup_steps} must be >= 0.")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction < 1.0:  # also NaN
            raise ConfigError(f"optimizer.warmup_fraction={self.warmup_fraction} must lie in [0, 1) (or be null).")
        if not 0.0 <= self.min_lr_ratio <= 1.0:  # also NaN
            raise ConfigError(f"optimizer.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1].")
        self.betas = tuple(self.betas)


def as_config(cls: type[T], value: T | dict | None) -> T:
    """Accept a config dataclass or its dict form (as stored in checkpoints' hyper-parameters)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} settings {unknown}; allowed: {sorted(known)}.")
        return cls(**value)
    raise ConfigError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")


def plain(value: Any) -> Any:
    """Dataclasses to dicts and tuples to lists, so hyper-parameters hold only plain, safely loadable types."""
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float, schedule: str) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine decay to ``min_ratio`` (or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TaskModule(L.LightningModule, abc.ABC):
    """Base of the task modules. Subclasses implement :meth:`build_network` and the step methods.

    The network is built in :meth:`configure_model` (idempotent), so that FSDP can build it sharded and
    ``load_from_checkpoint`` rebuilds it from the saved hyper-parameters. Values the data decides (vocabulary
    size, classes, sequence length) come from the datamodule's ``spec()`` at setup and are saved as ``data_spec``.

    Args:
        network: the network config (GPT, ViT or encoder sizes), already a dataclass; it must declare its closed-form
            cost (:func:`qkv_lightning.accounting.check_declares_cost`); its ``n_head`` decides the allowed K/V
            heads.
        attention: the attention variant (a dict, as stored in checkpoints, is accepted too).
        optimizer: AdamW and learning-rate schedule (or its dict).
        data_spec: what the data decides; filled from the datamodule when None.
        compile: compile each block with ``torch.compile`` (in place, so checkpoint keys do not change).
        activation_checkpointing: recompute each block's activations in the backward pass (saves memory).
    """

    network: nn.Module | None
    network_config: Any
    """The network's config (sizes and options; the values the data decides may still be None)."""

    def __init__(
        self,
        network: Any,
        attention: AttentionConfig = AttentionConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        data_spec: dict | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_declares_cost(network)
        self.network_config = network
        self.attention_config = as_config(AttentionConfig, attention)
        self.attention_config.resolve_kv_heads(network.n_head)  # head counts checked once, before any work
        if getattr(network, "n_layer", None):  # a per-layer schedule and cross-layer sharing, checked too
            self.attention_config.layer_configs(network.n_layer, network.n_head)
            self.attention_config.kv_source_list(network.n_layer, network.n_head)
        self.optimizer_config = as_config(OptimizerConfig, optimizer)
        self.data_spec = dict(data_spec) if data_spec else None
        self.compile_blocks = compile
        self.activation_checkpointing = activation_checkpointing
        self.network = None
        self._costs: dict[tuple, NetworkCost] = {}
        self._batch_samples: int | None = None

    def save_task_hyperparameters(self, **task_hparams: Any) -> None:
        """Save plain hyper-parameters (no modules, no dataclasses) for checkpoints and loggers.

        ``_class_path`` lets ``fit --ckpt_path`` (LightningCLI) rebuild the task from a checkpoint's hyper-parameters.
        """
        self.save_hyperparameters(
            plain(
                {
                    "_class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                    **task_hparams,
                    "attention": self.attention_config,
                    "optimizer": self.optimizer_config,
                    "data_spec": self.data_spec,
                    "compile": self.compile_blocks,
                    "activation_checkpointing": self.activation_checkpointing,
                }
            )
        )

    # ----------------------------------------------------------------------------------------------- building
    @abc.abstractmethod
    def resolved_network_config(self, data_spec: dict) -> Any:
        """The network config with the values the data decides filled in; implemented by each task."""

    @abc.abstractmethod
    def build_network(self, data_spec: dict) -> nn.Module:
        """Build the network for ``data_spec``; implemented by each task."""

    def setup(self, stage: str) -> None:
        if self.data_spec is None:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is None or not hasattr(datamodule, "spec"):
                raise ConfigError(
                    f"{type(self).__name__} needs data_spec: run it with one of qkv_lightning's datamodules, or "
                    "set model.data_spec explicitly."
                )
            self.data_spec = dict(datamodule.spec())
            self.hparams["data_spec"] = self.data_spec

    # ------------------------------------------------------------------------------------- checks before work
    def check_data_spec(self, spec: dict, stage: str = "fit") -> None:
        """Check the settings against what the data's settings alone decide (``seq_len``, ``image_size``, ...),
        before any file is read or written. ``spec`` holds only the keys known without data; ``stage`` is fit,
        validate, test or predict. Tasks with such constraints override this (raising :class:`ConfigError` naming the
        settings to change)."""

    def expected_weight_shapes(self, data_spec: dict) -> dict[str, tuple[int, ...]]:
        """The ``state_dict`` names and shapes of this task with its network built for ``data_spec``, on the meta
        device (no memory, no data); :func:`qkv_lightning.resume.check_fits` compares a checkpoint with them."""
        with torch.device("meta"):
            network = self.build_network(dict(data_spec))
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items() if not k.startswith("network.")}
        expected.update({f"network.{k}": tuple(v.shape) for k, v in network.state_dict().items()})
        return expected

    def check_checkpoint_data(self, saved_spec: dict, source: str) -> None:
        """Raise a :class:`CheckpointError` if a checkpoint's ``data_spec`` (what its data decided) cannot serve this
        task's data; tasks with such constraints override it (a language model's tokenizer and vocabulary)."""

    def configure_model(self) -> None:
        if self.network is not None:
            return
        if self.data_spec is None:
            raise ConfigError(f"{type(self).__name__}.configure_model() needs data_spec (see setup()).")
        network = self.build_network(self.data_spec)
        blocks = [module for module in network.modules() if isinstance(module, Block)]
        for module in network.modules():
            if isinstance(module, Trunk):
                module.activation_checkpointing = self.activation_checkpointing
        if self.compile_blocks:
            for block in blocks:
                block.compile()  # in place: parameter names (checkpoint keys) stay the same
        if self.device_mesh is not None:  # FSDP2 / ModelParallelStrategy
            shard_network(network, self.device_mesh)
        self.network = network

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill in tied parameters (e.g. a GPT head tied to the embedding) that sharded checkpoints store once."""
        state = checkpoint.get("state_dict")
        if state is None or self.network is None:
            return
        aliases: dict[int, list[str]] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        for names in aliases.values():
            present = [name for name in names if name in state]
            if present and len(present) < len(names):
                for name in names:
                    state.setdefault(name, state[present[0]])

    # ---------------------------------------------------------------------------------------------- accounting
    sample_unit: str = "samples"
    """What one sample of a batch is, in the names of throughput metrics (``perf/<unit>_per_sec``)."""

    counts_tokens: bool = True
    """Whether samples are token sequences, so that throughput is also counted in tokens (:meth:`tokens_in`)."""

    autoregressive: bool = False
    """Whether the network is a causal decoder that generates with a KV cache (its attention is causal; ``bench``
    times decoding for it)."""

    def cost(
        self, attention: AttentionConfig | None = None, data_spec: dict | None = None, kv_bytes: int = 2
    ) -> NetworkCost:
        """Closed-form parameters, FLOPs and KV-cache bytes of this task's network (:mod:`qkv_lightning.accounting`),
        without building it; ``attention`` and ``data_spec`` default to the task's own."""
        spec = self.data_spec if data_spec is None else data_spec
        if spec is None:
            raise ConfigError(
                f"{type(self).__name__}.cost() needs the data's spec (model.data_spec, or the datamodule's spec())."
            )
        attention = attention or self.attention_config
        key = (repr(attention), repr(sorted(spec.items())), kv_bytes)
        if key not in self._costs:
            config = self.resolved_network_config(spec)
            self._costs[key] = network_cost(config, attention, spec.get("seq_len"), kv_bytes)
        return self._costs[key]

    def samples_in(self, batch: Any) -> int:
        """Samples (sequences, images) in a batch: the first dimension of its inputs."""
        inputs = batch[0] if isinstance(batch, list | tuple) else batch
        return int(inputs.shape[0])

    def tokens_in(self, batch: Any) -> int:
        """Tokens in a batch (of a task whose samples are token sequences): every element of its inputs."""
        inputs = batch[0] if isinstance(batch, list | tuple) else batch
        return int(inputs.numel())

    def example_batch(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """A training batch of ``batch_size`` samples of the data's shapes (``data_spec``) with random contents, as the
        datamodule would collate it (``bench --data random``); implemented by each task."""
        raise NotImplementedError(f"{type(self).__name__} does not make example batches; use bench --data config.")

    @property
    def flops_per_batch(self) -> int | None:
        """Closed-form FLOPs of the current batch on this device: forward plus backward in training, forward in
        evaluation (read by :class:`~qkv_lightning.callbacks.perf.PerfMonitor`, Lightning's ``ThroughputMonitor``)."""
        if self._batch_samples is None or self.data_spec is None:
            return None
        cost = self.cost()
        return cost.train_flops(self._batch_samples) if self.training else cost.forward_flops(self._batch_samples)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_samples = self.samples_in(batch)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_samples = self.samples_in(batch)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_samples = self.samples_in(batch)

    # ------------------------------------------------------------------------------------------------ training
    @abc.abstractmethod
    def training_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of a batch, without logging (``training_step`` logs it; ``bench`` calls this in a plain
        PyTorch loop); implemented by each task."""

    @abc.abstractmethod
    def attention_maps(self, batch: Any) -> list[torch.Tensor]:
        """Each block's attention probabilities, (1, H, T, S), for the first sample of ``batch``; by each task."""

    # ---------------------------------------------------------------------------------------------- optimising
    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip as the Trainer is told to; under Lightning's FSDPStrategy (FSDP1), whose precision plugin cannot clip
        by norm, through FSDP's own ``clip_grad_norm_`` on the root module (the norm over all shards)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model if self._trainer is not None else None
        if gradient_clip_val and isinstance(root, FullyShardedDataParallel):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ConfigError(
                    f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r} is not supported with FSDPStrategy: "
                    "use 'norm' (or FSDP2, configs/strategy/fsdp2.yaml)."
                )
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict:
        optimizer, scheduler = self.build_optimizer(self.total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def build_optimizer(
        self, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW (decay on matrices only) and its warm-up + cosine schedule over ``total_steps`` steps."""
        config = self.optimizer_config
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
        warmup = config.warmup_steps
        if config.warmup_fraction is not None:
            warmup = max(1, int(config.warmup_fraction * total_steps)) if config.warmup_fraction > 0 else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, warmup, total_steps, config.min_lr_ratio, config.schedule),
        )
        return optimizer, scheduler

    def total_steps(self) -> int:
        """Optimiser steps of the whole run: ``trainer.max_steps``, else Lightning's estimate."""
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        estimate = trainer.estimated_stepping_batches
        return int(estimate) if math.isfinite(estimate) else 0
