"""Positional encodings: rotary (RoPE), 2D sin-cos for image patches, and the pairwise score encoding.

Everything here is computed on the fly from positions (no buffers), so modules built on the meta device for FSDP
need no re-initialisation of position tables.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rope_tables(
    positions: Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables of rotary embeddings (rotate-half convention, as GPT-NeoX and Llama).

    Args:
        positions: integer positions, shape (T,).
        head_dim: size of one attention head; must be even.
        base: the RoPE frequency base.
        dtype: dtype of the returned tables (defaults to float32).

    Returns:
        ``(cos, sin)``, each of shape (T, head_dim).
    """
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head size, got head_dim={head_dim}; change d_model or n_head")
    dtype = dtype or torch.float32
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim))
    angles = positions.to(work)[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_dims(head_dim: int, fraction: float) -> int:
    """Dimensions of a head that partial rotary rotates: ``int(head_dim * fraction)`` rounded down to an even count
    (Hugging Face's ``partial_rotary_factor``, GPT-NeoX's ``rotary_pct``); the first ones of the head."""
    return int(head_dim * fraction) // 2 * 2


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` of shape (B, H, T, D) by the tables ``cos``/``sin`` of shape (T, R): the first R <= D dimensions
    of each head (partial rotary when R < D); the others pass unrotated."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)  # (B, H, T, D)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, T, D)
    return x * cos + rotated * sin


def rotate_into(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor) -> Tensor:
    """:func:`apply_rope` written into ``out`` (same shape as ``x``, (B, H, T, D)) without temporaries.

    Re-rotating a whole KV cache at each decoding step allocates several cache-sized temporaries with
    :func:`apply_rope`; on CPUs each fresh allocation is paged in again, which costs more than the arithmetic.
    This writes ``x * cos`` into ``out`` and adds the rotated halves in place (no autograd through ``out``). With
    partial rotary the callers pass only the rotated dimensions of a cache (no copy of the others).
    """
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)  # (B, H, T, D)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2D sin-cos position embedding of a patch grid (as in MAE / "simple ViT").

    Returns:
        Tensor of shape (grid_h * grid_w, dim), rows in raster order.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need d_model divisible by 4, got {dim}; change d_model")
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4 - 1 or 1))
    ys = ys.flatten().float()[:, None] * omega[None, :]  # (N, dim/4)
    xs = xs.flatten().float()[:, None] * omega[None, :]  # (N, dim/4)
    return torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1)  # (N, dim)


def pair_encoding(q_positions: Tensor, k_positions: Tensor, n_frequencies: int) -> Tensor:
    """Fixed sinusoidal encoding of every (query position i, key position j) pair.

    For each of ``n_frequencies`` frequencies w it has sin and cos of w*i, of w*j and of w*(i - j). The last pair is
    odd/even in (i - j), so a linear map of these channels can give score(i, j) != score(j, i).

    Returns:
        Tensor of shape (Tq, Tk, 6 * n_frequencies).
    """
    steps = torch.arange(n_frequencies, device=q_positions.device, dtype=torch.float32)  # (F,)
    omega = 1.0 / (100.0 ** (steps / n_frequencies))
    i = q_positions.float()[:, None, None]  # (Tq, 1, 1)
    j = k_positions.float()[None, :, None]  # (1, Tk, 1)
    wi, wj, wd = i * omega, j * omega, (i - j) * omega  # (Tq, 1, F), (1, Tk, F), (Tq, Tk, F)
    tq, tk = q_positions.numel(), k_positions.numel()
    parts = [wi.expand(tq, tk, -1), wj.expand(tq, tk, -1), wd]
    return torch.cat([f(p) for p in parts for f in (torch.sin, torch.cos)], dim=-1)  # (Tq, Tk, 6F)


class PairScoreEncoding(nn.Module):
    """The paper's "+" symmetry breaker: a learned linear map from the pair encoding to one score bias per head.

    Args:
        n_head: number of query heads (one bias per head).
        n_frequencies: frequencies of the fixed pair encoding (6 channels each).
    """

    def __init__(self, n_head: int, n_frequencies: int) -> None:
        super().__init__()
        self.n_frequencies = n_frequencies
        self.proj = nn.Linear(6 * n_frequencies, n_head)

    def forward(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """Score bias of shape (H, Tq, Tk)."""
        enc = pair_encoding(q_positions, k_positions, self.n_frequencies).to(self.proj.weight.dtype)  # (Tq, Tk, C)
        return self.proj(enc).permute(2, 0, 1)  # (H, Tq, Tk)


def sinusoid_channels(positions: Tensor, dim: int, base: float = 10000.0, dtype: torch.dtype | None = None) -> Tensor:
    """1-D sinusoidal features of ``positions`` (T,) with ``dim`` channels, interleaved: channel 2k holds
    sin(p * base^(-2k/dim)) and channel 2k+1 holds cos(p * base^(-2k/dim)) (an odd ``dim`` ends on a sine).

    This is the layout of the paper's score encoding; the exponent uses ``dim``, the size of this half.

    Returns:
        Tensor of shape (T, dim) in ``dtype`` (default: float64 for float64 positions, else float32), computed in
        float64 when that is asked for.
    """
    dtype = dtype or (torch.float64 if positions.dtype == torch.float64 else torch.float32)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    channel = torch.arange(dim, device=positions.device)
    exponent = (2 * (channel // 2)).to(work) / max(dim, 1)  # (dim,): 0, 0, 2/dim, 2/dim, ...
    angles = positions.to(work)[:, None] * base ** (-exponent)[None, :]  # (T, dim)
    return torch.where(channel % 2 == 0, angles.sin(), angles.cos()).to(dtype)  # (T, dim)


def paper_pair_tensor(q_positions: Tensor, k_positions: Tensor, channels: int, base: float = 10000.0) -> Tensor:
    """The paper's fixed tensor P of shape (Tq, Tk, m): the first m//2 channels encode the query position i, the
    other m - m//2 the key position j (:func:`sinusoid_channels` of each). Written out for reference and tests; the
    layer itself never materialises it (:class:`PaperScoreEncoding`)."""
    half = channels // 2
    rows = sinusoid_channels(q_positions, half, base)  # (Tq, m/2)
    cols = sinusoid_channels(k_positions, channels - half, base)  # (Tk, m - m/2)
    tq, tk = q_positions.numel(), k_positions.numel()
    return torch.cat([rows[:, None, :].expand(tq, tk, half), cols[None, :, :].expand(tq, tk, channels - half)], -1)


def grid_channels(
    positions: Tensor, dim: int, grid_w: int, prefix: int, base: float = 10000.0, dtype: torch.dtype | None = None
) -> Tensor:
    """Sinusoidal features of sequence ``positions`` (T,) of a ViT's tokens by their place on the patch grid: token
    ``prefix + r * grid_w + c`` is the patch at row r, column c; its first ``dim // 2`` channels are
    :func:`sinusoid_channels` of r, the other ``dim - dim // 2`` those of c. The ``prefix`` tokens before the patches
    (the class token) sit on no patch and get all-zero features.

    Returns:
        Tensor of shape (T, dim) in ``dtype`` (default: float64 for float64 positions, else float32).
    """
    dtype = dtype or (torch.float64 if positions.dtype == torch.float64 else torch.float32)
    positions = positions.long()
    patch = (positions - prefix).clamp(min=0)  # (T,): the patch index (0 for prefix tokens, zeroed below)
    rows = torch.div(patch, grid_w, rounding_mode="floor")
    cols = patch - rows * grid_w
    half = dim // 2
    feats = torch.cat([sinusoid_channels(rows, half, base, dtype), sinusoid_channels(cols, dim - half, base, dtype)], 1)
    return feats * (positions >= prefix).to(dtype)[:, None]  # (T, dim)


def paper_grid_pair_tensor(
    q_positions: Tensor, k_positions: Tensor, channels: int, grid_w: int, prefix: int, base: float = 10000.0
) -> Tensor:
    """P (Tq, Tk, m) of the paper's encoding indexed by the patch grid: the first m//2 channels encode the query's
    (row, column) (:func:`grid_channels`), the other m - m//2 the key's. Written out for reference and tests."""
    half = channels // 2
    rows = grid_channels(q_positions, half, grid_w, prefix, base)  # (Tq, m/2)
    cols = grid_channels(k_positions, channels - half, grid_w, prefix, base)  # (Tk, m - m/2)
    tq, tk = q_positions.numel(), k_positions.numel()
    return torch.cat([rows[:, None, :].expand(tq, tk, half), cols[None, :, :].expand(tq, tk, channels - half)], -1)


class PaperScoreEncoding(nn.Module):
    """The paper's "+" score encoding: a 1x1 convolution (m channels -> 1) over (score map broadcast + P).

    With S the (Tq, Tk) score map and P the fixed (Tq, Tk, m) tensor of :func:`paper_pair_tensor`, the convolution
    gives ``S' = sum_c w_c (S + P_c) + b = S * sum(w) + (P . w) + b``. Because P's channels depend on i alone or on
    j alone, ``P . w = r(i) + c(j)``, so the layer needs only a temperature ``sum(w)`` and a (Tq, Tk) additive
    bias, both shared by every head. One ``w`` (m values, initialised N(0, 0.02)) and one ``b`` (initialised 0)
    per layer.

    What it can express: softmax is invariant to terms constant along a row, so r(i) and b cancel; what remains is a
    learned temperature and a bias c(j) that depends on the key position only. It makes a symmetric score map
    asymmetric (c(j) != c(i) in general) but cannot depend on i - j.

    On a ViT's patch grid (:meth:`index_by_grid`, set by the ViT's ``score_grid``) P is indexed by each patch's
    (row, column) instead of its place in the sequence (:func:`paper_grid_pair_tensor`; our extension: the
    authors' released code indexes P by sequence place only): each half of P splits again into row and column
    channels, and the class token gets none.

    Args:
        channels: m, the channels of P (10 for the paper's synthetic tasks, 50 for its ViT).
        base: frequency base of the sinusoids.
    """

    def __init__(self, channels: int = 10, base: float = 10000.0) -> None:
        super().__init__()
        self.channels = channels
        self.base = base
        self.grid: tuple[int, int] | None = None
        """(patches per row, tokens before the patches) when P is indexed by the patch grid; None: by position."""
        self.weight = nn.Parameter(torch.empty(channels))  # w: one weight per channel of P
        self.bias = nn.Parameter(torch.empty(1))  # b
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: w ~ N(0, 0.02), b = 0."""
        with torch.no_grad():
            nn.init.normal_(self.weight, mean=0.0, std=0.02)
            nn.init.zeros_(self.bias)

    @property
    def temperature(self) -> Tensor:
        """sum(w), the factor of the score map (a 0-d tensor)."""
        return self.weight.sum()

    def index_by_grid(self, grid_w: int, prefix: int) -> None:
        """Index P by the patch grid of a ViT with ``grid_w`` patches per row and ``prefix`` tokens (the class token)
        before the raster-ordered patches (no parameters change, so checkpoints load either way)."""
        if grid_w < 1 or prefix < 0:
            raise ValueError(f"a patch grid needs grid_w >= 1 and prefix >= 0, got {grid_w} and {prefix}")
        self.grid = (grid_w, prefix)

    def extra_repr(self) -> str:
        grid = "" if self.grid is None else f", grid_w={self.grid[0]}, prefix={self.grid[1]}"
        return f"channels={self.channels}{grid}"

    def forward(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """The additive bias ``P . w + b`` of shape (Tq, Tk), from the row and column terms (never building P)."""
        half = self.channels // 2
        dtype = self.weight.dtype
        if self.grid is not None:
            grid_w, prefix = self.grid
            rows = grid_channels(q_positions, half, grid_w, prefix, self.base, dtype) @ self.weight[:half, None]
            cols = grid_channels(k_positions, self.channels - half, grid_w, prefix, self.base, dtype)
            return rows + (cols @ self.weight[half:, None]).T + self.bias  # (Tq, 1) + (1, Tk) + (1,) -> (Tq, Tk)
        rows = sinusoid_channels(q_positions, half, self.base, dtype) @ self.weight[:half, None]  # (Tq, 1)
        cols = sinusoid_channels(k_positions, self.channels - half, self.base, dtype) @ self.weight[half:, None]
        return rows + cols.T + self.bias  # (Tq, 1) + (1, Tk) + (1,) -> (Tq, Tk)
