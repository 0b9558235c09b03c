"""What every task LightningModule shares: the variant, the optimiser and schedule, and lazy network building."""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from qkv_lightning.accounting import NetworkCost, check_declares_cost, network_cost
from qkv_lightning.errors import ConfigError
from qkv_lightning.hparams import as_config, plain
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.blocks import Block, Trunk
from qkv_lightning.parallel import shard_network
from qkv_lightning.resume import confine_callback_paths
from qkv_lightning.tasks.distill import DistillConfig, distillation_loss, freeze
from qkv_lightning.tasks.optim import OptimizerConfig
from qkv_lightning.tasks.persist import BOOKKEEPING, build_task, load_weights, stored_settings


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
        init_from: a checkpoint whose weights ``fit`` starts from, with a fresh optimiser and schedule (e.g. one
            written by ``convert``); ``--ckpt_path`` takes precedence (a resumed run continues its own weights).
        distill: distillation from a frozen teacher checkpoint (:class:`~qkv_lightning.tasks.distill.DistillConfig`).
        **stored: only the bookkeeping keys a checkpoint's hyper-parameters carry beside the settings (``_class_path``),
            which Lightning's ``load_from_checkpoint`` hands back; they are ignored.
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
        init_from: str | None = None,
        distill: DistillConfig = DistillConfig(),
        **stored: Any,
    ) -> None:
        unknown = sorted(set(stored) - set(BOOKKEEPING))
        if unknown:
            raise ConfigError(f"unknown model settings {unknown}; see --model.help <task class> for the settings.")
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
        self.init_from = init_from
        self.init_from_skipped = False  # set by the CLI when --ckpt_path gives the weights (it takes precedence)
        self.distill_config = as_config(DistillConfig, distill)
        object.__setattr__(self, "teacher", None)  # not a submodule: out of state_dict, checkpoints and optimiser
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
                    "init_from": self.init_from,
                    "distill": self.distill_config,
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
        if self.network is None:
            self.build_and_place_network()
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if self.distill_config.teacher and fitting and self.teacher is None:
            teacher = freeze(self.load_teacher(self.distill_config.teacher))
            if self.device_mesh is not None:
                shard_network(teacher, self.device_mesh)
            object.__setattr__(self, "teacher", teacher)

    def build_and_place_network(self) -> None:
        """Build the network, start it from ``init_from`` (unless a checkpoint restores it), compile and shard it."""
        if self.data_spec is None:
            raise ConfigError(f"{type(self).__name__}.configure_model() needs data_spec (see setup()).")
        network = self.build_network(self.data_spec)
        blocks = [module for module in network.modules() if isinstance(module, Block)]
        for module in network.modules():
            if isinstance(module, Trunk):
                module.activation_checkpointing = self.activation_checkpointing
        if self.init_from and not self.init_from_skipped:
            self.load_initial_weights(network, self.init_from)  # before sharding: every rank reads the full file
        if self.compile_blocks:
            for block in blocks:
                block.compile()  # in place: parameter names (checkpoint keys) stay the same
        if self.device_mesh is not None:  # FSDP2 / ModelParallelStrategy
            shard_network(network, self.device_mesh)
        self.network = network

    # ------------------------------------------------------------------------------------- starting weights
    def read_weights(self, path: str, setting: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The network weights (``network.`` keys stripped) and hyper-parameters of the checkpoint ``path`` (a file
        or a sharded folder, read weights-only), checked to come from this task class and data."""
        from qkv_lightning.checkpoints import is_sharded_checkpoint, load_checkpoint_file, load_sharded_checkpoint
        from qkv_lightning.errors import CheckpointError
        from qkv_lightning.resume import CheckpointInfo, check_class

        try:
            checkpoint = load_sharded_checkpoint(path) if is_sharded_checkpoint(path) else load_checkpoint_file(path)
        except CheckpointError as error:
            raise CheckpointError(f"{setting}={path}: {error}") from None
        source = f"{setting}={path}"
        saved_class, hparams = stored_settings(checkpoint.get("hyper_parameters"), source)
        mine = f"{type(self).__module__}.{type(self).__qualname__}"
        check_class(CheckpointInfo(Path(path), False, {}, {"_class_path": saved_class}), mine)
        self.check_checkpoint_data(hparams.get("data_spec") or {}, source)
        state = checkpoint["state_dict"]  # its layout checked where it was read
        weights = {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}
        return weights, hparams

    def load_initial_weights(self, network: nn.Module, path: str) -> None:
        """Load ``init_from``'s network weights into ``network`` (strict names and shapes), before any sharding.

        Raises:
            CheckpointError: naming ``model.init_from`` and the settings that differ, if the weights do not fit.
        """
        from qkv_lightning.errors import CheckpointError
        from qkv_lightning.resume import differing_settings, weight_problems

        weights, hparams = self.read_weights(path, "model.init_from")
        expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
        problems = weight_problems(expected, {k: tuple(v.shape) for k, v in weights.items()})
        if problems:
            differ = differing_settings(hparams, dict(self.hparams))
            raise CheckpointError(
                f"model.init_from={path} does not fit the configured model ({'; '.join(problems[:4])}"
                f"{' ...' if len(problems) > 4 else ''}); configure the variant and sizes it was made with"
                f"{': ' + '; '.join(differ) if differ else ''} (e.g. --config configs/variants/<variant>.yaml)."
            )
        if any(p.is_meta for p in network.parameters()):
            network.to_empty(device="cpu")
        network.load_state_dict(weights, strict=True)

    def load_teacher(self, path: str) -> nn.Module:
        """The teacher's network, built from its checkpoint's own settings (any attention variant), with its weights."""
        weights, hparams = self.read_weights(path, "model.distill.teacher")
        source = f"model.distill.teacher={path}"
        replace = {"distill": {}, "data_spec": hparams.get("data_spec") or self.data_spec}
        teacher = build_task(hparams, source, expected=type(self), replace=replace, drop=("init_from",)).network
        load_weights(teacher, weights, source)
        return teacher

    @property
    def distilling(self) -> bool:
        """Whether training distils from a teacher (set up for ``fit`` only)."""
        return self.teacher is not None

    def on_fit_start(self) -> None:
        teacher = self.teacher
        if teacher is not None and self.device_mesh is None:
            teacher.to(self.device)
            self.trainer.precision_plugin.convert_module(teacher)  # "16-true" / "bf16-true" runs convert weights
        super().on_fit_start()

    def distill_outputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor | None]:
        """For distillation: the hard-label loss, the student's logits (N, V), the input the teacher must see (after
        any augmentation of the batch) and the (N,) mask of the rows that count (None: all); by each task."""
        raise NotImplementedError(f"{type(self).__name__} does not support distillation.")

    def teacher_logits(self, network: nn.Module, inputs: Any) -> torch.Tensor:
        """The logits (N, V) that ``network`` (the teacher) gives for ``inputs``; by each task."""
        raise NotImplementedError(f"{type(self).__name__} does not support distillation.")

    def distilled_training_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha * hard + (1 - alpha) * distillation`` (:class:`DistillConfig`) and the student's logits (N, V);
        logs ``train/distill_loss`` and ``train/hard_loss``."""
        config = self.distill_config
        hard, student, inputs, mask = self.distill_outputs(batch)
        with torch.no_grad():
            teacher = self.teacher_logits(self.teacher, inputs)
        soft = distillation_loss(student, teacher, config.temperature, mask)
        size = self.samples_in(batch)
        self.log("train/distill_loss", soft.detach(), batch_size=size)
        self.log("train/hard_loss", hard.detach(), batch_size=size)
        return config.alpha * hard + (1.0 - config.alpha) * soft, student

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill in tied parameters (e.g. a GPT head tied to the embedding) that sharded checkpoints store once; and
        name the two parameter groups of a checkpoint saved before they had names (the optimiser takes its groups'
        settings from the checkpoint, so the LR monitor would log ``pg1``/``pg2`` again). Paths in its callback state
        outside the checkpoint folder are dropped first (:func:`qkv_lightning.resume.confine_callback_paths`)."""
        confine_callback_paths(checkpoint)
        for state in checkpoint.get("optimizer_states") or []:
            groups = state.get("param_groups") if isinstance(state, dict) else None
            if isinstance(groups, list) and len(groups) == 2 and all(isinstance(g, dict) for g in groups):
                for group, name in zip(groups, ("decay", "no_decay"), strict=True):
                    group.setdefault("name", name)
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
        self,
        attention: AttentionConfig | None = None,
        data_spec: dict | None = None,
        kv_bytes: int = 2,
        count_masked: bool = False,
    ) -> NetworkCost:
        """Closed-form parameters, FLOPs and KV-cache bytes of this task's network (:mod:`qkv_lightning.accounting`),
        without building it; ``attention`` and ``data_spec`` default to the task's own. ``count_masked`` counts the
        full T x T score matrix of causal attention (the paper's convention) instead of the pairs the mask allows."""
        spec = self.data_spec if data_spec is None else data_spec
        if spec is None:
            raise ConfigError(
                f"{type(self).__name__}.cost() needs the data's spec (model.data_spec, or the datamodule's spec())."
            )
        attention = attention or self.attention_config
        key = (repr(attention), repr(sorted(spec.items())), kv_bytes, count_masked)
        if key not in self._costs:
            config = self.resolved_network_config(spec)
            self._costs[key] = network_cost(config, attention, spec.get("seq_len"), kv_bytes, count_masked)
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
        return {"optimizer": optimizer, "lr_scheduler": self.optimizer_config.scheduler_entry(scheduler)}

    def build_optimizer(
        self, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimiser (``optimizer.name``) over two named parameter groups, ``decay`` (matrices) and ``no_decay``
        (biases, norms), with weight decay as ``optimizer.decay_on`` says, and its schedule over ``total_steps`` steps
        (warm-up, then cosine, constant or step decay; or a torch.optim.lr_scheduler class)."""
        config = self.optimizer_config
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": config.weight_decay, "name": "decay"},
            {
                "params": no_decay,
                "weight_decay": config.weight_decay if config.decay_on == "all" else 0.0,
                "name": "no_decay",
            },
        ]
        optimizer = config.build(groups)
        scheduler = config.build_scheduler(optimizer, total_steps)
        return optimizer, scheduler

    def total_steps(self) -> int:
        """Optimiser steps of the whole run: ``trainer.max_steps``, else Lightning's estimate."""
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        estimate = trainer.estimated_stepping_batches
        return int(estimate) if math.isfinite(estimate) else 0
