"""The one label grammar (nn/sharing.py) and the variant parsed once on its way from a config to the fused projection.

The round trip is checked over labels written here by hand (not by the code under test) and over every label the
grammar's fields can make; the parse count wraps :meth:`Sharing.parse`, the one function that reads a sharing out of
text, and counts its real calls while a task is built, its network made, its cost computed and its variant named.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from qkv_lightning.accounting import network_cost
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import Attention
from qkv_lightning.nn.attention_config import AttentionConfig
from qkv_lightning.nn.encoder import EncoderConfig
from qkv_lightning.nn.gpt import GPT, GPTConfig
from qkv_lightning.nn.sharing import CANONICAL_VARIANTS, ProjectionLayout, Sharing, VariantLabel
from qkv_lightning.tasks.sequence_tasks import SequenceTask
from qkv_lightning.variants import Variant, parse_label

# label -> (sharing, n_kv_heads, breakers, layers, kv_share_every, kv_sources, depth), written out by hand
LABELS = {
    "QKV": ("QKV", None, (), (), 1, (), ()),
    "Q-K=V_kv2": ("Q-K=V", 2, (), (), 1, (), ()),
    "Q=K-V+score": ("Q=K-V", None, ("score",), (), 1, (), ()),
    "Q=K=V+score+noself": ("Q=K=V", None, ("score", "noself"), (), 1, (), ()),
    "QKV+relative_kv1": ("QKV", 1, ("relative",), (), 1, (), ()),
    "Q-K=V_dQ2_cla2": ("Q-K=V", None, (), (), 2, (), (("Q", 2),)),
    "QKV_kv2_cla[1:0,3:2]": ("QKV", 2, (), (), 1, ((1, 0), (3, 2)), ()),
    "QKV@0-1,Q-K=V@2-": ("QKV", None, (), (("0-1", "QKV"), ("2-", "Q-K=V")), 1, (), ()),
    "Q=K-V+score@0,Q-K=V_kv2@1-_cla2": ("QKV", None, (), (("0", "Q=K-V+score"), ("1-", "Q-K=V_kv2")), 2, (), ()),
}

# other spellings of the same variants: aliases, group order, spaces, the paper's "(...)+" notation, range order
SPELLINGS = {
    "shared_kv_kv2": "Q-K=V_kv2",
    "K=Q-V+score": "Q=K-V+score",
    " V = K = Q + noself + score ": "Q=K=V+score+noself",
    "(Q=K-V)+": "Q=K-V+score",
    "Q-K=V@2-,standard@0-1": "QKV@0-1,Q-K=V@2-",
}


@pytest.mark.parametrize("label", LABELS)
def test_a_label_parses_to_its_fields_and_writes_back_to_itself(label):
    parsed = VariantLabel.parse(label)
    fields = (parsed.sharing, parsed.n_kv_heads, parsed.breakers, parsed.layers, parsed.kv_share_every,
              parsed.kv_sources, parsed.depth)
    assert fields == LABELS[label]
    assert parsed.label == label
    assert Variant.parse(label) == parse_label(label) == Variant(*LABELS[label])  # variants.py: the same grammar
    assert Variant.parse(label).label == label


@pytest.mark.parametrize(("spelling", "label"), SPELLINGS.items())
def test_every_spelling_parses_to_the_one_canonical_label(spelling, label):
    assert VariantLabel.parse(spelling).label == label
    assert VariantLabel.parse(spelling) == VariantLabel.parse(label)


def test_every_label_the_fields_can_make_round_trips_through_the_one_parser():
    """Fields -> label -> parse gives the same variant back, for every sharing, head count and breaker set, with and
    without structure suffixes, and as the layers of a schedule."""
    breaker_sets = [(), ("score",), ("relative",), ("noself",), ("score", "noself"), ("relative", "noself")]
    structures = [{}, {"kv_share_every": 2}, {"kv_sources": ((1, 0), (2, 0))}, {"depth": (("Q", 2), ("V", 3))}]
    count = 0
    for sharing, n_kv, breakers, structure in itertools.product(CANONICAL_VARIANTS, [None, 1, 4], breaker_sets,
                                                                structures):
        variant = VariantLabel(sharing, n_kv, breakers, **structure)
        assert VariantLabel.parse(variant.label) == variant, variant.label
        count += 1
        if not structure:
            schedule = VariantLabel(layers=(("0", variant.label), ("1-", "Q-K=V_kv2")), kv_share_every=2)
            assert VariantLabel.parse(schedule.label) == schedule, schedule.label
    assert count == 5 * 3 * 6 * 4


def test_attention_layers_read_labels_with_the_same_grammar():
    """A schedule in the config takes what the study's labels take (the paper's notation, aliases), and refuses the
    network-wide suffixes in one layer's label."""
    config = AttentionConfig(layers={"0": "(Q=K-V)+", "1-": "shared_kv_kv1"})
    assert [(c.sharing, c.n_kv_heads, c.score_encoding) for c in config.layer_configs(3, 2)] == [
        ("Q=K-V", None, "paper"), ("Q-K=V", 1, "none"), ("Q-K=V", 1, "none")]
    assert Variant.of(config, 2).label == "Q=K-V+score@0,Q-K=V_kv1@1-"
    with pytest.raises(ConfigError, match=r"attention.layers\['1-'\]='QKV_cla2' is not one variant's label"):
        AttentionConfig(layers={"0": "QKV", "1-": "QKV_cla2"})


def test_the_row_layout_is_the_fused_projections_rows():
    """Each role's rows (ProjectionLayout.rows) are those the layer's split gives that role, per variant and GQA."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    for sharing in CANONICAL_VARIANTS:
        for n_kv in ([4, 2, 1] if not Sharing.parse(sharing).query_shared else [4]):
            attn = Attention(24, 4, AttentionConfig(sharing=sharing, n_kv_heads=n_kv), causal=False).double()
            layout = attn.layout
            parts = attn.split_groups(x)  # (B, heads, T, D) per group
            for role in "QKV":
                rows = layout.rows(layout.sharing.group_of(role))
                by_rows = x @ attn.qkv.weight[rows].T + attn.qkv.bias[rows]  # (B, T, heads * D)
                expected = by_rows.view(2, 5, layout.heads_of(role), 6).transpose(1, 2)
                torch.testing.assert_close(parts[layout.part_of(role)], expected, rtol=0, atol=1e-12)
    reuser = ProjectionLayout(Sharing.parse("Q-K=V"), 4, 2, 6, owns_kv=False)
    assert (reuser.groups, reuser.width, reuser.rows(0), reuser.cached_tensors) == ((0,), 24, slice(0, 24), 0)
    gqa = ProjectionLayout(Sharing.parse("QKV"), 4, 2, 6)
    assert [gqa.head_of("K", h) for h in range(4)] == [0, 0, 1, 1] and gqa.head_of("Q", 3) == 3
    assert (gqa.rows(1), gqa.rows(2), gqa.width) == (slice(24, 36), slice(36, 48), 48)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every real call of Sharing.parse (the one reader of a sharing's text) while the test runs."""
    calls: list[str] = []
    original = Sharing.parse.__func__

    def counted(cls, name):
        calls.append(name)
        return original(cls, name)

    monkeypatch.setattr(Sharing, "parse", classmethod(counted))
    return calls


@pytest.mark.parametrize(
    ("attention", "texts"),
    [
        ({"sharing": "shared_kv", "n_kv_heads": 1, "score_encoding": "paper", "kv_share_every": 2,
          "depth": {"Q": 2}, "q_norm": "rms"}, 1),
        ({"sharing": "QKV", "layers": {"0": "Q=K-V+score", "1-2": "Q-K=V_kv2", "3": "QKV"}}, 1 + 3),
    ],
    ids=["one variant", "schedule"],
)
def test_a_task_parses_its_variant_once_from_its_settings_to_the_fused_projection(parses, attention, texts):
    """A task given its attention settings as a checkpoint stores them (a dict) parses each variant text once: the
    task's checks, the network (trunk, every attention layer), the closed-form cost and the variant's name read
    what the config parsed. A second parse anywhere on that route (planted in Attention.__init__) fails this."""
    task = SequenceTask(
        attention=attention,
        network={"n_layer": 4, "n_head": 2, "d_model": 16, "max_seq_len": 8},
        data_spec={"vocab_size": 12, "num_classes": 10, "seq_len": 8},
    )
    assert len(parses) == texts  # the sharing, and each layer label of a schedule, once each
    task.configure_model()
    cost = task.cost()
    label = Variant.of(task.attention_config, 2).label
    assert len(parses) == texts, parses
    assert cost.params_total == sum(p.numel() for p in task.network.parameters())
    assert label == cost.label
    widths = [block.attn.qkv.out_features for block in task.network.trunk.blocks]
    assert widths == [task.attention_config.layer_configs(4, 2)[i].layout(2, 8, source is None).width
                      for i, source in enumerate(task.network.trunk.kv_sources)]


def test_a_gpt_and_its_cost_read_the_parsed_variant(parses):
    config = AttentionConfig(sharing="Q-K=V", n_kv_heads=2, layers=None)
    assert parses == ["Q-K=V"]
    gpt_config = GPTConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=20)
    model = GPT(gpt_config, config)
    assert network_cost(gpt_config, config).kv_cache_bytes_per_token == 2 * 1 * 2 * 8 * 2  # layers, tensor, heads
    assert parses == ["Q-K=V"]
    assert all(block.attn.sharing is config.parsed.partition for block in model.blocks)
    EncoderConfig()  # network configs parse nothing
    assert parses == ["Q-K=V"]
