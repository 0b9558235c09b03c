"""Bidirectional transformer encoder with a per-position classification head (the synthetic sequence tasks)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention_config import AttentionConfig
from qkv_lightning.nn.blocks import Trunk, init_gpt2_
from qkv_lightning.nn.cost import Flops, NetworkCost, attention_shapes, trunk_flops, trunk_network_cost
from qkv_lightning.nn.sequence import SequenceConfig


@dataclass
class EncoderConfig(SequenceConfig):
    """Sizes and options of the sequence encoder."""

    n_layer: int = 2
    """Number of transformer blocks."""

    d_model: int = 64
    """Model width; must be divisible by n_head."""

    max_seq_len: int = 64
    """Longest sequence the model accepts (size of the learned position table)."""

    num_classes: int | None = None
    """Output classes per position; None takes the data's."""

    init: Literal["gpt2", "torch"] = "gpt2"
    """Weight initialisation. gpt2: N(0, init_std) weights, zero biases, residual projections scaled by
    1/sqrt(2 n_layer). torch: PyTorch's default initialisation of every layer (Kaiming-uniform linear layers, N(0, 1)
    position embeddings), with the token embedding drawn as the paper's one-hot linear input layer, U(+-1/sqrt(vocab)):
    the initialisation of the paper's synthetic-task code. The paper's score encoding keeps its own either way."""

    def cost(
        self, attention: AttentionConfig, seq_len: int | None = None, kv_bytes: int = 2, count_masked: bool = False
    ) -> NetworkCost:
        """Cost of the :class:`SequenceEncoder` this config builds (``vocab_size``, ``num_classes`` set) on
        sequences of ``seq_len`` tokens (default: ``max_seq_len``)."""
        d, bias = self.d_model, self.bias
        t = seq_len or self.max_seq_len
        shape = attention_shapes(d, self.n_head, attention, bias, self.n_layer, self.qkv_bias)
        embedding = self.vocab_size * d + (self.max_seq_len * d if self.position == "learned" else 0)
        head = d * self.num_classes + (self.num_classes if bias else 0)
        flops, fixed = trunk_flops(shape, self.mlp_width, self.n_layer, t, False, False, self.mlp)
        flops += Flops.product(2 * t * d * self.num_classes)
        return trunk_network_cost(
            "SequenceEncoder", self, attention, shape, embedding=embedding, head=head, flops=flops, fixed=fixed,
            tokens_per_sample=t, sample_unit="sequence", context_tokens=t, kv_bytes=kv_bytes,
        )


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
        self.trunk = Trunk.from_config(config, attention, causal=False)
        self.head = nn.Linear(config.d_model, config.num_classes, bias=config.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The configured initialisation, ``network.init`` (also used after materialising a meta-device model)."""
        if self.config.init == "torch":
            for module in self.modules():
                if module is not self and hasattr(module, "reset_parameters"):
                    module.reset_parameters()  # each layer's PyTorch default (and the paper encoding's own)
            bound = 1.0 / math.sqrt(self.config.vocab_size)
            nn.init.uniform_(self.embed.weight, -bound, bound)  # as a linear layer over one-hot inputs
            return
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
        dims = self.trunk.attention.rotary_dims(self.config.head_dim) if self.config.position == "rope" else None
        rope = self.config.rope(t, idx.device, self.embed.weight.dtype, dims)  # (T, R) each, or None
        hidden, maps = self.trunk(self.dropout(x), rope, None, need_weights)  # (B, T, C)
        # Not self.head(hidden): a biased Linear on (B, T, C) returns a view of its 2-D product, which FSDP2's
        # pre-backward hook cannot follow through an in-place op (torch warns). matmul + bias is a fresh tensor, the
        # same numbers.
        logits = F.linear(hidden, self.head.weight)  # (B, T, classes)
        return (logits if self.head.bias is None else logits + self.head.bias), maps  # (B, T, classes)
