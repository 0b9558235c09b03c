"""The KV cache of one attention layer for incremental decoding, and how a K=V cache gives rotated keys with RoPE
(``rope_keys``: rotate on read, keep a rotated copy, or a window of both), or the scores of rotated keys without
rotating them (:func:`rotary_scores`)."""

from __future__ import annotations

import torch
from torch import Tensor

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.positional import apply_rope, rotate_into

ROPE_KEYS_DEFAULT = "on_read"
ROTARY_SCORE_BLOCK = 1024
"""Positions :func:`rotary_scores` takes at a time: small enough that a block of cached keys and its products stay
in a CPU core's cache between the two products, large enough that the per-block overhead stays small (at 4,096
tokens 1,024 and 2,048 timed alike, 512 slower)."""
"""How a K=V cache with rotary positions gives rotated keys: see :func:`parse_rope_keys` and the README's
"bench-decode" section for the measurements behind the default."""


def parse_rope_keys(value: str, capacity: int) -> int:
    """Positions whose rotated keys a K=V cache keeps in a second tensor, from a ``rope_keys`` setting.

    ``on_read`` (0): the cache holds the one un-rotated K=V tensor (half of QKV's cache) and rotates the cached keys
    as it reads them, at every step, into a workspace shared by all layers. ``copy`` (``capacity``): a rotated copy
    of every key, as QKV caches them: decoding costs what QKV's does, and the cache is as large as QKV's.
    ``window:W``: a rotated copy of the first W positions only; the others are rotated on read. ``fused`` (0): the
    cache of ``on_read``, the keys rotated as they are read inside one Triton kernel on CUDA, with no workspace
    (:mod:`~qkv_lightning.nn.fused_decode`; :func:`is_fused` tells it apart).

    Raises:
        ConfigError: naming ``rope_keys`` and the allowed values.
    """
    text = str(value).strip().lower()
    if text in ("on_read", "fused"):
        return 0
    if text == "copy":
        return capacity
    if text.startswith("window:") and text[7:].isdigit() and int(text[7:]) > 0:
        return min(int(text[7:]), capacity)
    raise ConfigError(
        f"rope_keys={value!r} is not a K=V cache scheme: use on_read (rotate cached keys when read; half the cache), "
        "copy (a rotated copy of every key; QKV's cache size and speed), window:W (a rotated copy of the first W "
        "positions, e.g. window:1024) or fused (on_read's cache, the keys rotated inside a Triton kernel; CUDA)."
    )


def is_fused(value: str) -> bool:
    """True for the ``rope_keys`` scheme that rotates keys inside the fused decoding kernel (``fused``)."""
    return str(value).strip().lower() == "fused"


def grouped_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a`` (B, H, T, M) times ``b`` (B, H_b, M, N) for each of the H heads of ``a``, head h using ``b``'s head
    h // (H / H_b) (GQA's pairing; H_b = 1: one matrix for all): (B, H, T, N), without repeating ``b``'s heads."""
    bsz, h, t, m = a.shape
    heads = b.shape[1]
    grouped = a.reshape(bsz, heads, (h // heads) * t, m)  # (B, H_b, G*T, M): the query heads of one b head
    return (grouped @ b).view(bsz, h, t, b.shape[-1])


def rotary_scores(
    q: Tensor, keys: Tensor, cos: Tensor, sin: Tensor, workspace: Tensor | None = None, block: int | None = None
) -> Tensor:
    """Scores of rotated queries against keys rotated by their positions, without rotating the keys: q . R(n) k_n.

    With the rotate-half tables of :func:`~qkv_lightning.nn.positional.rope_tables` (whose two halves are equal),
    R(n) k = k * cos_n + (-k2, k1) * sin_n, so q . R(n) k = (k * cos_n) . q + (k * sin_n) . (q2, -q1): two products
    of the keys with the tables, each a full-row product with no half-width operation (on CPUs these are what a
    rotation costs). Block by block of ``block`` positions, both products go through the same ``workspace`` slice
    while the block of keys is still in the CPU's cache; the keys are never rotated into a tensor of their length.

    Args:
        q: rotated queries (B, H, T, R).
        keys: the un-rotated keys (B, H_kv, L, R) (e.g. the rotated dimensions of a K=V cache, a strided view); the
            heads pair as in :func:`grouped_matmul`.
        cos: tables (L, R) of the keys' positions.
        sin: tables (L, R) of the keys' positions.
        workspace: (B, H_kv, >= 1, R) scratch (its first ``min(block, its length)`` positions are used); None
            computes with temporaries (autograd, compiled and exported graphs).
        block: positions per block; None: :data:`ROTARY_SCORE_BLOCK`.

    Returns:
        Scores (B, H, T, L), unscaled.
    """
    half = q.shape[-1] // 2
    swapped = torch.cat([q[..., half:], -q[..., :half]], dim=-1)  # (B, H, T, R): (q2, -q1)
    if workspace is None:
        return grouped_matmul(q, (keys * cos).transpose(-2, -1)) + grouped_matmul(
            swapped, (keys * sin).transpose(-2, -1)
        )  # (B, H, T, L)
    length = keys.shape[2]
    block = min(block or ROTARY_SCORE_BLOCK, workspace.shape[2])
    out = q.new_empty((*q.shape[:3], length))  # (B, H, T, L)
    for start in range(0, length, block):
        end = min(start + block, length)
        part, scratch = keys[:, :, start:end], workspace[:, :, : end - start]  # (B, H_kv, n, R)
        torch.mul(part, cos[start:end], out=scratch)
        scores = grouped_matmul(q, scratch.transpose(-2, -1))  # (B, H, T, n)
        torch.mul(part, sin[start:end], out=scratch)
        out[..., start:end] = scores.add_(grouped_matmul(swapped, scratch.transpose(-2, -1)))
    return out


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
        rotated_dim: width of the rotated copy (the rotated dimensions with partial rotary); None: ``head_dim``.
        rope_key_dim: a decoupled rotary key's size: the cache keeps one more tensor, (B, 1, capacity, rope_key_dim),
            after the others (0: none).
        fused: decoding steps read the K=V tensor through the fused kernel
            (:func:`~qkv_lightning.nn.fused_decode.rotary_decode_attention`), which rotates the keys as it reads them.
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
        rotated_dim: int | None = None,
        rope_key_dim: int = 0,
        fused: bool = False,
    ) -> None:
        shape = (batch_size, n_kv_heads, capacity, head_dim)
        self.buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_tensors)]
        if rope_key_dim:
            self.buffers.append(torch.zeros((batch_size, 1, capacity, rope_key_dim), dtype=dtype, device=device))
        width = rotated_dim or head_dim
        self.rotated = (
            torch.zeros((batch_size, n_kv_heads, rotated, width), dtype=dtype, device=device) if rotated else None
        )
        self.workspace = [] if workspace is None else workspace
        self.capacity = capacity
        self.length = 0
        self.fused = fused

    def update(self, new: list[Tensor]) -> list[Tensor]:
        """Append ``new`` tensors, each (B, H_kv, T, D) (the decoupled rotary key (B, 1, T, R)), and return the whole
        sequences, each (B, H_kv, L+T, D) (and (B, 1, L+T, R))."""
        t_new = new[0].shape[2]
        end = self.length + t_new
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} tokens exceed its capacity of {self.capacity}")
        for buffer, tensor in zip(self.buffers, new, strict=True):
            buffer[:, :, self.length : end] = tensor
        self.length = end
        return [buffer[:, :, :end] for buffer in self.buffers]

    def rotated_keys(self, kv: Tensor, rope: tuple[Tensor, Tensor], start: int) -> Tensor:
        """Rotated keys (B, H_kv, L, R) of the un-rotated K=V sequence ``kv`` (B, H_kv, L, R) just returned by
        :meth:`update` (with partial rotary, its first R dimensions), whose positions from ``start`` on are new;
        ``rope``: tables (L, R) for positions 0 .. L-1.

        Keys of the rotated copy's positions are rotated once, when they arrive; the others at every call, into the
        shared workspace when no gradient is needed (no cache-sized temporaries), else with :func:`apply_rope`.
        """
        cos, sin = rope
        end, kept = kv.shape[2], self._keep_rotated(kv, rope, start)
        if kept and end <= kept:
            return self.rotated[:, :, :end]
        if torch.is_grad_enabled() and kv.requires_grad:
            rest = apply_rope(kv[:, :, kept:], cos[kept:], sin[kept:])
            return rest if not kept else torch.cat([self.rotated, rest], dim=2)
        out = self._workspace(kv.shape[:2], self.capacity, kv)[:, :, :end]  # (B, H_kv, L, D)
        if kept:
            out[:, :, :kept] = self.rotated
        rotate_into(kv[:, :, kept:], cos[kept:], sin[kept:], out[:, :, kept:])
        return out

    def rotary_scores(self, q: Tensor, kv: Tensor, rope: tuple[Tensor, Tensor], start: int) -> Tensor:
        """Scores (B, H, T, L) of rotated queries ``q`` (B, H, T, R) against the rotated keys of the un-rotated K=V
        sequence ``kv`` (B, H_kv, L, R) (as :meth:`rotated_keys` takes it), without rotating them: the rotated
        copy's positions from the copy, the others by :func:`rotary_scores` through a workspace of at most
        :data:`ROTARY_SCORE_BLOCK` positions shared by the layers. Unscaled."""
        cos, sin = rope
        kept = self._keep_rotated(kv, rope, start)
        grad = torch.is_grad_enabled() and (kv.requires_grad or q.requires_grad)
        workspace = None if grad else self._workspace(kv.shape[:2], min(self.capacity, ROTARY_SCORE_BLOCK), kv)
        scores = rotary_scores(q, kv[:, :, kept:], cos[kept:], sin[kept:], workspace)  # (B, H, T, L - kept)
        if not kept:
            return scores
        copied = grouped_matmul(q, self.rotated[:, :, : kv.shape[2]].transpose(-2, -1))  # (B, H, T, <= kept)
        return torch.cat([copied, scores], dim=-1)

    def _keep_rotated(self, kv: Tensor, rope: tuple[Tensor, Tensor], start: int) -> int:
        """Rotate the new positions (from ``start``) of ``kv`` that fall in the rotated copy into it; returns the
        positions the copy holds (0 without one)."""
        if self.rotated is None:
            return 0
        cos, sin = rope
        kept = self.rotated.shape[2]
        upto = min(kv.shape[2], kept)
        if start < upto:
            self.rotated[:, :, start:upto] = apply_rope(kv[:, :, start:upto], cos[start:upto], sin[start:upto])
        return kept

    def _workspace(self, heads: tuple[int, ...], positions: int, like: Tensor) -> Tensor:
        """The workspace shared by the layers, (``heads``..., ``positions``, ``like``'s last size), reallocated when
        a layer needs another shape, dtype or device."""
        shape = (*heads, positions, like.shape[3])
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

