"""The paper's "+" score encoding (``attention.score_encoding=paper``) against an explicit 1x1 convolution over
(score map broadcast + P), with P written out channel by channel from the paper's description."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import Attention, AttentionConfig
from qkv_lightning.nn.attention_config import canonical_score_encoding
from qkv_lightning.nn.encoder import EncoderConfig, SequenceEncoder
from qkv_lightning.nn.positional import PairScoreEncoding, PaperScoreEncoding, paper_pair_tensor, rope_tables
from tests.test_attention import D_MODEL, HEAD_DIM, N_HEAD, build

M = 10


def sinusoid(pos: int, local: int, size: int) -> float:
    """Channel ``local`` of a ``size``-channel sinusoid of ``pos``: sin (even) or cos (odd) of
    pos / 10000^(2 * (local // 2) / size)."""
    angle = pos / 10000.0 ** (2 * (local // 2) / size)
    return math.sin(angle) if local % 2 == 0 else math.cos(angle)


def explicit_pair(t: int, m: int, feature: Callable[[int, int, int], float]) -> torch.Tensor:
    """P (T, T, m) element by element: channels [0, m/2) describe the query token i, [m/2, m) the key token j;
    channel ``local`` of a half of size h is ``feature(token, local, h)``."""
    half = m // 2
    p = torch.zeros(t, t, m, dtype=torch.float64)
    for i, j, c in itertools.product(range(t), range(t), range(m)):
        token, size, local = (i, half, c) if c < half else (j, m - half, c - half)
        p[i, j, c] = feature(token, local, size)
    return p


def explicit_p(t: int, m: int) -> torch.Tensor:
    """P (T, T, m) of the sequence: each half is the :func:`sinusoid` of the token's position."""
    return explicit_pair(t, m, sinusoid)


def paper(variant: str = "Q=K-V", n_kv: int = N_HEAD, causal: bool = False, **config) -> tuple[Attention, dict]:
    """A float64 attention with the paper's encoding, its tied weights, and w, b set to non-trivial values."""
    attn, tied = build(variant, n_kv, causal, score_encoding="paper", score_encoding_channels=M, **config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        attn.score_encoding.weight.copy_(torch.randn(M, generator=gen, dtype=torch.float64) * 0.5)
        attn.score_encoding.bias.fill_(0.3)
    return attn, tied


def conv_scores(attn: Attention, tied: dict, x: torch.Tensor, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's score map written out: S = q k^T / sqrt(d) per head, broadcast to m channels, plus P, then a
    1x1 convolution (m -> 1, weight w, bias b) over the channels. Returns the mixed scores (B, H, T, T) before any
    mask, and v with its heads repeated for the query heads, (B, H, T, D)."""
    b, t, _ = x.shape

    def heads(role: str, n: int) -> torch.Tensor:
        y = x @ tied["W"][role].T + tied["b"][role]  # (B, T, n*D)
        return y.view(b, t, n, HEAD_DIM).permute(0, 2, 1, 3)  # (B, n, T, D)

    q, k, v = heads("Q", N_HEAD), heads("K", n_kv), heads("V", n_kv)
    group = N_HEAD // n_kv
    k = torch.stack([k[:, h // group] for h in range(N_HEAD)], dim=1)  # (B, H, T, D)
    v = torch.stack([v[:, h // group] for h in range(N_HEAD)], dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(HEAD_DIM)  # (B, H, T, T)
    stacked = scores[..., None] + explicit_p(t, M)[None, None]  # (B, H, T, T, m)
    channels_first = stacked.permute(0, 1, 4, 2, 3).reshape(b * N_HEAD, M, t, t)  # (B*H, m, T, T)
    enc = attn.score_encoding
    mixed = F.conv2d(channels_first, enc.weight.view(1, M, 1, 1), enc.bias)  # (B*H, 1, T, T)
    return mixed.view(b, N_HEAD, t, t), v


def conv_reference(attn: Attention, tied: dict, x: torch.Tensor, causal: bool, n_kv: int) -> torch.Tensor:
    """The paper's formulation written out: :func:`conv_scores`, (masks), softmax, weighted sum, output projection."""
    b, t, _ = x.shape
    mixed, v = conv_scores(attn, tied, x, n_kv)
    if causal:
        mixed = mixed.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhij,bhjd->bhid", mixed.softmax(-1), v)  # (B, H, T, D)
    out = out.permute(0, 2, 1, 3).reshape(b, t, N_HEAD * HEAD_DIM)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_p_tensor_layout_is_the_papers():
    torch.testing.assert_close(paper_pair_tensor(torch.arange(9), torch.arange(9), M).double(), explicit_p(9, M))
    odd = paper_pair_tensor(torch.arange(5, dtype=torch.float64), torch.arange(5, dtype=torch.float64), 7)
    torch.testing.assert_close(odd, explicit_p(5, 7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("variant", "n_kv"), [("QKV", 2), ("Q=K-V", N_HEAD), ("Q-K=V", 1), ("Q=K=V", N_HEAD)])
def test_matches_the_explicit_1x1_conv_forward_and_gradients(variant, n_kv, causal, backend):
    attn, tied = paper(variant, n_kv, causal, backend=backend)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64, requires_grad=True)
    out, _ = attn(x)
    expected = conv_reference(attn, tied, x, causal, n_kv)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    enc = attn.score_encoding
    wrt = [x, enc.weight, enc.bias, attn.proj.weight]
    got = torch.autograd.grad(out, wrt, grad_out)
    # the reference's q/k/v come from the tied per-role matrices (not attn.qkv): compare the gradients of the rest
    want = torch.autograd.grad(expected, wrt, grad_out)
    for name, a, b in zip(["x", "w", "b", "proj"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")
    assert got[1].abs().max() > 1e-6  # w does receive a gradient
    # b is constant along every softmax row, so its gradient vanishes (up to rounding)
    assert got[2].abs().max() < 1e-10


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("variant", "n_kv"), [("QKV", 2), ("Q=K-V", N_HEAD), ("Q-K=V", 1), ("Q=K=V", N_HEAD)])
def test_logits_are_the_scores_behind_the_probabilities(variant, n_kv, causal):
    """``logits()`` (attention maps, ``analyze``) are the paper's mixed scores S sum(w) + P . w + b, the 1x1
    convolution written out, and their softmax (masked) is the probabilities the forward uses, with and without
    RoPE. sum(w) is set far from 1, so that logits without the temperature differ from both."""
    attn, tied = paper(variant, n_kv, causal)
    with torch.no_grad():
        attn.score_encoding.weight.add_(2.5 / M - attn.score_encoding.weight.mean())  # sum(w) = 2.5
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    expected, _ = conv_scores(attn, tied, x, n_kv)  # (B, H, T, T)
    torch.testing.assert_close(attn.logits(x), expected, rtol=1e-10, atol=1e-10)
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    for tables in (None, rope_tables(torch.arange(7), HEAD_DIM, dtype=torch.float64)):
        _, probs = attn(x, tables, need_weights=True)  # (B, H, T, T)
        logits = attn.logits(x, tables)
        if causal:
            logits = logits.masked_fill(mask, float("-inf"))
        torch.testing.assert_close(probs, logits.softmax(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["Q=K-V", "Q=K=V"])
def test_scores_become_asymmetric_once_w_is_nonzero(variant):
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    attn, _ = paper(variant)
    with torch.no_grad():
        attn.score_encoding.weight.zero_()
    logits = attn.logits(x)  # (B, H, T, T)
    torch.testing.assert_close(logits, logits.transpose(-1, -2), rtol=0, atol=1e-12)
    with torch.no_grad():
        attn.score_encoding.weight.copy_(torch.linspace(-0.3, 0.4, M, dtype=torch.float64))
    logits = attn.logits(x)
    assert (logits - logits.transpose(-1, -2)).abs().max() > 1e-2
    # the asymmetric part is positional only: [r(i) + c(j)] - [r(j) + c(i)], the same for every input and head
    other = attn.logits(torch.randn(2, 9, D_MODEL, dtype=torch.float64))
    torch.testing.assert_close(
        logits - logits.transpose(-1, -2), other - other.transpose(-1, -2), rtol=1e-10, atol=1e-10
    )


def test_row_terms_and_b_cancel_leaving_temperature_and_a_key_bias():
    """softmax(S sum(w) + r(i) + c(j) + b) == softmax(S sum(w) + c(j)): what the docs say the form can express."""
    attn, _ = paper("Q=K-V")
    x = torch.randn(2, 8, D_MODEL, dtype=torch.float64)
    _, probs = attn(x, need_weights=True)
    enc = attn.score_encoding
    p = explicit_p(8, M)
    key_only = torch.einsum("jc,c->j", p[0, :, M // 2 :], enc.weight[M // 2 :].detach())  # c(j), (T,)
    q, k, _ = attn.project(x)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(HEAD_DIM) * enc.weight.sum().detach() + key_only  # (B, H, T, T)
    torch.testing.assert_close(probs, scores.softmax(-1), rtol=1e-10, atol=1e-12)


def test_attention_starts_near_uniform_at_the_papers_initialisation():
    """sum(w) ~ N(0, 0.02^2 m) is small, so even large scores give near-uniform attention at initialisation."""
    temperatures = []
    for seed in range(200):
        torch.manual_seed(seed)
        temperatures.append(PaperScoreEncoding(M).temperature.item())
    spread = torch.tensor(temperatures).std().item()
    assert 0.5 * 0.02 * math.sqrt(M) < spread < 1.5 * 0.02 * math.sqrt(M)  # N(0, 0.02): std of the sum 0.063

    def network(score_encoding: str) -> SequenceEncoder:
        torch.manual_seed(0)  # init_std=0.2: large q, k, hence peaked attention without the encoding
        config = EncoderConfig(n_layer=1, n_head=2, d_model=32, max_seq_len=32, vocab_size=10, num_classes=10,
                               init_std=0.2)
        return SequenceEncoder(config, AttentionConfig(sharing="Q=K=V", score_encoding=score_encoding))

    idx = torch.randint(0, 10, (4, 32), generator=torch.Generator().manual_seed(0))
    plain_peak = network("none")(idx, need_weights=True)[1][0].max(-1).values  # (B, H, T): largest probability
    encoded = network("paper")
    w = encoded.trunk.blocks[0].attn.score_encoding.weight
    assert w.std().item() < 0.05  # the network's init_std does not override the paper's N(0, 0.02)
    peak = encoded(idx, need_weights=True)[1][0].max(-1).values
    assert plain_peak.mean() * 32 > 8  # the scores themselves are far from uniform (peaks > 8x uniform)
    assert peak.max() * 32 < 2.0  # with the encoding every probability is within 2x of uniform (1/32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("variant", "n_kv"), [("QKV", 2), ("Q=K-V", N_HEAD), ("Q-K=V", 1), ("Q=K=V", N_HEAD)])
def test_sdpa_path_equals_explicit_path(variant, n_kv, causal):
    sdpa, _ = paper(variant, n_kv, causal)
    explicit = Attention(D_MODEL, N_HEAD, AttentionConfig(sharing=variant, n_kv_heads=n_kv, backend="explicit",
                                                          score_encoding="paper"), causal=causal).double()
    explicit.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(sdpa(x)[0], explicit(x)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize(("variant", "n_kv"), [("QKV", 2), ("Q-K=V", 1), ("Q=K=V", N_HEAD), ("Q=K-V", N_HEAD)])
def test_causal_cached_decoding_equals_full_forward(variant, n_kv, rope):
    attn, _ = paper(variant, n_kv, causal=True)
    x = torch.randn(3, 9, D_MODEL, dtype=torch.float64)

    def tables(n):
        return rope_tables(torch.arange(n), HEAD_DIM, dtype=torch.float64) if rope else None

    full, _ = attn(x, tables(9))
    cache = attn.new_cache(batch_size=3, capacity=12)
    prompt, _ = attn(x[:, :4], tables(4), cache)
    steps = [prompt] + [attn(x[:, t : t + 1], tables(t + 1), cache)[0] for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    changed = x.clone()
    changed[:, 5:] = torch.randn(3, 4, D_MODEL, dtype=torch.float64)  # the future does not leak into the past
    torch.testing.assert_close(attn(changed, tables(9))[0][:, :5], full[:, :5], rtol=1e-10, atol=1e-10)


def test_modes_aliases_and_parameters():
    assert canonical_score_encoding(True) == "relative" and canonical_score_encoding(False) == "none"
    assert AttentionConfig(score_encoding=True).score_encoding == "relative"
    assert AttentionConfig(score_encoding="Paper").score_encoding == "paper"
    assert isinstance(Attention(D_MODEL, N_HEAD, AttentionConfig(score_encoding=True), causal=True).score_encoding,
                      PairScoreEncoding)
    plain = Attention(D_MODEL, N_HEAD, AttentionConfig(), causal=True)
    assert plain.score_encoding is None
    for m in (10, 50):
        attn = Attention(D_MODEL, N_HEAD, AttentionConfig(score_encoding="paper", score_encoding_channels=m), True)
        extra = sum(p.numel() for p in attn.parameters()) - sum(p.numel() for p in plain.parameters())
        assert extra == m + 1  # one w (m values) and one b per layer, shared by every head
    with pytest.raises(ConfigError, match="attention.score_encoding="):
        AttentionConfig(score_encoding="alibi")
    with pytest.raises(ConfigError, match="attention.score_encoding_channels"):
        AttentionConfig(score_encoding="paper", score_encoding_channels=1)


def test_meta_built_network_gets_the_papers_initialisation():
    """FSDP builds on the meta device and re-initialises through the network's reset_parameters()."""
    config = EncoderConfig(n_layer=2, n_head=2, d_model=16, max_seq_len=8, vocab_size=10, num_classes=10, init_std=0.5)
    with torch.device("meta"):
        network = SequenceEncoder(config, AttentionConfig(score_encoding="paper"))
    network.to_empty(device="cpu")
    torch.manual_seed(0)
    network.reset_parameters()
    for block in network.trunk.blocks:
        enc = block.attn.score_encoding
        assert enc.bias.item() == 0.0
        assert 0.005 < enc.weight.std().item() < 0.05


def test_torch_initialisation_is_pytorchs_default_as_in_the_papers_code():
    config = EncoderConfig(n_layer=2, n_head=2, d_model=64, max_seq_len=128, vocab_size=10, num_classes=10,
                           init="torch")
    torch.manual_seed(0)
    network = SequenceEncoder(config, AttentionConfig(sharing="Q=K=V", score_encoding="paper"))
    qkv = network.trunk.blocks[0].attn.qkv
    bound = 1 / math.sqrt(64)  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
    assert qkv.weight.abs().max() <= bound and qkv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert qkv.bias.abs().max() <= bound and qkv.bias.abs().max() > bound / 2  # not zeroed as GPT-2's init does
    assert network.position.weight.std().item() == pytest.approx(1.0, rel=0.05)  # nn.Embedding's N(0, 1)
    assert network.embed.weight.abs().max() <= 1 / math.sqrt(10)  # the paper's one-hot linear input layer
    assert network.trunk.blocks[1].mlp.proj.weight.abs().max() <= 1 / math.sqrt(256)  # fan_in 4 * d_model
    enc = network.trunk.blocks[0].attn.score_encoding
    assert enc.bias.item() == 0.0 and enc.weight.std() < 0.05
