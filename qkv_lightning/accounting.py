"""Closed-form efficiency accounting: parameters, FLOPs and KV-cache bytes per variant, without building models.

Everything here is arithmetic on the configs, checked against built models (``numel()``, real cache tensors and
torch's FLOP counter) in ``tests/test_accounting.py``.

FLOPs are those of matrix products (2 per multiply-add): every linear layer and convolution, the attention scores
``QK^T`` and the weighted sum ``PV``, and the score encoding's linear map. Element-wise work (norms, softmax, GELU,
the optimiser) is not counted, as in the usual model-FLOPs-utilisation convention. The backward pass of a product
costs twice its forward (gradients of both operands), except where one operand needs no gradient (the images of a
patch embedding, the fixed pair encoding of the score encoding): then once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qkv_lightning.nn.attention import AttentionConfig, Sharing, score_encoding_suffix


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
        """Output width of the fused projection: n_head heads for the group holding Q, n_kv_heads for the others."""
        groups = Sharing.parse(self.sharing).groups
        return sum((self.n_head if "Q" in g else self.kv_heads) * self.head_dim for g in groups)

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

    @property
    def label(self) -> str:
        """``Q-K=V``, or ``Q-K=V kv=2`` with fewer K/V heads than query heads (as ``bench-attention`` names them)."""
        name = self.sharing + score_encoding_suffix(self.score_encoding)
        return name if self.n_kv_heads == self.n_head else f"{name} kv={self.n_kv_heads}"

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


def _shape(d_model: int, n_head: int, attention: AttentionConfig, bias: bool) -> AttentionShape:
    return AttentionShape.from_config(d_model, n_head, attention, bias)


def _trunk_network_cost(
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


def gpt_cost(
    config: Any, attention: AttentionConfig, seq_len: int | None = None, kv_bytes: int = 2, count_masked: bool = False
) -> NetworkCost:
    """Cost of a :class:`~qkv_lightning.nn.gpt.GPT` (its ``vocab_size`` set) trained on ``seq_len`` tokens
    (default: ``max_seq_len``). An adaptive softmax counts its head cluster only: each tail cluster runs only for the
    tokens whose target falls in it, which the data decides."""
    d, v, bias = config.d_model, config.vocab_size, config.bias
    t = seq_len or config.max_seq_len
    shape = _shape(d, config.n_head, attention, bias)
    embedding = v * d + (config.max_seq_len * d if config.position == "learned" else 0)
    notes = []
    if config.output == "adaptive":
        cutoffs = [c for c in config.adaptive_cutoffs if c < v] + [v]
        head_width = cutoffs[0] + len(cutoffs) - 1  # the shortlist plus one logit per tail cluster
        head = d * head_width
        for i in range(len(cutoffs) - 1):
            hidden = int(d // config.adaptive_div_value ** (i + 1))
            head += d * hidden + hidden * (cutoffs[i + 1] - cutoffs[i])
        head_flops = Flops.product(2 * t * d * head_width)
        notes.append("adaptive softmax: FLOPs count its head cluster only (tail clusters run for rare targets)")
    else:
        head = 0 if config.tie_embeddings else v * d
        head_flops = Flops.product(2 * t * d * v)
    flops, fixed = trunk_flops(shape, config.mlp_width, config.n_layer, t, True, count_masked)
    flops += head_flops
    return _trunk_network_cost(
        "GPT", config, attention, shape, embedding=embedding, head=head, flops=flops, fixed=fixed,
        tokens_per_sample=t, sample_unit="sequence", context_tokens=config.max_seq_len, kv_bytes=kv_bytes,
        notes=tuple(notes),
    )


def vit_cost(config: Any, attention: AttentionConfig, kv_bytes: int = 2) -> NetworkCost:
    """Cost of a :class:`~qkv_lightning.nn.vit.ViT` (``image_size``, ``in_channels``, ``num_classes`` set), per
    image; its tokens are the patches plus the class token."""
    d, bias = config.d_model, config.bias
    patches = config.grid**2
    t = patches + (1 if config.pool == "cls" else 0)
    shape = _shape(d, config.n_head, attention, bias)
    patch_in = config.in_channels * config.patch_size**2
    embedding = patch_in * d + (d if bias else 0)
    embedding += d if config.pool == "cls" else 0
    embedding += t * d if config.position == "learned" else 0
    head = d * config.num_classes + config.num_classes  # the ViT's head always has a bias
    flops, fixed = trunk_flops(shape, config.mlp_width, config.n_layer, t, False, False)
    flops += Flops.product(2 * patches * patch_in * d, input_needs_grad=False)  # images need no gradient
    flops += Flops.product(2 * d * config.num_classes)  # one pooled vector per image
    return _trunk_network_cost(
        "ViT", config, attention, shape, embedding=embedding, head=head, flops=flops, fixed=fixed,
        tokens_per_sample=t, sample_unit="image", context_tokens=t, kv_bytes=kv_bytes,
        notes=("ViT: FLOPs per sample are per image; per token means per patch token (class token included)",),
    )


def encoder_cost(config: Any, attention: AttentionConfig, seq_len: int | None = None, kv_bytes: int = 2) -> NetworkCost:
    """Cost of a :class:`~qkv_lightning.nn.encoder.SequenceEncoder` (``vocab_size``, ``num_classes`` set) on
    sequences of ``seq_len`` tokens (default: ``max_seq_len``)."""
    d, bias = config.d_model, config.bias
    t = seq_len or config.max_seq_len
    shape = _shape(d, config.n_head, attention, bias)
    embedding = config.vocab_size * d + (config.max_seq_len * d if config.position == "learned" else 0)
    head = d * config.num_classes + (config.num_classes if bias else 0)
    flops, fixed = trunk_flops(shape, config.mlp_width, config.n_layer, t, False, False)
    flops += Flops.product(2 * t * d * config.num_classes)
    return _trunk_network_cost(
        "SequenceEncoder", config, attention, shape, embedding=embedding, head=head, flops=flops, fixed=fixed,
        tokens_per_sample=t, sample_unit="sequence", context_tokens=t, kv_bytes=kv_bytes,
    )


def network_cost(
    config: Any, attention: AttentionConfig, seq_len: int | None = None, kv_bytes: int = 2, count_masked: bool = False
) -> NetworkCost:
    """Cost of the network that ``config`` (a GPT, ViT or encoder config with the data's values filled in) builds.

    Args:
        config: :class:`GPTConfig`, :class:`ViTConfig` or :class:`EncoderConfig`.
        attention: the attention variant.
        seq_len: tokens per training sequence (GPT, encoder); None means ``max_seq_len``.
        kv_bytes: bytes per KV-cache element (2 for bf16/fp16, 4 for fp32).
        count_masked: count the masked half of causal score matrices too (as a kernel without masking does).
    """
    from qkv_lightning.nn.encoder import EncoderConfig
    from qkv_lightning.nn.gpt import GPTConfig
    from qkv_lightning.nn.vit import ViTConfig

    if isinstance(config, GPTConfig):
        return gpt_cost(config, attention, seq_len, kv_bytes, count_masked)
    if isinstance(config, ViTConfig):
        return vit_cost(config, attention, kv_bytes)
    if isinstance(config, EncoderConfig):
        return encoder_cost(config, attention, seq_len, kv_bytes)
    raise TypeError(f"no closed-form accounting for {type(config).__name__}")
