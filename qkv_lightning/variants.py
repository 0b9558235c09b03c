"""The attention variant: projection sharing, K/V heads and symmetry breakers, with its one label format and the one
grid expansion that study, bench, report and accounting all use.

A :class:`Variant` is what a comparison varies; everything else about attention (dropout, backend, the score
encoding's size) stays as the task config sets it. Adding a symmetry breaker means a setting in
:class:`~qkv_lightning.nn.attention.AttentionConfig` and one entry in :data:`BREAKERS`; the study's grid, its
``results.csv`` columns, the report's rows, the TensorBoard hparams and the accounting labels follow from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import AttentionConfig, Sharing

BREAKERS: dict[str, dict[str, Any]] = {
    "score": {"score_encoding": "paper"},
    "relative": {"score_encoding": "relative"},
    "noself": {"mask_self": True},
}
"""Symmetry breakers by name: the attention settings each one turns on. The other value of each setting is its
:class:`AttentionConfig` default (the breaker off). Breakers combine with ``+`` (``score+noself``). ``score`` is the
paper's "+" encoding (``score_encoding: paper``), ``relative`` the learned per-head relative bias; the two set the
same setting, so they do not combine."""

NO_BREAKER = "none"
"""The name of the empty breaker combination in configs (``study.breakers: [none, score]``)."""


def breaker_settings() -> dict[str, Any]:
    """Every attention setting a breaker touches, at its default (off) value, in registry order."""
    defaults = {f.name: f.default for f in dataclasses.fields(AttentionConfig)}
    return {key: defaults[key] for settings in BREAKERS.values() for key in settings}


def parse_breakers(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"score+noself"`` (or ``["score", "noself"]``, or ``"none"``) as a tuple of breaker names in registry order.

    Raises:
        ConfigError: for an unknown breaker, naming the known ones.
    """
    names = [text] if isinstance(text, str) else list(text)
    parts = [part.strip() for name in names for part in str(name).split("+") if part.strip()]
    parts = [part for part in parts if part != NO_BREAKER]
    unknown = [part for part in parts if part not in BREAKERS]
    if unknown:
        raise ConfigError(
            f"unknown symmetry breaker {unknown[0]!r}: use {NO_BREAKER}, one of {', '.join(BREAKERS)}, or several "
            "joined by '+' (e.g. score+noself)."
        )
    chosen = tuple(name for name in BREAKERS if name in parts)
    for i, first in enumerate(chosen):
        for second in chosen[i + 1 :]:
            clash = set(BREAKERS[first]) & set(BREAKERS[second])
            if clash:
                raise ConfigError(
                    f"symmetry breakers {first} and {second} both set attention.{sorted(clash)[0]}: pick one of them."
                )
    return chosen


def parse_label(label: str) -> Variant:
    """The variant a label names: ``QKV``, ``Q=K-V+score``, ``Q-K=V_kv2``, ``Q=K=V+score+noself``; the paper's
    ``(Q=K=V)+`` is accepted for ``Q=K=V+score``.

    Raises:
        ConfigError: for an unknown sharing, breaker or K/V head count, naming the label.
    """
    text = str(label).strip().replace(" ", "")
    if text.startswith("(") and ")+" in text:  # the paper's notation of the "+" variants
        text = text[1:].replace(")+", "+score", 1)
    text, n_kv = (text.rsplit("_kv", 1) + [None])[:2] if "_kv" in text else (text, None)
    sharing, *breakers = text.split("+")
    try:
        count = None if n_kv is None else int(n_kv)
        return Variant(sharing, count, parse_breakers(breakers or [NO_BREAKER]))
    except (ConfigError, ValueError) as error:
        raise ConfigError(
            f"variant label {label!r} is not a variant ({error}): write the sharing, then '+breaker' for each "
            "symmetry breaker, then '_kvN' for N K/V heads, e.g. Q=K-V+score or Q-K=V_kv2."
        ) from None


@dataclass(frozen=True)
class Variant:
    """One attention variant: a sharing, a K/V head count (None: as many as query heads) and symmetry breakers.

    The sharing is stored in the paper's notation (aliases are accepted and canonicalised) and the breakers in
    registry order, so that equal variants compare equal and have one label.
    """

    sharing: str = "QKV"
    n_kv_heads: int | None = None
    breakers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sharing", Sharing.parse(self.sharing).name)
        object.__setattr__(self, "breakers", parse_breakers(self.breakers))
        if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1):
            raise ConfigError(f"n_kv_heads={self.n_kv_heads!r} must be null or a count >= 1.")

    @classmethod
    def of(cls, attention: AttentionConfig, n_head: int | None = None) -> Variant:
        """The variant an attention config describes; with ``n_head``, a K/V head count equal to it is None."""
        n_kv = attention.n_kv_heads
        if n_head is not None and n_kv == n_head:
            n_kv = None
        on = tuple(
            name for name, settings in BREAKERS.items() if all(getattr(attention, k) == v for k, v in settings.items())
        )
        return cls(attention.sharing, n_kv, on)

    @classmethod
    def parse(cls, label: str) -> Variant:
        """The variant a :attr:`label` names (``Q-K=V+score_kv2``), the inverse of :attr:`label`.

        Raises:
            ConfigError: if ``label`` is not a variant label.
        """
        name, sep, kv = label.strip().rpartition("_kv") if "_kv" in label else (label.strip(), "", "")
        if sep and not kv.isdigit():
            raise ConfigError(f"{label!r} is not a variant label (e.g. Q-K=V, Q=K-V+score, Q-K=V_kv2).")
        sharing, *breakers = name.split("+")
        return cls(sharing, int(kv) if sep else None, tuple(breakers))

    def with_settings(self, **settings: Any) -> Variant:
        """The variant with other attention settings, e.g. ``with_settings(score_encoding="paper")``: a breaker's
        setting turns that breaker on or off."""
        return Variant.of(dataclasses.replace(self.attention_config(), **settings))

    @property
    def query_shared(self) -> bool:
        """Whether Q shares its projection (then it needs as many K/V heads as query heads)."""
        return Sharing.parse(self.sharing).query_shared

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

    @property
    def label(self) -> str:
        """The one name of the variant in tables, directories, logs and plots: ``Q=K-V+score``, ``Q-K=V_kv1``."""
        label = self.sharing + "".join(f"+{name}" for name in self.breakers)
        return label if self.n_kv_heads is None else f"{label}_kv{self.n_kv_heads}"

    def attention_settings(self) -> dict[str, Any]:
        """The ``attention`` settings this variant decides: sharing, n_kv_heads and every breaker's setting (on for
        its breakers, at the default for the others)."""
        settings: dict[str, Any] = {"sharing": self.sharing, "n_kv_heads": self.n_kv_heads, **breaker_settings()}
        for name in self.breakers:
            settings.update(BREAKERS[name])
        return settings

    def attention_config(self, base: AttentionConfig | None = None) -> AttentionConfig:
        """``base`` (default: the default attention) with this variant's settings."""
        return dataclasses.replace(base or AttentionConfig(), **self.attention_settings())

    def check_heads(self, n_head: int) -> None:
        """Raise a :class:`ConfigError` if the variant does not fit a model with ``n_head`` query heads."""
        self.attention_config().resolve_kv_heads(n_head)

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
        for n_kv in n_kv_heads:
            for breaker in breakers:
                if n_head is not None and n_kv == n_head:
                    n_kv = None
                variant = Variant(name, n_kv, parse_breakers(breaker))
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
