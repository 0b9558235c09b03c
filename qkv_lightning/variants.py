"""The attention variant: projection sharing, K/V heads and symmetry breakers, with its one label format and the one
grid expansion that study, bench, report and accounting all use.

A :class:`Variant` is what a comparison varies; everything else about attention (dropout, backend, the score
encoding's size) stays as the task config sets it. Adding a symmetry breaker means a setting in
:class:`~qkv_lightning.nn.attention.AttentionConfig` and one entry in :data:`BREAKERS`; the study's grid, its
``results.csv`` columns, the report's rows, the TensorBoard hparams and the accounting labels follow from here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import BREAKERS, ROLES, AttentionConfig, Sharing, parse_layer_range  # noqa: F401

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


STRUCTURE_DEFAULTS: dict[str, Any] = {"layers": None, "kv_share_every": 1, "kv_sources": None, "depth": None}
"""The attention settings of a variant's structure across layers and depth (per-layer schedule, cross-layer K/V
sharing, depth factorisation), at their defaults. A variant's :meth:`Variant.attention_settings` holds those it
changes; :meth:`Variant.attention_config` sets all of them."""

_CLA = re.compile(r"_cla(\d+|\[\d+:\d+(?:,\d+:\d+)*\])$")
_DEPTH = re.compile(r"_d((?:[QKV]\d+)+)$")


def _split_structure(text: str) -> tuple[str, dict[str, Any]]:
    """``Q-K=V_dQ2_cla2`` -> (``Q-K=V``, the depth and cross-layer settings its suffixes name)."""
    extra: dict[str, Any] = {}
    match = _CLA.search(text)
    if match:
        value = match.group(1)
        if value.startswith("["):
            extra["kv_sources"] = tuple(
                (int(a), int(b)) for a, b in (item.split(":") for item in value[1:-1].split(","))
            )
        else:
            extra["kv_share_every"] = int(value)
        text = text[: match.start()]
    match = _DEPTH.search(text)
    if match:
        extra["depth"] = tuple((role, int(n)) for role, n in re.findall(r"([QKV])(\d+)", match.group(1)))
        text = text[: match.start()]
    return text, extra


def _split_schedule(text: str, parse: Any) -> tuple[tuple[str, str], ...]:
    """``QKV@0-1,Q-K=V@2-`` -> ((range, label), ...), each label parsed by ``parse``."""
    out = []
    for item in text.split(","):
        label, at, key = item.rpartition("@")
        if not at or not label:
            raise ConfigError(f"{item!r} is not a layer range's variant: write label@range, e.g. Q-K=V@4-.")
        out.append((key, parse(label).label))
    return tuple(out)


def parse_label(label: str) -> Variant:
    """The variant a label names: ``QKV``, ``Q=K-V+score``, ``Q-K=V_kv2``, ``Q=K=V+score+noself``; the paper's
    ``(Q=K=V)+`` is accepted for ``Q=K=V+score``.

    Raises:
        ConfigError: for an unknown sharing, breaker or K/V head count, naming the label.
    """
    text = str(label).strip().replace(" ", "")
    try:
        text, extra = _split_structure(text)
        if "@" in text:
            return Variant(layers=_split_schedule(text, parse_label), **extra)
    except (ConfigError, ValueError) as error:
        raise ConfigError(
            f"variant label {label!r} is not a variant ({error}): a schedule is label@range joined by ',', e.g. "
            "QKV@0-1,Q-K=V@2-, optionally followed by _dQ2 (depth) and _cla2 (cross-layer K/V sharing)."
        ) from None
    if text.startswith("(") and ")+" in text:  # the paper's notation of the "+" variants
        text = text[1:].replace(")+", "+score", 1)
    text, n_kv = (text.rsplit("_kv", 1) + [None])[:2] if "_kv" in text else (text, None)
    sharing, *breakers = text.split("+")
    try:
        count = None if n_kv is None else int(n_kv)
        return Variant(sharing, count, parse_breakers(breakers or [NO_BREAKER]), **extra)
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
    layers: tuple[tuple[str, str], ...] = ()
    """A per-layer schedule: (range, layer variant label) pairs, ordered by their first layer (then sharing,
    n_kv_heads and breakers are those of the layers, not set here). Empty: the same variant in every layer."""
    kv_share_every: int = 1
    """Cross-layer K/V sharing: every run of this many layers shares the first one's K/V (1: none)."""
    kv_sources: tuple[tuple[int, int], ...] = ()
    """Cross-layer K/V sharing as (layer, source layer) pairs (instead of ``kv_share_every``)."""
    depth: tuple[tuple[str, int], ...] = ()
    """Depth-factorised roles: (role, factors) pairs, e.g. (("Q", 2),) for QVV(3) on Q-K=V."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sharing", Sharing.parse(self.sharing).name)
        object.__setattr__(self, "breakers", parse_breakers(self.breakers))
        if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1):
            raise ConfigError(f"n_kv_heads={self.n_kv_heads!r} must be null or a count >= 1.")
        layers = self.layers.items() if isinstance(self.layers, Mapping) else self.layers
        if layers:
            pairs = []
            for key, label in layers:
                start, stop = parse_layer_range(str(key))
                text = str(start) if stop == start else f"{start}-{'' if stop is None else stop}"
                pairs.append((start, text, Variant.parse(str(label)).label))
            object.__setattr__(self, "layers", tuple((text, label) for _, text, label in sorted(pairs)))
            if (self.sharing, self.n_kv_heads, self.breakers) != ("QKV", None, ()):
                raise ConfigError(
                    "a variant with a per-layer schedule takes sharing, n_kv_heads and breakers from its layers' "
                    "labels: leave them at their defaults."
                )
        else:
            object.__setattr__(self, "layers", ())
        sources = self.kv_sources.items() if isinstance(self.kv_sources, Mapping) else self.kv_sources or ()
        object.__setattr__(self, "kv_sources", tuple(sorted((int(a), int(b)) for a, b in sources)))
        if not isinstance(self.kv_share_every, int) or self.kv_share_every < 1:
            raise ConfigError(f"kv_share_every={self.kv_share_every!r} must be a whole number >= 1.")
        if self.kv_sources and self.kv_share_every != 1:
            raise ConfigError("a variant shares K/V across layers by kv_share_every or by kv_sources, not both.")
        depth = dict(self.depth.items() if isinstance(self.depth, Mapping) else self.depth or ())
        object.__setattr__(
            self, "depth", tuple((role, int(depth[role])) for role in ROLES if role in depth and int(depth[role]) > 1)
        )

    @classmethod
    def of(cls, attention: AttentionConfig, n_head: int | None = None) -> Variant:
        """The variant an attention config describes; with ``n_head``, a K/V head count equal to it is None."""
        n_kv = attention.n_kv_heads
        if n_head is not None and n_kv == n_head:
            n_kv = None
        structure = {
            "kv_share_every": attention.kv_share_every,
            "kv_sources": tuple((attention.kv_sources or {}).items()),
            "depth": tuple((attention.depth or {}).items()),
        }
        if attention.layers:
            layers = []
            for key, label in attention.layers.items():
                layer = Variant.parse(label)
                if n_head is not None and layer.n_kv_heads == n_head:
                    layer = dataclasses.replace(layer, n_kv_heads=None)
                layers.append((key, layer.label))
            return cls(layers=tuple(layers), **structure)
        on = tuple(
            name for name, settings in BREAKERS.items() if all(getattr(attention, k) == v for k, v in settings.items())
        )
        return cls(attention.sharing, n_kv, on, **structure)

    @classmethod
    def parse(cls, label: str) -> Variant:
        """The variant a :attr:`label` names (``Q-K=V+score_kv2``), the inverse of :attr:`label`.

        Raises:
            ConfigError: if ``label`` is not a variant label.
        """
        text, extra = _split_structure(label.strip())
        if "@" in text:
            return cls(layers=_split_schedule(text, cls.parse), **extra)
        name, sep, kv = text.rpartition("_kv") if "_kv" in text else (text, "", "")
        if sep and not kv.isdigit():
            raise ConfigError(f"{label!r} is not a variant label (e.g. Q-K=V, Q=K-V+score, Q-K=V_kv2).")
        sharing, *breakers = name.split("+")
        return cls(sharing, int(kv) if sep else None, tuple(breakers), **extra)

    def with_settings(self, **settings: Any) -> Variant:
        """The variant with other attention settings, e.g. ``with_settings(score_encoding="paper")``: a breaker's
        setting turns that breaker on or off."""
        return Variant.of(dataclasses.replace(self.attention_config(), **settings))

    @property
    def query_shared(self) -> bool:
        """Whether Q shares its projection (then it needs as many K/V heads as query heads); for a schedule,
        whether any layer's does."""
        if self.layers:
            return any(Variant.parse(label).query_shared for _, label in self.layers)
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
        if self.layers:  # a per-layer schedule: QKV@0-1,Q-K=V@2-
            label = ",".join(f"{layer}@{key}" for key, layer in self.layers)
        else:
            label = self.sharing + "".join(f"+{name}" for name in self.breakers)
            label = label if self.n_kv_heads is None else f"{label}_kv{self.n_kv_heads}"
        if self.depth:
            label += "_d" + "".join(f"{role}{count}" for role, count in self.depth)
        if self.kv_share_every != 1:
            label += f"_cla{self.kv_share_every}"
        if self.kv_sources:
            label += "_cla[" + ",".join(f"{a}:{b}" for a, b in self.kv_sources) + "]"
        return label

    def structure_settings(self) -> dict[str, Any]:
        """The settings of :data:`STRUCTURE_DEFAULTS` as this variant sets them (all of them)."""
        return {
            "layers": {key: label for key, label in self.layers} if self.layers else None,
            "kv_share_every": self.kv_share_every,
            "kv_sources": {str(a): b for a, b in self.kv_sources} if self.kv_sources else None,
            "depth": dict(self.depth) if self.depth else None,
        }

    def attention_settings(self) -> dict[str, Any]:
        """The ``attention`` settings this variant decides: sharing, n_kv_heads and every breaker's setting (on for
        its breakers, at the default for the others), and the structure settings it changes (a schedule, cross-layer
        sharing, depth; those at their defaults are left out, so existing studies keep their fingerprints)."""
        settings: dict[str, Any] = {"sharing": self.sharing, "n_kv_heads": self.n_kv_heads, **breaker_settings()}
        for name in self.breakers:
            settings.update(BREAKERS[name])
        settings.update({k: v for k, v in self.structure_settings().items() if v != STRUCTURE_DEFAULTS[k]})
        return settings

    def attention_config(self, base: AttentionConfig | None = None) -> AttentionConfig:
        """``base`` (default: the default attention) with this variant's settings (its structure settings too, so a
        plain variant has no schedule, cross-layer sharing or depth whatever ``base`` has)."""
        settings = {**self.structure_settings(), **self.attention_settings()}
        return dataclasses.replace(base or AttentionConfig(), **settings)

    def check_heads(self, n_head: int) -> None:
        """Raise a :class:`ConfigError` if the variant does not fit a model with ``n_head`` query heads."""
        for _, label in self.layers:
            Variant.parse(label).check_heads(n_head)
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
                    variant = dataclasses.replace(named, n_kv_heads=n_kv, breakers=chosen)
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
