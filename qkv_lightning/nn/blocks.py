"""Pre-norm transformer blocks and the trunk (a stack of blocks) shared by the GPT, ViT and sequence encoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import Attention, AttentionConfig, KVCache
from qkv_lightning.nn.positional import PaperScoreEncoding


@dataclass
class TrunkConfig:
    """Sizes of the stack of transformer blocks, shared by every network's config."""

    n_layer: int = 4
    """Number of transformer blocks."""

    n_head: int = 4
    """Query heads per attention layer."""

    d_model: int = 256
    """Model width; must be divisible by n_head."""

    d_mlp: int | None = None
    """Hidden width of the MLP; None means 4 * d_model."""

    bias: bool = True
    """Biases in linear layers and LayerNorms."""

    dropout: float = 0.0
    """Residual and embedding dropout."""

    norm_eps: float = 1e-5
    """LayerNorm epsilon."""

    init_std: float = 0.02
    """Standard deviation of the weight initialisation."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ConfigError(f"network.{name}={getattr(self, name)} must be at least 1.")
        if self.d_model % self.n_head:
            divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
            raise ConfigError(
                f"network.d_model={self.d_model} must be divisible by network.n_head={self.n_head}; "
                f"n_head values that divide it: {divisors}."
            )
        if self.d_mlp is not None and self.d_mlp < 1:
            raise ConfigError(f"network.d_mlp={self.d_mlp} must be at least 1 (or null for 4 * d_model).")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"network.dropout={self.dropout} must lie in [0, 1).")

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p`` during training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)  # (B, 1, ...)
        return x * keep / (1.0 - self.p)


class MLP(nn.Module):
    """Two-layer feed-forward network with GELU."""

    def __init__(self, d_model: int, d_mlp: int, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_mlp, bias=bias)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, each branch with dropout and drop-path.

    Args:
        d_model: model width.
        n_head: query heads.
        d_mlp: hidden width of the MLP.
        attention: the attention variant.
        causal: decoder or encoder attention.
        bias: biases in linear layers.
        dropout: residual dropout (after the attention and MLP output projections).
        drop_path: stochastic-depth probability of this block.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_mlp: int,
        attention: AttentionConfig,
        causal: bool,
        bias: bool = True,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model, eps=norm_eps, bias=bias)
        self.attn = Attention(d_model, n_head, attention, causal=causal, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(d_model, eps=norm_eps, bias=bias)
        self.mlp = MLP(d_model, d_mlp, bias=bias, dropout=dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        attended, weights = self.attn(self.norm_attn(x), rope, cache, need_weights)  # (B, T, C)
        x = x + self.drop_path(self.attn_dropout(attended))
        x = x + self.drop_path(self.mlp(self.norm_mlp(x)))
        return x, weights


    def static_step(self, x: Tensor, pos: Tensor, rope: tuple[Tensor, Tensor] | None, buffers: list[Tensor],
                    inplace: bool = True, workspace: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """:meth:`forward` in eval mode for one token against a static cache (see :meth:`Attention.static_step`)."""
        attended, stored = self.attn.static_step(self.norm_attn(x), pos, rope, buffers, inplace, workspace)
        x = x + attended  # (B, 1, C)
        return x + self.mlp(self.norm_mlp(x)), stored


class Trunk(nn.Module):
    """A stack of :class:`Block` followed by a final LayerNorm.

    Args:
        n_layer: number of blocks.
        drop_path: the largest stochastic-depth rate; block i gets ``drop_path * i / (n_layer - 1)``.
        **block_kwargs: the arguments of :class:`Block`.
    """

    def __init__(
        self, n_layer: int, d_model: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **block_kwargs
    ) -> None:
        super().__init__()
        rates = [drop_path * i / (n_layer - 1) for i in range(n_layer)] if n_layer > 1 else [drop_path]  # meta-safe
        self.blocks = nn.ModuleList(
            Block(d_model=d_model, drop_path=rate, norm_eps=norm_eps, **block_kwargs) for rate in rates
        )
        self.norm = nn.LayerNorm(d_model, eps=norm_eps, bias=block_kwargs.get("bias", True))
        self.activation_checkpointing = False
        """Recompute each block's activations in the backward pass instead of storing them (saves memory)."""

    @classmethod
    def from_config(
        cls, config: TrunkConfig, attention: AttentionConfig, causal: bool, drop_path: float = 0.0
    ) -> Trunk:
        """The trunk a network config describes."""
        return cls(
            n_layer=config.n_layer,
            d_model=config.d_model,
            n_head=config.n_head,
            d_mlp=config.mlp_width,
            attention=attention,
            causal=causal,
            bias=config.bias,
            dropout=config.dropout,
            drop_path=drop_path,
            norm_eps=config.norm_eps,
        )

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        caches: Sequence[KVCache] | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Run every block; returns the normalised output (B, T, C) and, if asked, each block's attention maps."""
        maps = []
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, weights = checkpoint(block, x, rope, cache, need_weights, use_reentrant=False)
            else:
                x, weights = block(x, rope, cache, need_weights)
            if weights is not None:
                maps.append(weights)
        return self.norm(x), maps

    def new_caches(self, batch_size: int, capacity: int, **kwargs) -> list[KVCache]:
        """One empty :class:`KVCache` per block, sharing one workspace (see :class:`KVCache`)."""
        kwargs.setdefault("workspace", [])
        return [block.attn.new_cache(batch_size, capacity, **kwargs) for block in self.blocks]


def init_gpt2_(module: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 initialisation: N(0, std) for linear and embedding weights, zero biases, and the residual output
    projections (attention ``proj`` and MLP ``proj``) scaled by 1/sqrt(2 * n_layer). The paper's score encoding keeps
    its own initialisation."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            scale = (2 * n_layer) ** -0.5 if name.endswith((".attn.proj", ".mlp.proj")) else 1.0
            nn.init.normal_(sub.weight, mean=0.0, std=std * scale)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, PaperScoreEncoding):
            sub.reset_parameters()  # the paper's own initialisation, w ~ N(0, 0.02) and b = 0, whatever std is
