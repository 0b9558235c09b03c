"""Closed-form efficiency accounting: parameters, FLOPs and KV-cache bytes per variant, without building models.

Each network config declares its own cost (a ``cost(attention, seq_len, kv_bytes, count_masked)`` method, built
from the arithmetic in :mod:`qkv_lightning.nn.cost`); this module is the entry point that asks it, names the
result after its :class:`~qkv_lightning.variants.Variant`, and tells a network that declares none at construction.
Everything is checked against built models (``numel()``, real cache tensors and torch's FLOP counter) in
``tests/test_accounting.py``. FLOP conventions: see :mod:`qkv_lightning.nn.cost`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention_config import AttentionConfig
from qkv_lightning.nn.cost import (  # noqa: F401  (the accounting vocabulary, re-exported)
    AttentionShape,
    Flops,
    NetworkCost,
    attended_pairs,
    attention_forward_flops,
    attention_params,
    kv_cache_bytes_per_token,
    mlp_params,
    norm_params,
    score_encoding_flops,
    trunk_flops,
)
from qkv_lightning.variants import Variant


@runtime_checkable
class DeclaresCost(Protocol):
    """A network config that declares its closed-form cost (what :func:`network_cost` asks)."""

    n_head: int

    def cost(
        self, attention: AttentionConfig, seq_len: int | None = None, kv_bytes: int = 2, count_masked: bool = False
    ) -> NetworkCost: ...


def check_declares_cost(config: Any) -> None:
    """Raise a :class:`ConfigError` if a network config does not declare its cost (checked when a task is built,
    so that a new network fails there rather than on its first training batch, where throughput is measured)."""
    if not isinstance(config, DeclaresCost):
        raise ConfigError(
            f"the network config {type(config).__name__} declares no closed-form cost: give it a method "
            "cost(attention, seq_len=None, kv_bytes=2, count_masked=False) -> NetworkCost (built from "
            "qkv_lightning.nn.cost, as GPTConfig.cost does) and an n_head field; throughput, MFU, report and bench "
            "need it."
        )


def network_cost(
    config: Any, attention: AttentionConfig, seq_len: int | None = None, kv_bytes: int = 2, count_masked: bool = False
) -> NetworkCost:
    """Cost of the network that ``config`` (with the data's values filled in) builds with ``attention``.

    Args:
        config: a network config that declares its cost (:class:`DeclaresCost`), e.g. :class:`GPTConfig`.
        attention: the attention variant.
        seq_len: tokens per training sequence (GPT, encoder); None means ``max_seq_len``.
        kv_bytes: bytes per KV-cache element (2 for bf16/fp16, 4 for fp32).
        count_masked: count the masked half of causal score matrices too (as a kernel without masking does).
    """
    check_declares_cost(config)
    cost = config.cost(attention, seq_len, kv_bytes, count_masked)
    return dataclasses.replace(cost, label=Variant.of(attention, config.n_head).label)
