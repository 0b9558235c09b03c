"""The measures of ``analyze``, as plain functions of tensors (tested on constructed weights with known answers).

Definitions:

* cosine similarity of two roles' outputs: per token and head, cos(a_t, b_t) of the two D-dimensional head vectors;
* effective rank (Roy & Vetterli, 2007): exp(H(p)) with p_i = s_i / sum_j s_j the singular values normalised to sum
  1 and H the Shannon entropy in nats; it is r for a matrix with r equal non-zero singular values and at most its
  rank otherwise. Computed on the matrix as it is (not centred);
* principal angles between two row spaces: arccos of the singular values of Q_a^T Q_b, with Q_a, Q_b orthonormal
  bases of the spans of the rows (numerical rank: singular values above 1e-6 of the largest);
* attention entropy: -sum_j p_ij log p_ij in nats per query row, and the distance from uniform as the
  Kullback-Leibler divergence KL(p_i || uniform over the allowed keys) = log n_i - H(p_i);
* logit asymmetry: mean over (i, j) of |A_ij - A_ji| for the logits A = q k^T / sqrt(D) (plus any score encoding)
  before masks, and the same divided by mean |A_ij|.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
"""The quantiles of the per-token cosine distributions that ``analyze`` reports."""


def token_cosines(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine similarity per vector of ``a`` and ``b`` (..., D): a tensor (...) of values in [-1, 1]."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)


def distribution(values: Tensor) -> dict[str, float]:
    """Mean and :data:`QUANTILES` (``q05``, ``q25``, ...) of ``values`` (any shape)."""
    flat = values.double().flatten()
    quantiles = torch.quantile(flat, torch.tensor(QUANTILES, dtype=flat.dtype))
    out = {"mean": float(flat.mean())}
    out.update({f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, quantiles, strict=True)})
    return out


def effective_rank(matrix: Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(s / sum s)) of a 2-D ``matrix`` (0 for a zero matrix)."""
    s = torch.linalg.svdvals(matrix.double())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def row_space_basis(matrix: Tensor, rtol: float = 1e-6) -> Tensor:
    """Orthonormal basis (C, r) of the span of the rows of ``matrix`` (D, C), r its numerical rank."""
    _, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    keep = s > rtol * s.max().clamp_min(1e-300)
    return vh[keep].T


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles in radians, ascending, between the row spaces of ``a`` (D_a, C) and ``b`` (D_b, C)."""
    qa, qb = row_space_basis(a), row_space_basis(b)
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)  # descending
    return torch.arccos(cosines)


def attention_entropy(probs: Tensor, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Entropy (nats) and KL divergence from uniform of each attention row.

    Args:
        probs: probabilities (..., T, S), rows summing to 1 over the allowed keys.
        allowed: boolean (T, S) mask of the keys each query may see; None: all keys.

    Returns:
        ``(entropy (..., T), kl_from_uniform (..., T))``; KL = log n - H with n the allowed keys of the row.
    """
    p = probs.double()
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)  # 0 log 0 = 0
    n = torch.full(probs.shape[-2:-1], probs.shape[-1], dtype=p.dtype) if allowed is None else allowed.sum(-1)
    return entropy, n.to(p).log() - entropy


def logit_asymmetry(logits: Tensor) -> tuple[float, float]:
    """Mean |A - A^T| of square logits (..., T, T), and that divided by mean |A|."""
    a = logits.double()
    asym = (a - a.transpose(-2, -1)).abs().mean()
    scale = a.abs().mean()
    return float(asym), float(asym / scale) if scale > 0 else 0.0


def random_subspace_angle(dim: int, ambient: int, samples: int = 64, seed: int = 0) -> float:
    """Mean principal angle in degrees between two random ``dim``-dimensional subspaces of R^``ambient`` (the
    reference for :func:`principal_angles` of unrelated projections)."""
    if dim >= ambient:
        return 0.0
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(samples):
        a = torch.randn(dim, ambient, generator=generator, dtype=torch.float64)
        b = torch.randn(dim, ambient, generator=generator, dtype=torch.float64)
        total += float(principal_angles(a, b).mean())
    return math.degrees(total / samples)
