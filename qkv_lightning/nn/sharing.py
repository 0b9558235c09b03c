"""The sharing algebra and the one variant-label grammar.

Two settings are independent:

* projection sharing (:class:`Sharing`): how the roles {Q, K, V} are split into groups. In the paper's notation
  ``-`` separates groups and ``=`` joins the members of a group: ``QKV`` (three projections), ``Q=K-V``,
  ``Q-K=V``, ``Q=V-K`` (two) and ``Q=K=V`` (one);
* head sharing: ``n_kv_heads`` (GQA; 1 is MQA). A group that holds Q has as many heads as Q.

:class:`ProjectionLayout` says which rows of an attention layer's fused projection hold which group and role; the
attention core, weight surgery and the analysis all read it. :class:`VariantLabel` is the one grammar of a variant's
label (``Q-K=V+score_kv2``, ``QKV@0-1,Q-K=V@2-_cla2``): :meth:`VariantLabel.parse` reads one and
:attr:`VariantLabel.label` writes it. An :class:`~qkv_lightning.nn.attention_config.AttentionConfig` parses its
variant once, into a :class:`VariantLabel` that travels with it, so nothing downstream parses the strings again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qkv_lightning.errors import ConfigError

ROLES = ("Q", "K", "V")

CANONICAL_VARIANTS = ("QKV", "Q=K-V", "Q-K=V", "Q=V-K", "Q=K=V")
"""The five ways to split {Q, K, V} into groups, in the paper's notation."""

VARIANT_ALIASES = {
    "standard": "QKV",
    "shared_qk": "Q=K-V",
    "shared_kv": "Q-K=V",
    "shared_qv": "Q=V-K",
    "single": "Q=K=V",
    "shared_qkv": "Q=K=V",
}
"""Readable names accepted in place of the notation (case-insensitive)."""


def _allowed_names() -> str:
    aliases = ", ".join(f"{alias} ({name})" for alias, name in VARIANT_ALIASES.items())
    return f"{', '.join(CANONICAL_VARIANTS)}, or an alias: {aliases}"


@dataclass(frozen=True)
class Sharing:
    """A projection-sharing variant: a partition of the roles Q, K, V into groups.

    Groups are kept in canonical order (by their first role in Q, K, V order), which is also the order of the
    groups in the fused projection's output.
    """

    groups: tuple[tuple[str, ...], ...]

    @classmethod
    def parse(cls, name: str) -> Sharing:
        """Parse a variant name (the notation in any group order, or an alias) into a :class:`Sharing`.

        Raises:
            ConfigError: if the name is not a partition of {Q, K, V} or a known alias.
        """
        if not isinstance(name, str):
            raise ConfigError(f"attention.sharing must be a string, got {name!r}. Allowed: {_allowed_names()}.")
        text = name.strip()
        alias = VARIANT_ALIASES.get(text.lower())
        if alias is not None:
            text = alias
        compact = text.upper().replace(" ", "")
        if compact == "QKV":
            return cls((("Q",), ("K",), ("V",)))
        groups = [tuple(member for member in group.split("=")) for group in compact.split("-")]
        members = [m for group in groups for m in group]
        if sorted(members) != sorted(ROLES) or any(len(m) != 1 for m in members):
            raise ConfigError(
                f"attention.sharing={name!r} is not a projection-sharing variant: use '-' between groups and '=' "
                f"between the members of a group, naming each of Q, K, V exactly once. Allowed: {_allowed_names()}."
            )
        ordered = sorted((tuple(sorted(g, key=ROLES.index)) for g in groups), key=lambda g: ROLES.index(g[0]))
        return cls(tuple(ordered))

    @property
    def name(self) -> str:
        """Canonical name in the paper's notation, e.g. ``Q-K=V``."""
        if len(self.groups) == 3:
            return "QKV"
        return "-".join("=".join(group) for group in self.groups)

    def group_of(self, role: str) -> int:
        """Index of the group that holds ``role`` (one of ``Q``, ``K``, ``V``)."""
        return next(i for i, group in enumerate(self.groups) if role in group)

    @property
    def cached_groups(self) -> tuple[int, ...]:
        """Indices of the distinct tensors a KV cache must store (the groups of K and V)."""
        return tuple(sorted({self.group_of("K"), self.group_of("V")}))

    def group_heads(self, n_head: int, n_kv_heads: int) -> tuple[int, ...]:
        """Heads of each group in the fused projection: ``n_head`` for the group holding Q, ``n_kv_heads`` for the
        others (so its output width is their sum times the head size)."""
        return tuple(n_head if "Q" in group else n_kv_heads for group in self.groups)

    @property
    def query_shared(self) -> bool:
        """Whether Q shares its projection with K or V (then K/V must have as many heads as Q)."""
        return len(self.groups[self.group_of("Q")]) > 1

    def resolve_kv_heads(self, n_head: int, n_kv_heads: int | None) -> int:
        """The K/V head count for ``n_head`` query heads (None: as many), validated.

        Raises:
            ConfigError: naming ``attention.n_kv_heads`` and the allowed values: a count that does not divide
                ``n_head``, or fewer K/V heads than query heads where Q shares its projection.
        """
        n_kv = n_head if n_kv_heads is None else n_kv_heads
        divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
        if n_head % n_kv:
            raise ConfigError(f"attention.n_kv_heads={n_kv} must divide n_head={n_head}; allowed: {divisors}.")
        if self.query_shared and n_kv != n_head:
            raise ConfigError(
                f"attention.sharing={self.name} shares the query projection with keys or values, so it needs as "
                f"many K/V heads as query heads: set attention.n_kv_heads to null or {n_head} (got {n_kv}), or pick "
                f"a variant that keeps Q separate (QKV or Q-K=V) for GQA/MQA."
            )
        return n_kv


def canonical_variant(name: str) -> str:
    """Canonical notation of a variant name or alias, e.g. ``canonical_variant("shared_kv") == "Q-K=V"``."""
    return Sharing.parse(name).name


@dataclass(frozen=True)
class ProjectionLayout:
    """The rows of one attention layer's fused projection: the groups it projects in canonical order, group ``g``
    holding ``group_heads[g]`` heads of ``head_dim`` rows each (head-major). A layer that reuses an earlier layer's
    K/V (``owns_kv`` False) projects only Q's group. The one statement of this layout: the attention core splits its
    output by it, weight surgery reads and writes roles through it, the analysis finds a role's heads with it."""

    sharing: Sharing
    n_head: int
    n_kv_heads: int
    head_dim: int
    owns_kv: bool = True

    @property
    def group_heads(self) -> tuple[int, ...]:
        """Heads of every group of the sharing (projected or not)."""
        return self.sharing.group_heads(self.n_head, self.n_kv_heads)

    @property
    def groups(self) -> tuple[int, ...]:
        """The groups this layer projects, in row order: all of them, or only Q's for a layer reusing K/V."""
        return tuple(range(len(self.sharing.groups))) if self.owns_kv else (self.sharing.group_of("Q"),)

    @property
    def widths(self) -> tuple[int, ...]:
        """Rows of each projected group (in :attr:`groups` order)."""
        return tuple(self.group_heads[g] * self.head_dim for g in self.groups)

    @property
    def width(self) -> int:
        """Rows of the fused projection (its output features)."""
        return sum(self.widths)

    def rows(self, group: int) -> slice:
        """The rows of the fused weight (and bias) that hold ``group``'s heads."""
        place = self.groups.index(group)
        start = sum(self.widths[:place])
        return slice(start, start + self.widths[place])

    def part_of(self, role: str) -> int:
        """The place of ``role``'s group among the projected groups (its part of the split projection)."""
        return self.groups.index(self.sharing.group_of(role))

    def heads_of(self, role: str) -> int:
        """Heads of ``role``'s group."""
        return self.group_heads[self.sharing.group_of(role)]

    def head_of(self, role: str, query_head: int) -> int:
        """The head of ``role``'s group that query head ``query_head`` reads: itself, or under GQA its K/V head
        ``query_head // (n_head / n_kv_heads)`` (as SDPA's ``enable_gqa`` pairs them)."""
        if self.heads_of(role) == self.n_head:
            return query_head
        return query_head // (self.n_head // self.n_kv_heads)

    @property
    def cached_tensors(self) -> int:
        """Distinct tensors a KV cache stores for this layer (1 when K and V share a projection, 0 when the layer
        reuses another layer's K/V)."""
        return len(self.sharing.cached_groups) if self.owns_kv else 0


BREAKERS: dict[str, dict[str, Any]] = {
    "score": {"score_encoding": "paper"},
    "relative": {"score_encoding": "relative"},
    "noself": {"mask_self": True},
}
"""Symmetry breakers by name: the attention settings each one turns on. The other value of each setting is its
:class:`~qkv_lightning.nn.attention_config.AttentionConfig` default (the breaker off). Breakers combine with ``+``
(``score+noself``). ``score`` is the paper's "+" encoding (``score_encoding: paper``), ``relative`` the learned
per-head relative bias; the two set the same setting, so they do not combine."""

NO_BREAKER = "none"
"""The name of the empty breaker combination in configs (``study.breakers: [none, score]``)."""


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


def parse_layer_range(key: str) -> tuple[int, int | None]:
    """``"2"`` -> (2, 2), ``"0-3"`` -> (0, 3), ``"4-"`` -> (4, None): a range of ``attention.layers``.

    Raises:
        ConfigError: naming ``attention.layers`` for anything else.
    """
    text = str(key).strip()
    first, dash, last = text.partition("-")
    ok = first.isdigit() and (not dash or not last or last.isdigit())
    if not ok or (dash and last and int(last) < int(first)):
        raise ConfigError(
            f"attention.layers range {key!r} is not a layer range: write 'a' (one layer), 'a-b' (a to b, inclusive, "
            "a <= b) or 'a-' (a to the last layer), e.g. {\"0-3\": \"QKV\", \"4-\": \"Q-K=V\"}."
        )
    start = int(first)
    return start, (start if not dash else (int(last) if last else None))


def range_text(start: int, stop: int | None) -> str:
    """The canonical text of a layer range: ``2``, ``0-3`` or ``4-``."""
    return str(start) if stop == start else f"{start}-{'' if stop is None else stop}"


_CLA = re.compile(r"_cla(\d+|\[\d+:\d+(?:,\d+:\d+)*\])$")
_DEPTH = re.compile(r"_d((?:[QKV]\d+)+)$")
_ROPE_KEY = re.compile(r"_rk(\d+)$")
_ROPE_FRACTION = re.compile(r"_rf(\d*\.?\d+)$")


def _split_structure(text: str) -> tuple[str, dict[str, Any]]:
    """``Q-K=V_dQ2_cla2_rk16`` -> (``Q-K=V``, the depth, cross-layer and rotary settings its suffixes name)."""
    extra: dict[str, Any] = {}
    match = _ROPE_KEY.search(text)
    if match:
        extra["rope_key_dim"] = int(match.group(1))
        text = text[: match.start()]
    match = _ROPE_FRACTION.search(text)
    if match:
        extra["rope_fraction"] = float(match.group(1))
        text = text[: match.start()]
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


@dataclass(frozen=True)
class VariantLabel:
    """A variant as its label names it: a sharing, a K/V head count (None: as many as query heads), symmetry
    breakers, and its structure across layers (a per-layer schedule, cross-layer K/V sharing, depth factorisation).

    Every field is kept canonical (the sharing in the paper's notation, breakers in registry order, layers by their
    first layer), so equal variants compare equal and have one :attr:`label`. :meth:`parse` is the one parser of a
    label and :attr:`label` the one writer. Besides its fields a label holds what was parsed: :attr:`partition`
    (the sharing's :class:`Sharing`) and :attr:`schedule` (each layer range's own :class:`VariantLabel`).
    """

    sharing: str = "QKV"
    """The projection sharing in the paper's notation (an alias, or an already parsed :class:`Sharing`, is taken
    and made canonical)."""
    n_kv_heads: int | None = None
    """K/V heads (GQA; 1 is MQA); None: as many as query heads."""
    breakers: tuple[str, ...] = ()
    """Symmetry breakers (names of :data:`BREAKERS`), in registry order."""
    layers: tuple[tuple[str, str], ...] = ()
    """A per-layer schedule: (range, layer variant label) pairs, ordered by their first layer (then sharing,
    n_kv_heads and breakers are those of the layers, not set here). Empty: the same variant in every layer."""
    kv_share_every: int = 1
    """Cross-layer K/V sharing: every run of this many layers shares the first one's K/V (1: none)."""
    kv_sources: tuple[tuple[int, int], ...] = ()
    """Cross-layer K/V sharing as (layer, source layer) pairs (instead of ``kv_share_every``)."""
    depth: tuple[tuple[str, int], ...] = ()
    """Depth-factorised roles: (role, factors) pairs, e.g. (("Q", 2),) for QVV(3) on Q-K=V."""
    rope_fraction: float = 1.0
    """Partial rotary positions: the fraction of each head's dimensions rotated (1.0: all; label suffix ``_rf``)."""
    rope_key_dim: int = 0
    """A decoupled rotary key of this many dimensions (0: none; label suffix ``_rk``)."""

    def __post_init__(self) -> None:
        partition = self.sharing if isinstance(self.sharing, Sharing) else Sharing.parse(self.sharing)
        object.__setattr__(self, "partition", partition)
        object.__setattr__(self, "sharing", partition.name)
        object.__setattr__(self, "breakers", parse_breakers(self.breakers))
        if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1):
            raise ConfigError(f"n_kv_heads={self.n_kv_heads!r} must be null or a count >= 1.")
        layers = self.layers.items() if isinstance(self.layers, Mapping) else self.layers
        schedule = []
        for key, label in layers or ():
            start, stop = parse_layer_range(str(key))
            layer = label if isinstance(label, VariantLabel) else VariantLabel.parse(str(label))
            if layer.layers or layer.structured:
                raise ConfigError(
                    f"the layer range {key!r} of a schedule is given {layer.label!r}: a layer's label names one "
                    "variant (its sharing, '+breaker's and '_kvN'); depth and cross-layer sharing are the "
                    "network's, written after the schedule (e.g. QKV@0-1,Q-K=V@2-_cla2)."
                )
            schedule.append((start, range_text(start, stop), layer))
        schedule.sort(key=lambda item: item[0])
        object.__setattr__(self, "layers", tuple((text, layer.label) for _, text, layer in schedule))
        object.__setattr__(self, "schedule", tuple(layer for _, _, layer in schedule))
        if self.layers and (self.sharing, self.n_kv_heads, self.breakers) != ("QKV", None, ()):
            raise ConfigError(
                "a variant with a per-layer schedule takes sharing, n_kv_heads and breakers from its layers' "
                "labels: leave them at their defaults."
            )
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
        if not 0.0 < float(self.rope_fraction) <= 1.0 or int(self.rope_key_dim) < 0 or int(self.rope_key_dim) % 2:
            raise ConfigError(
                f"rope_fraction={self.rope_fraction!r} must lie in (0, 1] and rope_key_dim={self.rope_key_dim!r} "
                "must be an even count >= 0."
            )
        object.__setattr__(self, "rope_fraction", float(self.rope_fraction))
        object.__setattr__(self, "rope_key_dim", int(self.rope_key_dim))

    @classmethod
    def parse(cls, label: str) -> Any:
        """The variant a label names (an instance of ``cls``): ``QKV``, ``Q=K-V+score``, ``Q-K=V_kv2``,
        ``Q=K=V+score+noself``, the paper's ``(Q=K=V)+`` for ``Q=K=V+score``; a schedule ``QKV@0-1,Q-K=V@2-``; then
        ``_dQ2`` (depth), ``_cla2`` or ``_cla[1:0,3:2]`` (cross-layer K/V sharing), ``_rf0.25`` (partial rotary)
        and ``_rk16`` (a decoupled rotary key). The inverse of :attr:`label`.

        Raises:
            ConfigError: for an unknown sharing, breaker or K/V head count, or a malformed schedule, naming the label.
        """
        text = str(label).strip().replace(" ", "")
        try:
            text, extra = _split_structure(text)
            if "@" in text:
                pairs = []
                for item in text.split(","):
                    layer, at, key = item.rpartition("@")
                    if not at or not layer:
                        raise ConfigError(f"{item!r} is not a layer range's variant: write label@range, e.g. Q-K=V@4-.")
                    pairs.append((key, VariantLabel.parse(layer)))
                return cls(layers=tuple(pairs), **extra)
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
            return cls(sharing, count, parse_breakers(breakers or [NO_BREAKER]), **extra)
        except (ConfigError, ValueError) as error:
            raise ConfigError(
                f"variant label {label!r} is not a variant ({error}): write the sharing, then '+breaker' for each "
                "symmetry breaker, then '_kvN' for N K/V heads, e.g. Q=K-V+score or Q-K=V_kv2."
            ) from None

    @property
    def structured(self) -> bool:
        """Whether the label names depth factorisation, cross-layer K/V sharing or rotary settings (all of them the
        whole network's)."""
        return bool(self.depth or self.kv_sources or self.kv_share_every != 1 or self.rope_fraction != 1.0
                    or self.rope_key_dim)

    @property
    def variant_text(self) -> str:
        """The label without its structure suffixes: the schedule (``QKV@0-1,Q-K=V@2-``) or the one variant
        (``Q-K=V+score_kv2``)."""
        if self.layers:
            return ",".join(f"{layer}@{key}" for key, layer in self.layers)
        text = self.sharing + "".join(f"+{name}" for name in self.breakers)
        return text if self.n_kv_heads is None else f"{text}_kv{self.n_kv_heads}"

    @property
    def label(self) -> str:
        """The one name of the variant in tables, directories, logs and plots: ``Q=K-V+score``, ``Q-K=V_kv1``,
        ``QKV@0-1,Q-K=V@2-_cla2``."""
        label = self.variant_text
        if self.depth:
            label += "_d" + "".join(f"{role}{count}" for role, count in self.depth)
        if self.kv_share_every != 1:
            label += f"_cla{self.kv_share_every}"
        if self.kv_sources:
            label += "_cla[" + ",".join(f"{a}:{b}" for a, b in self.kv_sources) + "]"
        if self.rope_fraction != 1.0:
            label += f"_rf{self.rope_fraction:g}"
        if self.rope_key_dim:
            label += f"_rk{self.rope_key_dim}"
        return label

    @property
    def query_shared(self) -> bool:
        """Whether Q shares its projection (then it needs as many K/V heads as query heads); for a schedule,
        whether any layer's does."""
        if self.schedule:
            return any(layer.query_shared for layer in self.schedule)
        return self.partition.query_shared

    def check_heads(self, n_head: int) -> None:
        """Raise a :class:`ConfigError` if the variant (every layer of a schedule) does not fit ``n_head`` query
        heads (:meth:`Sharing.resolve_kv_heads`)."""
        for layer in self.schedule:
            layer.check_heads(n_head)
        self.partition.resolve_kv_heads(n_head, self.n_kv_heads)
