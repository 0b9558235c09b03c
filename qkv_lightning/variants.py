"""The attention variant as studies, benches, reports and accounting name it: :class:`Variant` and the one grid
expansion that study, bench, report and accounting all use.

A :class:`Variant` is what a comparison varies; everything else about attention (dropout, backend, the score
encoding's size) stays as the task config sets it. Its label grammar (:meth:`Variant.parse`, :attr:`Variant.label`)
is the one of :class:`~qkv_lightning.nn.sharing.VariantLabel`. Adding a symmetry breaker means a setting in
:class:`~qkv_lightning.nn.attention_config.AttentionConfig` and one entry in :data:`BREAKERS`; the study's grid, its
``results.csv`` columns, the report's rows, the TensorBoard hparams and the accounting labels follow from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from qkv_lightning.nn.attention_config import AttentionConfig, breaker_settings
from qkv_lightning.nn.sharing import BREAKERS, NO_BREAKER, VariantLabel, parse_breakers

__all__ = [  # BREAKERS, NO_BREAKER and parse_breakers: the registry and breaker grammar of nn.sharing, for the study
    "BREAKERS",
    "NO_BREAKER",
    "STRUCTURE_DEFAULTS",
    "Variant",
    "expand",
    "parse_breakers",
    "parse_label",
    "row_columns",
]

STRUCTURE_DEFAULTS: dict[str, Any] = {"layers": None, "kv_share_every": 1, "kv_sources": None, "depth": None,
                                      "rope_fraction": 1.0, "rope_key_dim": 0}
"""The attention settings of a variant's structure across layers and depth (per-layer schedule, cross-layer K/V
sharing, depth factorisation) and of its rotary keys (partial rotary, a decoupled rotary key), at their defaults.
A variant's :meth:`Variant.attention_settings` holds those it changes; :meth:`Variant.attention_config` sets all
of them."""


def parse_label(label: str) -> Variant:
    """The variant a label names (:meth:`Variant.parse`, the one grammar): ``QKV``, ``Q=K-V+score``, ``Q-K=V_kv2``,
    ``Q=K=V+score+noself``, the paper's ``(Q=K=V)+``, a schedule ``QKV@0-1,Q-K=V@2-``, ``_dQ2``, ``_cla2``.

    Raises:
        ConfigError: for an unknown sharing, breaker or K/V head count, naming the label.
    """
    return Variant.parse(label)


@dataclass(frozen=True)
class Variant(VariantLabel):
    """One attention variant: a sharing, a K/V head count (None: as many as query heads), symmetry breakers and its
    structure across layers (the fields and the label grammar of :class:`~qkv_lightning.nn.sharing.VariantLabel`),
    with what studies, benches and reports ask of it.

    The sharing is stored in the paper's notation (aliases are accepted and canonicalised) and the breakers in
    registry order, so that equal variants compare equal and have one label.
    """

    @classmethod
    def of(cls, attention: AttentionConfig, n_head: int | None = None) -> Variant:
        """The variant an attention config describes, read off the variant it parsed (:attr:`AttentionConfig.parsed`,
        nothing is parsed again); with ``n_head``, a K/V head count equal to it is None."""
        parsed = attention.parsed

        def heads(label: VariantLabel) -> int | None:
            return None if n_head is not None and label.n_kv_heads == n_head else label.n_kv_heads

        layers = tuple(
            (key, VariantLabel(layer.partition, heads(layer), layer.breakers))
            for (key, _), layer in zip(parsed.layers, parsed.schedule, strict=True)
        )
        rope = {"rope_fraction": parsed.rope_fraction, "rope_key_dim": parsed.rope_key_dim}
        if layers:
            return cls(parsed.partition, None, (), layers, parsed.kv_share_every, parsed.kv_sources, parsed.depth,
                       **rope)
        return cls(parsed.partition, heads(parsed), parsed.breakers, (), parsed.kv_share_every, parsed.kv_sources,
                   parsed.depth, **rope)

    def with_settings(self, **settings: Any) -> Variant:
        """The variant with other attention settings, e.g. ``with_settings(score_encoding="paper")``: a breaker's
        setting turns that breaker on or off."""
        return Variant.of(dataclasses.replace(self.attention_config(), **settings))

    @property
    def breaker_name(self) -> str:
        """The breakers as written in configs: ``none``, ``score`` or ``score+noself``."""
        return "+".join(self.breakers) or NO_BREAKER

    @property
    def paper_name(self) -> str:
        """The paper's name of a K/V-head variant: ``GQA-4`` (QKV with 4 K/V heads), ``MQA``, ``Q-GQA-4`` (Q-K=V with
        4), ``Q-MQA``; otherwise :attr:`label`."""
        prefix = {"QKV": "", "Q-K=V": "Q-"}.get(self.sharing)
        if self.n_kv_heads is None or prefix is None or self.breakers:
            return self.label
        return f"{prefix}MQA" if self.n_kv_heads == 1 else f"{prefix}GQA-{self.n_kv_heads}"

    def structure_settings(self) -> dict[str, Any]:
        """The settings of :data:`STRUCTURE_DEFAULTS` as this variant sets them (all of them)."""
        return {
            "layers": {key: label for key, label in self.layers} if self.layers else None,
            "kv_share_every": self.kv_share_every,
            "kv_sources": {str(a): b for a, b in self.kv_sources} if self.kv_sources else None,
            "depth": dict(self.depth) if self.depth else None,
            "rope_fraction": self.rope_fraction,
            "rope_key_dim": self.rope_key_dim,
        }

    def attention_settings(self) -> dict[str, Any]:
        """The ``attention`` settings this variant decides: sharing, n_kv_heads and every breaker's setting (on for
        its breakers, at the default for the others), and the structure settings it changes (a schedule, cross-layer
        sharing, depth; those at their defaults are left out, so existing studies keep their fingerprints)."""
        settings = {"sharing": self.sharing, "n_kv_heads": self.n_kv_heads, **breaker_settings(self.breakers)}
        settings.update({k: v for k, v in self.structure_settings().items() if v != STRUCTURE_DEFAULTS[k]})
        return settings

    def attention_config(self, base: AttentionConfig | None = None) -> AttentionConfig:
        """``base`` (default: the default attention) with this variant's settings (its structure settings too, so a
        plain variant has no schedule, cross-layer sharing or depth whatever ``base`` has)."""
        settings = {**self.structure_settings(), **self.attention_settings()}
        return dataclasses.replace(base or AttentionConfig(), **settings)

    def as_row(self) -> dict[str, Any]:
        """The variant's columns in tables (``results.csv``, summaries, TensorBoard hparams): the label, sharing,
        n_kv_heads and each breaker setting."""
        settings = self.attention_settings()
        return {"variant": self.label, **settings}


def row_columns() -> list[str]:
    """The column names of :meth:`Variant.as_row`, in order."""
    return list(Variant().as_row())


def expand(
    sharing: Iterable[str],
    n_kv_heads: Iterable[int | None] = (None,),
    breakers: Iterable[str | Sequence[str]] = (NO_BREAKER,),
    n_head: int | None = None,
) -> tuple[list[Variant], list[str]]:
    """The grid sharing x K/V heads x breakers, without repeats, and notes on the combinations left out.

    The one validity rule: a variant that shares Q with K or V needs as many K/V heads as query heads, so it is
    left out (with a note) for any other count. With ``n_head``, a count equal to it means "all heads" and every
    count is checked to divide it.

    Raises:
        ConfigError: for an unknown sharing or breaker, or (with ``n_head``) a count that does not divide it.
    """
    variants: list[Variant] = []
    notes: list[str] = []
    for name in sharing:
        named = parse_label(name)  # a sharing name, or a full label (Q-K=V_cla2, QKV@0-1,Q-K=V@2-)
        for n_kv in n_kv_heads:
            for breaker in breakers:
                if n_head is not None and n_kv == n_head:
                    n_kv = None
                chosen = parse_breakers([*named.breakers, *parse_breakers(breaker)])
                if named.layers:
                    variant = named
                else:
                    n_kv = named.n_kv_heads if n_kv is None else n_kv
                    if n_head is not None and n_kv == n_head:
                        n_kv = None
                    variant = dataclasses.replace(named, sharing=named.partition, n_kv_heads=n_kv, breakers=chosen)
                if n_kv is not None and variant.query_shared:
                    notes.append(
                        f"left out {variant.label}: {variant.sharing} shares the query projection, so it needs as "
                        "many K/V heads as query heads (it runs with n_kv_heads null)"
                    )
                    continue
                if n_head is not None:
                    variant.check_heads(n_head)
                if variant not in variants:
                    variants.append(variant)
    return variants, notes
