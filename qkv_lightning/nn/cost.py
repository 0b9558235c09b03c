"""Closed-form cost arithmetic that networks use to declare their own parameters, FLOPs and KV-cache bytes (each
network config's ``cost()``; :mod:`qkv_lightning.accounting` is the entry point that calls it).

FLOPs are those of matrix products (2 per multiply-add): every linear layer and convolution, the attention scores
``QK^T`` and the weighted sum ``PV``, and the score encoding's linear map. Element-wise work (norms, softmax, GELU,
the optimiser) is not counted, as in the usual model-FLOPs-utilisation convention. The backward pass of a product
costs twice its forward (gradients of both operands), except where one operand needs no gradient (the images of a
patch embedding, the fixed pair encoding of the score encoding): then once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from qkv_lightning.nn.attention_config import AttentionConfig
from qkv_lightning.nn.positional import rotary_dims
from qkv_lightning.nn.sharing import ProjectionLayout, Sharing


@dataclass(frozen=True)
class AttentionShape:
    """The sizes that decide an attention layer's cost."""

    d_model: int
    n_head: int
    sharing: Sharing | str = "QKV"
    """The projection sharing: a parsed :class:`Sharing` (a name is parsed once, when the shape is made)."""
    n_kv_heads: int | None = None
    bias: bool = True
    score_encoding_frequencies: int | None = None
    """Frequencies of the 'relative' score encoding, or None without it."""
    score_encoding_channels: int | None = None
    """Channels m of the paper's score encoding, or None without it."""
    owns_kv: bool = True
    """False for a layer that reuses an earlier layer's K/V (cross-layer sharing): it projects and caches only Q."""
    depths: tuple[int, ...] = ()
    """Factors of each group's projection (depth factorisation; empty: one matrix each)."""
    role_norms: tuple[str, ...] = ()
    """The per-role norms of the layer (``rms`` or ``layer``, one per role that has one)."""
    rope_fraction: float = 1.0
    """Partial rotary: the fraction of each head's dimensions rotated (what a K=V cache's rotated copy keeps)."""
    rope_key_dim: int = 0
    """A decoupled rotary key's size: ``(n_head + 1) * rope_key_dim`` more projected features, as many more per query
    head in the scores, and ``rope_key_dim`` more cached values per token (0: none)."""
    qkv_bias: bool | None = None
    """Biases on the fused projection (and depth factors) apart from ``bias`` (the output projection's and the
    per-role norms'); None: as ``bias``."""

    def __post_init__(self) -> None:
        if not isinstance(self.sharing, Sharing):
            object.__setattr__(self, "sharing", Sharing.parse(self.sharing))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def rotary_dims(self) -> int:
        """Dimensions of each key head that rotary positions rotate (0 with a decoupled rotary key)."""
        return 0 if self.rope_key_dim else rotary_dims(self.head_dim, self.rope_fraction)

    @property
    def projection_bias(self) -> bool:
        """Whether the fused projection and its depth factors have biases."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_heads is None else self.n_kv_heads

    @property
    def layout(self) -> ProjectionLayout:
        """The rows of the layer's fused projection."""
        return ProjectionLayout(self.sharing, self.n_head, self.kv_heads, self.head_dim, self.owns_kv)

    @property
    def group_widths(self) -> tuple[int, ...]:
        """Output width of each group the layer projects (only Q's for a layer that reuses K/V)."""
        return self.layout.widths

    @property
    def projection_width(self) -> int:
        """Output width of the fused projection (:meth:`Sharing.group_heads` heads of ``head_dim`` per group)."""
        return sum(self.group_widths)

    @property
    def factor_widths(self) -> tuple[int, ...]:
        """Width of each square factor after the first of the depth-factorised groups (training only)."""
        depths = self.depths or (1,) * len(self.group_widths)
        return tuple(w for w, n in zip(self.group_widths, depths, strict=True) for _ in range(n - 1))

    @property
    def cached_tensors(self) -> int:
        """Distinct tensors a KV cache stores per layer (1 when K and V share a projection, 0 when the layer reuses
        another layer's)."""
        return self.layout.cached_tensors

    @classmethod
    def from_config(
        cls, d_model: int, n_head: int, attention: AttentionConfig, bias: bool = True, owns_kv: bool = True,
        qkv_bias: bool | None = None,
    ) -> AttentionShape:
        depths = attention.group_depths()
        norms = [attention.q_norm] + ([attention.k_norm, attention.v_norm] if owns_kv else [])
        return cls(
            d_model,
            n_head,
            attention.parsed.partition,
            attention.resolve_kv_heads(n_head),
            bias,
            attention.score_encoding_frequencies if attention.score_encoding == "relative" else None,
            attention.score_encoding_channels if attention.score_encoding == "paper" else None,
            owns_kv,
            (depths[:1] if not owns_kv else depths) if any(n > 1 for n in depths) else (),
            tuple(kind for kind in norms if kind != "none"),
            attention.rope_fraction,
            attention.rope_key_dim,
            qkv_bias=qkv_bias,
        )

    @property
    def rope_width(self) -> int:
        """Output features of the decoupled rotary projection: each query head's rotary part and the shared key."""
        return (self.n_head + 1) * self.rope_key_dim


def attention_params(shape: AttentionShape, fused: bool = False) -> int:
    """Parameters of one attention layer: fused projection, output projection, the optional score encoding and
    per-role norms, and (unless ``fused``: after :meth:`Attention.fuse`, at inference) the depth factors."""
    inner = shape.n_head * shape.head_dim
    params = shape.d_model * (shape.projection_width + shape.rope_width) + inner * shape.d_model
    if not fused:
        params += sum(w * w + (w if shape.projection_bias else 0) for w in shape.factor_widths)
    for kind in shape.role_norms:
        params += shape.head_dim * (2 if kind == "layer" and shape.bias else 1)
    if shape.bias:
        params += shape.projection_width + shape.rope_width + shape.d_model
    if shape.projection_bias != shape.bias:  # q/k/v biases without the output's (Qwen2), or the other way round
        params += (shape.projection_width + shape.rope_width) * (1 if shape.projection_bias else -1)
    if shape.score_encoding_frequencies:
        params += (6 * shape.score_encoding_frequencies + 1) * shape.n_head
    if shape.score_encoding_channels:  # the paper's w (m values) and b, shared by the heads
        params += shape.score_encoding_channels + 1
    return params


def attended_pairs(t_q: int, t_k: int, causal: bool, count_masked: bool = False) -> int:
    """(query, key) pairs whose scores are computed: all of them, or for causal attention only those the mask allows
    (queries sit at the newest ``t_q`` of ``t_k`` positions). ``count_masked`` counts masked pairs too (what a
    kernel that computes the whole score matrix does)."""
    if not causal or count_masked:
        return t_q * t_k
    past = t_k - t_q
    return t_q * past + t_q * (t_q + 1) // 2


def attention_forward_flops(
    shape: AttentionShape, t_q: int, t_k: int, causal: bool = False, count_masked: bool = False
) -> int:
    """Forward FLOPs of one attention layer for ``t_q`` queries over ``t_k`` keys, per sequence.

    Projections (fused input and output) cost 2 * T_q * d_in * d_out; scores and the weighted sum each
    2 * pairs * n_head * head_dim (see :func:`attended_pairs`); a decoupled rotary key adds its projection and
    2 * pairs * n_head * rope_key_dim to the scores. The score encoding is counted separately
    (:func:`score_encoding_flops`).
    """
    inner = shape.n_head * shape.head_dim
    projections = 2 * t_q * shape.d_model * (shape.projection_width + shape.rope_width + inner)
    projections += sum(2 * t_q * w * w for w in shape.factor_widths)  # depth factors (training form)
    pairs = attended_pairs(t_q, t_k, causal, count_masked)
    return projections + 2 * pairs * (2 * inner + shape.n_head * shape.rope_key_dim)


def score_encoding_flops(shape: AttentionShape, t_q: int, t_k: int) -> int:
    """Forward FLOPs of the score encoding: the relative encoding's linear map (6F channels to one bias per head)
    over all pairs, or the paper's row and column terms (m/2 channels of each query position and m - m/2 of each
    key position, dotted with w; the temperature's scaling of q is element-wise, not counted)."""
    if shape.score_encoding_channels:
        half = shape.score_encoding_channels // 2
        return 2 * (t_q * half + t_k * (shape.score_encoding_channels - half))
    if not shape.score_encoding_frequencies:
        return 0
    return 2 * t_q * t_k * 6 * shape.score_encoding_frequencies * shape.n_head


def kv_cache_bytes_per_token(
    shape: AttentionShape, bytes_per_element: int = 2, tensors: float | None = None, copied: float = 0.0
) -> int | float:
    """KV-cache bytes one token adds to one layer: ``shape.cached_tensors`` tensors (or ``tensors``) of
    ``kv_heads * head_dim`` elements, the decoupled rotary key's ``rope_key_dim`` elements, and for a K=V layer with
    rotary keys the rotated copy (``kv_heads * rotary_dims`` elements) of the fraction ``copied`` of the positions
    (``rope_keys``: 1 for copy, W/capacity for window:W; a fraction gives a fraction of a byte, otherwise the count is a
    whole number of bytes, an int). The one KV-bytes
    formula: accounting, the static decoder and the benchmarks use it."""
    count = shape.cached_tensors if tensors is None else tensors
    elements = count * shape.kv_heads * shape.head_dim
    if shape.owns_kv:
        elements += shape.rope_key_dim
        if copied and shape.layout.cached_tensors == 1:  # K=V: the rotated copy of the rotated dimensions
            elements += copied * shape.kv_heads * shape.rotary_dims
    return elements * bytes_per_element


def norm_params(d_model: int, bias: bool, kind: str = "layer") -> int:
    """Parameters of a LayerNorm (scale, and shift with biases) or an RMSNorm (``kind='rms'``: a scale only)."""
    return d_model * (2 if bias and kind == "layer" else 1)


def mlp_params(d_model: int, d_mlp: int, bias: bool, kind: str = "gelu") -> int:
    """Parameters of the two-layer MLP, or of the gated one (``kind='swiglu'``: gate, up and down matrices)."""
    if kind == "swiglu":
        return 3 * d_model * d_mlp + ((2 * d_mlp + d_model) if bias else 0)
    return 2 * d_model * d_mlp + ((d_mlp + d_model) if bias else 0)


@dataclass(frozen=True)
class Flops:
    """Forward and training (forward plus backward) FLOPs of some part of a network."""

    forward: int = 0
    train: int = 0

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.train + other.train)

    def __mul__(self, factor: int) -> Flops:
        return Flops(self.forward * factor, self.train * factor)

    @classmethod
    def product(cls, flops: int, input_needs_grad: bool = True) -> Flops:
        """A matrix product: its backward costs twice its forward, or once if its input needs no gradient."""
        return cls(flops, flops * (3 if input_needs_grad else 2))


def layer_shapes(shape: AttentionShape | Sequence[AttentionShape], n_layer: int) -> tuple[AttentionShape, ...]:
    """One shape per layer: ``shape`` for every layer, or the per-layer shapes as given."""
    if isinstance(shape, AttentionShape):
        return (shape,) * n_layer
    if len(shape) != n_layer:
        raise ValueError(f"{len(shape)} attention shapes for {n_layer} layers")
    return tuple(shape)


def trunk_flops(
    shape: AttentionShape | Sequence[AttentionShape], d_mlp: int, n_layer: int, seq_len: int, causal: bool,
    count_masked: bool, mlp: str = "gelu",
) -> tuple[Flops, Flops]:
    """FLOPs of ``n_layer`` pre-norm blocks (one attention shape for all, or one per layer): per sequence of
    ``seq_len`` tokens, and per batch whatever its size (the score encoding, computed once per layer for the whole
    batch). ``mlp='swiglu'``: three MLP matrices instead of two."""
    matrices = 3 if mlp == "swiglu" else 2
    total, fixed = Flops(), Flops()
    for layer in layer_shapes(shape, n_layer):
        attention = Flops.product(attention_forward_flops(layer, seq_len, seq_len, causal, count_masked))
        total += attention + Flops.product(2 * seq_len * matrices * layer.d_model * d_mlp)
        fixed += Flops.product(score_encoding_flops(layer, seq_len, seq_len), input_needs_grad=False)
    return total, fixed


@dataclass(frozen=True)
class NetworkCost:
    """Closed-form size and cost of one network with one attention variant.

    ``tokens_per_sample`` is the sequence length (GPT, sequence encoder) or the tokens of one image (ViT: patches
    plus the class token); FLOPs per sample are per sequence or per image. The ``*_per_batch_fixed`` FLOPs are
    spent once per batch whatever its size (the score encoding's bias for every pair of positions).
    """

    network: str
    sharing: str
    n_kv_heads: int
    n_head: int
    n_layer: int
    d_model: int
    params_total: int
    params_attention: int
    params_embedding: int
    params_head: int
    tokens_per_sample: int
    sample_unit: str
    forward_flops_per_sample: int
    train_flops_per_sample: int
    forward_flops_per_batch_fixed: int
    train_flops_per_batch_fixed: int
    kv_cache_bytes_per_token: int
    context_tokens: int
    kv_bytes_per_element: int
    score_encoding: str = "none"
    params_inference: int | None = None
    """Parameters at inference, after the depth factors are fused (:meth:`Attention.fuse`); equal to
    ``params_total`` without depth factorisation."""
    notes: tuple[str, ...] = field(default=())
    label: str = ""
    """The variant's name (:attr:`qkv_lightning.variants.Variant.label`), filled in by
    :func:`qkv_lightning.accounting.network_cost`."""

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs (forward plus backward) per token of a sample."""
        return self.train_flops_per_sample / self.tokens_per_sample

    def forward_flops(self, batch_size: int) -> int:
        """Forward FLOPs of a batch of ``batch_size`` samples."""
        return self.forward_flops_per_sample * batch_size + self.forward_flops_per_batch_fixed

    def train_flops(self, batch_size: int) -> int:
        """Training (forward plus backward) FLOPs of a batch of ``batch_size`` samples."""
        return self.train_flops_per_sample * batch_size + self.train_flops_per_batch_fixed

    @property
    def kv_cache_bytes_context(self) -> int:
        """KV-cache bytes of one sequence filling the whole context (all layers)."""
        return self.kv_cache_bytes_per_token * self.context_tokens

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["notes"] = list(self.notes)
        values.update(
            name=self.label,
            flops_per_token=self.flops_per_token,
            kv_cache_bytes_context=self.kv_cache_bytes_context,
        )
        return values


def attention_shape(d_model: int, n_head: int, attention: AttentionConfig, bias: bool) -> AttentionShape:
    return AttentionShape.from_config(d_model, n_head, attention, bias)


def attention_shapes(
    d_model: int, n_head: int, attention: AttentionConfig, bias: bool, n_layer: int, qkv_bias: bool | None = None
) -> tuple[AttentionShape, ...]:
    """The shape of each of ``n_layer`` layers: the per-layer schedule (``attention.layers``) and cross-layer K/V
    sharing (a layer that reuses K/V projects and caches only Q) as the trunk builds them; ``qkv_bias``: see
    :attr:`AttentionShape.qkv_bias`."""
    configs = attention.layer_configs(n_layer, n_head)
    sources = attention.kv_source_list(n_layer, n_head)
    return tuple(
        AttentionShape.from_config(d_model, n_head, config, bias, owns_kv=source is None, qkv_bias=qkv_bias)
        for config, source in zip(configs, sources, strict=True)
    )


def schedule_name(attention: AttentionConfig) -> str:
    """The sharing of a network's attention as one word for tables: the sharing, or a schedule's layers."""
    return attention.parsed.variant_text if attention.layers else attention.sharing


def trunk_network_cost(
    network: str,
    config: Any,
    attention: AttentionConfig,
    shape: AttentionShape,
    *,
    embedding: int,
    head: int,
    flops: Flops,
    fixed: Flops,
    tokens_per_sample: int,
    sample_unit: str,
    context_tokens: int,
    kv_bytes: int,
    notes: tuple[str, ...] = (),
) -> NetworkCost:
    """The parts every network shares: ``n_layer`` pre-norm blocks (attention, MLP, two norms; one attention shape
    for all, or one per layer) and a final norm between its own embedding and head, whose parameters and FLOPs the
    caller computed."""
    d, bias = config.d_model, config.bias
    shapes = layer_shapes(shape, config.n_layer)
    norm, mlp = config.norm, config.mlp
    rest = config.n_layer * (mlp_params(d, config.mlp_width, bias, mlp) + 2 * norm_params(d, bias, norm))
    rest += embedding + norm_params(d, bias, norm) + head
    attention_total = sum(attention_params(layer) for layer in shapes)
    return NetworkCost(
        network=network,
        sharing=schedule_name(attention),
        n_kv_heads=shapes[0].kv_heads,
        n_head=config.n_head,
        n_layer=config.n_layer,
        d_model=d,
        params_total=rest + attention_total,
        params_inference=rest + sum(attention_params(layer, fused=True) for layer in shapes),
        params_attention=attention_total,
        params_embedding=embedding,
        params_head=head,
        tokens_per_sample=tokens_per_sample,
        sample_unit=sample_unit,
        forward_flops_per_sample=flops.forward,
        train_flops_per_sample=flops.train,
        forward_flops_per_batch_fixed=fixed.forward,
        train_flops_per_batch_fixed=fixed.train,
        kv_cache_bytes_per_token=sum(kv_cache_bytes_per_token(layer, kv_bytes) for layer in shapes),
        context_tokens=context_tokens,
        kv_bytes_per_element=kv_bytes,
        score_encoding=attention.score_encoding,
        notes=notes,
    )


