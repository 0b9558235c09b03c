"""The attention core: the one place where queries, keys and values are projected, shared and cached.

Two settings are independent:

* projection sharing (:class:`Sharing`): how the roles {Q, K, V} are split into groups. In the paper's notation
  ``-`` separates groups and ``=`` joins the members of a group: ``QKV`` (three projections), ``Q=K-V``,
  ``Q-K=V``, ``Q=V-K`` (two) and ``Q=K=V`` (one);
* head sharing: ``n_kv_heads`` (GQA; 1 is MQA). A group that holds Q has as many heads as Q.

One fused ``nn.Linear`` produces every group in one matmul. Roles in the same group are the same tensor, so no
parameter goes unused and a KV cache stores each distinct tensor once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.positional import PairScoreEncoding, PaperScoreEncoding, apply_rope, rotate_into

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


def canonical_variant(name: str) -> str:
    """Canonical notation of a variant name or alias, e.g. ``canonical_variant("shared_kv") == "Q-K=V"``."""
    return Sharing.parse(name).name


SCORE_ENCODINGS = ("none", "paper", "relative")
"""The score-encoding modes; ``True`` is an alias of ``relative`` and ``False`` of ``none``."""


def canonical_score_encoding(value: str | bool | None) -> str:
    """``none``, ``paper`` or ``relative`` for a score-encoding setting (``True`` -> relative, ``False``/None -> none).

    Raises:
        ConfigError: naming ``attention.score_encoding`` and the allowed values.
    """
    if value is None or value is False:
        return "none"
    if value is True:
        return "relative"
    text = str(value).strip().lower()
    aliases = {"true": "relative", "false": "none"}
    text = aliases.get(text, text)
    if text not in SCORE_ENCODINGS:
        raise ConfigError(
            f"attention.score_encoding={value!r} is not a score encoding; allowed: none, paper (the paper's '+' "
            "variants), relative, or the aliases true (= relative) and false (= none)."
        )
    return text


@dataclass
class AttentionConfig:
    """The attention variant: projection sharing, K/V heads and symmetry breakers."""

    sharing: str = "QKV"
    """Projection sharing in the paper's notation: QKV, Q=K-V, Q-K=V, Q=V-K or Q=K=V ('-' separates groups, '='
    joins members of a group), or an alias: standard, shared_qk, shared_kv, shared_qv, single."""

    n_kv_heads: int | None = None
    """Number of key/value heads (GQA; 1 is MQA). None means as many as query heads. Must divide n_head; a
    variant that shares Q with K or V needs as many K/V heads as query heads."""

    score_encoding: Literal["none", "paper", "relative"] | bool = "none"
    """A positional encoding of the score map, added before the softmax (breaks the symmetry of Q=K scores).
    'none'; 'paper': the paper's "+" variants exactly, a 1x1 convolution over (scores + a fixed (T, T, m)
    sinusoidal tensor of query and key positions), i.e. a learned temperature sum(w) and a (T, T) bias, one w and b
    per layer shared by all heads (score_encoding_channels); 'relative': a learned per-head bias from sin/cos
    features of i, j and i - j (score_encoding_frequencies). Aliases: true = 'relative' (what true meant before
    'paper' existed, so old configs and checkpoints keep their meaning), false = 'none'."""

    score_encoding_channels: int = 10
    """m, the channels of the paper's encoding (half for the query position, half for the key position): 10 for
    the paper's synthetic tasks, 50 for its ViT."""

    score_encoding_frequencies: int = 4
    """Frequencies of the 'relative' pair encoding (it has 6 channels per frequency)."""

    mask_self: bool = False
    """Mask each token's score with itself (Reformer's remedy for shared Q=K), except where it is the only key."""

    dropout: float = 0.0
    """Dropout on the attention probabilities during training."""

    backend: Literal["sdpa", "explicit"] = "sdpa"
    """'sdpa': torch's fused scaled_dot_product_attention; 'explicit': softmax(QK^T/sqrt(d))V written out (for
    reference and attention maps)."""

    layers: dict[str | int, str] | None = None
    """Per-layer schedule: a variant label (sharing, '+breaker's, '_kvN', as in study.variants) per layer or range
    of layers, e.g. {"0-3": "QKV", "4-": "Q-K=V"} ('a-b' inclusive, 'a-' to the last layer, 'a' one layer). Every
    layer must be covered exactly once. The label's settings replace sharing, n_kv_heads and the breakers for those
    layers; the other attention settings apply to every layer. None: every layer is the variant set above."""

    kv_share_every: int = 1
    """Cross-layer K/V sharing (CLA): in each run of this many layers the first projects and caches K/V and the
    others reuse its tensors, with no K/V projection of their own (2: CLA-2). 1: every layer has its own."""

    kv_sources: dict[str | int, int] | None = None
    """Cross-layer K/V sharing as a map, layer -> earlier layer whose K/V it reuses, e.g. {"1": 0, "3": 0} (used
    instead of kv_share_every). A source must have its own K/V projection; a reusing layer must keep Q separate
    (QKV or Q-K=V) and have its source's K/V heads."""

    q_norm: Literal["none", "rms", "layer"] = "none"
    """Norm of each query head after the projection (before RoPE): none, rms (RMSNorm) or layer (LayerNorm, with a
    bias when the network has biases); with k_norm it is QK-norm. Each role's norm has its own learned scale."""

    k_norm: Literal["none", "rms", "layer"] = "none"
    """Norm of each key head after the projection (before RoPE); see q_norm. With K=V shared the cache keeps the
    one raw tensor and the norms are applied when it is read (Gemma-style k_norm / v_norm on one tensor)."""

    v_norm: Literal["none", "rms", "layer"] = "none"
    """Norm of each value head after the projection; see q_norm and k_norm."""

    role_norm_eps: float = 1e-6
    """Epsilon of the per-role norms (q_norm, k_norm, v_norm)."""

    depth: dict[str, int] | None = None
    """Depth-factorised roles: the projection of a role's group is trained as a product of this many square
    matrices, e.g. {"Q": 2} with sharing Q-K=V is Keyless Attention's QVV(3) (Q = X W1 W2, K = V = X Wv: QKV's
    parameter count, Q-K=V's cache). The first factor is part of the fused projection; `fuse` (used by export and
    bench-decode) multiplies the others into it, so inference runs one matmul. Roles of one group share a depth."""

    def __post_init__(self) -> None:
        self.sharing = canonical_variant(self.sharing)
        if self.n_kv_heads is not None and self.n_kv_heads < 1:
            raise ConfigError(f"attention.n_kv_heads={self.n_kv_heads} must be at least 1 (or null for n_head).")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"attention.dropout={self.dropout} must lie in [0, 1).")
        self.score_encoding = canonical_score_encoding(self.score_encoding)
        if self.score_encoding_channels < 2:
            raise ConfigError(
                f"attention.score_encoding_channels={self.score_encoding_channels} must be at least 2 (half of the "
                "channels encode the query position, half the key position)."
            )
        if self.score_encoding_frequencies < 1:
            raise ConfigError(
                f"attention.score_encoding_frequencies={self.score_encoding_frequencies} must be at least 1."
            )
        if self.layers is not None:
            if not isinstance(self.layers, dict) or not self.layers:
                raise ConfigError(
                    f"attention.layers={self.layers!r} must be a mapping of layer ranges to variant labels, e.g. "
                    '{"0-3": "QKV", "4-": "Q-K=V"} (or null for one variant in every layer).'
                )
            self.layers = {str(key).strip(): str(value) for key, value in self.layers.items()}
            for key in self.layers:
                parse_layer_range(key)
        if not isinstance(self.kv_share_every, int) or self.kv_share_every < 1:
            raise ConfigError(
                f"attention.kv_share_every={self.kv_share_every!r} must be a whole number >= 1 (1: no cross-layer "
                "sharing, 2: every second layer reuses the K/V of the layer before it)."
            )
        if self.kv_sources is not None:
            if self.kv_share_every != 1:
                raise ConfigError(
                    "attention.kv_sources and attention.kv_share_every both set cross-layer sharing: set one of them "
                    "(kv_share_every back to 1, or kv_sources to null)."
                )
            try:
                self.kv_sources = {int(str(k)): int(v) for k, v in dict(self.kv_sources).items()}
            except (TypeError, ValueError):
                raise ConfigError(
                    f"attention.kv_sources={self.kv_sources!r} must map layer indices to earlier layer indices, e.g. "
                    '{"1": 0, "3": 2}.'
                ) from None
        for role in ("q_norm", "k_norm", "v_norm"):
            if getattr(self, role) not in ROLE_NORMS:
                raise ConfigError(f"attention.{role}={getattr(self, role)!r} must be one of {', '.join(ROLE_NORMS)}.")
        if self.depth is not None:
            depth = {}
            for role, count in dict(self.depth).items():
                name = str(role).strip().upper()
                if name not in ROLES or not isinstance(count, int) or isinstance(count, bool) or count < 1:
                    raise ConfigError(
                        f"attention.depth={self.depth!r}: give a whole number >= 1 of factors per role Q, K or V, "
                        'e.g. {"Q": 2} (Q = X W1 W2).'
                    )
                depth[name] = count
            self.depth = {role: depth[role] for role in ROLES if role in depth} or None

    def group_depths(self) -> tuple[int, ...]:
        """Factors of each group of the fused projection (1: one matrix), from ``depth``.

        Raises:
            ConfigError: if two roles of one group are given different depths.
        """
        sharing = Sharing.parse(self.sharing)
        out = []
        for group in sharing.groups:
            asked = {self.depth[role] for role in group if self.depth and role in self.depth}
            if len(asked) > 1:
                raise ConfigError(
                    f"attention.depth={self.depth} gives the roles of the group {'='.join(group)} of {sharing.name} "
                    "different depths: they share one projection, so give them one depth (or name one of them)."
                )
            out.append(asked.pop() if asked else 1)
        return tuple(out)

    def layer_configs(self, n_layer: int, n_head: int | None = None) -> list[AttentionConfig]:
        """The attention config of each of ``n_layer`` layers: this one, or with ``layers`` each range's variant
        (its sharing, n_kv_heads and breakers; the other settings are this config's). Checked with ``n_head``.

        Raises:
            ConfigError: naming ``attention.layers`` for ranges that overlap, leave a layer out or lie past the
                last layer, or for a label that is not a variant.
        """
        if self.layers is None:
            out = [self] * n_layer
        else:
            assigned: list[str | None] = [None] * n_layer
            for key in self.layers:
                start, stop = parse_layer_range(key)
                stop = n_layer - 1 if stop is None else stop
                if start >= n_layer or stop >= n_layer:
                    raise ConfigError(
                        f"attention.layers range {key!r} lies past the last layer ({n_layer - 1}; the network has "
                        f"{n_layer} layers): use ranges within 0-{n_layer - 1}."
                    )
                for i in range(start, stop + 1):
                    if assigned[i] is not None:
                        raise ConfigError(
                            f"attention.layers gives layer {i} twice (ranges {assigned[i]!r} and {key!r}): make the "
                            "ranges disjoint."
                        )
                    assigned[i] = key
            missing = [i for i, key in enumerate(assigned) if key is None]
            if missing:
                raise ConfigError(
                    f"attention.layers leaves layer(s) {missing} of 0-{n_layer - 1} without a variant: every layer "
                    'needs one (e.g. add "' + f"{missing[0]}-" + '": "QKV").'
                )
            settings = {
                key: layer_label_settings(label, f"attention.layers[{key!r}]") for key, label in self.layers.items()
            }
            base = dataclasses.replace(self, layers=None)
            out = [dataclasses.replace(base, **settings[key]) for key in assigned]
        if n_head is not None:
            for i, config in enumerate(out):
                try:
                    config.resolve_kv_heads(n_head)
                    config.group_depths()
                except ConfigError as error:
                    raise ConfigError(f"layer {i}: {error}") from None
        return out

    def kv_source_list(self, n_layer: int, n_head: int | None = None) -> list[int | None]:
        """For each layer, the earlier layer whose K/V it reuses (cross-layer sharing), or None.

        Raises:
            ConfigError: naming ``attention.kv_sources`` / ``attention.kv_share_every`` for a source that is not an
                earlier layer with its own K/V, or a reusing layer whose Q shares a projection or whose K/V heads
                differ from its source's.
        """
        if self.kv_sources is None:
            every = self.kv_share_every
            sources: list[int | None] = [None if i % every == 0 else i - i % every for i in range(n_layer)]
            setting = f"attention.kv_share_every={every}"
        else:
            sources = [None] * n_layer
            for layer, source in self.kv_sources.items():
                if not 0 <= layer < n_layer or not 0 <= source < layer:
                    raise ConfigError(
                        f"attention.kv_sources maps layer {layer} to {source}: a layer (0-{n_layer - 1}) reuses the "
                        "K/V of an earlier layer."
                    )
                sources[layer] = source
            setting = "attention.kv_sources"
        if all(source is None for source in sources):
            return sources
        configs = self.layer_configs(n_layer)
        heads = [None if n_head is None else c.resolve_kv_heads(n_head) for c in configs]
        for i, source in enumerate(sources):
            if source is None:
                continue
            if sources[source] is not None:
                raise ConfigError(
                    f"{setting}: layer {i} reuses the K/V of layer {source}, which reuses layer {sources[source]}'s "
                    f"itself; point layer {i} at layer {sources[source]}."
                )
            if Sharing.parse(configs[i].sharing).query_shared:
                raise ConfigError(
                    f"{setting}: layer {i} reuses the K/V of layer {source}, but its sharing "
                    f"{configs[i].sharing} ties Q to K or V, which it no longer projects: give it QKV or Q-K=V."
                )
            if heads[i] != heads[source]:
                raise ConfigError(
                    f"{setting}: layer {i} ({heads[i]} K/V heads) reuses layer {source}'s K/V ({heads[source]} "
                    "heads): give them the same n_kv_heads."
                )
        return sources

    def resolve_kv_heads(self, n_head: int) -> int:
        """Number of K/V heads for a model with ``n_head`` query heads, validated.

        Raises:
            ConfigError: naming ``attention.n_kv_heads`` and the allowed values.
        """
        n_kv = n_head if self.n_kv_heads is None else self.n_kv_heads
        divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
        if n_head % n_kv:
            raise ConfigError(
                f"attention.n_kv_heads={n_kv} must divide n_head={n_head}; allowed: {divisors}."
            )
        sharing = Sharing.parse(self.sharing)
        if sharing.query_shared and n_kv != n_head:
            raise ConfigError(
                f"attention.sharing={sharing.name} shares the query projection with keys or values, so it needs as "
                f"many K/V heads as query heads: set attention.n_kv_heads to null or {n_head} (got {n_kv}), or pick "
                f"a variant that keeps Q separate (QKV or Q-K=V) for GQA/MQA."
            )
        return n_kv


BREAKERS: dict[str, dict[str, Any]] = {
    "score": {"score_encoding": "paper"},
    "relative": {"score_encoding": "relative"},
    "noself": {"mask_self": True},
}
"""Symmetry breakers by name (the registry lives with the attention core, which resolves per-layer labels;
:mod:`qkv_lightning.variants` re-exports it): the attention settings each one turns on. The other value of each
setting is its :class:`AttentionConfig` default (the breaker off). Breakers combine with ``+`` (``score+noself``).
``score`` is the paper's "+" encoding (``score_encoding: paper``), ``relative`` the learned per-head relative bias;
the two set the same setting, so they do not combine."""


def layer_label_settings(label: str, setting: str = "attention.layers") -> dict[str, Any]:
    """The attention settings a one-variant label names (``Q-K=V+score_kv2``: sharing, breakers from
    :data:`BREAKERS` on and the others at their defaults, K/V heads), for a layer of a schedule.

    Raises:
        ConfigError: naming ``setting`` when the label is not one variant's.
    """
    text = str(label).strip().replace(" ", "")
    core, sep, kv = text.rpartition("_kv") if "_kv" in text else (text, "", "")
    sharing, *names = core.split("+")
    defaults = {f.name: f.default for f in dataclasses.fields(AttentionConfig)}
    settings: dict[str, Any] = {key: defaults[key] for entry in BREAKERS.values() for key in entry}
    problem = None
    if sep and not kv.isdigit():
        problem = f"'_kv' must be followed by a K/V head count, not {kv!r}"
    unknown = [name for name in names if name not in BREAKERS]
    if unknown:
        problem = f"unknown symmetry breaker {unknown[0]!r} (known: {', '.join(BREAKERS)})"
    if problem is None:
        try:
            sharing = canonical_variant(sharing)
        except ConfigError:
            problem = f"{sharing!r} is not a sharing ({_allowed_names()})"
    if problem is not None:
        raise ConfigError(
            f"{setting}={label!r} is not one variant's label: {problem}. Write the sharing, then '+breaker' for each "
            "symmetry breaker, then '_kvN' for N K/V heads, e.g. QKV, Q-K=V_kv2, Q=K-V+score."
        )
    for name in names:
        settings.update(BREAKERS[name])
    return {"sharing": sharing, "n_kv_heads": int(kv) if sep else None, **settings}


ROLE_NORMS = ("none", "rms", "layer")
"""The per-role norms (q_norm, k_norm, v_norm): none, RMSNorm or LayerNorm over each head."""


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


def role_norm(kind: str, head_dim: int, eps: float, bias: bool) -> nn.Module:
    """The norm of one role over each head: Identity (none), RMSNorm (rms) or LayerNorm (layer)."""
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=eps, bias=bias)
    return nn.Identity()


ROPE_KEYS_DEFAULT = "on_read"
"""How a K=V cache with rotary positions gives rotated keys: see :func:`parse_rope_keys` and the README's
"bench-decode" section for the measurements behind the default."""


def parse_rope_keys(value: str, capacity: int) -> int:
    """Positions whose rotated keys a K=V cache keeps in a second tensor, from a ``rope_keys`` setting.

    ``on_read`` (0): the cache holds the one un-rotated K=V tensor (half of QKV's cache) and rotates the cached keys
    as it reads them, at every step, into a workspace shared by all layers. ``copy`` (``capacity``): a rotated copy
    of every key, as QKV caches them: decoding costs what QKV's does, and the cache is as large as QKV's.
    ``window:W``: a rotated copy of the first W positions only; the others are rotated on read.

    Raises:
        ConfigError: naming ``rope_keys`` and the allowed values.
    """
    text = str(value).strip().lower()
    if text == "on_read":
        return 0
    if text == "copy":
        return capacity
    if text.startswith("window:") and text[7:].isdigit() and int(text[7:]) > 0:
        return min(int(text[7:]), capacity)
    raise ConfigError(
        f"rope_keys={value!r} is not a K=V cache scheme: use on_read (rotate cached keys when read; half the cache), "
        "copy (a rotated copy of every key; QKV's cache size and speed) or window:W (a rotated copy of the first W "
        "positions, e.g. window:1024)."
    )


class KVCache:
    """Cache of one attention layer for incremental decoding; stores each distinct K/V tensor once.

    Args:
        n_tensors: distinct tensors to store (1 when K and V share a projection, else 2).
        batch_size: batch size of the decoding run.
        n_kv_heads: heads per stored tensor.
        capacity: the most tokens it can hold.
        head_dim: size of one head.
        dtype: dtype of the stored tensors.
        device: where to allocate them.
        rotated: positions (from 0) whose rotated keys are also kept, for K=V with RoPE (see
            :func:`parse_rope_keys`); 0 keeps none.
        workspace: a list shared by the caches of all layers, holding the one tensor into which keys are rotated
            on read (allocated on first use); None gives this cache its own.
    """

    def __init__(
        self,
        n_tensors: int,
        batch_size: int,
        n_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        rotated: int = 0,
        workspace: list[Tensor] | None = None,
    ) -> None:
        shape = (batch_size, n_kv_heads, capacity, head_dim)
        self.buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_tensors)]
        self.rotated = (
            torch.zeros((batch_size, n_kv_heads, rotated, head_dim), dtype=dtype, device=device) if rotated else None
        )
        self.workspace = [] if workspace is None else workspace
        self.capacity = capacity
        self.length = 0

    def update(self, new: list[Tensor]) -> list[Tensor]:
        """Append ``new`` tensors, each (B, H_kv, T, D), and return the whole sequences, each (B, H_kv, L+T, D)."""
        t_new = new[0].shape[2]
        end = self.length + t_new
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} tokens exceed its capacity of {self.capacity}")
        for buffer, tensor in zip(self.buffers, new, strict=True):
            buffer[:, :, self.length : end] = tensor
        self.length = end
        return [buffer[:, :, :end] for buffer in self.buffers]

    def rotated_keys(self, kv: Tensor, rope: tuple[Tensor, Tensor], start: int) -> Tensor:
        """Rotated keys (B, H_kv, L, D) of the un-rotated K=V sequence ``kv`` (B, H_kv, L, D) just returned by
        :meth:`update`, whose positions from ``start`` on are new; ``rope``: tables (L, D) for positions 0 .. L-1.

        Keys of the rotated copy's positions are rotated once, when they arrive; the others at every call, into the
        shared workspace when no gradient is needed (no cache-sized temporaries), else with :func:`apply_rope`.
        """
        cos, sin = rope
        end, kept = kv.shape[2], 0 if self.rotated is None else self.rotated.shape[2]
        if kept:
            upto = min(end, kept)
            if start < upto:
                self.rotated[:, :, start:upto] = apply_rope(kv[:, :, start:upto], cos[start:upto], sin[start:upto])
            if end <= kept:
                return self.rotated[:, :, :end]
        if torch.is_grad_enabled() and kv.requires_grad:
            rest = apply_rope(kv[:, :, kept:], cos[kept:], sin[kept:])
            return rest if not kept else torch.cat([self.rotated, rest], dim=2)
        out = self._workspace(kv)[:, :, :end]  # (B, H_kv, L, D)
        if kept:
            out[:, :, :kept] = self.rotated
        rotate_into(kv[:, :, kept:], cos[kept:], sin[kept:], out[:, :, kept:])
        return out

    def _workspace(self, like: Tensor) -> Tensor:
        shape = (*like.shape[:2], self.capacity, like.shape[3])
        ws = self.workspace
        fits = ws and ws[0].shape == shape and ws[0].dtype == like.dtype and ws[0].device == like.device
        if not fits or ws[0].is_inference() != torch.is_inference_mode_enabled():
            ws[:] = [torch.empty(shape, dtype=like.dtype, device=like.device)]
        return ws[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (the rotated copy included; not the workspace shared by all layers)."""
        tensors = self.buffers + ([] if self.rotated is None else [self.rotated])
        return sum(t.numel() * t.element_size() for t in tensors)


class Attention(nn.Module):
    """Multi-head attention with projection sharing, GQA/MQA, RoPE, symmetry breakers and a KV cache.

    Args:
        d_model: model width.
        n_head: number of query heads.
        config: the variant (:class:`AttentionConfig`).
        causal: decoder (causal) or encoder (bidirectional) attention.
        bias: biases in the fused projection and the output projection.
        reuses_kv: cross-layer sharing: this layer projects only Q and attends with the K/V of an earlier layer
            (passed to :meth:`forward` as ``shared_kv``); it has no K/V projection and no cache of its own.
    """

    def __init__(
        self, d_model: int, n_head: int, config: AttentionConfig, causal: bool, bias: bool = True,
        reuses_kv: bool = False,
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ConfigError(f"d_model={d_model} must be divisible by n_head={n_head}.")
        self.config = config
        self.sharing = Sharing.parse(config.sharing)
        self.causal = causal
        self.n_head = n_head
        self.n_kv_heads = config.resolve_kv_heads(n_head)
        self.head_dim = d_model // n_head
        self.group_heads = list(self.sharing.group_heads(n_head, self.n_kv_heads))
        self.group_widths = [heads * self.head_dim for heads in self.group_heads]
        self.q_group, self.k_group, self.v_group = (self.sharing.group_of(role) for role in ROLES)
        self.kv_shared = self.k_group == self.v_group
        self.reuses_kv = reuses_kv
        if reuses_kv and self.sharing.query_shared:
            raise ConfigError(
                f"attention.sharing={self.sharing.name} ties Q to K or V, so a layer that reuses another layer's K/V "
                "(attention.kv_share_every / kv_sources) cannot have it: use QKV or Q-K=V there."
            )
        self.own_groups = [self.q_group] if reuses_kv else list(range(len(self.group_widths)))
        """The groups this layer projects (a layer reusing K/V projects only Q's)."""
        depths = config.group_depths()

        # one fused matmul for every group this layer projects
        self.qkv = nn.Linear(d_model, sum(self.group_widths[g] for g in self.own_groups), bias=bias)
        self.proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)
        mode = canonical_score_encoding(config.score_encoding)
        self.score_encoding: PairScoreEncoding | PaperScoreEncoding | None = None
        if mode == "relative":
            self.score_encoding = PairScoreEncoding(n_head, config.score_encoding_frequencies)
        elif mode == "paper":
            self.score_encoding = PaperScoreEncoding(config.score_encoding_channels)
        self.paper_encoding = mode == "paper"
        eps = config.role_norm_eps
        self.q_norm = role_norm(config.q_norm, self.head_dim, eps, bias)
        self.k_norm = role_norm("none" if reuses_kv else config.k_norm, self.head_dim, eps, bias)
        self.v_norm = role_norm("none" if reuses_kv else config.v_norm, self.head_dim, eps, bias)
        self.plain_qk = config.q_norm == "none" and config.k_norm == "none"
        """Q and K of one group are the same tensor (no per-role norm tells them apart)."""
        self.factors = nn.ModuleDict(
            {
                str(g): nn.Sequential(*(nn.Linear(self.group_widths[g], self.group_widths[g], bias=bias)
                                        for _ in range(depths[g] - 1)))
                for g in self.own_groups
                if depths[g] > 1
            }
        )
        """Depth factorisation: the factors after the first (which is the group's part of ``qkv``), per group."""

    @property
    def cached_tensors(self) -> int:
        """Distinct tensors this layer's KV cache stores (0 for a layer that reuses another layer's K/V)."""
        return 0 if self.reuses_kv else len(self.sharing.cached_groups)

    def split_groups(self, x: Tensor) -> list[Tensor]:
        """The fused projection of ``x`` (B, T, C) and each group's depth factors, as (B, heads, T, D) per group
        this layer projects (indexed by group; a layer reusing K/V has only Q's, group 0)."""
        b, t, _ = x.shape
        fused = self.qkv(x)  # (B, T, sum of the own groups' widths)
        widths = [self.group_widths[g] for g in self.own_groups]
        out = []
        for g, part in zip(self.own_groups, fused.split(widths, dim=-1), strict=True):
            if str(g) in self.factors:
                part = self.factors[str(g)](part)  # (B, T, width): the product W1 W2 ... of the group
            out.append(part.view(b, t, self.group_heads[g], self.head_dim).transpose(1, 2))  # (B, heads, T, D)
        return out

    @torch.no_grad()
    def fuse(self) -> None:
        """Multiply each depth-factorised group's factors into its rows of the fused projection (one matmul at
        inference): x W1^T + b1 followed by y A^T + a is x (A W1)^T + (A b1 + a). The outputs do not change."""
        if not self.factors:
            return
        weight, bias = self.qkv.weight, self.qkv.bias
        start = 0
        for g in self.own_groups:
            width = self.group_widths[g]
            if str(g) in self.factors:
                w = weight[start : start + width].double()  # (width, C)
                b = None if bias is None else bias[start : start + width].double()
                for layer in self.factors[str(g)]:
                    a = layer.weight.double()  # (width, width)
                    w = a @ w
                    if b is not None:
                        b = a @ b + layer.bias.double()
                weight[start : start + width] = w.to(weight.dtype)
                if b is not None:
                    bias[start : start + width] = b.to(bias.dtype)
            start += width
        self.factors = nn.ModuleDict()
        self.config = dataclasses.replace(self.config, depth=None)

    def new_cache(
        self,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        rope_keys: str = ROPE_KEYS_DEFAULT,
        workspace: list[Tensor] | None = None,
    ) -> KVCache:
        """An empty :class:`KVCache` for this layer; ``rope_keys`` (K=V variants with RoPE): see
        :func:`parse_rope_keys`; ``workspace``: shared by the layers' caches (see :class:`KVCache`)."""
        weight = self.qkv.weight
        rotated = parse_rope_keys(rope_keys, capacity) if self.kv_shared and not self.reuses_kv else 0
        return KVCache(
            self.cached_tensors,
            batch_size,
            self.n_kv_heads,
            capacity,
            self.head_dim,
            dtype or weight.dtype,
            device or weight.device,
            rotated=rotated,
            workspace=workspace,
        )

    def project(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        shared_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Project ``x`` (B, T, C) into q (B, H, T, D) and k, v (B, H_kv, L+T, D), L tokens coming from ``cache``.

        ``rope``: cos/sin tables for positions 0 .. L+T-1, each (L+T, D), or None. Roles in one group are the same
        tensor. With K=V shared the cache holds the un-rotated tensor and keys are rotated (and the per-role norms
        applied) when read. ``shared_kv``: the keys and values of the source layer, for a layer that reuses them.
        """
        t = x.shape[1]
        groups = self.split_groups(x)  # (B, heads, T, D) per group

        if self.reuses_kv:  # cross-layer sharing: the source's keys (rotated, normed) and values, L+T positions
            if shared_kv is None:
                raise ValueError("this layer reuses an earlier layer's K/V: pass them as shared_kv")
            k, v = shared_kv
            offset = k.shape[2] - t
            q = self.q_norm(groups[self.q_group])
            return (q if rope is None else apply_rope(q, rope[0][offset:], rope[1][offset:])), k, v

        offset = cache.length if cache is not None else 0

        def rotate_new(tensor: Tensor) -> Tensor:  # rotate the T new positions
            return tensor if rope is None else apply_rope(tensor, rope[0][offset:], rope[1][offset:])

        if self.kv_shared:  # Q-K=V or Q=K=V: one cached tensor serves as keys (rotated) and values (raw)
            kv = cache.update([groups[self.k_group]])[0] if cache is not None else groups[self.k_group]
            v = self.v_norm(kv)  # (B, H_kv, L+T, D)
            keys = self.k_norm(kv)
            if rope is None:
                k = keys
            else:
                k = apply_rope(keys, *rope) if cache is None else cache.rotated_keys(keys, rope, offset)
            if self.q_group == self.k_group and self.plain_qk:
                q = k[:, :, offset:]
            else:
                q = rotate_new(self.q_norm(groups[self.q_group]))
            return q, k, v
        k_new = rotate_new(self.k_norm(groups[self.k_group]))  # (B, H_kv, T, D)
        q = k_new if self.q_group == self.k_group and self.plain_qk else rotate_new(self.q_norm(groups[self.q_group]))
        v_new = self.v_norm(groups[self.v_group])  # raw: for Q=V-K this is Q before rotation
        if cache is None:
            return q, k_new, v_new
        k, v = cache.update([k_new, v_new])
        return q, k, v

    def static_step(
        self,
        x: Tensor,
        pos: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        buffers: list[Tensor],
        inplace: bool = True,
        workspace: Tensor | None = None,
        shared_kv: tuple[Tensor, Tensor] | None = None,
        return_kv: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | tuple[Tensor, list[Tensor], tuple[Tensor, Tensor]]:
        """One decoding step against a static cache: every shape is fixed by the cache's capacity, not by the
        position, so the step compiles (and exports) once and CUDA graphs can replay it.

        Args:
            x: the new token's input (B, 1, C).
            pos: its position, an int64 tensor of shape (1,), or one position per sequence, shape (B,) (a batch of
                requests of different lengths, as a serving loop runs them).
            rope: tables (capacity, D) for positions 0 .. capacity-1, or None.
            buffers: this layer's cache tensors, each (B, H_kv, capacity, D): K and V; or for K=V the un-rotated
                tensor, plus its rotated copy when the cache keeps one (``rope_keys=copy``).
            inplace: write the new entries into ``buffers`` (eager, compiled) or return new tensors (export).
            workspace: (B, H_kv, capacity, D) tensor to rotate cached keys into (eager); None rotates them with
                :func:`apply_rope` (compiled and exported graphs, where the compiler fuses it).
            shared_kv: a layer that reuses another layer's K/V: that layer's keys and values, each
                (B, H_kv, capacity, D) (then ``buffers`` is empty).
            return_kv: also return this layer's keys and values (for the layers that reuse them).

        Returns:
            ``(output (B, 1, C), the layer's cache tensors after the step)``, and ``(k, v)`` with ``return_kv``.
        """
        b = x.shape[0]
        capacity = (shared_kv[0] if self.reuses_kv else buffers[0]).shape[2]
        groups = self.split_groups(x)  # (B, heads, 1, D) per group
        n_pos = pos.shape[0]
        row = None if rope is None else tuple(t.index_select(0, pos).view(n_pos, 1, 1, -1) for t in rope)  # (P,1,1,D)

        def rotate(tensor: Tensor) -> Tensor:
            return tensor if row is None else apply_rope(tensor, *row)

        def write(buffer: Tensor, new: Tensor) -> Tensor:  # new (B, H_kv, 1, D) at pos into (B, H_kv, capacity, D)
            if n_pos == 1:
                return buffer.index_copy_(2, pos, new) if inplace else buffer.index_copy(2, pos, new)
            index = pos.view(n_pos, 1, 1, 1).expand_as(new)
            return buffer.scatter_(2, index, new) if inplace else buffer.scatter(2, index, new)

        if self.reuses_kv:
            k, v = shared_kv
            stored: list[Tensor] = []
            q = rotate(self.q_norm(groups[self.q_group]))
        elif self.kv_shared:
            kv_new = groups[self.k_group]
            stored = [write(buffers[0], kv_new)]
            v = self.v_norm(stored[0])
            if rope is None:
                k = self.k_norm(stored[0])
            elif len(buffers) == 2:  # the rotated copy
                stored.append(write(buffers[1], rotate(self.k_norm(kv_new))))
                k = stored[1]
            elif workspace is not None:
                k = rotate_into(self.k_norm(stored[0]), *rope, workspace)
            else:
                k = apply_rope(self.k_norm(stored[0]), *rope)
            plain = self.q_group == self.k_group and self.plain_qk
            q = rotate(kv_new) if plain else rotate(self.q_norm(groups[self.q_group]))
        else:
            k_new = rotate(self.k_norm(groups[self.k_group]))
            plain = self.q_group == self.k_group and self.plain_qk
            q = k_new if plain else rotate(self.q_norm(groups[self.q_group]))
            stored = [write(buffers[0], k_new), write(buffers[1], self.v_norm(groups[self.v_group]))]
            k, v = stored
        keys = torch.arange(capacity, device=x.device)
        at = pos.view(n_pos, 1, 1, 1)
        allowed = keys <= at  # (P, 1, 1, capacity): the filled positions
        if self.config.mask_self:
            allowed = allowed & ((keys != at) | (at == 0))
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        if self.paper_encoding:  # the temperature sum(w) scales q; P . w + b is one (P, capacity) bias for all heads
            q = q * self.score_encoding.temperature.to(q.dtype)
            bias = bias + self.score_encoding(pos, keys).to(q.dtype)[:, None, None, :]  # (P, 1, 1, capacity)
        elif self.score_encoding is not None:
            encoded = self.score_encoding(pos, keys).to(q.dtype)  # (H, P, capacity)
            bias = bias + encoded.transpose(0, 1).unsqueeze(2)  # (P, H, 1, capacity)
        if self.config.backend == "explicit":
            out = self.explicit_attention(q, k, v, bias, 0.0)[0]
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, enable_gqa=self.n_kv_heads != self.n_head
            )  # (B, H, 1, D)
        out = out.transpose(1, 2).reshape(b, 1, self.n_head * self.head_dim)  # (B, 1, H*D)
        return (self.proj(out), stored, (k, v)) if return_kv else (self.proj(out), stored)

    def score_bias(self, t_q: int, t_k: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """Additive bias (H or 1, Tq, Tk) holding masks and the score encoding; None when no mask is needed.

        Query i sits at position t_k - t_q + i (the newest positions), key j at position j.
        """
        offset = t_k - t_q
        needs_causal_mask = self.causal and t_q > 1 and offset > 0
        if self.score_encoding is None and not self.config.mask_self and not needs_causal_mask:
            return None
        allowed = self.allowed(t_q, t_k, device)
        bias = torch.zeros(1, t_q, t_k, device=device, dtype=dtype)
        if self.score_encoding is not None:  # relative: (H, Tq, Tk); paper: (Tq, Tk), shared by the heads
            q_pos = torch.arange(offset, t_k, device=device)
            bias = bias + self.score_encoding(q_pos, torch.arange(t_k, device=device)).to(dtype)
        return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))

    def allowed(self, t_q: int, t_k: int, device: torch.device) -> Tensor | None:
        """Boolean (Tq, Tk) mask of the keys each query may attend to, or None when all are allowed."""
        q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]  # (Tq, 1)
        k_pos = torch.arange(t_k, device=device)[None, :]  # (1, Tk)
        allowed = (k_pos <= q_pos) if self.causal else None
        if self.config.mask_self:
            not_self = k_pos != q_pos  # (Tq, Tk)
            others = not_self if allowed is None else allowed & not_self
            alone = ~others.any(dim=-1, keepdim=True)  # a query with no other key keeps itself
            allowed = others | (alone & ~not_self)
        return allowed

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        shared_kv: tuple[Tensor, Tensor] | None = None,
        return_kv: bool = False,
    ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, tuple[Tensor, Tensor]]:
        """Attend.

        Args:
            x: input of shape (B, T, C).
            rope: rotary cos/sin tables for positions 0 .. L+T-1 (L = tokens already in ``cache``), or None.
            cache: a :class:`KVCache` to read from and append to, or None.
            need_weights: also return the attention probabilities (uses the explicit path).
            shared_kv: for a layer that reuses another layer's K/V (``reuses_kv``): that layer's ``(k, v)``.
            return_kv: also return this layer's ``(k, v)``, each (B, H_kv, L+T, D) (for the layers reusing them).

        Returns:
            ``(output (B, T, C), probabilities (B, H, T, L+T) or None)``, and ``(k, v)`` with ``return_kv``.
        """
        b, t, _ = x.shape
        q, k, v = self.project(x, rope, cache, shared_kv)  # (B, H, T, D), (B, H_kv, S, D), (B, H_kv, S, D)
        s = k.shape[2]
        dropout = self.config.dropout if self.training else 0.0
        if self.paper_encoding:  # the paper's temperature sum(w) scales the scores: scale q, keep the fused path
            q = q * self.score_encoding.temperature.to(q.dtype)
        bias = self.score_bias(t, s, x.device, q.dtype)
        weights = None
        if need_weights or self.config.backend == "explicit":
            out, weights = self.explicit_attention(q, k, v, bias, dropout)
        else:
            is_causal = self.causal and bias is None and t > 1
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=is_causal,
                enable_gqa=self.n_kv_heads != self.n_head,
            )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)  # (B, T, H*D)
        return (self.proj(out), weights, (k, v)) if return_kv else (self.proj(out), weights)

    def explicit_attention(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout: float
    ) -> tuple[Tensor, Tensor]:
        """softmax(q k^T / sqrt(D) + masks) v written out; returns the output (B, H, T, D) and probabilities."""
        k, v = self.expand_kv(k), self.expand_kv(v)  # (B, H, S, D)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        if bias is not None:
            scores = scores + bias
        elif self.causal and q.shape[2] > 1:
            allowed = self.allowed(q.shape[2], k.shape[2], q.device)
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)  # (B,H,T,S)
        return F.dropout(probs, dropout, training=dropout > 0) @ v, probs

    def expand_kv(self, tensor: Tensor) -> Tensor:
        """Repeat K/V heads so that query head h reads K/V head h // (H / H_kv), as SDPA's ``enable_gqa`` does."""
        return tensor.repeat_interleave(self.n_head // self.n_kv_heads, dim=1)

    def logits(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, shared_kv: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Attention logits (B, H, T, T) before any mask: q k^T / sqrt(D) with the score encoding, if any
        (``shared_kv``: the source layer's K/V for a layer that reuses them)."""
        q, k, _ = self.project(x, rope, None, shared_kv)
        scores = (q @ self.expand_kv(k).transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, T)
        if self.paper_encoding:
            scores = scores * self.score_encoding.temperature.to(scores.dtype)
        if self.score_encoding is not None:
            positions = torch.arange(x.shape[1], device=x.device)
            scores = scores + self.score_encoding(positions, positions).to(scores.dtype)
        return scores
