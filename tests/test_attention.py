"""The attention core against an explicit reference that builds Q, K, V from tied matrices by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import Attention, AttentionConfig
from qkv_lightning.nn.positional import rope_tables
from qkv_lightning.nn.sharing import CANONICAL_VARIANTS, Sharing, canonical_variant

D_MODEL, N_HEAD, HEAD_DIM = 24, 4, 6

# which roles share one matrix, written independently of the implementation's parser
TIED = {
    "QKV": [("Q",), ("K",), ("V",)],
    "Q=K-V": [("Q", "K"), ("V",)],
    "Q-K=V": [("Q",), ("K", "V")],
    "Q=V-K": [("Q", "V"), ("K",)],
    "Q=K=V": [("Q", "K", "V")],
}


def valid_kv_heads(variant: str) -> list[int]:
    """MHA always; GQA (2) and MQA (1) only when Q has a projection of its own."""
    return [N_HEAD, 2, 1] if variant in ("QKV", "Q-K=V") else [N_HEAD]


CASES = [(v, h) for v in CANONICAL_VARIANTS for h in valid_kv_heads(v)]


def reference_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE as complex rotation of the pairs (d, d + D/2) by angle pos * 10000^(-2d/D)."""
    half = x.shape[-1] // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = positions.double()[:, None] * freqs[None, :]  # (T, D/2)
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def build(variant: str, n_kv: int, causal: bool, **config) -> tuple[Attention, dict[str, torch.Tensor]]:
    """An Attention in float64 whose fused weight is written from per-role matrices tied as ``TIED`` says."""
    attn = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing=variant, n_kv_heads=n_kv, **config), causal=causal)
    attn.double()
    gen = torch.Generator().manual_seed(0)
    role_weight, role_bias, parts_w, parts_b = {}, {}, [], []
    for group in TIED[variant]:
        heads = N_HEAD if "Q" in group else n_kv
        w = torch.randn(heads * HEAD_DIM, D_MODEL, generator=gen, dtype=torch.float64) / math.sqrt(D_MODEL)
        b = torch.randn(heads * HEAD_DIM, generator=gen, dtype=torch.float64) * 0.1
        parts_w.append(w)
        parts_b.append(b)
        for role in group:
            role_weight[role], role_bias[role] = w, b
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.cat(parts_w))
        attn.qkv.bias.copy_(torch.cat(parts_b))
    return attn, {"W": role_weight, "b": role_bias}


def reference(attn: Attention, tied: dict, x: torch.Tensor, causal: bool, rope: bool, n_kv: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V with Q, K, V built from the per-role matrices, heads split by hand."""
    b, t, _ = x.shape
    pos = torch.arange(t)

    def heads(role: str, n: int) -> torch.Tensor:
        y = x @ tied["W"][role].T + tied["b"][role]  # (B, T, n*D)
        return y.view(b, t, n, HEAD_DIM).permute(0, 2, 1, 3)  # (B, n, T, D)

    q, k, v = heads("Q", N_HEAD), heads("K", n_kv), heads("V", n_kv)
    if rope:
        q, k = reference_rope(q, pos), reference_rope(k, pos)
    group = N_HEAD // n_kv
    k = torch.stack([k[:, h // group] for h in range(N_HEAD)], dim=1)  # (B, H, T, D)
    v = torch.stack([v[:, h // group] for h in range(N_HEAD)], dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(HEAD_DIM)
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v)  # (B, H, T, D)
    out = out.permute(0, 2, 1, 3).reshape(b, t, N_HEAD * HEAD_DIM)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
@pytest.mark.parametrize(("variant", "n_kv"), CASES)
def test_matches_explicit_reference(variant, n_kv, causal, backend, rope):
    attn, tied = build(variant, n_kv, causal, backend=backend)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    tables = rope_tables(torch.arange(7), HEAD_DIM, dtype=torch.float64) if rope else None
    out, _ = attn(x, tables)
    torch.testing.assert_close(out, reference(attn, tied, x, causal, rope, n_kv), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("variant", "n_kv"), CASES)
def test_parameter_count_closed_form(variant, n_kv):
    attn = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing=variant, n_kv_heads=n_kv), causal=True)
    width = sum(N_HEAD * HEAD_DIM if "Q" in group else n_kv * HEAD_DIM for group in TIED[variant])
    expected = (D_MODEL + 1) * width + (N_HEAD * HEAD_DIM + 1) * D_MODEL
    assert sum(p.numel() for p in attn.parameters()) == expected
    assert attn.qkv.weight.shape == (width, D_MODEL)


def test_shared_kv_has_two_thirds_of_the_projection_weights():
    def projection(variant):
        return Attention(D_MODEL, N_HEAD, AttentionConfig(sharing=variant), causal=True).qkv.weight.numel()

    assert projection("Q-K=V") * 3 == projection("QKV") * 2
    assert projection("Q=K=V") * 3 == projection("QKV")


@pytest.mark.parametrize("variant", ["Q=K-V", "Q=K=V"])
@pytest.mark.parametrize("rope", [False, True])
def test_shared_qk_logits_are_symmetric_unless_score_encoding(variant, rope):
    """q_i = k_i, and RoPE keeps (R_i q_i).(R_j q_j) = q_i^T R_(j-i) q_j symmetric in i, j."""
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    tables = rope_tables(torch.arange(9), HEAD_DIM, dtype=torch.float64) if rope else None
    attn = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing=variant), causal=True).double()
    logits = attn.logits(x, tables)  # (B, H, T, T)
    torch.testing.assert_close(logits, logits.transpose(-1, -2), rtol=1e-12, atol=1e-12)

    broken = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing=variant, score_encoding=True), causal=True).double()
    logits = broken.logits(x, tables)
    assert (logits - logits.transpose(-1, -2)).abs().max() > 1e-3


def test_separate_qk_logits_are_not_symmetric():
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    logits = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing="Q-K=V"), causal=True).double().logits(x)
    assert (logits - logits.transpose(-1, -2)).abs().max() > 1e-3


def test_mask_self_removes_the_diagonal_except_where_alone():
    x = torch.randn(1, 6, D_MODEL)
    for causal in (True, False):
        attn = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing="Q=K-V", mask_self=True), causal=causal)
        _, probs = attn(x, need_weights=True)  # (1, H, T, T)
        diag = probs.diagonal(dim1=-2, dim2=-1)  # (1, H, T)
        if causal:  # token 0 has no other key, so it keeps itself
            assert torch.allclose(diag[..., 0], torch.ones(1))
            assert diag[..., 1:].abs().max() == 0
        else:
            assert diag.abs().max() == 0
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, N_HEAD, 6))


@pytest.mark.parametrize("config", [{"score_encoding": True}, {"mask_self": True}])
def test_symmetry_breakers_agree_between_backends(config):
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    sdpa = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing="Q=K-V", **config), causal=True).double()
    explicit = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing="Q=K-V", backend="explicit", **config), causal=True)
    explicit.double().load_state_dict(sdpa.state_dict())
    torch.testing.assert_close(sdpa(x)[0], explicit(x)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", [{}, {"score_encoding": True}, {"mask_self": True}])
@pytest.mark.parametrize(("variant", "n_kv"), CASES)
def test_causality(variant, n_kv, config):
    attn = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing=variant, n_kv_heads=n_kv, **config), causal=True)
    x = torch.randn(2, 8, D_MODEL)
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 3, D_MODEL)
    tables = rope_tables(torch.arange(8), HEAD_DIM)
    torch.testing.assert_close(attn(x, tables)[0][:, :5], attn(changed, tables)[0][:, :5])
    assert not torch.allclose(attn(x, tables)[0][:, 5:], attn(changed, tables)[0][:, 5:])


@pytest.mark.parametrize(("variant", "n_kv"), CASES)
def test_every_parameter_gets_a_gradient(variant, n_kv):
    config = AttentionConfig(sharing=variant, n_kv_heads=n_kv, score_encoding=True)
    attn = Attention(D_MODEL, N_HEAD, config, causal=True)
    attn(torch.randn(2, 5, D_MODEL), rope_tables(torch.arange(5), HEAD_DIM))[0].square().sum().backward()
    for name, param in attn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("config", [{}, {"score_encoding": True, "mask_self": True}])
@pytest.mark.parametrize(("variant", "n_kv"), CASES)
def test_cached_decoding_equals_full_forward(variant, n_kv, config, rope):
    attn = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing=variant, n_kv_heads=n_kv, **config), causal=True)
    attn.double()
    x = torch.randn(3, 9, D_MODEL, dtype=torch.float64)

    def tables(n):
        return rope_tables(torch.arange(n), HEAD_DIM, dtype=torch.float64) if rope else None

    full, _ = attn(x, tables(9))
    cache = attn.new_cache(batch_size=3, capacity=12)
    prompt, _ = attn(x[:, :4], tables(4), cache)  # a 4-token prompt in one step, then one token at a time
    steps = [prompt] + [attn(x[:, t : t + 1], tables(t + 1), cache)[0] for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)

    n_tensors = 1 if variant in ("Q-K=V", "Q=K=V") else 2
    assert len(cache.buffers) == n_tensors
    assert cache.nbytes == n_tensors * 3 * n_kv * 12 * HEAD_DIM * 8  # tensors x batch x heads x tokens x dim x bytes
    assert cache.length == 9


def test_cache_is_filled_with_the_projection_it_reuses():
    """Q-K=V: the single cached tensor is the raw K=V projection, which values use unrotated."""
    attn = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing="Q-K=V", n_kv_heads=2), causal=True)
    x = torch.randn(1, 3, D_MODEL)
    cache = attn.new_cache(1, 3)
    attn(x, rope_tables(torch.arange(3), HEAD_DIM), cache)
    kv = (x @ attn.qkv.weight[N_HEAD * HEAD_DIM :].T + attn.qkv.bias[N_HEAD * HEAD_DIM :]).view(1, 3, 2, HEAD_DIM)
    torch.testing.assert_close(cache.buffers[0], kv.transpose(1, 2))


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("QKV", "QKV"),
        ("standard", "QKV"),
        ("q=k-v", "Q=K-V"),
        ("K=Q-V", "Q=K-V"),
        ("shared_qk", "Q=K-V"),
        ("K=V-Q", "Q-K=V"),
        ("Shared_KV", "Q-K=V"),
        ("V=Q-K", "Q=V-K"),
        ("shared_qv", "Q=V-K"),
        ("V=K=Q", "Q=K=V"),
        ("single", "Q=K=V"),
    ],
)
def test_variant_names(name, canonical):
    assert canonical_variant(name) == canonical
    assert AttentionConfig(sharing=name).sharing == canonical


@pytest.mark.parametrize("name", ["QK=V", "Q-K", "Q=K-V-V", "kv", "shared", "Q-KV", "mqa", "", "Q=K-V-X"])
def test_unknown_or_ambiguous_variant_names_are_rejected(name):
    with pytest.raises(ConfigError, match=r"attention\.sharing.*Allowed: QKV, Q=K-V, Q-K=V, Q=V-K, Q=K=V"):
        AttentionConfig(sharing=name)


def test_sharing_groups_and_cache_tensors():
    assert Sharing.parse("Q-K=V").groups == (("Q",), ("K", "V"))
    assert len(Sharing.parse("Q-K=V").cached_groups) == 1
    assert len(Sharing.parse("Q=K-V").cached_groups) == 2
    assert len(Sharing.parse("Q=V-K").cached_groups) == 2
    assert len(Sharing.parse("Q=K=V").cached_groups) == 1
    assert len(Sharing.parse("QKV").cached_groups) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 25, "n_head": 4}, r"d_model=25 must be divisible by n_head=4"),
        ({"n_kv_heads": 3}, r"attention\.n_kv_heads=3 must divide n_head=4; allowed: \[1, 2, 4\]"),
        ({"sharing": "Q=K-V", "n_kv_heads": 2}, r"attention\.sharing=Q=K-V .* attention\.n_kv_heads to null or 4"),
        ({"sharing": "Q=V-K", "n_kv_heads": 1}, r"attention\.sharing=Q=V-K"),
        ({"sharing": "Q=K=V", "n_kv_heads": 2}, r"attention\.sharing=Q=K=V"),
        ({"n_kv_heads": 0}, r"attention\.n_kv_heads=0 must be at least 1"),
    ],
)
def test_invalid_settings_name_the_setting(kwargs, message):
    d_model, n_head = kwargs.pop("d_model", D_MODEL), kwargs.pop("n_head", N_HEAD)
    with pytest.raises(ConfigError, match=message):
        Attention(d_model, n_head, AttentionConfig(**kwargs), causal=True)


def test_attention_dropout_only_in_training():
    attn = Attention(D_MODEL, N_HEAD, AttentionConfig(dropout=0.5), causal=False)
    x = torch.randn(2, 6, D_MODEL)
    attn.eval()
    torch.testing.assert_close(attn(x)[0], attn(x)[0])
    attn.train()
    assert not torch.allclose(attn(x)[0], attn(x)[0])


# ----------------------------------------------------------------------------------- chunks after a non-empty cache
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
@pytest.mark.parametrize("config", [{}, {"score_encoding": True}, {"mask_self": True}])
@pytest.mark.parametrize(("variant", "n_kv"), CASES)
def test_chunked_decoding_after_a_non_empty_cache_equals_full_forward(variant, n_kv, config, backend):
    """Chunks of several tokens after a non-empty cache: query i of a chunk sits at position L + i, so the causal
    mask of the chunk is bottom-right aligned (key j allowed when j <= L + i), not SDPA's top-left ``is_causal``."""
    config = AttentionConfig(sharing=variant, n_kv_heads=n_kv, backend=backend, **config)
    attn = Attention(D_MODEL, N_HEAD, config, causal=True).double()
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    tables = rope_tables(torch.arange(10), HEAD_DIM, dtype=torch.float64)
    full, _ = attn(x, tables)
    cache = attn.new_cache(batch_size=2, capacity=10)
    steps, start = [], 0
    for size in (3, 2, 4, 1):  # prompt, then chunks of 2, 4 and 1 tokens
        end = start + size
        steps.append(attn(x[:, start:end], (tables[0][:end], tables[1][:end]), cache)[0])
        start = end
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------- pair score encoding
def reference_pair_channels(i: int, j: int, n_frequencies: int) -> list[float]:
    """The documented channels of pair (i, j): sin, cos of w*i, of w*j and of w*(i - j), w = 100^(-f/F), each
    group over the F frequencies."""
    omegas = [100.0 ** (-f / n_frequencies) for f in range(n_frequencies)]
    channels = []
    for value in (i, j, i - j):
        channels += [math.sin(w * value) for w in omegas] + [math.cos(w * value) for w in omegas]
    return channels


def test_pair_score_encoding_channels_match_a_reference_and_are_shift_invariant_in_i_minus_j():
    from qkv_lightning.nn.positional import PairScoreEncoding, pair_encoding

    n_freq, q_pos, k_pos = 3, torch.tensor([5, 6, 7, 8]), torch.arange(9)
    encoding = pair_encoding(q_pos, k_pos, n_freq)  # (Tq, Tk, 6F), rows: queries, columns: keys
    assert encoding.shape == (4, 9, 6 * n_freq)
    expected = torch.tensor([[reference_pair_channels(i, j, n_freq) for j in k_pos.tolist()] for i in q_pos.tolist()])
    torch.testing.assert_close(encoding, expected.float(), rtol=0, atol=1e-5)

    # the relative channels depend on i - j only: shifting both positions changes nothing
    shifted = pair_encoding(q_pos + 11, k_pos + 11, n_freq)[..., 4 * n_freq :]
    torch.testing.assert_close(shifted, encoding[..., 4 * n_freq :], rtol=0, atol=1e-5)
    # and sin(w (i - j)) is odd: swapping query and key flips its sign
    square = pair_encoding(torch.arange(6), torch.arange(6), n_freq)
    odd = slice(4 * n_freq, 5 * n_freq)  # the sin(w (i - j)) channels
    torch.testing.assert_close(square[..., odd], -square.transpose(0, 1)[..., odd])

    module = PairScoreEncoding(n_head=2, n_frequencies=n_freq).double()
    bias = module(q_pos, k_pos)  # (H, Tq, Tk): head h, query i, key j
    manual = expected.double() @ module.proj.weight.T + module.proj.bias  # (Tq, Tk, H)
    torch.testing.assert_close(bias, manual.permute(2, 0, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", ["QKV", "Q=K-V", "Q=K=V"])
def test_explicit_probabilities_equal_softmax_of_masked_logits_with_score_encoding(variant, causal):
    """The probabilities the explicit path returns are softmax(logits() masked): the score bias is added as
    (query i, key j), the same as in ``logits()``, in both paths."""
    config = AttentionConfig(sharing=variant, score_encoding=True, backend="explicit")
    attn = Attention(D_MODEL, N_HEAD, config, causal=causal).double()
    with torch.no_grad():  # a score bias as large as the logits, so that a transposed one shows
        attn.score_encoding.proj.weight.normal_(0.0, 1.0)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    tables = rope_tables(torch.arange(7), HEAD_DIM, dtype=torch.float64)
    _, probs = attn(x, tables, need_weights=True)  # (B, H, T, T)
    logits = attn.logits(x, tables)  # (B, H, T, T)
    if causal:
        logits = logits.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(probs, logits.softmax(-1), rtol=1e-10, atol=1e-10)
    sdpa = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing=variant, score_encoding=True), causal=causal).double()
    sdpa.load_state_dict(attn.state_dict())
    v = attn.project(x, tables)[2]
    expected = (probs @ attn.expand_kv(v)).transpose(1, 2).reshape(2, 7, D_MODEL) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(sdpa(x, tables)[0], expected, rtol=1e-10, atol=1e-10)
