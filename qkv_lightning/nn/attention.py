"""The attention core: the one place where queries, keys and values are projected, shared and cached.

The variant comes parsed with its :class:`~qkv_lightning.nn.attention_config.AttentionConfig`: projection sharing
(:class:`~qkv_lightning.nn.sharing.Sharing`) and K/V heads give the rows of one fused ``nn.Linear``
(:class:`~qkv_lightning.nn.sharing.ProjectionLayout`), which produces every group in one matmul. Roles in the same
group are the same tensor, so no parameter goes unused and a KV cache (:mod:`qkv_lightning.nn.kv_cache`) stores
each distinct tensor once.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv_lightning.errors import ConfigError

# bench/ imports CANONICAL_VARIANTS and canonical_score_encoding from here (homes: nn.sharing, nn.attention_config)
from qkv_lightning.nn.attention_config import AttentionConfig, canonical_score_encoding  # noqa: F401
from qkv_lightning.nn.kv_cache import (
    ROPE_KEYS_DEFAULT,
    KVCache,
    grouped_matmul,
    is_fused,
    parse_rope_keys,
    rotary_scores,
)
from qkv_lightning.nn.positional import PairScoreEncoding, PaperScoreEncoding, apply_rope, rotate_into
from qkv_lightning.nn.sharing import CANONICAL_VARIANTS, ROLES  # noqa: F401


def role_norm(kind: str, head_dim: int, eps: float, bias: bool) -> nn.Module:
    """The norm of one role over each head: Identity (none), RMSNorm (rms) or LayerNorm (layer)."""
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=eps, bias=bias)
    return nn.Identity()


class Attention(nn.Module):
    """Multi-head attention with projection sharing, GQA/MQA, RoPE, symmetry breakers and a KV cache.

    Args:
        d_model: model width.
        n_head: number of query heads.
        config: the variant (:class:`AttentionConfig`).
        causal: decoder (causal) or encoder (bidirectional) attention.
        bias: biases in the fused projection and the output projection.
        reuses_kv: cross-layer sharing: this layer projects only Q and attends with the K/V of an earlier layer
            (passed to :meth:`forward` as ``shared_kv``); it has no K/V projection and no cache of its own.
        qkv_bias: biases on the fused projection (and its depth factors) apart from ``bias``, which then covers the
            output projection and the per-role norms (Qwen2: q/k/v biases only); None: as ``bias``.
    """

    def __init__(
        self, d_model: int, n_head: int, config: AttentionConfig, causal: bool, bias: bool = True,
        reuses_kv: bool = False, qkv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        projection_bias = bias if qkv_bias is None else qkv_bias
        if d_model % n_head:
            raise ConfigError(f"d_model={d_model} must be divisible by n_head={n_head}.")
        self.config = config
        self.layout = config.layout(n_head, d_model // n_head, owns_kv=not reuses_kv)  # the config's parsed sharing
        """Which rows of the fused projection ``qkv`` hold which group (:class:`ProjectionLayout`)."""
        self.sharing = self.layout.sharing
        self.causal = causal
        self.n_head = n_head
        self.n_kv_heads = self.layout.n_kv_heads
        self.head_dim = self.layout.head_dim
        self.group_heads = list(self.layout.group_heads)
        self.group_widths = [heads * self.head_dim for heads in self.group_heads]
        self.q_group, self.k_group, self.v_group = (self.sharing.group_of(role) for role in ROLES)
        self.kv_shared = self.k_group == self.v_group
        self.reuses_kv = reuses_kv
        if reuses_kv and self.sharing.query_shared:
            raise ConfigError(
                f"attention.sharing={self.sharing.name} ties Q to K or V, so a layer that reuses another layer's K/V "
                "(attention.kv_share_every / kv_sources) cannot have it: use QKV or Q-K=V there."
            )
        self.own_groups = list(self.layout.groups)
        """The groups this layer projects (a layer reusing K/V projects only Q's)."""
        depths = config.group_depths()

        # one fused matmul for every group this layer projects
        self.qkv = nn.Linear(d_model, self.layout.width, bias=projection_bias)
        self.rope_key_dim = config.rope_key_dim
        """Dimensions of the decoupled rotary key (0: none)."""
        if self.rope_key_dim:  # each query head's rotary part (H*R rows), then the one shared rotary key (R rows)
            self.rope_proj = nn.Linear(d_model, (n_head + 1) * self.rope_key_dim, bias=projection_bias)
        self.proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)
        mode = config.score_encoding  # canonical (AttentionConfig)
        self.score_encoding: PairScoreEncoding | PaperScoreEncoding | None = None
        if mode == "relative":
            self.score_encoding = PairScoreEncoding(n_head, config.score_encoding_frequencies)
        elif mode == "paper":
            self.score_encoding = PaperScoreEncoding(config.score_encoding_channels)
        self.paper_encoding = mode == "paper"
        eps = config.role_norm_eps
        self.q_norm = role_norm(config.q_norm, self.head_dim, eps, bias)
        self.k_norm = role_norm("none" if reuses_kv else config.k_norm, self.head_dim, eps, bias)
        self.v_norm = role_norm("none" if reuses_kv else config.v_norm, self.head_dim, eps, bias)
        self.plain_qk = config.q_norm == "none" and config.k_norm == "none"
        """Q and K of one group are the same tensor (no per-role norm tells them apart)."""
        self.factors = nn.ModuleDict(
            {
                str(g): nn.Sequential(*(nn.Linear(self.group_widths[g], self.group_widths[g], bias=projection_bias)
                                        for _ in range(depths[g] - 1)))
                for g in self.own_groups
                if depths[g] > 1
            }
        )
        """Depth factorisation: the factors after the first (which is the group's part of ``qkv``), per group."""

    @property
    def cached_tensors(self) -> int:
        """Distinct tensors this layer's KV cache stores (0 for a layer that reuses another layer's K/V)."""
        return self.layout.cached_tensors

    def split_groups(self, x: Tensor) -> list[Tensor]:
        """The fused projection of ``x`` (B, T, C) and each group's depth factors, as (B, heads, T, D) per group
        this layer projects (indexed by group; a layer reusing K/V has only Q's, group 0)."""
        b, t, _ = x.shape
        fused = self.qkv(x)  # (B, T, sum of the own groups' widths)
        out = []
        for g, part in zip(self.layout.groups, fused.split(self.layout.widths, dim=-1), strict=True):
            if str(g) in self.factors:
                part = self.factors[str(g)](part)  # (B, T, width): the product W1 W2 ... of the group
            out.append(part.view(b, t, self.group_heads[g], self.head_dim).transpose(1, 2))  # (B, heads, T, D)
        return out

    @torch.no_grad()
    def fuse(self) -> None:
        """Multiply each depth-factorised group's factors into its rows of the fused projection (one matmul at
        inference): x W1^T + b1 followed by y A^T + a is x (A W1)^T + (A b1 + a). The outputs do not change."""
        if not self.factors:
            return
        weight, bias = self.qkv.weight, self.qkv.bias
        for g in self.layout.groups:
            if str(g) in self.factors:
                rows = self.layout.rows(g)
                w = weight[rows].double()  # (width, C)
                b = None if bias is None else bias[rows].double()
                for layer in self.factors[str(g)]:
                    a = layer.weight.double()  # (width, width)
                    w = a @ w
                    if b is not None:
                        b = a @ b + layer.bias.double()
                weight[rows] = w.to(weight.dtype)
                if b is not None:
                    bias[rows] = b.to(bias.dtype)
        self.factors = nn.ModuleDict()
        self.config = dataclasses.replace(self.config, depth=None)

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
        :func:`parse_rope_keys` (``fused``: :func:`~qkv_lightning.nn.fused_decode.fuses`); ``workspace``: shared by
        the layers' caches (see :class:`KVCache`)."""
        weight = self.qkv.weight
        rotates = self.kv_shared and not self.reuses_kv and not self.rope_key_dim  # K=V keys rotated on read
        rotated = parse_rope_keys(rope_keys, capacity) if rotates else 0
        fused = False
        if rotates and is_fused(rope_keys):  # decoding steps in the fused kernel, where this layer allows it
            from qkv_lightning.nn.fused_decode import fuses

            fused = fuses(self, torch.device(device or weight.device))
        return KVCache(
            self.cached_tensors,
            batch_size,
            self.n_kv_heads,
            capacity,
            self.head_dim,
            dtype or weight.dtype,
            device or weight.device,
            rotated=rotated,
            workspace=workspace,
            rotated_dim=self.config.rotary_dims(self.head_dim) if rotated else None,
            rope_key_dim=self.rope_key_dim,
            fused=fused,
        )

    def cache_shapes(self, batch_size: int, capacity: int, copy: bool = False) -> list[tuple[int, ...]]:
        """Shapes of this layer's static cache tensors: K and V, or the one K=V tensor (and its rotated copy, the
        rotated dimensions only, with ``copy``), then the decoupled rotary key (B, 1, capacity, rope_key_dim)."""
        if self.reuses_kv:
            return []
        shape = (batch_size, self.n_kv_heads, capacity, self.head_dim)
        if not self.kv_shared:
            out = [shape, shape]
        elif copy and not self.rope_key_dim:
            out = [shape, (*shape[:3], self.config.rotary_dims(self.head_dim))]
        else:
            out = [shape]
        return out + ([(batch_size, 1, capacity, self.rope_key_dim)] if self.rope_key_dim else [])

    def rope_parts(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """The decoupled rotary parts of ``x`` (B, T, C): each query head's (B, H, T, R) and the shared key
        (B, 1, T, R), rotated by ``rope`` (tables (T, R) of the T positions of ``x``) if given."""
        b, t, _ = x.shape
        r = self.rope_key_dim
        extra = self.rope_proj(x)  # (B, T, (H + 1) * R)
        q_rope = extra[..., : self.n_head * r].view(b, t, self.n_head, r).transpose(1, 2)  # (B, H, T, R)
        k_rope = extra[..., self.n_head * r :].view(b, t, 1, r).transpose(1, 2)  # (B, 1, T, R)
        if rope is None:
            return q_rope, k_rope
        return apply_rope(q_rope, *rope), apply_rope(k_rope, *rope)

    @staticmethod
    def partial_split(q: Tensor, r: int, scores: Tensor) -> tuple[Tensor, Tensor]:
        """The split query (see :meth:`split_attention`) of a partial-rotary K=V decoding step: ``q`` (B, H, T, D)
        with its first ``r`` (rotated) dimensions zeroed, taken against the whole un-rotated keys (B, H_kv, L, D) (a
        product over the contiguous cache, faster than over its last D - r dimensions, and the same sum), and
        ``scores`` (B, H, T, L), those r dimensions' scores against the rotated keys (:func:`rotary_scores`)."""
        rest = q.clone()
        rest[..., :r] = 0.0  # (B, H, T, D)
        return rest, scores

    @staticmethod
    def decoupled_split(q: Tensor, q_rope: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """The split query (see :meth:`split_attention`) with a decoupled rotary key: ``q`` (B, H, T, D) and the
        rotary parts' scores, ``q_rope`` (B, H, T, R) against the cached rotated key ``k_rope`` (B, 1, L, R)."""
        return q, grouped_matmul(q_rope, k_rope.transpose(-2, -1))  # (B, H, T, D), (B, H, T, L)

    def joined(self, q: tuple[Tensor, Tensor], k: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The decoupled rotary parts beside the heads, (q, q_rope) and (k, k_rope), joined into one q (B, H, T, E)
        and k (B, H_kv, S, E): the form SDPA takes (a one-head second key part repeated for each K/V head)."""
        kb = k[1].expand(-1, k[0].shape[1], -1, -1) if k[1].shape[1] != k[0].shape[1] else k[1]
        return torch.cat(q, dim=-1), torch.cat([k[0], kb], dim=-1)

    def project(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        shared_kv: tuple[Tensor, Tensor] | None = None,
        split: bool = False,
    ) -> tuple[Tensor | tuple[Tensor, Tensor], Tensor, Tensor]:
        """Project ``x`` (B, T, C) into q (B, H, T, D) and k, v (B, H_kv, L+T, D), L tokens coming from ``cache``.

        ``rope``: cos/sin tables for positions 0 .. L+T-1, each (L+T, R), or None (R < D: partial rotary; with a
        decoupled rotary key R is its size). Roles in one group are the same tensor. With K=V shared the cache holds
        the un-rotated tensor and keys are rotated (and the per-role norms applied) when read. ``shared_kv``: the
        keys and values of the source layer, for a layer that reuses them.

        With a decoupled rotary key, q and k have ``D + rope_key_dim`` dimensions (each head's rotary part after its
        own). ``split``: return q as the pair :meth:`split_attention` takes instead, where that avoids copying the
        cache: (q, the rotary parts' scores) with a decoupled key, and for a K=V cache with partial rotary (q with its
        rotated dimensions zeroed, their scores against the rotated keys, which are never rotated into a tensor of
        the cache's length: :meth:`KVCache.rotary_scores`); k is then the un-rotated keys (B, H_kv, L+T, D).
        """
        t = x.shape[1]
        groups = self.split_groups(x)  # (B, heads, T, D) per group

        if self.reuses_kv:  # cross-layer sharing: the source's keys (rotated, normed) and values, L+T positions
            if shared_kv is None:
                raise ValueError("this layer reuses an earlier layer's K/V: pass them as shared_kv")
            k, v = shared_kv
            offset = k.shape[2] - t
            q = self.q_norm(groups[self.q_group])
            return (q if rope is None else apply_rope(q, rope[0][offset:], rope[1][offset:])), k, v

        offset = cache.length if cache is not None else 0
        if self.rope_key_dim:
            return self.project_decoupled(x, groups, rope, cache, split)

        def rotate_new(tensor: Tensor) -> Tensor:  # rotate the T new positions
            return tensor if rope is None else apply_rope(tensor, rope[0][offset:], rope[1][offset:])

        if self.kv_shared:  # Q-K=V or Q=K=V: one cached tensor serves as keys (rotated) and values (raw)
            kv = cache.update([groups[self.k_group]])[0] if cache is not None else groups[self.k_group]
            v = self.v_norm(kv)  # (B, H_kv, L+T, D)
            keys = self.k_norm(kv)
            r = self.head_dim if rope is None else rope[0].shape[-1]
            if rope is None:
                k = keys
            elif cache is None:
                k = apply_rope(keys, *rope)
            elif r < self.head_dim and split:  # partial rotary, a decoding step: the rotated dimensions' scores
                q = rotate_new(self.q_norm(groups[self.q_group]))  # (B, H, 1, D)
                scores = cache.rotary_scores(q[..., :r], keys[..., :r], rope, offset)  # (B, H, 1, L+1)
                return self.partial_split(q, r, scores), keys, v
            elif r < self.head_dim:  # partial rotary: only the first r dimensions are rotated on read
                rotated = cache.rotated_keys(keys[..., :r], rope, offset)  # (B, H_kv, L+T, r)
                k = torch.cat([rotated, keys[..., r:]], dim=-1)  # (B, H_kv, L+T, D)
            else:
                k = cache.rotated_keys(keys, rope, offset)
            if self.q_group == self.k_group and self.plain_qk:
                q = k[:, :, offset:]
            else:
                q = rotate_new(self.q_norm(groups[self.q_group]))
            return q, k, v
        k_new = rotate_new(self.k_norm(groups[self.k_group]))  # (B, H_kv, T, D)
        q = k_new if self.q_group == self.k_group and self.plain_qk else rotate_new(self.q_norm(groups[self.q_group]))
        v_new = self.v_norm(groups[self.v_group])  # raw: for Q=V-K this is Q before rotation
        if cache is None:
            return q, k_new, v_new
        k, v = cache.update([k_new, v_new])
        return q, k, v

    def project_decoupled(
        self,
        x: Tensor,
        groups: list[Tensor],
        rope: tuple[Tensor, Tensor] | None,
        cache: KVCache | None,
        split: bool,
    ) -> tuple[Tensor | tuple[Tensor, Tensor], Tensor, Tensor]:
        """:meth:`project` with a decoupled rotary key: no head is rotated; the rotary parts come from
        :meth:`rope_parts` and the rotated key is cached beside K and V (or the K=V tensor)."""
        offset = cache.length if cache is not None else 0
        q_rope, k_rope = self.rope_parts(x, None if rope is None else (rope[0][offset:], rope[1][offset:]))
        if self.kv_shared:  # the cache keeps the raw K=V tensor; the norms are applied when it is read
            new = [groups[self.k_group]]
        else:
            new = [self.k_norm(groups[self.k_group]), self.v_norm(groups[self.v_group])]
        stored = cache.update([*new, k_rope]) if cache is not None else [*new, k_rope]  # (B, ., L+T, .)
        if self.kv_shared:
            k, v = self.k_norm(stored[0]), self.v_norm(stored[0])  # (B, H_kv, L+T, D)
        else:
            k, v = stored[0], stored[1]
        q = k[:, :, offset:] if self.q_group == self.k_group and self.plain_qk else self.q_norm(groups[self.q_group])
        if split:
            return self.decoupled_split(q, q_rope, stored[-1]), k, v
        return (*self.joined((q, q_rope), (k, stored[-1])), v)

    def static_step(
        self,
        x: Tensor,
        pos: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        buffers: list[Tensor],
        inplace: bool = True,
        workspace: Tensor | None = None,
        shared_kv: tuple[Tensor, Tensor] | None = None,
        return_kv: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | tuple[Tensor, list[Tensor], tuple[Tensor, Tensor]]:
        """One decoding step against a static cache: every shape is fixed by the cache's capacity, not by the
        position, so the step compiles (and exports) once and CUDA graphs can replay it.

        Args:
            x: the new token's input (B, 1, C).
            pos: its position, an int64 tensor of shape (1,), or one position per sequence, shape (B,) (a batch of
                requests of different lengths, as a serving loop runs them).
            rope: tables (capacity, R) for positions 0 .. capacity-1, or None (R < D: partial rotary; with a
                decoupled rotary key R is its size).
            buffers: this layer's cache tensors (:meth:`cache_shapes`), each (B, H_kv, capacity, D): K and V; or for
                K=V the un-rotated tensor, plus its rotated copy (R wide) when the cache keeps one
                (``rope_keys=copy``); then the decoupled rotary key (B, 1, capacity, rope_key_dim) if the layer has one.
            inplace: write the new entries into ``buffers`` (eager, compiled) or return new tensors (export).
            workspace: (B, H_kv, capacity, R) tensor to rotate cached keys into (eager); None rotates them with
                :func:`apply_rope` (compiled and exported graphs, where the compiler fuses it).
            shared_kv: a layer that reuses another layer's K/V: that layer's keys and values, each
                (B, H_kv, capacity, D) (then ``buffers`` is empty).
            return_kv: also return this layer's keys and values (for the layers that reuse them).

        Returns:
            ``(output (B, 1, C), the layer's cache tensors after the step)``, and ``(k, v)`` with ``return_kv``.
        """
        b = x.shape[0]
        capacity = (shared_kv[0] if self.reuses_kv else buffers[0]).shape[2]
        groups = self.split_groups(x)  # (B, heads, 1, D) per group
        n_pos = pos.shape[0]
        row = None if rope is None else tuple(t.index_select(0, pos).view(n_pos, 1, 1, -1) for t in rope)  # (P,1,1,D)

        def rotate(tensor: Tensor) -> Tensor:
            return tensor if row is None else apply_rope(tensor, *row)

        def write(buffer: Tensor, new: Tensor) -> Tensor:  # new (B, H_kv, 1, D) at pos into (B, H_kv, capacity, D)
            if n_pos == 1:
                return buffer.index_copy_(2, pos, new) if inplace else buffer.index_copy(2, pos, new)
            index = pos.view(n_pos, 1, 1, 1).expand_as(new)
            return buffer.scatter_(2, index, new) if inplace else buffer.scatter(2, index, new)

        r = self.head_dim if rope is None else rope[0].shape[-1]
        plain = self.q_group == self.k_group and self.plain_qk
        if self.reuses_kv:
            k, v = shared_kv
            stored: list[Tensor] = []
            q = rotate(self.q_norm(groups[self.q_group]))
        elif self.rope_key_dim:  # decoupled rotary key: nothing rotated on read; the key is cached rotated
            q_rope, k_rope = self.rope_parts(x, row)  # (B, H, 1, R), (B, 1, 1, R)
            if self.kv_shared:
                stored = [write(buffers[0], groups[self.k_group])]
                k, v = self.k_norm(stored[0]), self.v_norm(stored[0])
            else:
                stored = [write(buffers[0], self.k_norm(groups[self.k_group])),
                          write(buffers[1], self.v_norm(groups[self.v_group]))]
                k, v = stored
            stored.append(write(buffers[-1], k_rope))
            q_nope = self.k_norm(groups[self.k_group]) if plain else self.q_norm(groups[self.q_group])
            q = self.decoupled_split(q_nope, q_rope, stored[-1])
        elif self.kv_shared and r < self.head_dim:  # partial rotary: the first r dimensions rotated on read
            kv_new = groups[self.k_group]
            stored = [write(buffers[0], kv_new)]
            k = self.k_norm(stored[0])
            v = self.v_norm(stored[0])
            q = rotate(self.q_norm(groups[self.q_group]))  # (B, H, 1, D)
            if len(buffers) == 2:  # the rotated copy of the first r dimensions
                stored.append(write(buffers[1], rotate(self.k_norm(kv_new)[..., :r])))
                scores = grouped_matmul(q[..., :r], stored[1].transpose(-2, -1))  # (B, H, 1, capacity)
            else:
                scores = rotary_scores(q[..., :r], k[..., :r], *rope, workspace)
            q = self.partial_split(q, r, scores)
        elif self.kv_shared:
            kv_new = groups[self.k_group]
            stored = [write(buffers[0], kv_new)]
            v = self.v_norm(stored[0])
            if rope is None:
                k = self.k_norm(stored[0])
            elif len(buffers) == 2:  # the rotated copy
                stored.append(write(buffers[1], rotate(self.k_norm(kv_new))))
                k = stored[1]
            elif workspace is not None:
                k = rotate_into(self.k_norm(stored[0]), *rope, workspace)
            else:
                k = apply_rope(self.k_norm(stored[0]), *rope)
            q = rotate(kv_new) if plain else rotate(self.q_norm(groups[self.q_group]))
        else:
            k_new = rotate(self.k_norm(groups[self.k_group]))
            q = k_new if plain else rotate(self.q_norm(groups[self.q_group]))
            stored = [write(buffers[0], k_new), write(buffers[1], self.v_norm(groups[self.v_group]))]
            k, v = stored
        keys = torch.arange(capacity, device=x.device)
        at = pos.view(n_pos, 1, 1, 1)
        allowed = keys <= at  # (P, 1, 1, capacity): the filled positions
        if self.config.mask_self:
            allowed = allowed & ((keys != at) | (at == 0))
        bias = torch.zeros(allowed.shape, dtype=v.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        if self.paper_encoding:  # the temperature sum(w) scales q; P . w + b is one (P, capacity) bias for all heads
            q = self.scale_queries(q, self.score_encoding.temperature)
            bias = bias + self.score_encoding(pos, keys).to(v.dtype)[:, None, None, :]  # (P, 1, 1, capacity)
        elif self.score_encoding is not None:
            encoded = self.score_encoding(pos, keys).to(v.dtype)  # (H, P, capacity)
            bias = bias + encoded.transpose(0, 1).unsqueeze(2)  # (P, H, 1, capacity)
        if isinstance(q, tuple):
            out = self.split_attention(q, k, v, bias)
        elif self.config.backend == "explicit":
            out = self.explicit_attention(q, k, v, bias, 0.0)[0]
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, enable_gqa=self.n_kv_heads != self.n_head
            )  # (B, H, 1, D)
        out = out.transpose(1, 2).reshape(b, 1, self.n_head * self.head_dim)  # (B, 1, H*D)
        return (self.proj(out), stored, (k, v)) if return_kv else (self.proj(out), stored)

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
        shared_kv: tuple[Tensor, Tensor] | None = None,
        return_kv: bool = False,
    ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, tuple[Tensor, Tensor]]:
        """Attend.

        Args:
            x: input of shape (B, T, C).
            rope: rotary cos/sin tables for positions 0 .. L+T-1 (L = tokens already in ``cache``), or None.
            cache: a :class:`KVCache` to read from and append to, or None.
            need_weights: also return the attention probabilities (uses the explicit path).
            shared_kv: for a layer that reuses another layer's K/V (``reuses_kv``): that layer's ``(k, v)``.
            return_kv: also return this layer's ``(k, v)``, each (B, H_kv, L+T, D) (for the layers reusing them).

        Returns:
            ``(output (B, T, C), probabilities (B, H, T, L+T) or None)``, and ``(k, v)`` with ``return_kv``.
        """
        b, t, _ = x.shape
        split = cache is not None and t == 1 and not need_weights and not return_kv  # a decoding step
        if split and cache.fused and rope is not None:  # K=V keys rotated inside the fused kernel (CUDA)
            from qkv_lightning.nn.fused_decode import decode_step

            return self.proj(decode_step(self, x, rope, cache)), None
        q, k, v = self.project(x, rope, cache, shared_kv, split)  # (B, H, T, D), (B, H_kv, S, D), (B, H_kv, S, D)
        s = v.shape[2]
        dropout = self.config.dropout if self.training else 0.0
        if self.paper_encoding:  # the paper's temperature sum(w) scales the scores: scale q, keep the fused path
            q = self.scale_queries(q, self.score_encoding.temperature)
        bias = self.score_bias(t, s, x.device, v.dtype)
        weights = None
        if isinstance(q, tuple):
            out = self.split_attention(q, k, v, bias)
        elif need_weights or self.config.backend == "explicit":
            out, weights = self.explicit_attention(q, k, v, bias, dropout)
        else:
            is_causal = self.causal and bias is None and t > 1
            d = v.shape[-1]
            if q.shape[-1] != d:  # decoupled rotary key: values padded to q's width keep SDPA's fused kernels
                v = F.pad(v, (0, q.shape[-1] - d))  # (B, H_kv, S, D + R)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=is_causal,
                enable_gqa=self.n_kv_heads != self.n_head,
            )[..., :d]  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)  # (B, T, H*D)
        return (self.proj(out), weights, (k, v)) if return_kv else (self.proj(out), weights)

    @staticmethod
    def scale_queries(q: Tensor | tuple[Tensor, Tensor], factor: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """``q`` (or both parts of a split q) times ``factor`` (a 0-d tensor)."""
        if isinstance(q, tuple):
            return tuple(part * factor.to(part.dtype) for part in q)
        return q * factor.to(q.dtype)

    def split_attention(self, q: tuple[Tensor, Tensor], k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """softmax((q k^T + scores) / sqrt(D + rope_key_dim) + bias) v, where ``scores`` are the rotary parts' scores
        computed apart (:meth:`partial_split`, :meth:`decoupled_split`): they enter as an additive mask, so SDPA
        reads the one K=V tensor as keys and values (for decoding steps, no dropout).

        Args:
            q: (q (B, H, T, D), scores (B, H, T, S)).
            k: (B, H_kv, S, D); query head h reads K/V head h // (H / H_kv), as GQA pairs them.
            v: (B, H_kv, S, D).
            bias: additive (broadcastable to (B, H, T, S)) masks and score encoding, or None.

        Returns:
            The output (B, H, T, D).
        """
        q, scores = q
        scale = 1.0 / math.sqrt(self.head_dim + self.rope_key_dim)
        mask = scores * scale if bias is None else torch.add(bias, scores, alpha=scale)  # (B, H, T, S)
        if self.config.backend == "explicit":
            logits = grouped_matmul(q, k.transpose(-2, -1)) * scale + mask  # (B, H, T, S)
            probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
            return grouped_matmul(probs, v)  # (B, H, T, D)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.to(q.dtype), scale=scale, enable_gqa=self.n_kv_heads != self.n_head
        )  # (B, H, T, D)

    def explicit_attention(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout: float
    ) -> tuple[Tensor, Tensor]:
        """softmax(q k^T / sqrt(E) + masks) v written out (E: the size of q's and k's heads: D, or D + rope_key_dim
        with a decoupled rotary key); returns the output (B, H, T, D) and probabilities."""
        k, v = self.expand_kv(k), self.expand_kv(v)  # (B, H, S, E), (B, H, S, D)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
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

    def logits(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, shared_kv: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Attention logits (B, H, T, T) before any mask: q k^T / sqrt(D) with the score encoding, if any
        (``shared_kv``: the source layer's K/V for a layer that reuses them)."""
        q, k, _ = self.project(x, rope, None, shared_kv)
        scores = (q @ self.expand_kv(k).transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        if self.paper_encoding:
            scores = scores * self.score_encoding.temperature.to(scores.dtype)
        if self.score_encoding is not None:
            positions = torch.arange(x.shape[1], device=x.device)
            scores = scores + self.score_encoding(positions, positions).to(scores.dtype)
        return scores
