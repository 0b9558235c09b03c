"""GPT-style decoder on the attention core, with KV-cached generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention_config import AttentionConfig
from qkv_lightning.nn.blocks import Trunk, init_gpt2_
from qkv_lightning.nn.cost import Flops, NetworkCost, attention_shapes, trunk_flops, trunk_network_cost
from qkv_lightning.nn.kv_cache import ROPE_KEYS_DEFAULT, KVCache
from qkv_lightning.nn.sequence import SequenceConfig

IGNORE_INDEX = -100
"""Target id that the loss skips (PyTorch's default ``ignore_index``)."""


@dataclass
class GPTConfig(SequenceConfig):
    """Sizes and options of the GPT decoder."""

    tie_embeddings: bool = True
    """Share the input embedding with the output layer (only with output: linear)."""

    output: Literal["linear", "adaptive"] = "linear"
    """Output layer: a full linear softmax, or PyTorch's adaptive softmax for large word vocabularies."""

    adaptive_cutoffs: list[int] = field(default_factory=lambda: [20000, 40000, 200000])
    """Cluster boundaries of the adaptive softmax (cutoffs at or beyond the vocabulary are dropped)."""

    adaptive_div_value: float = 4.0
    """Each adaptive-softmax tail cluster's width is divided by this factor."""

    embedding_dropout: float | None = None
    """Dropout on the token (+ position) embeddings, apart from ``dropout``, the residual dropout after each block's
    attention and MLP projections; None: the same as ``dropout`` (our default). The paper: 0 here with dropout 0.1
    (its ``embd_pdrop`` and ``resid_pdrop``; attention-probability dropout is ``attention.dropout``)."""

    residual_scaling: bool = True
    """Initialise the residual output projections (attention and MLP ``proj``) with std ``init_std / sqrt(2 *
    n_layer)``, as GPT-2 does (our default); false: every weight N(0, init_std), as the paper's LM code does."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embedding_dropout is not None and not 0.0 <= self.embedding_dropout < 1.0:
            raise ConfigError(f"network.embedding_dropout={self.embedding_dropout} must lie in [0, 1) (or be null).")
        if self.output == "adaptive" and self.tie_embeddings:
            self.tie_embeddings = False  # the adaptive softmax has its own cluster weights
        self.adaptive_cutoffs = list(self.adaptive_cutoffs)
        if self.adaptive_cutoffs != sorted(set(self.adaptive_cutoffs)) or min(self.adaptive_cutoffs, default=1) < 1:
            raise ConfigError(
                f"network.adaptive_cutoffs={self.adaptive_cutoffs} must be distinct positive integers in increasing "
                "order, e.g. [20000, 40000, 200000]."
            )

    def cost(
        self, attention: AttentionConfig, seq_len: int | None = None, kv_bytes: int = 2, count_masked: bool = False
    ) -> NetworkCost:
        """Cost of the :class:`GPT` this config builds (its ``vocab_size`` set) trained on ``seq_len`` tokens
        (default: ``max_seq_len``). An adaptive softmax counts its head cluster only: each tail cluster runs only
        for the tokens whose target falls in it, which the data decides."""
        d, v, bias = self.d_model, self.vocab_size, self.bias
        t = seq_len or self.max_seq_len
        shape = attention_shapes(d, self.n_head, attention, bias, self.n_layer, self.qkv_bias)
        embedding = v * d + (self.max_seq_len * d if self.position == "learned" else 0)
        notes = []
        if self.output == "adaptive":
            cutoffs = [c for c in self.adaptive_cutoffs if c < v] + [v]
            head_width = cutoffs[0] + len(cutoffs) - 1  # the shortlist plus one logit per tail cluster
            head = d * head_width
            for i in range(len(cutoffs) - 1):
                hidden = int(d // self.adaptive_div_value ** (i + 1))
                head += d * hidden + hidden * (cutoffs[i + 1] - cutoffs[i])
            head_flops = Flops.product(2 * t * d * head_width)
            notes.append("adaptive softmax: FLOPs count its head cluster only (tail clusters run for rare targets)")
        else:
            head = 0 if self.tie_embeddings else v * d
            head_flops = Flops.product(2 * t * d * v)
        flops, fixed = trunk_flops(shape, self.mlp_width, self.n_layer, t, True, count_masked, self.mlp)
        flops += head_flops
        return trunk_network_cost(
            "GPT", self, attention, shape, embedding=embedding, head=head, flops=flops, fixed=fixed,
            tokens_per_sample=t, sample_unit="sequence", context_tokens=self.max_seq_len, kv_bytes=kv_bytes,
            notes=tuple(notes),
        )


class GPT(nn.Module):
    """Decoder-only transformer: token (+ position) embedding, pre-norm causal blocks, LM head.

    Args:
        config: sizes and options; ``vocab_size`` must be set.
        attention: the attention variant.
    """

    fsdp_methods = ("loss",)
    """Entry points besides ``forward`` that FSDP2 must hook (they must not call ``forward`` themselves)."""

    def __init__(self, config: GPTConfig, attention: AttentionConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ConfigError("network.vocab_size is not set: take it from the data or set it in the config.")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        embedding_dropout = config.dropout if config.embedding_dropout is None else config.embedding_dropout
        self.dropout = nn.Dropout(embedding_dropout)  # on the embeddings; the blocks' residual dropout is their own
        self.trunk = Trunk.from_config(config, attention, causal=True)
        self.rope_dims = attention.rotary_dims(config.head_dim) if config.position == "rope" else None
        """Width of the rotary tables (partial rotary, a decoupled rotary key), or None without rotary positions."""
        if config.output == "adaptive":
            cutoffs = [c for c in config.adaptive_cutoffs if c < config.vocab_size]
            if not cutoffs:
                raise ConfigError(
                    f"network.output=adaptive needs at least one of network.adaptive_cutoffs={config.adaptive_cutoffs} "
                    f"below the vocabulary size {config.vocab_size}; lower the cutoffs or use output: linear."
                )
            self.head: nn.Module = nn.AdaptiveLogSoftmaxWithLoss(
                config.d_model, config.vocab_size, cutoffs, div_value=config.adaptive_div_value
            )
        else:
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation (also used after materialising a meta-device model)."""
        init_gpt2_(self, self.config.n_layer, self.config.init_std, self.config.residual_scaling)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def fuse(self) -> GPT:
        """Fuse depth-factorised projections (``attention.depth``) into one matrix each, for inference (export,
        bench-decode); the outputs do not change. Returns the model."""
        self.trunk.fuse()
        return self

    def rope(self, length: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """RoPE tables for positions 0 .. length-1, or None without rotary positions."""
        return self.config.rope(length, device, self.embed.weight.dtype, self.rope_dims)

    def hidden(
        self, idx: Tensor, caches: list[KVCache] | None = None, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """Final hidden states (B, T, C) for token ids ``idx`` (B, T), continuing ``caches`` if given."""
        _, t = idx.shape
        offset = caches[0].length if caches else 0
        if offset + t > self.config.max_seq_len:
            raise ConfigError(
                f"sequence of {offset + t} tokens exceeds network.max_seq_len={self.config.max_seq_len}; lower the "
                "data's seq_len (or the generation length) or raise network.max_seq_len."
            )
        x = self.embed(idx)  # (B, T, C)
        if self.position is not None:
            x = x + self.position(torch.arange(offset, offset + t, device=idx.device))  # (T, C) broadcast
        x = self.dropout(x)
        return self.trunk(x, self.rope(offset + t, idx.device), caches, need_weights)

    def logits(self, hidden: Tensor) -> Tensor:
        """Log-probabilities or logits (B, T, V) from hidden states (B, T, C)."""
        if isinstance(self.head, nn.AdaptiveLogSoftmaxWithLoss):
            return self.head.log_prob(hidden.flatten(0, 1)).view(*hidden.shape[:2], -1)
        return self.head(hidden)

    def forward(self, idx: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        """Logits (B, T, V) for token ids (B, T)."""
        return self.logits(self.hidden(idx, caches)[0])

    def loss(self, idx: Tensor, targets: Tensor, reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
        """Cross-entropy of ``targets`` (B, T) given ``idx`` (B, T).

        Targets equal to :data:`IGNORE_INDEX` do not count (padding, or tokens a sliding evaluation window has
        already scored). ``reduction='sum'`` gives the summed loss, for exact perplexity over many batches;
        ``'none'`` the per-target losses (B, T), 0 where ignored.
        """
        hidden = self.hidden(idx)[0]  # (B, T, C)
        if isinstance(self.head, nn.AdaptiveLogSoftmaxWithLoss):
            keep = targets != IGNORE_INDEX  # (B, T)
            nll = -self.head(hidden[keep], targets[keep]).output  # (N,)
            if reduction == "none":
                return nll.new_zeros(targets.shape).masked_scatter(keep, nll)  # (B, T)
            return nll.sum() if reduction == "sum" else nll.mean()
        logits = self.head(hidden).flatten(0, 1)  # (B*T, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision: softmax in float32
        losses = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
        # "none": a copy, not a view of the (B*T,) losses: FSDP2 cannot follow an in-place op on a view it returns
        return losses.view_as(targets).clone() if reduction == "none" else losses  # (B, T) or a scalar

    def new_caches(
        self, batch_size: int, capacity: int | None = None, rope_keys: str = ROPE_KEYS_DEFAULT
    ) -> list[KVCache]:
        """Empty KV caches for every layer; ``rope_keys``: how K=V caches give rotated keys with RoPE (see
        :func:`~qkv_lightning.nn.kv_cache.parse_rope_keys`; ignored without rotary positions)."""
        rope_keys = rope_keys if self.config.position == "rope" else "on_read"
        return self.trunk.new_caches(batch_size, capacity or self.config.max_seq_len, rope_keys=rope_keys)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        n_valid: int | None = None,
        rope_keys: str = ROPE_KEYS_DEFAULT,
    ) -> Tensor:
        """Continue ``prompt`` (B, T) by ``max_new_tokens`` tokens: greedy at temperature 0, else sampled (top-k).

        With ``use_cache`` the prompt is run once and each new token attends to the KV cache; without it every step
        runs the whole sequence again (the reference the cache must match). ``n_valid``: only ids below it are
        generated (the ids above pad the vocabulary, e.g. 50257 real GPT-2 tokens in a 50304-wide output). Call it in
        eval mode (dropout off). ``rope_keys``: the K=V cache scheme with RoPE (see :meth:`new_caches`).
        """
        total = prompt.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ConfigError(
                f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds network.max_seq_len="
                f"{self.config.max_seq_len}."
            )
        caches = self.new_caches(prompt.shape[0], total, rope_keys) if use_cache else None
        tokens, step_input = prompt, prompt
        for _ in range(max_new_tokens):
            hidden = self.hidden(step_input if use_cache else tokens, caches)[0][:, -1:]  # (B, 1, C)
            logits = self.logits(hidden)[:, 0].float()  # (B, V): only the last position is needed
            if n_valid is not None and n_valid < logits.shape[-1]:
                logits[:, n_valid:] = float("-inf")
            next_token = sample(logits, temperature, top_k, generator)  # (B, 1)
            tokens = torch.cat([tokens, next_token], dim=1)
            step_input = next_token
        return tokens


def sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Next token (B, 1) from logits (B, V): argmax at temperature 0, else softmax sampling over the top k."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
