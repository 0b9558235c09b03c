"""Closed-form cost arithmetic that networks use to declare their own parameters, FLOPs and KV-cache bytes (each
network config's ``cost()``; :mod:`qkv_lightning.accounting` is the entry point that calls it).

FLOPs are those of matrix products (2 per multiply-add): every linear layer and convolution, the attention scores
``QK^T`` and the weighted sum ``PV``, and the score encoding's linear map. Element-wise work (norms, softmax, GELU,
the optimiser) is not counted, as in the usual model-FLOPs-utilisation convention. The backward pass of a product
costs twice its forward (gradients of both operands), except where one operand needs no gradient (the images of a
patch embedding, the fixed pair encoding of the score encoding): then once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qkv_lightning.nn.attention import AttentionConfig, Sharing


@dataclass(frozen=True)
class AttentionShape:
    """The sizes that decide an attention layer's cost."""

    d_model: int
    n_head: int
    sharing: str = "QKV"
    n_kv_heads: int | None = None
    bias: bool = True
    score_encoding_frequencies: int | None = None
    """Frequencies of the 'relative' score encoding, or None without it."""
    score_encoding_channels: int | None = None
    """Channels m of the paper's score encoding, or None without it."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_heads is None else self.n_kv_heads

    @property
    def projection_width(self) -> int:
        """Output width of the fused projection (:meth:`Sharing.group_heads` heads of ``head_dim`` per group)."""
        return sum(Sharing.parse(self.sharing).group_heads(self.n_head, self.kv_heads)) * self.head_dim

    @property
    def cached_tensors(self) -> int:
        """Distinct tensors a KV cache stores per layer (1 when K and V share a projection)."""
        return len(Sharing.parse(self.sharing).cached_groups)

    @classmethod
    def from_config(cls, d_model: int, n_head: int, attention: AttentionConfig, bias: bool = True) -> AttentionShape:
        return cls(
            d_model,
            n_head,
            attention.sharing,
            attention.resolve_kv_heads(n_head),
            bias,
            attention.score_encoding_frequencies if attention.score_encoding == "relative" else None,
            attention.score_encoding_channels if attention.score_encoding == "paper" else None,
        )


def attention_params(shape: AttentionShape) -> int:
    """Parameters of one attention layer: fused projection, output projection and the optional score encoding."""
    inner = shape.n_head * shape.head_dim
    params = shape.d_model * shape.projection_width + inner * shape.d_model
    if shape.bias:
        params += shape.projection_width + shape.d_model
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
    2 * pairs * n_head * head_dim (see :func:`attended_pairs`). The score encoding is counted separately
    (:func:`score_encoding_flops`).
    """
    inner = shape.n_head * shape.head_dim
    projections = 2 * t_q * shape.d_model * (shape.projection_width + inner)
    return projections + 2 * 2 * attended_pairs(t_q, t_k, causal, count_masked) * inner


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


def kv_cache_bytes_per_token(shape: AttentionShape, bytes_per_element: int = 2) -> int:
    """KV-cache bytes one token adds to one layer."""
    return shape.cached_tensors * shape.kv_heads * shape.head_dim * bytes_per_element


def norm_params(d_model: int, bias: bool) -> int:
    """Parameters of a LayerNorm (scale, and shift with biases)."""
    return d_model * (2 if bias else 1)


def mlp_params(d_model: int, d_mlp: int, bias: bool) -> int:
    """Parameters of the two-layer MLP."""
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


def trunk_flops(
    shape: AttentionShape, d_mlp: int, n_layer: int, seq_len: int, causal: bool, count_masked: bool
) -> tuple[Flops, Flops]:
    """FLOPs of ``n_layer`` pre-norm blocks: per sequence of ``seq_len`` tokens, and per batch whatever its size
    (the score encoding, computed once per layer for the whole batch)."""
    attention = Flops.product(attention_forward_flops(shape, seq_len, seq_len, causal, count_masked))
    mlp = Flops.product(2 * seq_len * 2 * shape.d_model * d_mlp)
    encoding = Flops.product(score_encoding_flops(shape, seq_len, seq_len), input_needs_grad=False)
    return (attention + mlp) * n_layer, encoding * n_layer


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
    """The parts every network shares: ``n_layer`` pre-norm blocks (attention, MLP, two norms) and a final norm
    between its own embedding and head, whose parameters and FLOPs the caller computed."""
    d, bias = config.d_model, config.bias
    block = attention_params(shape) + mlp_params(d, config.mlp_width, bias) + 2 * norm_params(d, bias)
    return NetworkCost(
        network=network,
        sharing=attention.sharing,
        n_kv_heads=shape.kv_heads,
        n_head=config.n_head,
        n_layer=config.n_layer,
        d_model=d,
        params_total=embedding + config.n_layer * block + norm_params(d, bias) + head,
        params_attention=config.n_layer * attention_params(shape),
        params_embedding=embedding,
        params_head=head,
        tokens_per_sample=tokens_per_sample,
        sample_unit=sample_unit,
        forward_flops_per_sample=flops.forward,
        train_flops_per_sample=flops.train,
        forward_flops_per_batch_fixed=fixed.forward,
        train_flops_per_batch_fixed=fixed.train,
        kv_cache_bytes_per_token=config.n_layer * kv_cache_bytes_per_token(shape, kv_bytes),
        context_tokens=context_tokens,
        kv_bytes_per_element=kv_bytes,
        score_encoding=attention.score_encoding,
        notes=notes,
    )


