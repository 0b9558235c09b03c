"""Weight surgery between attention variants: the fused projection of a trained layer rewritten for another variant.

Everything here is keyed on the public layout of :class:`~qkv_lightning.nn.attention.Attention`: one fused
``qkv`` Linear whose rows are given by its :class:`~qkv_lightning.nn.sharing.ProjectionLayout` (``Attention.layout``:
which rows hold which group and role), and the output projection ``proj`` whose input columns are the query heads.
A role's projection is written *augmented*: ``A = [W | b]`` of shape (heads, D, C + 1), so that the role's output
for an input ``x`` is ``A [x; 1]``.

Methods (per target group, from the roles' source projections ``A_r``, each first brought to the target's head count):

* ``mean``: ``A = mean_r A_r`` (weights and biases). Fewer K/V heads (GQA/MQA): the source heads of each group are
  mean-pooled first, ``A[j] = mean_{i in group j} A_src[i]`` with group ``j`` the ``n_src / n_tgt`` consecutive heads
  that query heads ``j * H / n_tgt ...`` read (Ainslie et al., 2023); more heads repeat each source head.
* ``keep``: ``A = A_keep`` for the kept role (``--keep K``); the other roles of the group are dropped.
* ``fit``: least squares on calibration inputs ``x`` (the layer's own inputs on a few batches of the run's data,
  ``G = E[x x^T]`` over augmented inputs). For a group without Q (K=V) it solves, per head,
  ``min_{S, M_r} sum_r E || M_r S x - A_r x ||^2`` with ``M_r`` a (D, D) map per role that is folded into the weights
  next to it (``M_V`` into the output projection's columns of the heads reading it, ``M_K^T`` into the query rows, so
  scores and outputs are those of the approximated roles); a role whose map cannot be folded (K under RoPE, Q) keeps
  ``M = I``. Solved by alternating least squares from the mean: ``M_r = A_r G S^T (S G S^T)^-1`` and
  ``S = (sum M_r^T M_r)^-1 sum M_r^T A_r``; each step lowers the error, so it is never worse than ``mean`` on the
  calibration data. For a group with Q and K (Q=K) it matches the scores instead: ``S`` minimises
  ``E || x_i^T (S^T S - B) x_j ||^2`` with ``B = (A_Q^T A_K + A_K^T A_Q) / 2``, the best positive semi-definite rank-D
  approximation of ``B`` in the metric ``G`` (top eigenvectors of ``L^T B L``, ``G = L L^T``), and a V in the group
  gets its folded map by least squares. Where it helps: when the roles differ by more than noise, e.g. V a per-head
  linear transform of K (then ``fit`` is exact and ``mean`` is not), or roles of very different scale (the mean is
  dominated by the larger); where the roles are already close, ``fit`` and ``mean`` agree. Without RoPE (learned or no
  positions) the folds are exact; under RoPE K is not mapped (RoPE does not commute with ``M_K``) and the Q=K score
  fit ignores the rotation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import Attention
from qkv_lightning.nn.sharing import ROLES, ProjectionLayout

METHODS = ("mean", "keep", "fit")
"""The conversion methods (see the module docstring for their formulas)."""

Method = Literal["mean", "keep", "fit"]


def check_reachable(source: ProjectionLayout, target: ProjectionLayout) -> None:
    """Raise a :class:`ConfigError` if ``target`` cannot be made from ``source``: a target group must be a union of
    source groups (no projection is invented), and every group's head count must divide or be divided by the source
    role's."""
    if source.n_head != target.n_head or source.head_dim != target.head_dim:
        raise ConfigError(
            f"convert keeps the query heads and head size: the source has n_head={source.n_head}, head_dim="
            f"{source.head_dim}, the target {target.n_head}, {target.head_dim}."
        )
    for group in source.sharing.groups:
        homes = {target.sharing.group_of(role) for role in group}
        if len(homes) > 1:
            raise ConfigError(
                f"--sharing {target.sharing.name} cannot be made from a {source.sharing.name} checkpoint: it has more "
                f"distinct projections than the source (the source's shared {'='.join(group)} would have to be split "
                "into separate projections, which nothing in the source determines). Pick a target whose groups are "
                f"unions of the source's groups ({source.sharing.name} or fewer projections)."
            )
    for role in ROLES:
        have, want = source.heads_of(role), target.heads_of(role)
        if have % want and want % have:
            raise ConfigError(
                f"--n_kv_heads: the target's {role} has {want} heads and the source's {have}; one must divide the "
                f"other (pooling groups of heads, or repeating heads). Allowed K/V heads: divisors or multiples of "
                f"{source.n_kv_heads} that divide n_head={source.n_head}."
            )


def role_projections(attn: Attention) -> dict[str, Tensor]:
    """Each role's augmented projection ``[W | b]``, (heads, D, C + 1), read from the fused ``qkv`` Linear (without
    biases: ``W``, (heads, D, C))."""
    layout = attn.layout
    weight = attn.qkv.weight.detach()  # (sum of group widths, C)
    bias = attn.qkv.bias
    augmented = weight if bias is None else torch.cat([weight, bias.detach()[:, None]], dim=1)  # (rows, C + 1)
    return {
        role: augmented[layout.rows(layout.sharing.group_of(role))].reshape(layout.heads_of(role), layout.head_dim, -1)
        for role in ROLES
    }


def to_heads(projection: Tensor, heads: int) -> Tensor:
    """A role's projection (H_src, D, C + 1) with ``heads`` heads: consecutive groups of source heads mean-pooled
    (fewer heads, as in GQA uptraining), or each source head repeated (more heads, the function unchanged)."""
    have = projection.shape[0]
    if have == heads:
        return projection
    if have % heads == 0:
        return projection.reshape(heads, have // heads, *projection.shape[1:]).mean(dim=1)  # (heads, D, C + 1)
    return projection.repeat_interleave(heads // have, dim=0)


def ridge(gram: Tensor) -> Tensor:
    """``gram`` with a tiny ridge on its diagonal, so that solves and Cholesky factorisations are well posed."""
    scale = gram.diagonal().mean().clamp_min(1e-12)
    return gram + 1e-6 * scale * torch.eye(gram.shape[0], dtype=gram.dtype)


def fit_outputs(
    projections: list[Tensor], anchored: list[bool], gram: Tensor, iterations: int = 200
) -> tuple[Tensor, list[Tensor]]:
    """Alternating least squares for ``min_{S, M_r} sum_r E||M_r S x - A_r x||^2`` (``M_r = I`` where anchored), per
    head, starting from the mean.

    Args:
        projections: each role's ``A_r``, (H, D, C + 1).
        anchored: per role, whether its map is fixed to the identity.
        gram: ``E[x x^T]`` of the augmented inputs, (C + 1, C + 1).

    Returns:
        The shared projection ``S`` (H, D, C + 1) and each role's map ``M_r`` (H, D, D).
    """
    g = ridge(gram.double())
    a = [p.double() for p in projections]
    shared = torch.stack(a).mean(dim=0)  # (H, D, C + 1)
    eye = torch.eye(shared.shape[1], dtype=torch.float64).expand(shared.shape[0], -1, -1)
    maps = [eye.clone() for _ in a]
    for _ in range(iterations):
        cov = shared @ g @ shared.transpose(1, 2)  # (H, D, D)
        for i, (role, fixed) in enumerate(zip(a, anchored, strict=True)):
            if not fixed:
                cross = role @ g @ shared.transpose(1, 2)  # (H, D, D)
                maps[i] = torch.linalg.solve(cov, cross.transpose(1, 2)).transpose(1, 2)  # cross @ cov^-1
        lhs = sum(m.transpose(1, 2) @ m for m in maps)  # (H, D, D)
        rhs = sum(m.transpose(1, 2) @ role for m, role in zip(maps, a, strict=True))  # (H, D, C + 1)
        shared = torch.linalg.solve(lhs, rhs)
    return shared.to(projections[0].dtype), [m.to(projections[0].dtype) for m in maps]


def output_error(projections: list[Tensor], shared: Tensor, maps: list[Tensor] | None, gram: Tensor) -> float:
    """The calibration error ``sum_r E||M_r S x - A_r x||^2`` (summed over heads; ``maps`` None: identities)."""
    total = 0.0
    for i, role in enumerate(projections):
        diff = (shared if maps is None else maps[i] @ shared) - role  # (H, D, C + 1)
        total += float(torch.einsum("hdi,ij,hdj->", diff.double(), gram.double(), diff.double()))
    return total


def fit_scores(a_q: Tensor, a_k: Tensor, gram: Tensor) -> Tensor:
    """The shared Q=K projection ``S`` (H, D, C + 1) whose scores ``x_i^T S^T S x_j`` best match ``x_i^T A_Q^T A_K
    x_j`` in the calibration metric: the top positive eigenpairs of ``L^T B L``, ``B`` the symmetric part of
    ``A_Q^T A_K`` and ``G = L L^T``."""
    chol = torch.linalg.cholesky(ridge(gram.double()))  # (C + 1, C + 1), lower
    q, k = a_q.double(), a_k.double()
    bilinear = q.transpose(1, 2) @ k  # (H, C + 1, C + 1)
    bilinear = (bilinear + bilinear.transpose(1, 2)) / 2
    metric = chol.transpose(0, 1) @ bilinear @ chol  # (H, C + 1, C + 1), symmetric
    values, vectors = torch.linalg.eigh(metric)  # ascending
    d = q.shape[1]
    top_values = values[:, -d:].clamp_min(0.0)  # (H, D)
    top_vectors = vectors[:, :, -d:]  # (H, C + 1, D)
    # S L = Lambda^(1/2) U^T  ->  S = Lambda^(1/2) U^T L^-1
    scaled = top_values.sqrt()[:, :, None] * top_vectors.transpose(1, 2)  # (H, D, C + 1)
    shared = torch.linalg.solve_triangular(chol, scaled, upper=False, left=False)
    return shared.to(a_q.dtype)


def score_error(a_q: Tensor, a_k: Tensor, shared: Tensor, gram: Tensor) -> float:
    """``sum_h || L^T (S^T S - sym(A_Q^T A_K)) L ||_F^2``: the calibration error of Q=K scores."""
    chol = torch.linalg.cholesky(ridge(gram.double()))
    bilinear = a_q.double().transpose(1, 2) @ a_k.double()
    bilinear = (bilinear + bilinear.transpose(1, 2)) / 2
    diff = shared.double().transpose(1, 2) @ shared.double() - bilinear
    return float((chol.transpose(0, 1) @ diff @ chol).square().sum())


def convert_attention(
    source: Attention,
    target: Attention,
    method: Method = "mean",
    keep: str | None = None,
    gram: Tensor | None = None,
    rope: bool = False,
) -> None:
    """Write ``target``'s fused projection (and, for ``fit``, its folded query rows and output projection) from
    ``source``'s, in place. Every other weight of ``target`` must already equal ``source``'s.

    Args:
        source: the trained layer.
        target: a layer of the target variant with the same width and query heads.
        method: ``mean``, ``keep`` or ``fit`` (see the module docstring).
        keep: the role kept by ``keep`` (``Q``, ``K`` or ``V``); it must belong to every merged group.
        gram: ``E[x x^T]`` of the layer's augmented inputs, (C + 1, C + 1), for ``fit``.
        rope: whether the network uses rotary positions (K's map then cannot be folded into Q).

    Raises:
        ConfigError: for an unreachable target, a kept role outside a merged group, or ``fit`` without ``gram``.
    """
    for layer in (source, target):
        if getattr(layer, "reuses_kv", False) or len(getattr(layer, "factors", ())) > 0:
            raise ConfigError(
                "convert rewrites layers with their own fused projection: cross-layer K/V sharing (attention."
                "kv_share_every / kv_sources) and depth-factorised roles (attention.depth) are not supported; convert "
                "a model without them."
            )
    src, tgt = source.layout, target.layout
    check_reachable(src, tgt)
    biased = target.qkv.bias is not None
    if gram is not None and not biased:
        gram = gram[:-1, :-1]  # no bias: the inputs themselves, without the constant
    roles = {role: to_heads(proj, tgt.heads_of(role)) for role, proj in role_projections(source).items()}
    proj_weight = target.proj.weight.detach().clone()  # (C, H * D); starts as the source's
    q_fold: Tensor | None = None  # (H_kv, D, D): M_K, folded into the query rows
    groups_out = []
    for group in tgt.sharing.groups:
        distinct = {src.sharing.group_of(role) for role in group}
        heads = tgt.heads_of(group[0])
        if len(distinct) == 1:  # one source projection (perhaps with pooled heads): nothing to choose
            groups_out.append(roles[group[0]])
            continue
        if method == "mean":
            groups_out.append(torch.stack([roles[r] for r in group]).mean(dim=0))
        elif method == "keep":
            if keep not in group:
                raise ConfigError(
                    f"--keep {keep}: the merged group {'='.join(group)} of {tgt.sharing.name} does not contain "
                    f"{keep}; keep one of {', '.join(group)}."
                )
            groups_out.append(roles[keep])
        elif method == "fit":
            if gram is None:
                raise ConfigError("--method fit needs calibration inputs (--calibration_batches N > 0).")
            if "Q" in group and "K" in group:
                shared = fit_scores(roles["Q"], roles["K"], gram)
                maps = {}
                if "V" in group:  # V's map by least squares, folded into the output projection
                    _, fitted = fit_outputs([shared, roles["V"]], [True, False], gram, iterations=1)
                    maps["V"] = fitted[1]
            else:
                anchored = [r == "Q" or (r == "K" and rope) for r in group]
                shared, fitted = fit_outputs([roles[r] for r in group], anchored, gram)
                maps = {r: m for r, m, fixed in zip(group, fitted, anchored, strict=True) if not fixed}
            groups_out.append(shared)
            per_query = tgt.n_head // heads  # query heads reading each head of this group
            if "V" in maps:  # o_h = M_V s-weighted sum: W_o[:, head h] <- W_o[:, head h] @ M_V(h // per_query)
                m_v = maps["V"].repeat_interleave(per_query, dim=0)  # (H, D, D)
                blocks = proj_weight.view(proj_weight.shape[0], tgt.n_head, tgt.head_dim)  # (C, H, D)
                proj_weight = torch.einsum("chd,hde->che", blocks, m_v).reshape_as(proj_weight)
            if "K" in maps:
                q_fold = maps["K"]
        else:
            raise ConfigError(f"--method {method!r} is not a conversion method; use one of {', '.join(METHODS)}.")
    if q_fold is not None:  # q_h . (M_K s_j) = (M_K^T q_h) . s_j: Q's rows of head h <- M_K(h // per_query)^T A_Q[h]
        qg = tgt.sharing.group_of("Q")
        per_query = tgt.n_head // q_fold.shape[0]
        fold = q_fold.repeat_interleave(per_query, dim=0).transpose(1, 2)  # (H, D, D)
        groups_out[qg] = fold @ groups_out[qg]
    fused = groups_out[0].new_empty(tgt.width, groups_out[0].shape[-1])  # (rows, C + 1)
    for group, part in zip(tgt.groups, groups_out, strict=True):
        fused[tgt.rows(group)] = part.reshape(-1, part.shape[-1])  # (heads * D, C + 1)
    with torch.no_grad():
        target.qkv.weight.copy_(fused[:, :-1] if biased else fused)
        if biased:
            target.qkv.bias.copy_(fused[:, -1])
        target.proj.weight.copy_(proj_weight)
