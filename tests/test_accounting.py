"""Closed-form accounting against built models: ``numel()``, real KV-cache tensors and torch's FLOP counter, for the
GPT, the ViT and the sequence encoder, every variant; and the ``report`` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from qkv_lightning.accounting import AttentionShape, attended_pairs, network_cost
from qkv_lightning.bench.common import task_variant
from qkv_lightning.cli import main
from qkv_lightning.nn.attention import Attention, AttentionConfig
from qkv_lightning.nn.encoder import EncoderConfig, SequenceEncoder
from qkv_lightning.nn.gpt import GPT, GPTConfig
from qkv_lightning.nn.sharing import CANONICAL_VARIANTS
from qkv_lightning.nn.vit import ViT, ViTConfig

ROOT = Path(__file__).resolve().parents[1]

# every sharing variant, plus GQA and MQA where Q keeps its own projection
CASES = [(v, None) for v in CANONICAL_VARIANTS] + [("QKV", 2), ("Q-K=V", 1)]


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # tied tensors once


def attention_params(module: nn.Module) -> int:
    return sum(n_params(m) for m in module.modules() if isinstance(m, Attention))


def counted(fn) -> int:
    """FLOPs of matrix products that torch's FlopCounterMode sees while ``fn`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def cache_bytes(trunk, batch: int, capacity: int, dtype: torch.dtype) -> int:
    return sum(cache.nbytes for cache in trunk.new_caches(batch, capacity, dtype=dtype))


def check_cache(network: nn.Module, config, attention: AttentionConfig, seq_len: int | None = None) -> None:
    """The closed-form KV bytes per token equal the bytes of real cache tensors, in bf16 and fp32."""
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        cost = network_cost(config, attention, seq_len, kv_bytes=size)
        assert cache_bytes(network.trunk, 3, 7, dtype) == 3 * 7 * cost.kv_cache_bytes_per_token
        assert cost.kv_cache_bytes_context == cost.kv_cache_bytes_per_token * cost.context_tokens


def explicit(variant: str, n_kv: int | None, **options) -> AttentionConfig:
    """The explicit attention path: its products are visible to the FLOP counter (CPU SDPA kernels are not)."""
    return AttentionConfig(sharing=variant, n_kv_heads=n_kv, backend="explicit", **options)


# ------------------------------------------------------------------------------------------------------------ GPT
GPT_OPTIONS = {
    "tied": {},
    "untied-no-bias": {"tie_embeddings": False, "bias": False},
    "adaptive": {"output": "adaptive", "vocab_size": 300, "adaptive_cutoffs": [40, 100, 1000],
                 "adaptive_div_value": 2.0},
    "score-rope": {"position": "rope", "score_encoding": True},
    "no-positions-default-mlp": {"position": "none", "d_mlp": None, "score_encoding": True},
    "paper-rope": {"position": "rope", "score_encoding": "paper"},
    "llama": {"norm": "rms", "mlp": "swiglu", "bias": False, "tie_embeddings": False, "position": "rope"},
    "qwen2-qkv-bias": {"norm": "rms", "mlp": "swiglu", "bias": False, "qkv_bias": True, "position": "rope"},
    "swiglu-bias-no-qkv-bias": {"mlp": "swiglu", "qkv_bias": False},
    "partial-rope": {"position": "rope", "rope_fraction": 0.5},
    "rope-key": {"position": "rope", "rope_key_dim": 4},
    "rope-key-no-bias": {"position": "rope", "rope_key_dim": 6, "bias": False},
    "rope-key-qkv-bias": {"position": "rope", "rope_key_dim": 4, "bias": False, "qkv_bias": True, "norm": "rms"},
}
ATTENTION_OPTIONS = ("score_encoding", "rope_fraction", "rope_key_dim")
"""Options of GPT_OPTIONS that are attention settings."""


@pytest.mark.parametrize(("variant", "n_kv"), CASES)
@pytest.mark.parametrize("option", list(GPT_OPTIONS))
def test_gpt_closed_form_matches_the_built_model(variant, n_kv, option):
    options = dict(GPT_OPTIONS[option])
    settings = {key: options.pop(key) for key in ATTENTION_OPTIONS if key in options}
    config = GPTConfig(**{"n_layer": 2, "n_head": 4, "d_model": 32, "d_mlp": 48, "max_seq_len": 24, "vocab_size": 50,
                          **options})
    attention = explicit(variant, n_kv, **settings)
    torch.manual_seed(0)
    model = GPT(config, attention)
    batch, seq_len = 3, 12
    cost = network_cost(config, attention, seq_len, count_masked=True)  # the explicit path computes masked scores

    assert cost.params_total == n_params(model)
    assert cost.params_attention == attention_params(model)
    positions = 0 if model.position is None else n_params(model.position)
    assert cost.params_embedding == model.embed.weight.numel() + positions
    head = 0 if config.tie_embeddings and config.output == "linear" else n_params(model.head)
    assert cost.params_head == head
    check_cache(model, config, attention, seq_len)

    idx = torch.randint(0, 40, (batch, seq_len))  # targets below the first adaptive cutoff: the head cluster only
    assert counted(lambda: model.loss(idx, idx)) == cost.forward_flops(batch)
    assert counted(lambda: model.loss(idx, idx).backward()) == cost.train_flops(batch)
    assert cost.tokens_per_sample == seq_len and cost.flops_per_token == cost.train_flops_per_sample / seq_len


def test_causal_flops_count_only_the_pairs_the_mask_allows():
    attention = Attention(16, 2, AttentionConfig(), causal=True)
    for t_q, t_k in ((5, 5), (1, 9), (3, 8)):
        assert attended_pairs(t_q, t_k, causal=True) == int(attention.allowed(t_q, t_k, torch.device("cpu")).sum())
        assert attended_pairs(t_q, t_k, causal=True, count_masked=True) == t_q * t_k
    config = GPTConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=50)
    full = network_cost(config, AttentionConfig(), 16, count_masked=True)
    allowed = network_cost(config, AttentionConfig(), 16)
    masked_pairs = 16 * 16 - 16 * 17 // 2
    # scores and weighted sum: 2 products x 2 FLOPs x pairs x width, x3 for training, in each layer
    assert full.train_flops_per_sample - allowed.train_flops_per_sample == 2 * 3 * 2 * 2 * masked_pairs * 32


def test_paper_gpt2_300m_figures():
    """The 300M config's published size, its KV cache (20 layers x 2 x 1024 x 2 bytes), and Q-K=V's half."""
    config = GPTConfig(n_layer=20, n_head=16, d_model=1024, d_mlp=4096, max_seq_len=2048, vocab_size=50304)
    qkv = network_cost(config, AttentionConfig(), 2048)
    kv = network_cost(config, AttentionConfig(sharing="Q-K=V"), 2048)
    assert qkv.params_total == 305_534_976
    assert qkv.kv_cache_bytes_per_token == 20 * 2 * 1024 * 2
    assert kv.kv_cache_bytes_per_token * 2 == qkv.kv_cache_bytes_per_token
    assert qkv.params_total - kv.params_total == 20 * (1024 * 1024 + 1024)
    # 6 x (weights used in products) per token, plus the attention scores of the allowed pairs
    matrices = 20 * (4 * 1024 * 1024 + 2 * 1024 * 4096) + 50304 * 1024
    scores = 20 * 3 * 2 * 2 * (2048 * 2049 // 2) * 1024
    assert qkv.train_flops_per_sample == 6 * matrices * 2048 + scores


# ------------------------------------------------------------------------------------------------------------ ViT
VIT_OPTIONS = {
    "cls-learned": {},
    "mean-sincos-no-bias": {"pool": "mean", "position": "sincos", "bias": False},
    "score": {"score_encoding": True, "position": "none"},
    "paper": {"score_encoding": "paper", "position": "none"},
    "rms-swiglu-qkv-bias": {"norm": "rms", "mlp": "swiglu", "bias": False, "qkv_bias": True},
}


@pytest.mark.parametrize(("variant", "n_kv"), CASES)
@pytest.mark.parametrize("option", list(VIT_OPTIONS))
def test_vit_closed_form_matches_the_built_model(variant, n_kv, option):
    options = dict(VIT_OPTIONS[option])
    score = options.pop("score_encoding", False)
    config = ViTConfig(patch_size=4, n_layer=2, n_head=4, d_model=32, d_mlp=40, image_size=16, in_channels=3,
                       num_classes=7, drop_path=0.0, **options)
    attention = explicit(variant, n_kv, score_encoding=score)
    model = ViT(config, attention)
    cost = network_cost(config, attention)
    assert cost.params_total == n_params(model)
    assert cost.params_attention == attention_params(model)
    embedding = n_params(model.patch_embed) + sum(
        p.numel() for p in (model.cls_token, model.pos_embed) if p is not None
    )
    assert cost.params_embedding == embedding
    assert cost.params_head == n_params(model.head)
    assert cost.tokens_per_sample == 16 + (1 if config.pool == "cls" else 0) and cost.sample_unit == "image"
    check_cache(model, config, attention)

    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 5])
    assert counted(lambda: model(images)) == cost.forward_flops(2)
    assert counted(lambda: F.cross_entropy(model(images), labels).backward()) == cost.train_flops(2)


# -------------------------------------------------------------------------------------------------------- encoder
@pytest.mark.parametrize(("variant", "n_kv"), CASES)
@pytest.mark.parametrize("score", [False, True, "paper"])
def test_encoder_closed_form_matches_the_built_model(variant, n_kv, score):
    config = EncoderConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=10, num_classes=10,
                           position="rope" if score else "learned", bias=not score)
    attention = explicit(variant, n_kv, score_encoding=score)
    model = SequenceEncoder(config, attention)
    cost = network_cost(config, attention, seq_len=9)
    assert cost.params_total == n_params(model)
    assert cost.params_attention == attention_params(model)
    assert cost.params_embedding == n_params(model.embed) + (0 if model.position is None else n_params(model.position))
    assert cost.params_head == n_params(model.head)
    check_cache(model, config, attention, 9)
    idx = torch.randint(0, 10, (2, 9))
    assert counted(lambda: model(idx)) == cost.forward_flops(2)
    loss = lambda: F.cross_entropy(model(idx)[0].flatten(0, 1), idx.flatten())  # noqa: E731
    assert counted(lambda: loss().backward()) == cost.train_flops(2)


ROLE_NORMS = {
    "layer-all": {"q_norm": "layer", "k_norm": "layer", "v_norm": "layer"},
    "layer-k-rms-q": {"q_norm": "rms", "k_norm": "layer"},
    "layer-v-cla": {"v_norm": "layer", "q_norm": "layer", "kv_share_every": 2},
}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("variant", "n_kv", "norms"), [  # a layer reusing K/V keeps Q separate: no Q=K=V with CLA
    (v, n, norms) for v, n in (("QKV", 2), ("Q-K=V", None), ("Q=K=V", None)) for norms in ROLE_NORMS
    if not (v == "Q=K=V" and "cla" in norms)])
def test_closed_form_with_per_role_norms_matches_the_built_model(variant, n_kv, norms, bias):
    """Per-role LayerNorms have a scale and, only with ``bias: true``, a shift (head_dim each); RMSNorms a scale. The
    closed form equals ``numel`` of the GPT, the ViT and the encoder built with them, with and without biases (and
    a layer reusing K/V has no K/V norms). Written out for one layer: each norm adds head_dim, x2 for a biased
    LayerNorm."""
    attention = AttentionConfig(sharing=variant, n_kv_heads=n_kv, **ROLE_NORMS[norms])
    networks = [
        GPT(GPTConfig(n_layer=2, n_head=4, d_model=32, d_mlp=48, max_seq_len=24, vocab_size=50, bias=bias), attention),
        ViT(ViTConfig(patch_size=4, n_layer=2, n_head=4, d_model=32, d_mlp=40, image_size=8, in_channels=3,
                      num_classes=7, bias=bias), attention),
        SequenceEncoder(EncoderConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=10, num_classes=10,
                                      bias=bias), attention),
    ]
    for model in networks:
        cost = network_cost(model.config, attention)
        assert cost.params_total == n_params(model)
        assert cost.params_attention == attention_params(model)
    plain = Attention(32, 4, AttentionConfig(sharing=variant, n_kv_heads=n_kv), causal=True, bias=bias)
    normed = Attention(32, 4, attention, causal=True, bias=bias)
    settings = ROLE_NORMS[norms]
    extra = sum(8 * (2 if settings.get(role) == "layer" and bias else 1)
                for role in ("q_norm", "k_norm", "v_norm") if settings.get(role, "none") != "none")
    assert n_params(normed) - n_params(plain) == extra


def test_shared_variants_remove_exactly_their_projections():
    """Per layer, Q=K=V saves two of the three d x d projections (plus biases) and Q-K=V one; MQA keeps one head."""
    d, h, layers = 64, 8, 3
    config = EncoderConfig(n_layer=layers, n_head=h, d_model=d, vocab_size=10, num_classes=10)
    costs = {name: network_cost(config, AttentionConfig(sharing=name)) for name in CANONICAL_VARIANTS}
    for name, groups in (("Q=K-V", 2), ("Q-K=V", 2), ("Q=V-K", 2), ("Q=K=V", 1)):
        assert costs["QKV"].params_total - costs[name].params_total == layers * (3 - groups) * (d * d + d)
    mqa = network_cost(config, AttentionConfig(sharing="Q-K=V", n_kv_heads=1))
    assert costs["Q-K=V"].params_attention - mqa.params_attention == layers * (d - d // h) * (d + 1)
    assert mqa.kv_cache_bytes_per_token == layers * 1 * (d // h) * 2


def test_attention_shape_from_config_validates_heads():
    shape = AttentionShape.from_config(32, 4, AttentionConfig(sharing="Q-K=V", n_kv_heads=2))
    assert shape.projection_width == 32 + 16 and shape.cached_tensors == 1


# --------------------------------------------------------------------------------------------------------- report
def report_json(capsys, *args: str) -> dict:
    assert main(["report", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def built_params(task, attention: AttentionConfig) -> int:
    """Parameters of the network the task builds for a variant (GPTs on the meta device: no memory)."""
    variant = task_variant(task, attention)
    with torch.device("meta" if type(task).__name__ == "LanguageModel" else "cpu"):
        variant.configure_model()
    return n_params(variant.network)


@pytest.mark.parametrize(
    "configs",
    [["configs/synthetic/reverse.yaml"], ["configs/vit/cifar10.yaml", "configs/vit/quick/cpu.yaml"],
     ["configs/lm/gpt2-300m.yaml"]],
)
def test_report_json_matches_built_models_of_each_task(capsys, configs, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = report_json(capsys, *[arg for path in configs for arg in ("--config", path)], "--n_kv_heads", "[1]")
    from qkv_lightning.bench.common import load_task

    task = load_task(configs).task
    names = [v["name"] for v in data["variants"]]
    assert names == [*CANONICAL_VARIANTS, "QKV_kv1", "Q-K=V_kv1"]
    reference = data["variants"][0]
    for entry in data["variants"]:
        for key in ("name", "sharing", "n_kv_heads", "params_total", "params_attention", "flops_per_token",
                    "kv_cache_bytes_per_token"):
            assert key in entry
        attention = AttentionConfig(sharing=entry["sharing"], n_kv_heads=entry["n_kv_heads"])
        assert entry["params_total"] == built_params(task, attention)
        for key, value in entry["relative_to_QKV"].items():
            assert value == pytest.approx(entry[key] / reference[key])
    by_name = {v["name"]: v for v in data["variants"]}
    assert by_name["Q-K=V"]["relative_to_QKV"]["kv_cache_bytes_per_token"] == 0.5
    assert by_name["Q=K=V"]["relative_to_QKV"]["params_attention"] == 0.5  # 2 (d^2 + d) of 4 (d^2 + d)
    assert data["data_spec_source"]


def test_report_says_where_the_data_values_came_from(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert "SyntheticSequenceData.spec()" in report_json(capsys, "--config", "configs/synthetic/reverse.yaml")[
        "data_spec_source"
    ]
    spec = '{"vocab_size": 1000, "seq_len": 32}'
    given = report_json(capsys, "--config", "configs/lm/wikitext2.yaml", "--data_spec", spec)
    assert given["data_spec_source"] == "--data_spec" and given["tokens_per_sample"] == 32
    official = report_json(capsys, "--config", "configs/lm/wikitext2.yaml")  # its files are not on this machine
    assert official["data_spec"]["vocab_size"] == 33278 and "official WikiText-2" in official["data_spec_source"]
    own = report_json(capsys, "--config", "configs/lm/gpt2-300m.yaml")
    assert own["variants"][0]["params_total"] == 305_534_976 and "model.network.vocab_size" in own["data_spec_source"]


def test_report_keeps_the_configs_symmetry_breakers_and_overrides(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    plain = report_json(capsys, "--config", "configs/synthetic/reverse.yaml", "--variants", "[Q=K=V]")
    scored = report_json(capsys, "--config", "configs/synthetic/reverse.yaml", "--config",
                         "configs/variants/q=k=v+score.yaml", "--variants", "[Q=K=V]", "--model.network.n_layer", "3")
    assert [v["name"] for v in scored["variants"]] == ["Q=K=V+score"]
    per_layer = 10 + 1  # the paper's encoding: w (m = 10 channels) and b, one per layer, shared by the heads
    assert scored["variants"][0]["params_attention"] * 2 == plain["variants"][0]["params_attention"] * 3 + \
        2 * 3 * per_layer


def test_report_text_and_markdown_show_ratios(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["report", "--config", "configs/synthetic/reverse.yaml", "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    assert "| Q-K=V |" in text and "x QKV" in text and "SyntheticSequenceData.spec()" in text
    assert main(["report", "--config", "configs/vit/cifar10.yaml"]) == 0
    text = capsys.readouterr().out
    assert "train FLOPs/image" in text and "per patch token" in text


def test_report_bad_input_is_one_clear_error(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["report", "--config", "configs/synthetic/reverse.yaml", "--n_kv_heads", "[3]"]) == 2
    assert "n_kv_heads=3 must divide n_head=4" in capsys.readouterr().err
    assert main(["report", "--config", "configs/synthetic/reverse.yaml", "--variants", "[QQV]"]) == 2
    assert "is not a projection-sharing variant" in capsys.readouterr().err
    assert main(["report", "--config", "configs/lm/wikitext2.yaml", "--data.init_args.train_file", "mine.txt",
                 "--prepare_data", "false"]) == 2
    assert "--data_spec" in capsys.readouterr().err
