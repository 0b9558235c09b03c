"""Sequence-to-sequence tasks of equal length (the synthetic tasks): one class per position."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from qkv_lightning.errors import ConfigError
from qkv_lightning.hparams import as_config
from qkv_lightning.nn.encoder import EncoderConfig, SequenceEncoder
from qkv_lightning.tasks.base import TaskModule

STAGES = ("train", "val", "test")


class SequenceTask(TaskModule):
    """A bidirectional encoder that predicts the output digit at every position.

    Logs ``{stage}/loss``, ``{stage}/acc`` (token accuracy) and ``{stage}/seq_acc`` (whole lists right).

    Args:
        network: sizes of the encoder (vocabulary and classes come from the data).
        **kwargs: the settings every task shares (``attention``, ``optimizer``, ``data_spec``, ``compile``,
            ``activation_checkpointing``, ``init_from``, ``distill``), declared once in :class:`TaskModule`.
    """

    def __init__(self, network: EncoderConfig = EncoderConfig(), **kwargs: Any) -> None:
        super().__init__(as_config(EncoderConfig, network), **kwargs)
        self.save_task_hyperparameters(network=self.network_config)
        # one metric object per stage and quantity (token accuracy, whole-sequence accuracy)
        self.token_acc = nn.ModuleDict({f"{stage}_": MeanMetric() for stage in STAGES})
        self.seq_acc = nn.ModuleDict({f"{stage}_": MeanMetric() for stage in STAGES})

    def check_data_spec(self, spec: dict, stage: str = "fit") -> None:
        """``data.seq_len`` against ``network.max_seq_len``, before any data is generated."""
        seq_len, limit = spec.get("seq_len"), self.network_config.max_seq_len
        if seq_len is not None and seq_len > limit:
            raise ConfigError(
                f"data.seq_len={seq_len} exceeds model.network.max_seq_len={limit}, the longest sequence the model has "
                "positions for; lower data.seq_len or raise model.network.max_seq_len."
            )

    def resolved_network_config(self, data_spec: dict) -> EncoderConfig:
        config = self.network_config
        self.check_data_spec(data_spec)
        return replace(
            config,
            vocab_size=config.vocab_size or data_spec["vocab_size"],
            num_classes=config.num_classes or data_spec["num_classes"],
        )

    def build_network(self, data_spec: dict) -> nn.Module:
        return SequenceEncoder(self.resolved_network_config(data_spec), self.attention_config)

    def example_batch(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Random digit lists (B, T) and per-position classes (B, T), T the data's ``seq_len``."""
        t = self.cost().tokens_per_sample  # (raises a ConfigError without the data's spec)
        config = self.resolved_network_config(self.data_spec)
        vocab = self.data_spec.get("vocab_size") or config.vocab_size
        inputs = torch.randint(0, vocab, (batch_size, t), generator=generator)  # (B, T)
        return inputs, torch.randint(0, config.num_classes or vocab, (batch_size, t), generator=generator)  # (B, T)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, classes) for digit lists (B, T)."""
        return self.network(idx)[0]

    def _loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy over every position, and the logits (B, T, classes)."""
        inputs, targets = batch  # (B, T), (B, T)
        logits = self(inputs)  # (B, T, classes)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()), logits

    def training_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self._loss(batch)[0]

    def attention_maps(self, batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        return self.network(batch[0][:1], need_weights=True)[1]  # per block (1, H, T, T)

    def distill_outputs(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, None]:
        """The loss, the student's logits (B*T, classes), the inputs and no mask (every position counts)."""
        loss, logits = self._loss(batch)
        return loss, logits.flatten(0, 1).float(), batch[0], None

    def teacher_logits(self, network: nn.Module, inputs: Tensor) -> Tensor:
        return network(inputs)[0].flatten(0, 1)  # (B*T, classes)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        inputs, targets = batch  # (B, T), (B, T)
        if stage == "train" and self.distilling:
            loss, flat = self.distilled_training_loss(batch)
            logits = flat.view(*targets.shape, -1)  # (B, T, classes)
        else:
            loss, logits = self._loss(batch)
        correct = logits.argmax(dim=-1) == targets  # (B, T)
        token_acc, seq_acc = self.token_acc[f"{stage}_"], self.seq_acc[f"{stage}_"]
        token_acc.update(correct.float())
        seq_acc.update(correct.all(dim=-1).float())
        on_step = stage == "train"
        batch_size = inputs.shape[0]
        self.log(  # epoch means over every process's batches (not rank 0's alone) under DDP / FSDP
            f"{stage}/loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=True, batch_size=batch_size,
            sync_dist=not on_step,
        )
        self.log(f"{stage}/acc", token_acc, on_step=False, on_epoch=True, prog_bar=stage != "train")
        self.log(f"{stage}/seq_acc", seq_acc, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        inputs = batch[0] if isinstance(batch, list | tuple) else batch
        return self(inputs).argmax(dim=-1)  # (B, T)
