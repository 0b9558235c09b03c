"""Q, K, V, logits and attention probabilities of every attention layer, captured with hooks while a task runs
its own forward pass: nothing of the attention core's math is repeated here.

* the raw projections: a forward hook on each layer's fused projection (``Attention.qkv``), split into its groups
  (the views ``Attention.project`` takes, before any rotary rotation);
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


@dataclass
class LayerCapture:
    """What one attention layer produced over the analysed batches."""

    module: Attention
    groups: list[list[Tensor]] = field(default_factory=list)
    """Per group of the fused projection, chunks of raw outputs (N, heads, D) of the kept tokens."""
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

    def role_outputs(self, role: str) -> Tensor:
        """Raw outputs (N, heads of the role's group, D) of ``role``'s projection over the kept tokens."""
        return torch.cat(self.groups[self.module.sharing.group_of(role)], dim=0)


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
        self.max_tokens = max_tokens
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:
        for layer in self.layers:
            layer.groups = [[] for _ in layer.module.group_widths]
            module = layer.module
            self._handles += [
                module.qkv.register_forward_hook(self._projection_hook(layer)),
                module.register_forward_pre_hook(self._logits_hook(layer), with_kwargs=True),
                module.register_forward_hook(self._probs_hook(layer)),
            ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _projection_hook(self, layer: LayerCapture):
        def hook(linear: torch.nn.Module, args: tuple, fused: Tensor) -> None:  # fused (B, T, sum of group widths)
            room = self.max_tokens - layer.tokens
            if room <= 0:
                return
            module = layer.module
            flat = fused.detach().reshape(-1, fused.shape[-1])[:room].float().cpu()  # (N, W)
            parts = flat.split(module.group_widths, -1)
            for i, (part, heads) in enumerate(zip(parts, module.group_heads, strict=True)):
                layer.groups[i].append(part.reshape(part.shape[0], heads, module.head_dim))  # (N, heads, D)
            layer.tokens += flat.shape[0]

        return hook

    def _logits_hook(self, layer: LayerCapture):
        def hook(module: Attention, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x = args[0]  # (B, T, C)
            rope = args[1] if len(args) > 1 else kwargs.get("rope")
            logits = module.logits(x, rope).detach()  # (B, H, T, T), before masks
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


def role_weights(module: Attention, role: str, head: int) -> Tensor:
    """Rows (D, C) of the fused projection's weight that give query head ``head``'s ``role`` output (the K/V head
    it reads under GQA)."""
    start = sum(module.group_widths[: module.sharing.group_of(role)])
    index = head_index(module, role, head)
    rows = slice(start + index * module.head_dim, start + (index + 1) * module.head_dim)
    return module.qkv.weight.detach()[rows].float().cpu()


def head_index(module: Attention, role: str, head: int) -> int:
    """The head of ``role``'s group that query head ``head`` reads (itself, or its K/V head under GQA)."""
    group = module.sharing.group_of(role)
    return head if module.group_heads[group] == module.n_head else head // (module.n_head // module.n_kv_heads)

