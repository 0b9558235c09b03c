"""The attention settings (:class:`AttentionConfig`): projection sharing, K/V heads, symmetry breakers, a per-layer
schedule, cross-layer K/V sharing, per-role norms and depth factorisation. The config parses its variant once
(:attr:`AttentionConfig.parsed`); the layers' configs and row layouts are made from that, never from the strings."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.positional import rotary_dims
from qkv_lightning.nn.sharing import (
    BREAKERS,
    ROLES,
    ProjectionLayout,
    Sharing,
    VariantLabel,
    parse_layer_range,
)

SEPARATE = Sharing((("Q",), ("K",), ("V",)))
"""QKV, three projections: the top-level sharing of a per-layer schedule (each layer has its own)."""

ROLE_NORMS = ("none", "rms", "layer")
"""The per-role norms (q_norm, k_norm, v_norm): none, RMSNorm or LayerNorm over each head."""

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
    """The attention variant: projection sharing, K/V heads and symmetry breakers.

    Besides its fields (the settings, as configs and checkpoints store them) a config holds ``parsed``: the variant
    they describe as a :class:`~qkv_lightning.nn.sharing.VariantLabel`, parsed once when the config is made (the
    sharing's groups, a schedule's layer variants). The trunk, the attention layers, the cost and the accounting
    read it; nothing parses the strings again.
    """

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

    rope_fraction: float = 1.0
    """Partial rotary positions (with network.position=rope): the first ``int(head_dim * rope_fraction)``
    dimensions of each query and key head, rounded down to an even count, are rotated and the rest are not (GPT-NeoX's
    rotary_pct, Phi's partial_rotary_factor). A K=V cache then rotates only those dimensions of its cached keys when
    it reads them. 1.0: every dimension (full RoPE)."""

    rope_key_dim: int = 0
    """Decoupled rotary key (DeepSeek-V2 style; with network.position=rope): queries and keys (the K=V tensor too)
    carry no rotation; a small extra projection gives each token one rotary key of this many dimensions, shared by
    every query head and cached already rotated, and each query head a rotary part of the same size. Scores are
    q . k + q_rope . k_rope, scaled by 1/sqrt(head_dim + rope_key_dim); the cache adds rope_key_dim values per token
    and layer. Even; 0: off (rotary positions, if any, rotate the heads themselves, see rope_fraction)."""

    def __post_init__(self) -> None:
        partition = Sharing.parse(self.sharing)
        self.sharing = partition.name
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
        if isinstance(self.rope_fraction, bool) or not 0.0 < float(self.rope_fraction) <= 1.0:
            raise ConfigError(
                f"attention.rope_fraction={self.rope_fraction!r} must lie in (0, 1]: the fraction of each head's "
                "dimensions that rotary positions rotate (1.0: all of them)."
            )
        self.rope_fraction = float(self.rope_fraction)
        key_dim = self.rope_key_dim
        if isinstance(key_dim, bool) or not isinstance(key_dim, int) or key_dim < 0 or key_dim % 2:
            raise ConfigError(
                f"attention.rope_key_dim={key_dim!r} must be an even whole number >= 0 (0: no decoupled rotary key; "
                "e.g. 16 or 32)."
            )
        if key_dim and self.rope_fraction != 1.0:
            raise ConfigError(
                f"attention.rope_key_dim={key_dim} and attention.rope_fraction={self.rope_fraction} both place rotary "
                "positions: with a decoupled rotary key no head dimension is rotated, so set rope_fraction back to 1.0 "
                "(or rope_key_dim to 0)."
            )
        if key_dim and (self.kv_share_every != 1 or self.kv_sources):
            raise ConfigError(
                f"attention.rope_key_dim={key_dim} does not combine with cross-layer K/V sharing "
                "(attention.kv_share_every / kv_sources): set rope_key_dim to 0 or share no K/V across layers."
            )
        structure = {
            "rope_fraction": self.rope_fraction,
            "rope_key_dim": self.rope_key_dim,
            "kv_share_every": self.kv_share_every,
            "kv_sources": tuple((self.kv_sources or {}).items()),
            "depth": tuple((self.depth or {}).items()),
        }
        if self.layers is None:
            breakers = tuple(
                name for name, settings in BREAKERS.items() if all(getattr(self, k) == v for k, v in settings.items())
            )
            self.parsed = VariantLabel(partition, self.n_kv_heads, breakers, **structure)
        else:
            schedule = tuple((key, layer_label(key, label)) for key, label in self.layers.items())
            self.parsed = VariantLabel(SEPARATE, layers=schedule, **structure)

    def rotary_dims(self, head_dim: int) -> int:
        """Width of the rotary tables for heads of ``head_dim`` (with rotary positions): ``rope_key_dim`` for a
        decoupled rotary key, else the rotated dimensions of each head (:func:`~qkv_lightning.nn.positional.rotary_dims`
        of ``rope_fraction``).

        Raises:
            ConfigError: naming ``attention.rope_fraction`` when it rotates no dimension.
        """
        if self.rope_key_dim:
            return self.rope_key_dim
        dims = rotary_dims(head_dim, self.rope_fraction)
        if dims < 2:
            raise ConfigError(
                f"attention.rope_fraction={self.rope_fraction} rotates no dimension of heads of {head_dim} (it rounds "
                f"down to an even count): raise it to at least {2 / head_dim:g}."
            )
        return dims

    def group_depths(self) -> tuple[int, ...]:
        """Factors of each group of the fused projection (1: one matrix), from ``depth``.

        Raises:
            ConfigError: if two roles of one group are given different depths.
        """
        sharing = self.parsed.partition
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
            ranges = [key for key, _ in self.parsed.layers]  # canonical ('0-0' is '0'), by first layer
            assigned: list[int | None] = [None] * n_layer
            for number, key in enumerate(ranges):
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
                            f"attention.layers gives layer {i} twice (ranges {ranges[assigned[i]]!r} and {key!r}): "
                            "make the ranges disjoint."
                        )
                    assigned[i] = number
            missing = [i for i, number in enumerate(assigned) if number is None]
            if missing:
                raise ConfigError(
                    f"attention.layers leaves layer(s) {missing} of 0-{n_layer - 1} without a variant: every layer "
                    'needs one (e.g. add "' + f"{missing[0]}-" + '": "QKV").'
                )
            configs = [self.for_layer(layer) for layer in self.parsed.schedule]
            out = [configs[number] for number in assigned]
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
            if configs[i].parsed.partition.query_shared:
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
        return self.parsed.partition.resolve_kv_heads(n_head, self.parsed.n_kv_heads)

    def layout(self, n_head: int, head_dim: int, owns_kv: bool = True) -> ProjectionLayout:
        """The rows of the fused projection of a layer with these settings, ``n_head`` query heads of ``head_dim``
        (``owns_kv`` False: a layer that reuses an earlier layer's K/V projects only Q); K/V heads checked.

        Raises:
            ConfigError: as :meth:`resolve_kv_heads`.
        """
        return ProjectionLayout(self.parsed.partition, n_head, self.resolve_kv_heads(n_head), head_dim, owns_kv)

    def for_layer(self, layer: VariantLabel) -> AttentionConfig:
        """These settings with a schedule's one-variant ``layer`` (its sharing, K/V heads and breakers, the other
        breakers off) and no schedule: a layer's config. Made from values already parsed and checked, so nothing is
        parsed again."""
        config = copy.copy(self)
        vars(config).update(
            layers=None, sharing=layer.sharing, n_kv_heads=layer.n_kv_heads, **breaker_settings(layer.breakers)
        )
        config.parsed = VariantLabel(layer.partition, layer.n_kv_heads, layer.breakers, (), self.parsed.kv_share_every,
                                     self.parsed.kv_sources, self.parsed.depth, self.parsed.rope_fraction,
                                     self.parsed.rope_key_dim)
        return config


def breaker_settings(names: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every attention setting a symmetry breaker touches (:data:`~qkv_lightning.nn.sharing.BREAKERS`, in registry
    order): on for the breakers ``names``, at its :class:`AttentionConfig` default (off) for the others."""
    defaults = {f.name: f.default for f in dataclasses.fields(AttentionConfig)}
    settings = {key: defaults[key] for entry in BREAKERS.values() for key in entry}
    for name in names:
        settings.update(BREAKERS[name])
    return settings


def layer_label(key: str, label: str) -> VariantLabel:
    """The one variant ``attention.layers[key]`` names, parsed (:meth:`VariantLabel.parse`).

    Raises:
        ConfigError: naming the setting, for a label that is not one variant's (a bad sharing, breaker or head
            count, or a schedule, depth or cross-layer suffix: those are settings of the whole network).
    """
    try:
        layer = VariantLabel.parse(label)
    except ConfigError as error:
        problem = str(error)
    else:
        if not (layer.layers or layer.structured):
            return layer
        problem = "it names a schedule, depth or cross-layer sharing, which are settings of the whole network"
    raise ConfigError(
        f"attention.layers[{key!r}]={label!r} is not one variant's label: {problem}. Write the sharing, then "
        "'+breaker' for each symmetry breaker, then '_kvN' for N K/V heads, e.g. QKV, Q-K=V_kv2, Q=K-V+score."
    )
