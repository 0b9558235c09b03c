"""The settings that make our configs the authors' protocol where they claim it: the blocks' dropout placement
(``network.dropout_at``), training lists per run seed (``data.train_seed``), and the configs that use them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from qkv_lightning.data.synthetic import SyntheticSequenceData
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention_config import AttentionConfig
from qkv_lightning.nn.blocks import Block, TrunkConfig

ROOT = Path(__file__).resolve().parents[1]


def block(dropout_at: str | None) -> Block:
    kwargs = {} if dropout_at is None else {"dropout_at": dropout_at}
    torch.manual_seed(0)
    return Block(16, 4, 32, AttentionConfig(), causal=False, dropout=0.5, gelu="exact", **kwargs).train()


def replay(b: Block, x: torch.Tensor, dropout_at: str) -> torch.Tensor:
    """The block's train-mode output written out, dropping in the given places in the same order (same RNG draws)."""
    out = b.attn(b.norm_attn(x))[0]  # (B, T, C)
    x = x + (F.dropout(out, 0.5, True) if dropout_at == "residual" else out)
    h = b.mlp.act(b.mlp.fc(b.norm_mlp(x)))
    if dropout_at == "mlp":
        h = F.dropout(h, 0.5, True)
    return x + F.dropout(b.mlp.proj(h), 0.5, True)


@pytest.mark.parametrize("dropout_at", [None, "residual", "mlp"])
def test_dropout_goes_where_dropout_at_says(dropout_at):
    b = block(dropout_at)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    ours = b(x)[0]
    torch.manual_seed(7)
    expected = replay(b, x, dropout_at or "residual")  # None: today's placement
    assert torch.equal(ours, expected)
    torch.manual_seed(7)
    other = replay(b, x, "mlp" if (dropout_at or "residual") == "residual" else "residual")
    assert not torch.equal(ours, other)
    with pytest.raises(ConfigError, match="network.dropout_at"):
        TrunkConfig(dropout_at="attention")


def lists(monkeypatch, run_seed: int, **kwargs) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("PL_GLOBAL_SEED", str(run_seed))
    return SyntheticSequenceData(task="reverse", seq_len=6, train_size=300, val_size=40, test_size=40,
                                 **kwargs).generate()


def test_train_seed_run_draws_new_training_lists_per_run_seed(monkeypatch):
    default_a, default_b = lists(monkeypatch, 0), lists(monkeypatch, 5)
    for split in ("train", "val", "test"):  # the default: one data seed for every run seed
        assert torch.equal(default_a[split], default_b[split])
    run_a, run_b = lists(monkeypatch, 1, train_seed="run"), lists(monkeypatch, 2, train_seed="run")
    assert not torch.equal(run_a["train"], run_b["train"])
    for split in ("val", "test"):
        assert torch.equal(run_a[split], default_a[split]) and torch.equal(run_b[split], default_a[split])
    held = {tuple(row) for row in torch.cat([run_b["val"], run_b["test"]]).tolist()}
    assert not held & {tuple(row) for row in run_b["train"].tolist()}
    with pytest.raises(ConfigError, match="data.train_seed"):
        SyntheticSequenceData(train_seed="epoch")


def test_configs_claiming_the_authors_protocol_use_their_settings():
    protocol = yaml.safe_load((ROOT / "configs/synthetic/paper-protocol.yaml").read_text())
    assert protocol["model"]["init_args"]["network"]["gelu"] == "exact"
    assert protocol["data"]["init_args"]["train_seed"] == "run"
    for path in sorted((ROOT / "configs/vit/paper").glob("*.yaml")):
        network = yaml.safe_load(path.read_text())["model"]["init_args"]["network"]
        assert network["dropout_at"] == "mlp" and network["gelu"] == "exact", path.name
