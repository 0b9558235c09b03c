"""A K=V decoding step with rotary positions in one Triton kernel (``rope_keys: fused``): the keys are rotated as
they are read, in registers, so the cache is read once and no workspace of its length is written.

A K=V cache holds the un-rotated tensor, which is both the values and, rotated by each position, the keys. The
workspace path (:meth:`~qkv_lightning.nn.kv_cache.KVCache.rotated_keys`, ``rope_keys: on_read``) rotates the
cache into a tensor of its length at every step, then attention reads it again: three passes over the cache's
size. Here each block of cached positions is loaded once, rotated in registers to give the keys (the first R
dimensions; with partial rotary the others pass as they are), and used un-rotated as the values, in a
flash-decoding loop (an online softmax over blocks, the positions split over programs, the splits combined at the
end). The query heads that share a K/V head (GQA/MQA) are one program, so a block is read once per K/V head.

Triton compiles the kernel for CUDA devices; with ``TRITON_INTERPRET=1`` set before this module is imported it
runs on CPU tensors through Triton's interpreter (how the tests check it against the eager path on machines
without a GPU).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.kv_cache import KVCache
from qkv_lightning.nn.positional import apply_rope

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only and non-Linux torch wheels ship no Triton
    triton = None

SPLIT_PROGRAMS = 128
"""Programs to aim for over (batch, K/V heads, position splits): the positions are split until the batch and K/V
heads make about this many (a decoding step of one sequence has few heads; an H100 has 132 multiprocessors)."""


TILE_ELEMENTS = 4096
"""The most elements of one (query heads, positions, head dims) product tile: with 4 warps its operands stay in
registers (ptxas reports no spills for sm_90 at head sizes 64 and 128 with 1 to 16 query heads per K/V head:
tests/test_fused_decode.py)."""


NUM_WARPS = 4
"""Warps per program."""


def block_sizes(group: int, head_dim: int) -> tuple[int, int, int]:
    """The kernel's tile: (query heads, head dims, positions), powers of two, the positions 8 to 64 within
    :data:`TILE_ELEMENTS`."""
    block_g, block_d = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    return block_g, block_d, max(8, min(64, TILE_ELEMENTS // (block_g * block_d)))


def interpreted() -> bool:
    """True when Triton's interpreter runs kernels (``TRITON_INTERPRET=1``): CPU tensors are then accepted."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_fused_decode(device: torch.device) -> None:
    """Raise a ConfigError naming ``rope_keys`` when the fused decoding step cannot run on ``device``."""
    reason = None
    if triton is None:
        reason = "it needs Triton, which this torch installation lacks (Linux CUDA wheels of torch ship it)"
    elif device.type != "cuda" and not interpreted():
        reason = f"it runs as a Triton kernel on a CUDA device, and the model is on {device.type}"
    if reason:
        raise ConfigError(
            f"rope_keys=fused: {reason}. Use rope_keys=on_read there (the same cache, with the keys rotated into a "
            "workspace), or move the model to a CUDA device."
        )


def fuses(attention: nn.Module, device: torch.device) -> bool:
    """Whether the decoding steps of ``attention`` (an :class:`~qkv_lightning.nn.attention.Attention` layer) with
    ``rope_keys=fused`` run in the kernel: its K=V tensor is both the keys and the values (no per-role norm on
    either) and its scores are plain (no score encoding, no self mask, the SDPA backend). Layers that are not decode
    as ``on_read``.

    Raises:
        ConfigError: naming ``rope_keys`` when the kernel cannot run on ``device`` (see :func:`check_fused_decode`).
    """
    c = attention.config
    plain = (attention.kv_shared and not attention.reuses_kv and not attention.rope_key_dim
             and c.k_norm == c.v_norm == "none" and attention.score_encoding is None and not c.mask_self
             and c.backend == "sdpa")
    if plain:
        check_fused_decode(device)
    return plain


if triton is not None:

    @triton.jit
    def _rotary_decode_kernel(
        q_ptr, kv_ptr, cos_ptr, sin_ptr, m_ptr, l_ptr, acc_ptr,
        length, split_len, n_kv_heads, scale,
        stride_kv_b, stride_kv_h, stride_kv_n, stride_table,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One (sequence, K/V head, split of the positions): the online-softmax partial sums of its GROUP query
        heads over the split's positions: running max ``m`` (G,), sum ``l`` (G,) and weighted values ``acc`` (G, D)."""
        row = tl.program_id(0)  # b * H_kv + K/V head
        split = tl.program_id(1)
        b = row // n_kv_heads
        head = row % n_kv_heads
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + (row * GROUP + g[:, None]) * HEAD_DIM + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)  # (G, D): rotated queries
        half = ROTARY // 2
        rotated = d < ROTARY
        partner = tl.where(d < half, d + half, tl.where(rotated, d - half, d))  # rotate-half's partner of each dim
        sign = tl.where(d < half, -1.0, 1.0)  # R(n) k = k cos + (-k2, k1) sin
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        base = kv_ptr + b * stride_kv_b + head * stride_kv_h
        for first in range(start, end, BLOCK_N):
            n = first + tl.arange(0, BLOCK_N)
            n_ok = n < end
            rows = base + n[:, None] * stride_kv_n
            x = tl.load(rows + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (N, D)
            table_ok = n_ok[:, None] & rotated[None, :]
            xp = tl.load(rows + partner[None, :], mask=table_ok, other=0.0).to(tl.float32)  # (N, D): partners
            at = n[:, None] * stride_table + d[None, :]
            cos = tl.load(cos_ptr + at, mask=table_ok, other=1.0).to(tl.float32)  # (N, D); 1 past the rotary dims
            sin = tl.load(sin_ptr + at, mask=table_ok, other=0.0).to(tl.float32)  # (N, D); 0 past them
            k = x * cos + sign[None, :] * xp * sin  # (N, D): the keys, rotated in registers
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (G, N)
            scores = tl.where(n_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # (G,)
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])  # (G, N)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * x[None, :, :], axis=1)  # (G, D): the values un-rotated
            m_i = m_new
        out = (row * tl.num_programs(1) + split) * BLOCK_G + g  # (G,)
        tl.store(m_ptr + out, m_i)
        tl.store(l_ptr + out, l_i)
        tl.store(acc_ptr + out[:, None] * BLOCK_D + d[None, :], acc)


def rotary_decode_attention(q: Tensor, kv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """softmax(q . R(n) kv_n / sqrt(D)) kv for one new token per sequence, the keys rotated as they are read.

    Args:
        q: the rotated queries (B, H, 1, D) (with partial rotary, the first R dimensions rotated).
        kv: the un-rotated K=V cache (B, H_kv, L, D) (a view of the cache's first L positions; rows contiguous);
            query head h reads K/V head h // (H / H_kv), as GQA pairs them.
        cos: rotate-half tables (L, R) of the positions 0 .. L-1 (R <= D, even).
        sin: as ``cos``.

    Returns:
        The attention output (B, H, 1, D), in ``q``'s dtype.
    """
    check_fused_decode(q.device)
    bsz, n_head, _, head_dim = q.shape
    n_kv_heads, length = kv.shape[1], kv.shape[2]
    group, rotary = n_head // n_kv_heads, cos.shape[-1]
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    cos, sin = cos[:length].contiguous(), sin[:length].contiguous()
    q = q.contiguous()  # (B, H, 1, D) = (B * H_kv, G, D): the query heads of one K/V head are consecutive
    block_g, block_d, block_n = block_sizes(group, head_dim)
    rows = bsz * n_kv_heads
    wanted = max(1, SPLIT_PROGRAMS // rows)
    split_len = block_n * math.ceil(math.ceil(length / wanted) / block_n)
    splits = math.ceil(length / split_len)
    f32 = dict(dtype=torch.float32, device=q.device)
    m = torch.empty((rows, splits, block_g), **f32)
    s = torch.empty((rows, splits, block_g), **f32)
    acc = torch.empty((rows, splits, block_g, block_d), **f32)
    _rotary_decode_kernel[(rows, splits)](
        q, kv, cos, sin, m, s, acc,
        length, split_len, n_kv_heads, 1.0 / math.sqrt(head_dim),
        kv.stride(0), kv.stride(1), kv.stride(2), cos.stride(0),
        GROUP=group, HEAD_DIM=head_dim, ROTARY=rotary, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
        num_warps=NUM_WARPS,
    )
    top = m.amax(dim=1, keepdim=True)  # (rows, 1, G): every row has positions, so this is finite
    weight = torch.exp(m - top)  # (rows, splits, G); 0 for a split without positions
    total = (s * weight).sum(dim=1)  # (rows, G)
    out = (acc * weight[..., None]).sum(dim=1) / total[..., None]  # (rows, G, D_block)
    return out[:, :group, :head_dim].reshape(bsz, n_head, 1, head_dim).to(q.dtype)


def decode_step(attention: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache) -> Tensor:
    """A decoding step of a K=V :class:`~qkv_lightning.nn.attention.Attention` layer whose cache is ``fused``: the
    new row ``x`` (B, 1, C) is projected and cached un-rotated, and the kernel rotates the cached keys as it reads
    them; ``rope``: tables (L+1, R) of positions 0 .. L. Returns the output before the output projection,
    (B, 1, H*D)."""
    offset = cache.length
    groups = attention.split_groups(x)  # (B, heads, 1, D) per group
    kv = cache.update([groups[attention.k_group]])[0]  # (B, H_kv, L+1, D), un-rotated
    q = apply_rope(attention.q_norm(groups[attention.q_group]), rope[0][offset:], rope[1][offset:])  # (B, H, 1, D)
    out = rotary_decode_attention(q, kv, rope[0], rope[1])  # (B, H, 1, D)
    return out.transpose(1, 2).reshape(x.shape[0], 1, attention.n_head * attention.head_dim)
