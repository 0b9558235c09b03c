"""Pre-norm transformer blocks and the trunk (a stack of blocks) shared by the GPT, ViT and sequence encoder."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import Attention
from qkv_lightning.nn.attention_config import AttentionConfig
from qkv_lightning.nn.kv_cache import KVCache
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

    dropout_at: Literal["residual", "mlp"] = "residual"
    """Where each block puts ``dropout``: ``residual`` (our default), after the attention's output projection and
    after the MLP's output; ``mlp``, after the MLP's GELU and after the MLP's output, none on the attention branch (the
    placement of the paper's ViT code, vision_tasks.py). The embeddings' dropout is the same either way."""

    norm_eps: float = 1e-5
    """LayerNorm epsilon."""

    init_std: float = 0.02
    """Standard deviation of the weight initialisation."""

    gelu: Literal["tanh", "exact"] = "tanh"
    """The MLP's GELU: ``tanh``, the tanh approximation (GPT-2's, our default), or ``exact``, the erf form (PyTorch's
    ``nn.GELU()`` default, as the paper's LM code uses). Not counted in FLOPs either way (element-wise)."""

    norm: Literal["layer", "rms"] = "layer"
    """The blocks' and the final norm: ``layer``, LayerNorm (GPT-2, our default; with a shift when ``bias``), or
    ``rms``, RMSNorm (Llama, Mistral, Qwen2: a scale only)."""

    mlp: Literal["gelu", "swiglu"] = "gelu"
    """The MLP: ``gelu``, two matrices with a GELU between (our default), or ``swiglu``, Llama's gated MLP
    ``proj(silu(gate(x)) * fc(x))`` with three matrices; ``d_mlp`` is then the gated width."""

    qkv_bias: bool | None = None
    """Biases on the attention's fused Q/K/V projection apart from ``bias`` (which then covers the output projection,
    the MLP and the norms); None: as ``bias``. Qwen2: ``bias: false`` with ``qkv_bias: true``."""

    def __post_init__(self) -> None:
        if self.norm not in ("layer", "rms"):
            raise ConfigError(f"network.norm={self.norm!r} must be 'layer' (LayerNorm) or 'rms' (RMSNorm).")
        if self.mlp not in ("gelu", "swiglu"):
            raise ConfigError(f"network.mlp={self.mlp!r} must be 'gelu' or 'swiglu'.")
        if self.dropout_at not in ("residual", "mlp"):
            raise ConfigError(f"network.dropout_at={self.dropout_at!r} must be 'residual' or 'mlp'.")
        if self.gelu not in ("tanh", "exact"):
            raise ConfigError(f"network.gelu={self.gelu!r} must be 'tanh' or 'exact'.")
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


class DropPath(StochasticDepth):
    """Stochastic depth (torchvision's ``StochasticDepth``, mode ``row``): drop the whole residual branch per sample
    with probability ``p`` during training and scale kept samples by 1 / (1 - p); the identity in evaluation."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__(p, mode="row")


class MLP(nn.Module):
    """Two-layer feed-forward network with GELU (``gelu``: ``tanh`` approximation or ``exact`` erf), dropout
    ``dropout`` on its output and ``hidden_dropout`` after the GELU."""

    def __init__(
        self, d_model: int, d_mlp: int, bias: bool = True, dropout: float = 0.0, gelu: str = "tanh",
        hidden_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_mlp, bias=bias)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.hidden_dropout = nn.Dropout(hidden_dropout) if hidden_dropout > 0 else nn.Identity()
        self.proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.hidden_dropout(self.act(self.fc(x)))))  # (B, T, C)


class SwiGLU(nn.Module):
    """Gated feed-forward network (Llama's): ``proj(silu(gate(x)) * fc(x))``, ``d_mlp`` the gated width."""

    def __init__(
        self, d_model: int, d_mlp: int, bias: bool = True, dropout: float = 0.0, hidden_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_mlp, bias=bias)
        self.fc = nn.Linear(d_model, d_mlp, bias=bias)
        self.hidden_dropout = nn.Dropout(hidden_dropout) if hidden_dropout > 0 else nn.Identity()
        self.proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.hidden_dropout(nn.functional.silu(self.gate(x)) * self.fc(x))  # (B, T, d_mlp)
        return self.dropout(self.proj(hidden))  # (B, T, C)


def make_norm(kind: str, d_model: int, eps: float, bias: bool) -> nn.Module:
    """A block's or the trunk's norm: LayerNorm (``layer``, shifted when ``bias``) or RMSNorm (``rms``)."""
    return nn.RMSNorm(d_model, eps=eps) if kind == "rms" else nn.LayerNorm(d_model, eps=eps, bias=bias)


def make_mlp(
    kind: str, d_model: int, d_mlp: int, bias: bool, dropout: float, gelu: str, hidden_dropout: float = 0.0
) -> nn.Module:
    """A block's MLP: :class:`MLP` (``gelu``) or :class:`SwiGLU` (``swiglu``), with dropout on the hidden layer's
    activations when ``hidden_dropout`` (``dropout_at: mlp``)."""
    if kind == "swiglu":
        return SwiGLU(d_model, d_mlp, bias=bias, dropout=dropout, hidden_dropout=hidden_dropout)
    return MLP(d_model, d_mlp, bias=bias, dropout=dropout, gelu=gelu, hidden_dropout=hidden_dropout)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, each branch with dropout and drop-path.

    Args:
        d_model: model width.
        n_head: query heads.
        d_mlp: hidden width of the MLP.
        attention: the attention variant.
        causal: decoder or encoder attention.
        bias: biases in linear layers.
        dropout: the blocks' dropout, placed by ``dropout_at``.
        drop_path: stochastic-depth probability of this block.
        norm_eps: LayerNorm epsilon.
        gelu: the MLP's GELU, ``tanh`` or ``exact`` (:attr:`TrunkConfig.gelu`).
        reuses_kv: the attention reuses an earlier layer's K/V (cross-layer sharing, see :class:`Attention`).
        norm: ``layer`` or ``rms`` (:attr:`TrunkConfig.norm`).
        mlp: ``gelu`` or ``swiglu`` (:attr:`TrunkConfig.mlp`).
        qkv_bias: biases on the fused Q/K/V projection; None: as ``bias`` (:attr:`TrunkConfig.qkv_bias`).
        dropout_at: ``residual`` (after the attention and MLP output projections) or ``mlp`` (after the MLP's GELU and
            output, none on attention) (:attr:`TrunkConfig.dropout_at`).
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
        gelu: str = "tanh",
        reuses_kv: bool = False,
        norm: str = "layer",
        mlp: str = "gelu",
        qkv_bias: bool | None = None,
        dropout_at: str = "residual",
    ) -> None:
        super().__init__()
        self.norm_attn = make_norm(norm, d_model, norm_eps, bias)
        self.attn = Attention(d_model, n_head, attention, causal=causal, bias=bias, reuses_kv=reuses_kv,
                              qkv_bias=qkv_bias)
        self.attn_dropout = nn.Dropout(dropout if dropout_at == "residual" else 0.0)
        self.norm_mlp = make_norm(norm, d_model, norm_eps, bias)
        hidden = dropout if dropout_at == "mlp" else 0.0
        self.mlp = make_mlp(mlp, d_model, d_mlp, bias, dropout, gelu, hidden_dropout=hidden)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        shared_kv: tuple[Tensor, Tensor] | None = None,
        return_kv: bool = False,
    ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, tuple[Tensor, Tensor]]:
        """``(output (B, T, C), attention maps or None)``, and the layer's ``(k, v)`` with ``return_kv``;
        ``shared_kv``: the source layer's ``(k, v)`` when this one reuses them (see :class:`Attention`)."""
        out = self.attn(self.norm_attn(x), rope, cache, need_weights, shared_kv, return_kv)  # (B, T, C), ...
        x = x + self.drop_path(self.attn_dropout(out[0]))
        x = x + self.drop_path(self.mlp(self.norm_mlp(x)))
        return (x, *out[1:])

    def static_step(self, x: Tensor, pos: Tensor, rope: tuple[Tensor, Tensor] | None, buffers: list[Tensor],
                    inplace: bool = True, workspace: Tensor | None = None,
                    shared_kv: tuple[Tensor, Tensor] | None = None, return_kv: bool = False) -> tuple:
        """:meth:`forward` in eval mode for one token against a static cache (see :meth:`Attention.static_step`):
        ``(output (B, 1, C), cache tensors)`` and ``(k, v)`` with ``return_kv``."""
        out = self.attn.static_step(self.norm_attn(x), pos, rope, buffers, inplace, workspace, shared_kv, return_kv)
        x = x + out[0]  # (B, 1, C)
        return (x + self.mlp(self.norm_mlp(x)), *out[1:])


class Trunk(nn.Module):
    """A stack of :class:`Block` followed by a final LayerNorm.

    Args:
        n_layer: number of blocks.
        drop_path: the largest stochastic-depth rate; block i gets ``drop_path * i / (n_layer - 1)``.
        **block_kwargs: the arguments of :class:`Block`; ``attention`` may be a per-layer schedule
            (``attention.layers``) and share K/V across layers (``attention.kv_share_every`` / ``kv_sources``).
    """

    def __init__(
        self, n_layer: int, d_model: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **block_kwargs
    ) -> None:
        super().__init__()
        rates = [drop_path * i / (n_layer - 1) for i in range(n_layer)] if n_layer > 1 else [drop_path]  # meta-safe
        attention: AttentionConfig = block_kwargs.pop("attention")
        self.attention = attention
        """The network's attention config (a schedule and cross-layer sharing included)."""
        n_head = block_kwargs["n_head"]
        configs = attention.layer_configs(n_layer, n_head)
        self.kv_sources = attention.kv_source_list(n_layer, n_head)
        """For each layer, the earlier layer whose K/V it reuses, or None."""
        self.kv_providers = {source for source in self.kv_sources if source is not None}
        self.blocks = nn.ModuleList(
            Block(d_model=d_model, drop_path=rate, norm_eps=norm_eps, attention=config, reuses_kv=source is not None,
                  **block_kwargs)
            for rate, config, source in zip(rates, configs, self.kv_sources, strict=True)
        )
        self.norm = make_norm(block_kwargs.get("norm", "layer"), d_model, norm_eps, block_kwargs.get("bias", True))
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
            gelu=config.gelu,
            norm=config.norm,
            mlp=config.mlp,
            qkv_bias=config.qkv_bias,
            dropout_at=config.dropout_at,
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
        provided: dict[int, tuple[Tensor, Tensor]] = {}  # cross-layer sharing: K/V of the source layers
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            source = self.kv_sources[i]
            args = (x, rope, cache, need_weights, None if source is None else provided[source], i in self.kv_providers)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                out = checkpoint(block, *args, use_reentrant=False)
            else:
                out = block(*args)
            x, weights = out[0], out[1]
            if i in self.kv_providers:
                provided[i] = out[2]
            if weights is not None:
                maps.append(weights)
        return self.norm(x), maps

    def fuse(self) -> Trunk:
        """Fuse every depth-factorised projection into one matrix (:meth:`Attention.fuse`); outputs are unchanged.
        Returns the trunk."""
        for block in self.blocks:
            block.attn.fuse()
        self.attention = dataclasses.replace(self.attention, depth=None)
        return self

    def new_caches(self, batch_size: int, capacity: int, **kwargs) -> list[KVCache]:
        """One empty :class:`KVCache` per block, sharing one workspace (see :class:`KVCache`)."""
        kwargs.setdefault("workspace", [])
        return [block.attn.new_cache(batch_size, capacity, **kwargs) for block in self.blocks]


def init_gpt2_(module: nn.Module, n_layer: int, std: float = 0.02, residual_scaling: bool = True) -> None:
    """GPT-2 initialisation: N(0, std) for linear and embedding weights, zero biases, and (with ``residual_scaling``)
    the residual output projections (attention ``proj`` and MLP ``proj``) scaled by 1/sqrt(2 * n_layer); without
    it every weight is N(0, std), as in the paper's LM code. The paper's score encoding keeps its own
    initialisation."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            residual = residual_scaling and name.endswith((".attn.proj", ".mlp.proj"))  # SwiGLU's too
            scale = (2 * n_layer) ** -0.5 if residual else 1.0
            nn.init.normal_(sub.weight, mean=0.0, std=std * scale)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
        elif isinstance(sub, PaperScoreEncoding):
            sub.reset_parameters()  # the paper's own initialisation, w ~ N(0, 0.02) and b = 0, whatever std is
    init_norms_(module)


def init_norms_(module: nn.Module) -> None:
    """Unit scales and zero shifts for every LayerNorm and RMSNorm in ``module`` (the blocks' norms, the final norm
    and the per-role norms ``attention.q_norm``, ``k_norm``, ``v_norm``); draws no random numbers."""
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm | nn.RMSNorm):
            nn.init.ones_(sub.weight)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
