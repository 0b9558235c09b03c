"""The GPT decoder: closed-form sizes (the paper's 300M and 1.2B included), causality, tied weights, initialisation,
losses against explicit references, and KV-cached generation against recomputing the whole sequence."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.gpt import GPT, IGNORE_INDEX, GPTConfig, sample
from qkv_lightning.nn.sharing import CANONICAL_VARIANTS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# (variant, n_kv_heads): every sharing variant, plus GQA and MQA where Q keeps its own projection
CASES = [(v, None) for v in CANONICAL_VARIANTS] + [("QKV", 2), ("Q-K=V", 1)]


def tiny(**overrides) -> GPTConfig:
    base = dict(n_layer=2, n_head=4, d_model=32, d_mlp=48, max_seq_len=24, vocab_size=50, init_std=0.3)
    return GPTConfig(**{**base, **overrides})


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) tensors are counted once


def closed_form(c: GPTConfig, variant: str = "QKV", n_kv: int | None = None) -> int:
    """Parameters of the decoder, written out from the architecture (independently of the implementation)."""
    d, m, v, hd = c.d_model, c.d_mlp or 4 * c.d_model, c.vocab_size, c.d_model // c.n_head
    kv = n_kv or c.n_head
    groups = {
        "QKV": ["Q", "K", "V"], "Q=K-V": ["QK", "V"], "Q-K=V": ["Q", "KV"], "Q=V-K": ["QV", "K"], "Q=K=V": ["QKV"]
    }
    width = sum((c.n_head if "Q" in g else kv) * hd for g in groups[variant])
    b = 1 if c.bias else 0
    attention = d * width + b * width + d * d + b * d
    mlp = d * m + b * m + m * d + b * d
    norms = 2 * (d + b * d)
    total = c.n_layer * (attention + mlp + norms) + (d + b * d) + v * d
    total += c.max_seq_len * d if c.position == "learned" else 0
    if c.output == "adaptive":
        cutoffs = [x for x in c.adaptive_cutoffs if x < v] + [v]
        total += d * (cutoffs[0] + len(cutoffs) - 1)  # head: shortlist + one logit per tail cluster
        for i in range(len(cutoffs) - 1):
            hidden = int(d // c.adaptive_div_value ** (i + 1))
            total += d * hidden + hidden * (cutoffs[i + 1] - cutoffs[i])
    elif not c.tie_embeddings:
        total += v * d
    return total


@pytest.mark.parametrize(("variant", "n_kv"), CASES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias": False, "tie_embeddings": False},
        {"position": "rope"},
        {"position": "none", "d_mlp": None},
        {"output": "adaptive", "vocab_size": 300, "adaptive_cutoffs": [20, 100, 1000], "adaptive_div_value": 2.0},
    ],
)
def test_parameter_count_closed_form(variant, n_kv, options):
    config = tiny(**options)
    model = GPT(config, AttentionConfig(sharing=variant, n_kv_heads=n_kv))
    assert n_params(model) == closed_form(config, variant, n_kv)


@pytest.mark.parametrize(("name", "expected"), [("gpt2-300m", 305_534_976), ("gpt2-1.2b", 1_215_102_976)])
def test_paper_configs_have_the_paper_sizes(name, expected):
    """Built on the meta device (no memory) from the config files themselves."""
    network = yaml.safe_load((CONFIGS / "lm" / f"{name}.yaml").read_text())["model"]["init_args"]["network"]
    config = GPTConfig(**network)
    wide = name == "gpt2-1.2b"
    assert (config.n_layer, config.d_model, config.n_head, config.mlp_width) == (
        (22, 2048, 32, 8192) if wide else (20, 1024, 16, 4096)
    )
    assert (config.max_seq_len, config.vocab_size, config.bias, config.tie_embeddings) == (2048, 50304, True, True)
    assert (config.position, config.dropout, config.output) == ("learned", 0.1, "linear")
    # 12 L d^2 + 13 L d (blocks with biases, MLP 4d) + (V + T) d + 2 d (final LayerNorm)
    L, d = config.n_layer, config.d_model
    assert 12 * L * d * d + 13 * L * d + (50304 + 2048) * d + 2 * d == expected
    for variant, saved in (("QKV", 0), ("Q-K=V", 1), ("Q=K=V", 2)):
        with torch.device("meta"):
            model = GPT(config, AttentionConfig(sharing=variant))
        assert next(model.parameters()).is_meta
        assert n_params(model) == expected - saved * L * (d * d + d)  # each shared projection drops d^2 + d


def test_tied_embeddings_share_one_tensor_and_its_gradient():
    model = GPT(tiny(), AttentionConfig())
    assert model.head.weight is model.embed.weight
    idx = torch.randint(0, 50, (2, 10))
    model.loss(idx, idx.roll(-1, 1)).backward()
    assert model.embed.weight.grad is not None
    # the gradient holds both uses: a model with the same numbers but separate tensors splits it in two parts
    untied = GPT(tiny(tie_embeddings=False), AttentionConfig())
    untied.load_state_dict({**model.state_dict(), "head.weight": model.embed.weight.detach().clone()})
    untied.loss(idx, idx.roll(-1, 1)).backward()
    torch.testing.assert_close(model.embed.weight.grad, untied.embed.weight.grad + untied.head.weight.grad)
    assert untied.head.weight is not untied.embed.weight
    assert not GPT(tiny(output="adaptive", adaptive_cutoffs=[10]), AttentionConfig()).config.tie_embeddings


def test_gpt2_initialisation():
    config = GPTConfig(n_layer=8, n_head=4, d_model=256, max_seq_len=64, vocab_size=512)
    torch.manual_seed(0)
    model = GPT(config, AttentionConfig(sharing="Q-K=V"))
    scaled = 0.02 / math.sqrt(2 * 8)
    for name, param in model.named_parameters():
        if name.endswith((".attn.proj.weight", ".mlp.proj.weight")):
            assert param.std().item() == pytest.approx(scaled, rel=0.05), name
        elif name.endswith(("norm_attn.weight", "norm_mlp.weight", "norm.weight")):
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith(".bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:  # embeddings, fused projections, MLP input
            assert param.std().item() == pytest.approx(0.02, rel=0.05), name


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize(("variant", "n_kv"), CASES)
def test_causality(variant, n_kv, position):
    model = GPT(tiny(position=position), AttentionConfig(sharing=variant, n_kv_heads=n_kv)).eval()
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    torch.testing.assert_close(model(idx)[:, :7], model(changed)[:, :7])
    assert not torch.allclose(model(idx)[:, 7:], model(changed)[:, 7:])


@pytest.mark.parametrize("output", ["linear", "adaptive"])
def test_loss_matches_explicit_cross_entropy_and_ignores_masked_targets(output):
    model = GPT(tiny(output=output, adaptive_cutoffs=[10, 30]), AttentionConfig()).double().eval()
    idx = torch.randint(0, 50, (3, 9))
    targets = torch.randint(0, 50, (3, 9))
    targets[0, :4] = IGNORE_INDEX
    targets[2, 8] = IGNORE_INDEX
    log_probs = model(idx).log_softmax(-1) if output == "linear" else model(idx)  # adaptive returns log-probs
    keep = targets != IGNORE_INDEX
    reference = -log_probs[keep].gather(-1, targets[keep][:, None]).squeeze(-1)  # (N,)
    torch.testing.assert_close(model.loss(idx, targets, reduction="sum"), reference.sum())
    torch.testing.assert_close(model.loss(idx, targets), reference.mean())
    assert model(idx).exp().sum(-1).sub(1).abs().max() < 1e-9 if output == "adaptive" else True


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize(("variant", "n_kv"), CASES)
def test_cached_generation_equals_uncached(variant, n_kv, position):
    torch.manual_seed(0)
    attention = AttentionConfig(sharing=variant, n_kv_heads=n_kv, score_encoding=variant == "Q=K-V")
    model = GPT(tiny(position=position), attention).double().eval()
    prompt = torch.randint(0, 50, (2, 5))
    greedy = model.generate(prompt, 12, use_cache=True)
    assert torch.equal(greedy, model.generate(prompt, 12, use_cache=False))
    assert torch.equal(greedy[:, :5], prompt) and greedy.shape == (2, 17)
    assert len(set(greedy[:, 5:].flatten().tolist())) > 1  # not a degenerate constant continuation

    def sampled(use_cache):
        generator = torch.Generator().manual_seed(7)
        return model.generate(prompt, 12, temperature=0.9, top_k=10, use_cache=use_cache, generator=generator)

    assert torch.equal(sampled(True), sampled(False))

    # the cached logits of each step equal the full forward pass over the sequence
    caches = model.new_caches(2)
    steps = [model(greedy[:, :5], caches)] + [model(greedy[:, t : t + 1], caches) for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(greedy[:, :16]), rtol=1e-10, atol=1e-10)
    assert caches[0].length == 16


def test_sampling_respects_top_k_temperature_and_valid_ids():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0, 9.0]])
    assert sample(logits, 0.0, None, None).item() == 5
    generator = torch.Generator().manual_seed(0)
    drawn = {sample(logits, 1.0, 3, generator).item() for _ in range(200)}
    assert drawn == {1, 2, 5}  # only the three most likely
    model = GPT(tiny(), AttentionConfig()).eval()
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 20, temperature=5.0, generator=generator, n_valid=7)
    assert out[:, 1:].max() < 7  # ids above n_valid (vocabulary padding) are never generated


def test_sequence_longer_than_positions_is_a_config_error():
    model = GPT(tiny(), AttentionConfig())
    with pytest.raises(ConfigError, match="max_seq_len"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 20, dtype=torch.long), 5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"d_model": 30, "n_head": 4}, "divisible"),
        ({"adaptive_cutoffs": [40, 20]}, "adaptive_cutoffs"),
        ({"dropout": 1.0}, "dropout"),
        ({"position": "rope", "d_model": 36, "n_head": 4, "init_std": 0.02}, "even head size"),
    ],
)
def test_bad_network_settings_name_the_setting(options, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**options)


def test_adaptive_output_needs_a_cutoff_below_the_vocabulary():
    with pytest.raises(ConfigError, match="adaptive_cutoffs"):
        GPT(tiny(output="adaptive", adaptive_cutoffs=[20000]), AttentionConfig())


def test_every_parameter_gets_a_gradient():
    for variant, n_kv in CASES:
        model = GPT(tiny(position="rope"), AttentionConfig(sharing=variant, n_kv_heads=n_kv, score_encoding=True))
        idx = torch.randint(0, 50, (2, 8))
        model.loss(idx, idx.roll(-1, 1)).backward()
        for name, param in model.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, (variant, name)


def test_loss_equals_functional_cross_entropy_in_float32():
    model = GPT(tiny(), AttentionConfig())
    idx = torch.randint(0, 50, (2, 8))
    expected = F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
    torch.testing.assert_close(model.loss(idx, idx.roll(-1, 1)), expected)
