"""Q, K, V, logits and attention probabilities of every attention layer, captured with hooks while a task runs
its own forward pass: nothing of the attention core's math is repeated here.

* the raw projections: ``Attention.split_groups`` (the fused projection and any depth factors, per group, before the
  per-role norms and any rotary rotation), in a forward pre-hook; a layer that reuses an earlier layer's K/V
  (cross-layer sharing) is given that layer's K and V;
* the logits before masks: ``Attention.logits`` (q k^T / sqrt(D) plus the score encoding) in a forward pre-hook;
* the probabilities: the pre-hook sets ``need_weights=True``, so the core's explicit path returns them.

Per-batch reductions (entropy sums, asymmetry sums) are taken in the hooks, so memory does not grow with T^2 times
the batches; only up to ``max_tokens`` token vectors per layer are kept for the cosines and output ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qkv_lightning.analysis.metrics import attention_entropy
from qkv_lightning.nn.attention import Attention
from qkv_lightning.nn.blocks import Trunk


@dataclass
class LayerCapture:
    """What one attention layer produced over the analysed batches."""

    module: Attention
    source: LayerCapture | None = None
    """The layer whose K/V this one reuses (cross-layer sharing), or None."""
    groups: list[list[Tensor]] = field(default_factory=list)
    """Per group this layer projects (``Attention.own_groups``), chunks of raw outputs (N, heads, D) of the kept
    tokens."""
    tokens: int = 0
    entropy_sum: Tensor | None = None
    """(H,) summed entropy (nats) of the query rows that see more than one key."""
    kl_sum: Tensor | None = None
    """(H,) summed KL divergence from uniform of those rows."""
    max_entropy_sum: Tensor | None = None
    """(H,) summed log n (the entropy of uniform attention) of those rows."""
    rows: int = 0
    """Query rows (per head) in the sums."""
    asym_sum: Tensor | None = None
    """(H,) summed per-sample mean |A - A^T| of the logits."""
    abs_sum: Tensor | None = None
    """(H,) summed per-sample mean |A|."""
    samples: int = 0

    def owner(self, role: str) -> LayerCapture:
        """The layer whose projection gives ``role`` here (the source layer for a reused K/V)."""
        return self.source if self.source is not None and role != "Q" else self

    def role_outputs(self, role: str) -> Tensor:
        """Raw outputs (N, heads of the role's group, D) of ``role``'s projection over the kept tokens."""
        owner = self.owner(role)
        chunks = owner.groups[owner.module.layout.part_of(role)]
        n = min(self.tokens, owner.tokens)
        return torch.cat(chunks, dim=0)[:n]


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value


class Capture:
    """Hooks on every :class:`Attention` of ``network`` while the ``with`` block runs.

    Args:
        network: the task's network.
        max_tokens: token vectors kept per layer for cosines and output ranks.
    """

    def __init__(self, network: torch.nn.Module, max_tokens: int = 8192) -> None:
        self.layers = [LayerCapture(m) for m in network.modules() if isinstance(m, Attention)]
        sources = next((list(m.kv_sources) for m in network.modules() if isinstance(m, Trunk)), [])
        for layer, source in zip(self.layers, sources, strict=False):
            if source is not None and layer.module.reuses_kv:
                layer.source = self.layers[source]
        self.max_tokens = max_tokens
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:
        for layer in self.layers:
            layer.groups = [[] for _ in layer.module.own_groups]
            module = layer.module
            self._handles += [
                module.register_forward_pre_hook(self._inputs_hook(layer), with_kwargs=True),
                module.register_forward_hook(self._probs_hook(layer)),
            ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _keep_projections(self, layer: LayerCapture, x: Tensor) -> None:
        room = self.max_tokens - layer.tokens
        if room <= 0:
            return
        module = layer.module
        for i, part in enumerate(module.split_groups(x)):  # (B, heads, T, D) per own group
            heads = part.shape[1]
            flat = part.detach().transpose(1, 2).reshape(-1, heads, module.head_dim)[:room]  # (N, heads, D)
            layer.groups[i].append(flat.float().cpu())
        layer.tokens += min(room, x.shape[0] * x.shape[1])

    def _inputs_hook(self, layer: LayerCapture):
        def hook(module: Attention, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x = args[0]  # (B, T, C)
            rope = args[1] if len(args) > 1 else kwargs.get("rope")
            shared_kv = args[4] if len(args) > 4 else kwargs.get("shared_kv")
            self._keep_projections(layer, x)
            logits = module.logits(x, rope, shared_kv).detach()  # (B, H, T, T), before masks
            a = logits.double()
            layer.asym_sum = _add(layer.asym_sum, (a - a.transpose(-2, -1)).abs().mean(dim=(-2, -1)).sum(0).cpu())
            layer.abs_sum = _add(layer.abs_sum, a.abs().mean(dim=(-2, -1)).sum(0).cpu())
            layer.samples += x.shape[0]
            if len(args) >= 4:
                args = (*args[:3], True, *args[4:])
            else:
                kwargs = {**kwargs, "need_weights": True}  # the explicit path returns the probabilities
            return args, kwargs

        return hook

    def _probs_hook(self, layer: LayerCapture):
        def hook(module: Attention, args: tuple, output: tuple[Tensor, Tensor | None]) -> None:
            probs = output[1]  # (B, H, T, S)
            if probs is None:
                return
            t, s = probs.shape[-2:]
            allowed = module.allowed(t, s, probs.device)  # (T, S) or None
            entropy, kl = attention_entropy(probs.detach(), allowed)  # (B, H, T) each
            n = torch.full((t,), s, device=probs.device) if allowed is None else allowed.sum(-1)  # (T,)
            rows = n > 1  # a query that sees one key has no choice to make
            layer.entropy_sum = _add(layer.entropy_sum, entropy[..., rows].sum(dim=(0, 2)).cpu())
            layer.kl_sum = _add(layer.kl_sum, kl[..., rows].sum(dim=(0, 2)).cpu())
            uniform = n[rows].double().log().sum() * probs.shape[0]
            layer.max_entropy_sum = _add(layer.max_entropy_sum, uniform.cpu().expand(probs.shape[1]))
            layer.rows += int(rows.sum()) * probs.shape[0]

        return hook


def run_batches(task: Any, batches: Iterable[Any], max_tokens: int = 8192) -> list[LayerCapture]:
    """Run the task's own forward pass (``training_loss``, without gradients, in eval mode) on ``batches`` and
    return what every attention layer produced."""
    task.eval()
    with torch.no_grad(), Capture(task.network, max_tokens) as capture:
        for batch in batches:
            task.training_loss(batch)
    return capture.layers


@torch.no_grad()
def role_weights(module: Attention, role: str, head: int) -> Tensor:
    """The linear map (D, C) that gives query head ``head``'s raw ``role`` output (the K/V head it reads under GQA),
    bias left out: ``Attention.split_groups`` of the identity minus that of zero, so depth factors are multiplied in
    by the core itself. ``module`` must project ``role`` (not reuse it)."""
    weight = module.qkv.weight
    c = module.qkv.in_features
    eye = torch.eye(c, dtype=weight.dtype, device=weight.device)[None]  # (1, C, C): C "tokens"
    zero = torch.zeros(1, 1, c, dtype=weight.dtype, device=weight.device)
    index = module.layout.part_of(role)
    mapped = module.split_groups(eye)[index] - module.split_groups(zero)[index]  # (1, heads, C, D)
    return mapped[0, head_index(module, role, head)].T.float().cpu()  # (D, C)


def head_index(module: Attention, role: str, head: int) -> int:
    """The head of ``role``'s group that query head ``head`` reads (itself, or its K/V head under GQA): the layer's
    :meth:`~qkv_lightning.nn.sharing.ProjectionLayout.head_of`."""
    return module.layout.head_of(role, head)

