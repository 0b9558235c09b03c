"""Closed-form efficiency accounting: parameters, FLOPs and KV-cache bytes per variant, without building models."""

from __future__ import annotations

from dataclasses import dataclass

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
            attention.score_encoding_frequencies if attention.score_encoding else None,
        )


def attention_params(shape: AttentionShape) -> int:
    """Parameters of one attention layer: fused projection, output projection and the optional score encoding."""
    inner = shape.n_head * shape.head_dim
    params = shape.d_model * shape.projection_width + inner * shape.d_model
    if shape.bias:
        params += shape.projection_width + shape.d_model
    if shape.score_encoding_frequencies:
        params += (6 * shape.score_encoding_frequencies + 1) * shape.n_head
    return params


def attention_forward_flops(shape: AttentionShape, t_q: int, t_k: int, causal: bool = False) -> int:
    """Forward FLOPs (2 per multiply-add) of one layer for ``t_q`` queries over ``t_k`` keys, per sequence.

    Projections cost 2 * T * d_in * d_out; scores and the weighted sum each 2 * T_q * T_k * n_head * head_dim,
    halved for causal self-attention (only the lower triangle is needed).
    """
    inner = shape.n_head * shape.head_dim
    projections = 2 * t_q * shape.d_model * (shape.projection_width + inner)
    pairs = t_q * t_k / 2 if causal and t_q == t_k else t_q * t_k
    return int(projections + 2 * 2 * pairs * inner)


def kv_cache_bytes_per_token(shape: AttentionShape, bytes_per_element: int = 2) -> int:
    """KV-cache bytes one token adds to one layer."""
    return shape.cached_tensors * shape.kv_heads * shape.head_dim * bytes_per_element
