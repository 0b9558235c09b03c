"""The variant space beyond one choice per model (issue 16): per-layer schedules, cross-layer K/V sharing (CLA),
per-role norms and depth-factorised projections, each against a reference computation or a closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv_lightning.accounting import network_cost
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import Attention, AttentionConfig
from qkv_lightning.nn.decoding import StaticDecoder
from qkv_lightning.nn.encoder import EncoderConfig, SequenceEncoder
from qkv_lightning.nn.gpt import GPT, GPTConfig
from qkv_lightning.nn.vit import ViT, ViTConfig
from qkv_lightning.variants import Variant, expand, parse_label
from tests.distributed_support import needs_cpu_fsdp2
from tests.test_accounting import counted, n_params

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50


def gpt(attention: AttentionConfig, position: str = "learned", n_layer: int = 4, seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=n_layer, n_head=4, d_model=32, d_mlp=48, max_seq_len=24, vocab_size=VOCAB,
                       position=position, **options)
    return GPT(config, attention).double().eval()


def cached_equals_full(model: GPT, idx: torch.Tensor, prompt: int, rope_keys: str = "on_read") -> list:
    """Prompt then one token at a time through the dynamic cache, and through the static decoder, against the
    full forward pass; returns the dynamic caches."""
    full = model(idx)  # (B, T, V)
    caches = model.new_caches(idx.shape[0], idx.shape[1], rope_keys=rope_keys)
    steps = [model(idx[:, :prompt], caches)] + [model(idx[:, i : i + 1], caches) for i in range(prompt, idx.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)
    decoder = StaticDecoder(model, idx.shape[1], rope_keys="copy" if rope_keys == "copy" else "on_read")
    logits, cache = decoder.prefill(idx[:, :prompt])
    torch.testing.assert_close(logits, full[:, prompt - 1], rtol=0, atol=1e-10)
    assert sum(t.numel() * t.element_size() for t in cache) == decoder.cache_bytes(idx.shape[0])
    for i in range(prompt, idx.shape[1]):
        logits, cache = decoder.step(idx[:, i : i + 1], torch.tensor([i]), cache)
        torch.testing.assert_close(logits, full[:, i], rtol=0, atol=1e-10)
    return caches


def idx_batch(length: int = 14) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))


# -------------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("layers", [{"0-3": "QKV"}, {"0": "QKV", "1-2": "QKV", "3-": "QKV"}])
def test_an_all_qkv_schedule_is_todays_qkv_model_exactly(layers):
    plain, scheduled = gpt(AttentionConfig()), gpt(AttentionConfig(layers=layers))
    assert list(plain.state_dict()) == list(scheduled.state_dict())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, scheduled.state_dict()[name]), name
    idx = idx_batch()
    assert torch.equal(plain(idx), scheduled(idx))


SCHEDULES = {
    "upper-half Q-K=V": AttentionConfig(layers={"0-1": "QKV", "2-": "Q-K=V"}),
    "mixed heads and breakers": AttentionConfig(layers={"0": "Q=K-V+score", "1": "Q-K=V_kv1", "2-3": "QKV_kv2"}),
}


@pytest.mark.parametrize(("name", "position"), [("upper-half Q-K=V", "rope"), ("mixed heads and breakers", "learned"),
                                               ("mixed heads and breakers", "rope")])
def test_a_schedule_builds_each_layers_variant_with_exact_accounting_and_exact_decoding(name, position):
    attention = SCHEDULES[name]
    model = gpt(attention, position)
    configs = attention.layer_configs(4, 4)
    for block, config in zip(model.blocks, configs, strict=True):  # each layer its own variant, one fused matmul
        single = Attention(32, 4, config, causal=True)
        assert block.attn.qkv.weight.shape == single.qkv.weight.shape and block.attn.sharing == single.sharing
    cost = network_cost(model.config, attention, kv_bytes=8)
    assert cost.params_total == n_params(model)
    caches = cached_equals_full(model, idx_batch(), prompt=6)
    assert sum(c.nbytes for c in caches) == 2 * 14 * cost.kv_cache_bytes_per_token
    per_layer = [Attention(32, 4, config, causal=True).cached_tensors for config in configs]
    assert [len(c.buffers) for c in caches] == per_layer
    assert cost.label == Variant.of(attention, 4).label


def test_schedule_flops_equal_torchs_counter_per_layer():
    attention = AttentionConfig(layers={"0-1": "QKV", "2-": "Q-K=V_kv2"}, backend="explicit", kv_share_every=2,
                                depth={"Q": 2}, q_norm="rms", k_norm="layer")
    model = gpt(attention).float()
    cost = network_cost(model.config, attention, 12, count_masked=True)
    idx = idx_batch(12)
    assert cost.params_total == n_params(model)
    assert counted(lambda: model.loss(idx, idx)) == cost.forward_flops(2)
    assert counted(lambda: model.loss(idx, idx).backward()) == cost.train_flops(2)


def test_schedule_labels_parse_back_and_enter_the_grid():
    for label in ("QKV@0-1,Q-K=V@2-", "Q=K-V+score@0,Q-K=V_kv2@1-", "Q-K=V_cla2", "QKV@0-1,Q-K=V@2-_cla2",
                  "Q-K=V_dQ2", "QKV_kv2_cla[1:0,3:2]"):
        assert Variant.parse(label).label == label and parse_label(label) == Variant.parse(label)
    variant = Variant.parse("QKV@0-1,Q-K=V@2-")
    config = variant.attention_config(AttentionConfig(sharing="Q=K=V", kv_share_every=2, dropout=0.1))
    assert (config.layers, config.kv_share_every, config.dropout) == ({"0-1": "QKV", "2-": "Q-K=V"}, 1, 0.1)
    assert Variant.of(config).label == variant.label
    found, _ = expand(["QKV", "QKV@0-1,Q-K=V@2-", "Q-K=V_cla2"], [None, 2])
    assert [v.label for v in found] == ["QKV", "QKV_kv2", "QKV@0-1,Q-K=V@2-", "Q-K=V_cla2", "Q-K=V_kv2_cla2"]
    assert "layers" not in Variant("Q-K=V").attention_settings()  # old studies keep their fingerprints


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({"0-2": "QKV", "2-": "Q-K=V"}, "gives layer 2 twice"),
        ({"0-1": "QKV", "3-": "Q-K=V"}, r"leaves layer\(s\) \[2\]"),
        ({"0-5": "QKV"}, "lies past the last layer"),
        ({"3-1": "QKV"}, "is not a layer range"),
        ({"x": "QKV"}, "is not a layer range"),
        ({"0-": "Q-K=W"}, r"attention.layers\['0-'\]='Q-K=W' is not one variant's label"),
        ({"0-": "QKV+scor"}, "unknown symmetry breaker 'scor'"),
        ({"0-": "Q=K-V_kv2"}, "layer 0: attention.sharing=Q=K-V shares the query projection"),
    ],
)
def test_bad_schedules_are_clear_config_errors_naming_the_setting(layers, message):
    with pytest.raises(ConfigError, match=message):
        gpt(AttentionConfig(layers=layers))


def test_a_schedule_reaches_the_vit_and_the_encoder_with_exact_counts():
    attention = AttentionConfig(layers={"0": "QKV", "1": "Q=K=V"}, kv_share_every=1, v_norm="layer")
    vit_config = ViTConfig(n_layer=2, n_head=2, d_model=16, patch_size=4, image_size=8, in_channels=3, num_classes=5)
    assert network_cost(vit_config, attention).params_total == n_params(ViT(vit_config, attention))
    encoder = EncoderConfig(n_layer=2, n_head=2, d_model=16, max_seq_len=8, vocab_size=12, num_classes=10)
    assert network_cost(encoder, attention).params_total == n_params(SequenceEncoder(encoder, attention))


# ------------------------------------------------------------------------------------------ cross-layer sharing
CLA = {
    "CLA-2": AttentionConfig(kv_share_every=2),
    "CLA-2 Q-K=V": AttentionConfig(sharing="Q-K=V", kv_share_every=2),
    "CLA-2 GQA": AttentionConfig(kv_share_every=2, n_kv_heads=2),
    "source map": AttentionConfig(sharing="Q-K=V", kv_sources={"1": 0, "2": 0, "3": 0}, k_norm="rms", v_norm="rms"),
}


@pytest.mark.parametrize(
    ("name", "position", "rope_keys"),
    [("CLA-2", "rope", "on_read"), ("CLA-2 Q-K=V", "learned", "on_read"), ("CLA-2 Q-K=V", "rope", "on_read"),
     ("CLA-2 Q-K=V", "rope", "copy"), ("CLA-2 GQA", "rope", "on_read"), ("source map", "rope", "copy")],
)
def test_cross_layer_sharing_caches_each_tensor_once_in_closed_form_and_decodes_exactly(name, position, rope_keys):
    attention = CLA[name]
    model = gpt(attention, position)
    sources = attention.kv_source_list(4)
    for block, source in zip(model.blocks, sources, strict=True):  # a reusing layer projects Q only
        attn = block.attn
        q_width = attn.n_head * attn.head_dim
        assert attn.reuses_kv == (source is not None)
        assert (attn.qkv.out_features == q_width) == attn.reuses_kv
    cost = network_cost(model.config, attention, kv_bytes=8)
    assert cost.params_total == n_params(model)
    caches = cached_equals_full(model, idx_batch(), prompt=5, rope_keys=rope_keys)
    owners = [i for i, s in enumerate(sources) if s is None]
    kv = model.blocks[0].attn
    tensors = len(kv.sharing.cached_groups) + (rope_keys == "copy" and kv.kv_shared)
    assert sum(c.nbytes for c in caches) == len(owners) * tensors * 2 * kv.n_kv_heads * 14 * kv.head_dim * 8
    if rope_keys == "on_read":
        assert sum(c.nbytes for c in caches) == 2 * 14 * cost.kv_cache_bytes_per_token
    assert [len(c.buffers) for i, c in enumerate(caches) if i not in owners] == [0] * (4 - len(owners))


def test_cla2_on_q_k_v_stores_one_tensor_per_two_layers():
    qkv = network_cost(gpt(AttentionConfig()).config, AttentionConfig())
    cla = network_cost(gpt(AttentionConfig()).config, AttentionConfig(sharing="Q-K=V", kv_share_every=2))
    assert cla.kv_cache_bytes_per_token * 4 == qkv.kv_cache_bytes_per_token  # 1 tensor per 2 layers vs 2 per layer
    assert cla.label == "Q-K=V_cla2"


@pytest.mark.parametrize(
    ("every", "n_layer", "expected"),
    [(3, 6, [None, 0, 0, None, 3, 3]), (3, 7, [None, 0, 0, None, 3, 3, None]), (2, 5, [None, 0, None, 2, None]),
     (4, 6, [None, 0, 0, 0, None, 4]), (1, 3, [None, None, None])],
)
def test_kv_share_every_gives_each_run_the_k_v_of_its_first_layer(every, n_layer, expected):
    """kv_share_every: N splits the layers into runs of N; every layer of a run reuses the K/V of the run's first
    layer (written out above). The network built from it is the one built from that explicit kv_sources map: same
    parameters, same outputs, and it decodes exactly."""
    attention = AttentionConfig(kv_share_every=every)
    assert attention.kv_source_list(n_layer, 4) == expected
    explicit_map = {str(i): source for i, source in enumerate(expected) if source is not None}
    model = gpt(attention, "rope", n_layer=n_layer)
    assert model.trunk.kv_sources == expected
    assert [block.attn.reuses_kv for block in model.blocks] == [source is not None for source in expected]
    if not explicit_map:
        return
    reference = gpt(AttentionConfig(kv_sources=explicit_map), "rope", n_layer=n_layer)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(model.state_dict())
    idx = idx_batch()
    torch.testing.assert_close(model(idx), reference(idx), rtol=0, atol=0)
    caches = cached_equals_full(model, idx, prompt=5)
    assert [len(c.buffers) for c in caches] == [0 if source is not None else 2 for source in expected]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sharing": "Q=K-V", "kv_share_every": 2}, "layer 1 reuses the K/V of layer 0, but its sharing"),
        ({"kv_sources": {"2": 1, "1": 0}}, "which reuses layer 0's itself"),
        ({"kv_sources": {"1": 1}}, "reuses the K/V of an earlier layer"),
        ({"layers": {"0": "QKV", "1-": "QKV_kv2"}, "kv_share_every": 2}, r"\(2 K/V heads\) reuses layer 0"),
        ({"kv_share_every": 0}, "kv_share_every=0 must be a whole number"),
        ({"kv_share_every": 2, "kv_sources": {"1": 0}}, "both set cross-layer sharing"),
    ],
)
def test_bad_cross_layer_sharing_is_a_clear_config_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        gpt(AttentionConfig(**settings))


# ---------------------------------------------------------------------------------------------- per-role norms
def test_role_norms_on_a_shared_kv_cache_one_tensor_and_decode_exactly():
    """Gemma-style k_norm / v_norm on one K=V projection: the cache keeps the one raw tensor per layer."""
    attention = AttentionConfig(sharing="Q-K=V", q_norm="rms", k_norm="rms", v_norm="layer")
    for position, rope_keys in (("learned", "on_read"), ("rope", "on_read"), ("rope", "copy")):
        model = gpt(attention, position)
        for module in model.modules():  # learned scales and shifts away from their initial values
            if isinstance(module, nn.RMSNorm | nn.LayerNorm) and module.weight.shape == (8,):
                with torch.no_grad():
                    module.weight.uniform_(0.5, 1.5)
                    if getattr(module, "bias", None) is not None:
                        module.bias.uniform_(-0.5, 0.5)
        caches = cached_equals_full(model, idx_batch(), prompt=4, rope_keys=rope_keys)
        assert all(len(c.buffers) == 1 for c in caches)
        assert network_cost(model.config, attention, kv_bytes=8).params_total == n_params(model)


def test_role_norms_keep_q_equal_k_symmetric_exactly_when_documented():
    """Q=K logits with per-role norms (README): RMSNorm gains on q and k form a diagonal bilinear form, so the logits
    stay symmetric whatever the gains; LayerNorm's shifts add a key term (asymmetric); with RoPE, unequal q and k
    gains break the symmetry, equal ones keep it."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    rope = GPTConfig(n_head=4, d_model=32, position="rope").rope(7, torch.device("cpu"), torch.float64)

    def logits(kind: str, same_gains: bool, tables) -> torch.Tensor:
        attn = Attention(32, 4, AttentionConfig(sharing="Q=K-V", q_norm=kind, k_norm=kind), causal=False).double()
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.copy_(attn.q_norm.weight if same_gains else torch.rand(8).double() + 0.5)
            if kind == "layer":
                attn.q_norm.bias.uniform_(-0.5, 0.5)
                attn.k_norm.bias.uniform_(-0.5, 0.5)
        return attn.logits(x, tables)

    def symmetric(scores: torch.Tensor) -> bool:
        return torch.allclose(scores, scores.transpose(-2, -1), atol=1e-12)

    assert symmetric(logits("rms", same_gains=False, tables=None))
    assert symmetric(logits("rms", same_gains=True, tables=rope))
    assert not symmetric(logits("rms", same_gains=False, tables=rope))
    assert not symmetric(logits("layer", same_gains=True, tables=None))


# ---------------------------------------------------------------------------------------- depth factorisation
def test_qvv3_has_exactly_qkvs_parameters_and_q_k_vs_cache_and_fuses_to_one_matmul():
    qkv, qvv = AttentionConfig(), AttentionConfig(sharing="Q-K=V", depth={"Q": 2})
    for bias in (True, False):
        model = gpt(qvv, bias=bias)
        assert n_params(model) == n_params(gpt(qkv, bias=bias))  # QVV(3): W1, W2, Wv against Wq, Wk, Wv
        cost = network_cost(model.config, qvv)
        assert cost.params_total == n_params(model) == network_cost(model.config, qkv).params_total
        assert cost.params_inference == network_cost(model.config, AttentionConfig(sharing="Q-K=V")).params_total
        assert cost.kv_cache_bytes_per_token * 2 == network_cost(model.config, qkv).kv_cache_bytes_per_token
        with torch.no_grad():  # biases away from their zero initialisation, so that fusing must carry them
            for name, param in model.named_parameters():
                if ".attn." in name and name.endswith("bias"):
                    param.uniform_(-0.5, 0.5)
        idx = idx_batch()
        before = model(idx)
        model.fuse()
        assert n_params(model) == cost.params_inference
        assert all(len(block.attn.factors) == 0 for block in model.blocks)
        torch.testing.assert_close(model(idx), before, rtol=0, atol=1e-12)


def test_a_fused_model_equals_the_factorised_one_for_every_role_and_decodes_exactly():
    attention = AttentionConfig(depth={"Q": 3, "K": 2}, kv_share_every=2)
    model = gpt(attention, "rope")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".attn." in name and name.endswith("bias"):
                param.uniform_(-0.5, 0.5)
    idx = idx_batch()
    factorised = model(idx)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(".factors." in name for name in state)
    model.fuse()
    assert not any(".factors." in name for name in model.state_dict())
    torch.testing.assert_close(model(idx), factorised, rtol=0, atol=1e-12)
    cached_equals_full(model, idx, prompt=5)
    assert model.trunk.attention.depth is None  # the fused model's config rebuilds its shapes (bench-decode)
    rebuilt = GPT(model.config, model.trunk.attention).double()
    rebuilt.load_state_dict(model.state_dict())


def test_roles_of_one_group_need_one_depth():
    with pytest.raises(ConfigError, match="gives the roles of the group K=V of Q-K=V different depths"):
        gpt(AttentionConfig(sharing="Q-K=V", depth={"K": 2, "V": 3}))
    with pytest.raises(ConfigError, match="give a whole number >= 1 of factors per role"):
        AttentionConfig(depth={"X": 2})


# ------------------------------------------------------------------------------------- DDP and FSDP2 (2 processes)
@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory) -> dict:
    """CLA-2 on Q-K=V with a depth-factorised Q and per-role norms, trained by 2-process DDP (no
    find_unused_parameters: an unused parameter fails the second step) and by FSDP2, through the normal CLI."""
    from tests.lm_fixtures import write_wikitext
    from tests.test_distributed import DDP, FSDP2, fit

    workdir = tmp_path_factory.mktemp("cla-distributed")
    write_wikitext(workdir / "data", {"wiki.train.tokens": 20, "wiki.valid.tokens": 2, "wiki.test.tokens": 2})
    variant = ("--model.init_args.attention.sharing", "Q-K=V", "--model.init_args.attention.kv_share_every", "2",
               "--model.init_args.attention.depth", "{Q: 2}", "--model.init_args.attention.q_norm", "rms",
               "--model.init_args.attention.k_norm", "rms", "--model.init_args.network.n_layer", "4")
    runs = {}
    for name, strategy in (("ddp", DDP), ("fsdp2", FSDP2)):
        runs[name] = fit(workdir, name, 4, *strategy, *variant, timeout=1500)
    return runs


@pytest.mark.slow
@needs_cpu_fsdp2
def test_cross_layer_sharing_trains_under_ddp_without_unused_parameters_and_fsdp2_shards_it(distributed_runs):
    from tests.test_distributed import STEPS, assert_same_training

    ddp, fsdp2 = distributed_runs["ddp"], distributed_runs["fsdp2"]
    assert ddp["strategy"] == "DDPStrategy" and len(ddp["losses"]) == STEPS and ddp["losses"][-1] < ddp["losses"][0]
    reusers = [name for name in ddp["state"] if name.endswith("blocks.1.attn.qkv.weight")]
    assert reusers and ddp["state"][reusers[0]].shape == (32, 32)  # layer 1 projects Q only
    assert any(".factors." in name for name in ddp["state"])
    assert_same_training(fsdp2, ddp)  # FSDP2 trains the same model as DDP, step by step
    assert fsdp2["strategy"] == "FSDP2Strategy"
    for name, per_rank in fsdp2["shard_numel"].items():  # every parameter split over the two ranks
        assert sum(per_rank) == fsdp2["full_numel"][name], name
        if fsdp2["state"][name].shape[0] >= 2:
            assert max(per_rank) < fsdp2["full_numel"][name], name
