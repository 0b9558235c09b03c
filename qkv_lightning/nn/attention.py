"""The attention core: the one place where queries, keys and values are projected, shared and cached.

Two settings are independent:

* projection sharing (:class:`Sharing`): how the roles {Q, K, V} are split into groups. In the paper's notation
  ``-`` separates groups and ``=`` joins the members of a group: ``QKV`` (three projections), ``Q=K-V``,
  ``Q-K=V``, ``Q=V-K`` (two) and ``Q=K=V`` (one);
* head sharing: ``n_kv_heads`` (GQA; 1 is MQA). A group that holds Q has as many heads as Q.

One fused ``nn.Linear`` produces every group in one matmul. Roles in the same group are the same tensor, so no
parameter goes unused and a KV cache stores each distinct tensor once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.positional import PairScoreEncoding, PaperScoreEncoding, apply_rope, rotate_into

ROLES = ("Q", "K", "V")

CANONICAL_VARIANTS = ("QKV", "Q=K-V", "Q-K=V", "Q=V-K", "Q=K=V")
"""The five ways to split {Q, K, V} into groups, in the paper's notation."""

VARIANT_ALIASES = {
    "standard": "QKV",
    "shared_qk": "Q=K-V",
    "shared_kv": "Q-K=V",
    "shared_qv": "Q=V-K",
    "single": "Q=K=V",
    "shared_qkv": "Q=K=V",
}
"""Readable names accepted in place of the notation (case-insensitive)."""


def _allowed_names() -> str:
    aliases = ", ".join(f"{alias} ({name})" for alias, name in VARIANT_ALIASES.items())
    return f"{', '.join(CANONICAL_VARIANTS)}, or an alias: {aliases}"


@dataclass(frozen=True)
class Sharing:
    """A projection-sharing variant: a partition of the roles Q, K, V into groups.

    Groups are kept in canonical order (by their first role in Q, K, V order), which is also the order of the
    groups in the fused projection's output.
    """

    groups: tuple[tuple[str, ...], ...]

    @classmethod
    def parse(cls, name: str) -> Sharing:
        """Parse a variant name (the notation in any group order, or an alias) into a :class:`Sharing`.

        Raises:
            ConfigError: if the name is not a partition of {Q, K, V} or a known alias.
        """
        if not isinstance(name, str):
            raise ConfigError(f"attention.sharing must be a string, got {name!r}. Allowed: {_allowed_names()}.")
        text = name.strip()
        alias = VARIANT_ALIASES.get(text.lower())
        if alias is not None:
            text = alias
        compact = text.upper().replace(" ", "")
        if compact == "QKV":
            return cls((("Q",), ("K",), ("V",)))
        groups = [tuple(member for member in group.split("=")) for group in compact.split("-")]
        members = [m for group in groups for m in group]
        if sorted(members) != sorted(ROLES) or any(len(m) != 1 for m in members):
            raise ConfigError(
                f"attention.sharing={name!r} is not a projection-sharing variant: use '-' between groups and '=' "
                f"between the members of a group, naming each of Q, K, V exactly once. Allowed: {_allowed_names()}."
            )
        ordered = sorted((tuple(sorted(g, key=ROLES.index)) for g in groups), key=lambda g: ROLES.index(g[0]))
        return cls(tuple(ordered))

    @property
    def name(self) -> str:
        """Canonical name in the paper's notation, e.g. ``Q-K=V``."""
        if len(self.groups) == 3:
            return "QKV"
        return "-".join("=".join(group) for group in self.groups)

    def group_of(self, role: str) -> int:
        """Index of the group that holds ``role`` (one of ``Q``, ``K``, ``V``)."""
        return next(i for i, group in enumerate(self.groups) if role in group)

    @property
    def cached_groups(self) -> tuple[int, ...]:
        """Indices of the distinct tensors a KV cache must store (the groups of K and V)."""
        return tuple(sorted({self.group_of("K"), self.group_of("V")}))

    def group_heads(self, n_head: int, n_kv_heads: int) -> tuple[int, ...]:
        """Heads of each group in the fused projection: ``n_head`` for the group holding Q, ``n_kv_heads`` for the
        others (so its output width is their sum times the head size)."""
        return tuple(n_head if "Q" in group else n_kv_heads for group in self.groups)

    @property
    def query_shared(self) -> bool:
        """Whether Q shares its projection with K or V (then K/V must have as many heads as Q)."""
        return len(self.groups[self.group_of("Q")]) > 1


def canonical_variant(name: str) -> str:
    """Canonical notation of a variant name or alias, e.g. ``canonical_variant("shared_kv") == "Q-K=V"``."""
    return Sharing.parse(name).name


SCORE_ENCODINGS = ("none", "paper", "relative")
"""The score-encoding modes; ``True`` is an alias of ``relative`` and ``False`` of ``none``."""


def canonical_score_encoding(value: str | bool | None) -> str:
    """``none``, ``paper`` or ``relative`` for a score-encoding setting (``True`` -> relative, ``False``/None -> none).

    Raises:
        ConfigError: naming ``attention.score_encoding`` and the allowed values.
    """
    if value is None or value is False:
        return "none"
    if value is True:
        return "relative"
    text = str(value).strip().lower()
    aliases = {"true": "relative", "false": "none"}
    text = aliases.get(text, text)
    if text not in SCORE_ENCODINGS:
        raise ConfigError(
            f"attention.score_encoding={value!r} is not a score encoding; allowed: none, paper (the paper's '+' "
            "variants), relative, or the aliases true (= relative) and false (= none)."
        )
    return text


@dataclass
class AttentionConfig:
    """The attention variant: projection sharing, K/V heads and symmetry breakers."""

    sharing: str = "QKV"
    """Projection sharing in the paper's notation: QKV, Q=K-V, Q-K=V, Q=V-K or Q=K=V ('-' separates groups, '='
    joins members of a group), or an alias: standard, shared_qk, shared_kv, shared_qv, single."""

    n_kv_heads: int | None = None
    """Number of key/value heads (GQA; 1 is MQA). None means as many as query heads. Must divide n_head; a
    variant that shares Q with K or V needs as many K/V heads as query heads."""

    score_encoding: Literal["none", "paper", "relative"] | bool = "none"
    """A positional encoding of the score map, added before the softmax (breaks the symmetry of Q=K scores).
    'none'; 'paper': the paper's "+" variants exactly, a 1x1 convolution over (scores + a fixed (T, T, m)
    sinusoidal tensor of query and key positions), i.e. a learned temperature sum(w) and a (T, T) bias, one w and b
    per layer shared by all heads (score_encoding_channels); 'relative': a learned per-head bias from sin/cos
    features of i, j and i - j (score_encoding_frequencies). Aliases: true = 'relative' (what true meant before
    'paper' existed, so old configs and checkpoints keep their meaning), false = 'none'."""

    score_encoding_channels: int = 10
    """m, the channels of the paper's encoding (half for the query position, half for the key position): 10 for
    the paper's synthetic tasks, 50 for its ViT."""

    score_encoding_frequencies: int = 4
    """Frequencies of the 'relative' pair encoding (it has 6 channels per frequency)."""

    mask_self: bool = False
    """Mask each token's score with itself (Reformer's remedy for shared Q=K), except where it is the only key."""

    dropout: float = 0.0
    """Dropout on the attention probabilities during training."""

    backend: Literal["sdpa", "explicit"] = "sdpa"
    """'sdpa': torch's fused scaled_dot_product_attention; 'explicit': softmax(QK^T/sqrt(d))V written out (for
    reference and attention maps)."""

    def __post_init__(self) -> None:
        self.sharing = canonical_variant(self.sharing)
        if self.n_kv_heads is not None and self.n_kv_heads < 1:
            raise ConfigError(f"attention.n_kv_heads={self.n_kv_heads} must be at least 1 (or null for n_head).")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"attention.dropout={self.dropout} must lie in [0, 1).")
        self.score_encoding = canonical_score_encoding(self.score_encoding)
        if self.score_encoding_channels < 2:
            raise ConfigError(
                f"attention.score_encoding_channels={self.score_encoding_channels} must be at least 2 (half of the "
                "channels encode the query position, half the key position)."
            )
        if self.score_encoding_frequencies < 1:
            raise ConfigError(
                f"attention.score_encoding_frequencies={self.score_encoding_frequencies} must be at least 1."
            )

    def resolve_kv_heads(self, n_head: int) -> int:
        """Number of K/V heads for a model with ``n_head`` query heads, validated.

        Raises:
            ConfigError: naming ``attention.n_kv_heads`` and the allowed values.
        """
        n_kv = n_head if self.n_kv_heads is None else self.n_kv_heads
        divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
        if n_head % n_kv:
            raise ConfigError(
                f"attention.n_kv_heads={n_kv} must divide n_head={n_head}; allowed: {divisors}."
            )
        sharing = Sharing.parse(self.sharing)
        if sharing.query_shared and n_kv != n_head:
            raise ConfigError(
                f"attention.sharing={sharing.name} shares the query projection with keys or values, so it needs as "
                f"many K/V heads as query heads: set attention.n_kv_heads to null or {n_head} (got {n_kv}), or pick "
                f"a variant that keeps Q separate (QKV or Q-K=V) for GQA/MQA."
            )
        return n_kv


ROPE_KEYS_DEFAULT = "on_read"
"""How a K=V cache with rotary positions gives rotated keys: see :func:`parse_rope_keys` and the README's
"bench-decode" section for the measurements behind the default."""


def parse_rope_keys(value: str, capacity: int) -> int:
    """Positions whose rotated keys a K=V cache keeps in a second tensor, from a ``rope_keys`` setting.

    ``on_read`` (0): the cache holds the one un-rotated K=V tensor (half of QKV's cache) and rotates the cached keys
    as it reads them, at every step, into a workspace shared by all layers. ``copy`` (``capacity``): a rotated copy
    of every key, as QKV caches them: decoding costs what QKV's does, and the cache is as large as QKV's.
    ``window:W``: a rotated copy of the first W positions only; the others are rotated on read.

    Raises:
        ConfigError: naming ``rope_keys`` and the allowed values.
    """
    text = str(value).strip().lower()
    if text == "on_read":
        return 0
    if text == "copy":
        return capacity
    if text.startswith("window:") and text[7:].isdigit() and int(text[7:]) > 0:
        return min(int(text[7:]), capacity)
    raise ConfigError(
        f"rope_keys={value!r} is not a K=V cache scheme: use on_read (rotate cached keys when read; half the cache), "
        "copy (a rotated copy of every key; QKV's cache size and speed) or window:W (a rotated copy of the first W "
        "positions, e.g. window:1024)."
    )


class KVCache:
    """Cache of one attention layer for incremental decoding; stores each distinct K/V tensor once.

    Args:
        n_tensors: distinct tensors to store (1 when K and V share a projection, else 2).
        batch_size: batch size of the decoding run.
        n_kv_heads: heads per stored tensor.
        capacity: the most tokens it can hold.
        head_dim: size of one head.
        dtype: dtype of the stored tensors.
        device: where to allocate them.
        rotated: positions (from 0) whose rotated keys are also kept, for K=V with RoPE (see
            :func:`parse_rope_keys`); 0 keeps none.
        workspace: a list shared by the caches of all layers, holding the one tensor into which keys are rotated
            on read (allocated on first use); None gives this cache its own.
    """

    def __init__(
        self,
        n_tensors: int,
        batch_size: int,
        n_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        rotated: int = 0,
        workspace: list[Tensor] | None = None,
    ) -> None:
        shape = (batch_size, n_kv_heads, capacity, head_dim)
        self.buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_tensors)]
        self.rotated = (
            torch.zeros((batch_size, n_kv_heads, rotated, head_dim), dtype=dtype, device=device) if rotated else None
        )
        self.workspace = [] if workspace is None else workspace
        self.capacity = capacity
        self.length = 0

    def update(self, new: list[Tensor]) -> list[Tensor]:
        """Append ``new`` tensors, each (B, H_kv, T, D), and return the whole sequences, each (B, H_kv, L+T, D)."""
        t_new = new[0].shape[2]
        end = self.length + t_new
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} tokens exceed its capacity of {self.capacity}")
        for buffer, tensor in zip(self.buffers, new, strict=True):
            buffer[:, :, self.length : end] = tensor
        self.length = end
        return [buffer[:, :, :end] for buffer in self.buffers]

    def rotated_keys(self, kv: Tensor, rope: tuple[Tensor, Tensor], start: int) -> Tensor:
        """Rotated keys (B, H_kv, L, D) of the un-rotated K=V sequence ``kv`` (B, H_kv, L, D) just returned by
        :meth:`update`, whose positions from ``start`` on are new; ``rope``: tables (L, D) for positions 0 .. L-1.

        Keys of the rotated copy's positions are rotated once, when they arrive; the others at every call, into the
        shared workspace when no gradient is needed (no cache-sized temporaries), else with :func:`apply_rope`.
        """
        cos, sin = rope
        end, kept = kv.shape[2], 0 if self.rotated is None else self.rotated.shape[2]
        if kept:
            upto = min(end, kept)
            if start < upto:
                self.rotated[:, :, start:upto] = apply_rope(kv[:, :, start:upto], cos[start:upto], sin[start:upto])
            if end <= kept:
                return self.rotated[:, :, :end]
        if torch.is_grad_enabled() and kv.requires_grad:
            rest = apply_rope(kv[:, :, kept:], cos[kept:], sin[kept:])
            return rest if not kept else torch.cat([self.rotated, rest], dim=2)
        out = self._workspace(kv)[:, :, :end]  # (B, H_kv, L, D)
        if kept:
            out[:, :, :kept] = self.rotated
        rotate_into(kv[:, :, kept:], cos[kept:], sin[kept:], out[:, :, kept:])
        return out

    def _workspace(self, like: Tensor) -> Tensor:
        shape = (*like.shape[:2], self.capacity, like.shape[3])
        ws = self.workspace
        fits = ws and ws[0].shape == shape and ws[0].dtype == like.dtype and ws[0].device == like.device
        if not fits or ws[0].is_inference() != torch.is_inference_mode_enabled():
            ws[:] = [torch.empty(shape, dtype=like.dtype, device=like.device)]
        return ws[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (the rotated copy included; not the workspace shared by all layers)."""
        tensors = self.buffers + ([] if self.rotated is None else [self.rotated])
        return sum(t.numel() * t.element_size() for t in tensors)


class Attention(nn.Module):
    """Multi-head attention with projection sharing, GQA/MQA, RoPE, symmetry breakers and a KV cache.

    Args:
        d_model: model width.
        n_head: number of query heads.
        config: the variant (:class:`AttentionConfig`).
        causal: decoder (causal) or encoder (bidirectional) attention.
        bias: biases in the fused projection and the output projection.
    """

    def __init__(self, d_model: int, n_head: int, config: AttentionConfig, causal: bool, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_head:
            raise ConfigError(f"d_model={d_model} must be divisible by n_head={n_head}.")
        self.config = config
        self.sharing = Sharing.parse(config.sharing)
        self.causal = causal
        self.n_head = n_head
        self.n_kv_heads = config.resolve_kv_heads(n_head)
        self.head_dim = d_model // n_head
        self.group_heads = list(self.sharing.group_heads(n_head, self.n_kv_heads))
        self.group_widths = [heads * self.head_dim for heads in self.group_heads]
        self.q_group, self.k_group, self.v_group = (self.sharing.group_of(role) for role in ROLES)
        self.kv_shared = self.k_group == self.v_group

        self.qkv = nn.Linear(d_model, sum(self.group_widths), bias=bias)  # one fused matmul for every group
        self.proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)
        mode = canonical_score_encoding(config.score_encoding)
        self.score_encoding: PairScoreEncoding | PaperScoreEncoding | None = None
        if mode == "relative":
            self.score_encoding = PairScoreEncoding(n_head, config.score_encoding_frequencies)
        elif mode == "paper":
            self.score_encoding = PaperScoreEncoding(config.score_encoding_channels)
        self.paper_encoding = mode == "paper"

    def new_cache(
        self,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        rope_keys: str = ROPE_KEYS_DEFAULT,
        workspace: list[Tensor] | None = None,
    ) -> KVCache:
        """An empty :class:`KVCache` for this layer; ``rope_keys`` (K=V variants with RoPE): see
        :func:`parse_rope_keys`; ``workspace``: shared by the layers' caches (see :class:`KVCache`)."""
        weight = self.qkv.weight
        rotated = parse_rope_keys(rope_keys, capacity) if self.kv_shared else 0
        return KVCache(
            len(self.sharing.cached_groups),
            batch_size,
            self.n_kv_heads,
            capacity,
            self.head_dim,
            dtype or weight.dtype,
            device or weight.device,
            rotated=rotated,
            workspace=workspace,
        )

    def project(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Project ``x`` (B, T, C) into q (B, H, T, D) and k, v (B, H_kv, L+T, D), L tokens coming from ``cache``.

        ``rope``: cos/sin tables for positions 0 .. L+T-1, each (L+T, D), or None. Roles in one group are the same
        tensor. With K=V shared the cache holds the un-rotated tensor and keys are rotated when read.
        """
        b, t, _ = x.shape
        offset = cache.length if cache is not None else 0
        fused = self.qkv(x)  # (B, T, sum of group widths)
        groups = [
            part.view(b, t, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, D)
            for part, heads in zip(fused.split(self.group_widths, dim=-1), self.group_heads, strict=True)
        ]

        def rotate_new(tensor: Tensor) -> Tensor:  # rotate the T new positions
            return tensor if rope is None else apply_rope(tensor, rope[0][offset:], rope[1][offset:])

        if self.kv_shared:  # Q-K=V or Q=K=V: one cached tensor serves as keys (rotated) and values (raw)
            kv = cache.update([groups[self.k_group]])[0] if cache is not None else groups[self.k_group]
            v = kv  # (B, H_kv, L+T, D)
            if rope is None:
                k = kv
            else:
                k = apply_rope(kv, *rope) if cache is None else cache.rotated_keys(kv, rope, offset)
            q = k[:, :, offset:] if self.q_group == self.k_group else rotate_new(groups[self.q_group])
            return q, k, v
        k_new = rotate_new(groups[self.k_group])  # (B, H_kv, T, D)
        q = k_new if self.q_group == self.k_group else rotate_new(groups[self.q_group])
        v_new = groups[self.v_group]  # raw: for Q=V-K this is Q before rotation
        if cache is None:
            return q, k_new, v_new
        k, v = cache.update([k_new, v_new])
        return q, k, v

    def static_step(
        self,
        x: Tensor,
        pos: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        buffers: list[Tensor],
        inplace: bool = True,
        workspace: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """One decoding step against a static cache: every shape is fixed by the cache's capacity, not by the
        position, so the step compiles (and exports) once and CUDA graphs can replay it.

        Args:
            x: the new token's input (B, 1, C).
            pos: its position, an int64 tensor of shape (1,), or one position per sequence, shape (B,) (a batch of
                requests of different lengths, as a serving loop runs them).
            rope: tables (capacity, D) for positions 0 .. capacity-1, or None.
            buffers: this layer's cache tensors, each (B, H_kv, capacity, D): K and V; or for K=V the un-rotated
                tensor, plus its rotated copy when the cache keeps one (``rope_keys=copy``).
            inplace: write the new entries into ``buffers`` (eager, compiled) or return new tensors (export).
            workspace: (B, H_kv, capacity, D) tensor to rotate cached keys into (eager); None rotates them with
                :func:`apply_rope` (compiled and exported graphs, where the compiler fuses it).

        Returns:
            ``(output (B, 1, C), the layer's cache tensors after the step)``.
        """
        b = x.shape[0]
        capacity = buffers[0].shape[2]
        fused = self.qkv(x)  # (B, 1, sum of group widths)
        groups = [
            part.view(b, 1, heads, self.head_dim).transpose(1, 2)  # (B, heads, 1, D)
            for part, heads in zip(fused.split(self.group_widths, dim=-1), self.group_heads, strict=True)
        ]
        n_pos = pos.shape[0]
        row = None if rope is None else tuple(t.index_select(0, pos).view(n_pos, 1, 1, -1) for t in rope)  # (P,1,1,D)

        def rotate(tensor: Tensor) -> Tensor:
            return tensor if row is None else apply_rope(tensor, *row)

        def write(buffer: Tensor, new: Tensor) -> Tensor:  # new (B, H_kv, 1, D) at pos into (B, H_kv, capacity, D)
            if n_pos == 1:
                return buffer.index_copy_(2, pos, new) if inplace else buffer.index_copy(2, pos, new)
            index = pos.view(n_pos, 1, 1, 1).expand_as(new)
            return buffer.scatter_(2, index, new) if inplace else buffer.scatter(2, index, new)

        if self.kv_shared:
            kv_new = groups[self.k_group]
            stored = [write(buffers[0], kv_new)]
            v = stored[0]
            if rope is None:
                k = v
            elif len(buffers) == 2:  # the rotated copy
                stored.append(write(buffers[1], rotate(kv_new)))
                k = stored[1]
            elif workspace is not None:
                k = rotate_into(v, *rope, workspace)
            else:
                k = apply_rope(v, *rope)
            q = rotate(kv_new) if self.q_group == self.k_group else rotate(groups[self.q_group])
        else:
            k_new = rotate(groups[self.k_group])
            q = k_new if self.q_group == self.k_group else rotate(groups[self.q_group])
            stored = [write(buffers[0], k_new), write(buffers[1], groups[self.v_group])]
            k, v = stored
        keys = torch.arange(capacity, device=x.device)
        at = pos.view(n_pos, 1, 1, 1)
        allowed = keys <= at  # (P, 1, 1, capacity): the filled positions
        if self.config.mask_self:
            allowed = allowed & ((keys != at) | (at == 0))
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        if self.score_encoding is not None:
            encoded = self.score_encoding(pos, keys).to(q.dtype)  # (H, P, capacity)
            bias = bias + encoded.transpose(0, 1).unsqueeze(2)  # (P, H, 1, capacity)
        if self.config.backend == "explicit":
            out = self.explicit_attention(q, k, v, bias, 0.0)[0]
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, enable_gqa=self.n_kv_heads != self.n_head
            )  # (B, H, 1, D)
        out = out.transpose(1, 2).reshape(b, 1, self.n_head * self.head_dim)  # (B, 1, H*D)
        return self.proj(out), stored

    def score_bias(self, t_q: int, t_k: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """Additive bias (H or 1, Tq, Tk) holding masks and the score encoding; None when no mask is needed.

        Query i sits at position t_k - t_q + i (the newest positions), key j at position j.
        """
        offset = t_k - t_q
        needs_causal_mask = self.causal and t_q > 1 and offset > 0
        if self.score_encoding is None and not self.config.mask_self and not needs_causal_mask:
            return None
        allowed = self.allowed(t_q, t_k, device)
        bias = torch.zeros(1, t_q, t_k, device=device, dtype=dtype)
        if self.score_encoding is not None:  # relative: (H, Tq, Tk); paper: (Tq, Tk), shared by the heads
            q_pos = torch.arange(offset, t_k, device=device)
            bias = bias + self.score_encoding(q_pos, torch.arange(t_k, device=device)).to(dtype)
        return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))

    def allowed(self, t_q: int, t_k: int, device: torch.device) -> Tensor | None:
        """Boolean (Tq, Tk) mask of the keys each query may attend to, or None when all are allowed."""
        q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]  # (Tq, 1)
        k_pos = torch.arange(t_k, device=device)[None, :]  # (1, Tk)
        allowed = (k_pos <= q_pos) if self.causal else None
        if self.config.mask_self:
            not_self = k_pos != q_pos  # (Tq, Tk)
            others = not_self if allowed is None else allowed & not_self
            alone = ~others.any(dim=-1, keepdim=True)  # a query with no other key keeps itself
            allowed = others | (alone & ~not_self)
        return allowed

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend.

        Args:
            x: input of shape (B, T, C).
            rope: rotary cos/sin tables for positions 0 .. L+T-1 (L = tokens already in ``cache``), or None.
            cache: a :class:`KVCache` to read from and append to, or None.
            need_weights: also return the attention probabilities (uses the explicit path).

        Returns:
            ``(output (B, T, C), probabilities (B, H, T, L+T) or None)``.
        """
        b, t, _ = x.shape
        q, k, v = self.project(x, rope, cache)  # (B, H, T, D), (B, H_kv, S, D), (B, H_kv, S, D)
        s = k.shape[2]
        dropout = self.config.dropout if self.training else 0.0
        if self.paper_encoding:  # the paper's temperature sum(w) scales the scores: scale q, keep the fused path
            q = q * self.score_encoding.temperature.to(q.dtype)
        bias = self.score_bias(t, s, x.device, q.dtype)
        weights = None
        if need_weights or self.config.backend == "explicit":
            out, weights = self.explicit_attention(q, k, v, bias, dropout)
        else:
            is_causal = self.causal and bias is None and t > 1
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=is_causal,
                enable_gqa=self.n_kv_heads != self.n_head,
            )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.proj(out), weights

    def explicit_attention(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout: float
    ) -> tuple[Tensor, Tensor]:
        """softmax(q k^T / sqrt(D) + masks) v written out; returns the output (B, H, T, D) and probabilities."""
        k, v = self.expand_kv(k), self.expand_kv(v)  # (B, H, S, D)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        if bias is not None:
            scores = scores + bias
        elif self.causal and q.shape[2] > 1:
            allowed = self.allowed(q.shape[2], k.shape[2], q.device)
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)  # (B,H,T,S)
        return F.dropout(probs, dropout, training=dropout > 0) @ v, probs

    def expand_kv(self, tensor: Tensor) -> Tensor:
        """Repeat K/V heads so that query head h reads K/V head h // (H / H_kv), as SDPA's ``enable_gqa`` does."""
        return tensor.repeat_interleave(self.n_head // self.n_kv_heads, dim=1)

    def logits(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Attention logits (B, H, T, T) before any mask: q k^T / sqrt(D) with the score encoding, if any."""
        q, k, _ = self.project(x, rope)
        scores = (q @ self.expand_kv(k).transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, T)
        if self.paper_encoding:
            scores = scores * self.score_encoding.temperature.to(scores.dtype)
        if self.score_encoding is not None:
            positions = torch.arange(x.shape[1], device=x.device)
            scores = scores + self.score_encoding(positions, positions).to(scores.dtype)
        return scores
