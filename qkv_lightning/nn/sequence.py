"""Config fields shared by the networks over token sequences (the GPT decoder and the sequence encoder)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.blocks import TrunkConfig
from qkv_lightning.nn.positional import rope_tables


@dataclass
class SequenceConfig(TrunkConfig):
    """A trunk over token sequences: vocabulary, length and positions."""

    max_seq_len: int = 256
    """Longest sequence the model accepts (size of the learned position table)."""

    vocab_size: int | None = None
    """Input (and, for the decoder, output) vocabulary; None takes the data's."""

    position: Literal["learned", "rope", "none"] = "learned"
    """Positions: learned absolute embeddings (GPT-2), rotary (RoPE) in attention, or none (the model then sees no
    order: an encoder without positions cannot learn order-dependent tasks such as reverse)."""

    rope_base: float = 10000.0
    """RoPE frequency base."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_seq_len < 1:
            raise ConfigError(f"network.max_seq_len={self.max_seq_len} must be at least 1.")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"network.position=rope needs an even head size, but d_model/n_head = {self.head_dim}.")

    def rope(
        self, length: int, device: torch.device, dtype: torch.dtype, dims: int | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """RoPE tables for positions 0 .. length-1, each (length, dims), or None without rotary positions; ``dims``:
        the rotated width (``AttentionConfig.rotary_dims``: partial rotary, a decoupled rotary key), None: head_dim.
        The frequencies follow the rotated width, as Hugging Face's partial rotary computes them."""
        if self.position != "rope":
            return None
        return rope_tables(torch.arange(length, device=device), dims or self.head_dim, self.rope_base, dtype)
