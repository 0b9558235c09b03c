"""Partial rotary (``attention.rope_fraction``) and the decoupled rotary key (``attention.rope_key_dim``) against
written-out references, their settings, labels and errors, and NoPE. Cached decoding against the full forward pass
for every variant, the static cache and the exported graphs are in test_decode.py; parameters, FLOPs and KV bytes in
closed form in test_accounting.py."""

from __future__ import annotations

import math

import pytest
import torch

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import Attention, AttentionConfig
from qkv_lightning.nn.gpt import GPT, GPTConfig
from qkv_lightning.nn.kv_cache import rotary_scores
from qkv_lightning.nn.positional import rope_tables
from qkv_lightning.variants import Variant, parse_label

pytestmark = pytest.mark.usefixtures("one_thread")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate_half (written here, not imported from the package)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def hf_partial_rope(x: torch.Tensor, positions: torch.Tensor, rotated: int, base: float = 10000.0) -> torch.Tensor:
    """Hugging Face's partial rotary (GPT-NeoX, Phi): the first ``rotated`` dims rotated with frequencies of that
    width, the rest passed through."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotated, 2, dtype=torch.float64) / rotated)
    angles = positions.double()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x_rot, x_pass = x[..., :rotated], x[..., rotated:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def causal_attention(scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    t = scores.shape[-1]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, n, -1).transpose(1, 2)  # (B, n, T, width)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("block", [1, 5, 23, 64, None])
def test_rotary_scores_equal_queries_against_keys_rotated_by_their_positions(n_kv, block):
    """The scores of a K=V cache's rotated dimensions, computed without rotating the keys, block by block through a
    workspace (or with temporaries), equal the written-out product with Hugging Face's rotation, GQA heads paired."""
    torch.manual_seed(0)
    r, length = 8, 23
    q = torch.randn(2, 4, 1, r, dtype=torch.float64)  # a rotated query (any values)
    cache = torch.randn(2, n_kv, 30, 16, dtype=torch.float64)  # the K=V cache; its first r dims are rotated
    keys = cache[:, :, :length, :r]  # a strided view, as the cache gives it
    positions = torch.arange(length)
    rotated = hf_partial_rope(keys, positions, r).repeat_interleave(4 // n_kv, dim=1)  # (2, 4, L, r)
    reference = q @ rotated.transpose(-2, -1)  # (2, 4, 1, L)
    cos, sin = rope_tables(positions, r, dtype=torch.float64)
    workspace = torch.full((2, n_kv, 7, r), float("nan"), dtype=torch.float64)  # 7 positions: blocks of <= 7
    for scratch in (workspace, None):
        scores = rotary_scores(q, keys, cos, sin, scratch, block)
        torch.testing.assert_close(scores, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(keys, cache[:, :, :length, :r]) and cache.isfinite().all()  # the cache is only read


@pytest.mark.parametrize(("fraction", "rotated"), [(0.5, 8), (0.25, 4), (0.3, 4), (1.0, 16)])
def test_partial_rotary_qkv_layer_equals_hugging_faces_partial_rotary(fraction, rotated):
    torch.manual_seed(0)
    config = AttentionConfig(rope_fraction=fraction)
    assert config.rotary_dims(16) == rotated  # int(16 * 0.3) = 4: rounded down to even
    attn = Attention(64, 4, config, causal=True).double()
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    positions = torch.arange(10)
    out = attn(x, rope_tables(positions, rotated, dtype=torch.float64))[0]
    q, k, v = (heads(part, 4) for part in attn.qkv(x).split(64, dim=-1))
    q, k = hf_partial_rope(q, positions, rotated), hf_partial_rope(k, positions, rotated)
    reference = causal_attention(q @ k.transpose(-2, -1) / math.sqrt(16), v)
    reference = attn.proj(reference.transpose(1, 2).reshape(2, 10, 64))
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("sharing", "n_kv"), [("QKV", None), ("Q-K=V", None), ("Q-K=V", 2), ("Q=K=V", None)])
def test_decoupled_rotary_key_layer_equals_its_written_out_scores(sharing, n_kv):
    torch.manual_seed(0)
    r, d = 6, 16
    attn = Attention(64, 4, AttentionConfig(sharing=sharing, n_kv_heads=n_kv, rope_key_dim=r), causal=True).double()
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    positions = torch.arange(10)
    out = attn(x, rope_tables(positions, r, dtype=torch.float64))[0]
    n_kv = n_kv or 4
    fused = attn.qkv(x)
    if sharing == "QKV":
        parts = fused.split([64, 16 * n_kv, 16 * n_kv], -1)
        q, k, v = (heads(part, n) for part, n in zip(parts, (4, n_kv, n_kv), strict=True))
    elif sharing == "Q-K=V":
        q, kv = heads(fused[..., :64], 4), heads(fused[..., 64:], n_kv)
        k = v = kv
    else:
        q = k = v = heads(fused, 4)
    extra = attn.rope_proj(x)  # each query head's rotary part, then one rotary key shared by all heads
    q_rope = hf_partial_rope(heads(extra[..., : 4 * r], 4), positions, r)  # (B, 4, T, r)
    k_rope = hf_partial_rope(heads(extra[..., 4 * r :], 1), positions, r)  # (B, 1, T, r)
    k, v = k.repeat_interleave(4 // n_kv, 1), v.repeat_interleave(4 // n_kv, 1)
    scores = (q @ k.transpose(-2, -1) + q_rope @ k_rope.transpose(-2, -1)) / math.sqrt(d + r)
    reference = attn.proj(causal_attention(scores, v).transpose(1, 2).reshape(2, 10, 64))
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    assert attn.rope_proj.weight.shape == (5 * r, 64)


def test_gpt_rotary_tables_have_the_rotated_width_and_full_rope_is_unchanged():
    network = GPTConfig(n_layer=1, n_head=2, d_model=32, max_seq_len=16, vocab_size=20, position="rope")
    assert GPT(network, AttentionConfig()).rope(5, torch.device("cpu"))[0].shape == (5, 16)
    assert GPT(network, AttentionConfig(rope_fraction=0.25)).rope(5, torch.device("cpu"))[0].shape == (5, 4)
    assert GPT(network, AttentionConfig(rope_key_dim=8)).rope(5, torch.device("cpu"))[0].shape == (5, 8)
    torch.manual_seed(0)
    full = GPT(network, AttentionConfig(sharing="Q-K=V"))
    torch.manual_seed(0)
    same = GPT(network, AttentionConfig(sharing="Q-K=V", rope_fraction=1.0))
    idx = torch.randint(0, 20, (2, 16))
    assert torch.equal(full(idx), same(idx)) and "rope_proj" not in str(full)


def test_nope_gpt_has_no_positions_at_all():
    network = GPTConfig(n_layer=1, n_head=2, d_model=16, max_seq_len=8, vocab_size=20, position="none")
    model = GPT(network, AttentionConfig(sharing="Q-K=V")).eval()
    assert model.position is None and model.rope(8, torch.device("cpu")) is None
    idx = torch.randint(0, 20, (1, 8))
    with torch.no_grad():  # no positions: a causal model's last output depends on the set of earlier tokens only
        swapped = idx.clone()
        swapped[0, [2, 4]] = idx[0, [4, 2]]
        torch.testing.assert_close(model(idx)[:, -1], model(swapped)[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rope_fraction": 0.0}, "attention.rope_fraction=0.0 must lie in"),
        ({"rope_fraction": 1.5}, "attention.rope_fraction=1.5 must lie in"),
        ({"rope_key_dim": 5}, "attention.rope_key_dim=5 must be an even"),
        ({"rope_key_dim": -2}, "attention.rope_key_dim=-2 must be an even"),
        ({"rope_key_dim": 8, "rope_fraction": 0.5}, "both place rotary positions"),
        ({"rope_key_dim": 8, "kv_share_every": 2}, "does not combine with cross-layer"),
    ],
)
def test_bad_rotary_settings_are_one_clear_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        AttentionConfig(**settings)


def test_a_fraction_that_rotates_nothing_names_the_setting():
    network = GPTConfig(n_layer=1, n_head=2, d_model=16, max_seq_len=8, vocab_size=20, position="rope")
    with pytest.raises(ConfigError, match=r"attention.rope_fraction=0.1 rotates no dimension of heads of 8"):
        GPT(network, AttentionConfig(rope_fraction=0.1))
    GPT(network.__class__(**{**vars(network), "position": "learned"}), AttentionConfig(rope_fraction=0.1))


@pytest.mark.parametrize("label", ["Q-K=V_rk16", "Q-K=V_rf0.25", "Q-K=V_kv2_rf0.5", "QKV_dQ2_cla2_rf0.5",
                                   "QKV@0,Q-K=V@1-_rk32"])
def test_rotary_labels_round_trip_through_configs(label):
    variant = parse_label(label)
    assert variant.label == label
    config = variant.attention_config()
    assert Variant.of(config).label == label
    assert config.rope_fraction == variant.rope_fraction and config.rope_key_dim == variant.rope_key_dim
    assert ("rope_key_dim" in variant.attention_settings()) == ("_rk" in label)
    assert "rope_fraction" not in parse_label("Q-K=V").attention_settings()  # fingerprints of old studies kept


def test_a_layer_of_a_schedule_cannot_name_rotary_settings():
    with pytest.raises(ConfigError, match="settings of the whole network"):
        AttentionConfig(layers={"0": "Q-K=V_rk16", "1-": "QKV"})
