"""Bidirectional transformer encoder with a per-position classification head (the synthetic sequence tasks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.blocks import Trunk, init_gpt2_
from qkv_lightning.nn.positional import rope_tables


@dataclass
class EncoderConfig:
    """Sizes and options of the sequence encoder."""

    n_layer: int = 2
    """Number of transformer blocks."""

    n_head: int = 4
    """Query heads per attention layer."""

    d_model: int = 64
    """Model width; must be divisible by n_head."""

    d_mlp: int | None = None
    """Hidden width of the MLP; None means 4 * d_model."""

    max_seq_len: int = 64
    """Longest sequence the model accepts (size of the learned position table)."""

    position: Literal["learned", "rope", "none"] = "learned"
    """Positions: learned absolute embeddings, rotary (RoPE) in attention, or none (the encoder is then
    permutation-equivariant and cannot learn order-dependent tasks such as reverse)."""

    rope_base: float = 10000.0
    """RoPE frequency base."""

    bias: bool = True
    """Biases in linear layers and LayerNorms."""

    dropout: float = 0.0
    """Residual and embedding dropout."""

    norm_eps: float = 1e-5
    """LayerNorm epsilon."""

    init_std: float = 0.02
    """Standard deviation of the GPT-2 style initialisation."""

    vocab_size: int | None = None
    """Input tokens; None takes the data's vocabulary."""

    num_classes: int | None = None
    """Output classes per position; None takes the data's."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"network.{name}={getattr(self, name)} must be at least 1.")
        if self.d_model % self.n_head:
            divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
            raise ConfigError(
                f"network.d_model={self.d_model} must be divisible by network.n_head={self.n_head}; "
                f"n_head values that divide it: {divisors}."
            )
        if self.position == "rope" and (self.d_model // self.n_head) % 2:
            raise ConfigError(
                f"network.position=rope needs an even head size, but d_model/n_head = {self.d_model // self.n_head}."
            )

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model


class SequenceEncoder(nn.Module):
    """Token embedding (+ learned positions) -> bidirectional pre-norm blocks -> one classifier per position.

    Args:
        config: sizes and options; ``vocab_size`` and ``num_classes`` must be set.
        attention: the attention variant.
    """

    def __init__(self, config: EncoderConfig, attention: AttentionConfig) -> None:
        super().__init__()
        if config.vocab_size is None or config.num_classes is None:
            raise ConfigError("network.vocab_size / network.num_classes are not set: take them from the data.")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        self.trunk = Trunk(
            n_layer=config.n_layer,
            d_model=config.d_model,
            n_head=config.n_head,
            d_mlp=config.mlp_width,
            attention=attention,
            causal=False,
            bias=config.bias,
            dropout=config.dropout,
            norm_eps=config.norm_eps,
        )
        self.head = nn.Linear(config.d_model, config.num_classes, bias=config.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style initialisation (also used after materialising a meta-device model)."""
        init_gpt2_(self, self.config.n_layer, self.config.init_std)

    def forward(self, idx: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Logits (B, T, classes) for token ids ``idx`` (B, T), and each block's attention maps if asked."""
        _, t = idx.shape
        if t > self.config.max_seq_len:
            raise ConfigError(
                f"sequence of {t} tokens exceeds network.max_seq_len={self.config.max_seq_len}; raise it or lower "
                "the data's seq_len."
            )
        positions = torch.arange(t, device=idx.device)
        x = self.embed(idx)  # (B, T, C)
        if self.position is not None:
            x = x + self.position(positions)  # (T, C) broadcast over the batch
        rope = None
        if self.config.position == "rope":
            head_dim = self.config.d_model // self.config.n_head
            rope = rope_tables(positions, head_dim, self.config.rope_base, self.embed.weight.dtype)  # (T, D) each
        hidden, maps = self.trunk(self.dropout(x), rope, None, need_weights)  # (B, T, C)
        return self.head(hidden), maps  # (B, T, classes)
