"""The paper's LM configs against the authors' files, the GPT options they need, the global batch in tokens, the
paper's K/V-head variant configs and their cache cuts, and the paper's FLOP convention (``report --count_masked``).

The authors' files are Brainchip-Inc/Do-Transformers-Need-3-Projections, branch main; each value below names the
file it comes from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from qkv_lightning.bench.common import load_task, variants_of
from qkv_lightning.bench.report import format_report, report_data
from qkv_lightning.callbacks.global_batch import GlobalBatch
from qkv_lightning.cli import main
from qkv_lightning.data.synthetic import SyntheticSequenceData
from qkv_lightning.errors import ConfigError
from qkv_lightning.lightning_cli import QKVLightningCLI
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.gpt import GPT, GPTConfig
from qkv_lightning.variants import Variant
from tests.run_fixtures import CONFIGS, subprocess_env, synthetic_args

ROOT = Path(__file__).resolve().parent.parent
GPUS = 8  # the paper trains both models on 8 GPUs (transformer_KQV_1_2B.py: "8x A100"; the 300M batch)

# configs/model_config_300M.yaml and configs/train_config_300M.yaml (the same values as transformer_KQV_300_M.py's
# ModelConfig/TrainingConfig), configs/model_config_1.2B.yaml and configs/train_config_1.2B.yaml.
AUTHORS = {
    "paper-300m": {
        "model": {"n_layer": 20, "n_embd": 1024, "n_head": 16, "n_inner": 4096, "n_positions": 2048,
                  "vocab_size": 50304, "embd_pdrop": 0.0, "resid_pdrop": 0.1, "attn_pdrop": 0.0,
                  "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "use_bias": True,
                  "tie_word_embeddings": True},
        "train": {"micro_batch_size": 6, "gradient_accumulation": 24, "learning_rate": 2e-4, "min_lr": 2e-5,
                  "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "warmup_steps": 500,
                  "lr_scheduler": "cosine", "total_tokens": 10_000_000_000, "eval_interval": 200,
                  "log_interval": 10, "save_interval": 1000, "seed": 42},
    },
    "paper-1.2b": {
        "model": {"n_layer": 22, "n_embd": 2048, "n_head": 32, "n_inner": 8192, "n_positions": 2048,
                  "vocab_size": 50304, "embd_pdrop": 0.0, "resid_pdrop": 0.1, "attn_pdrop": 0.0,
                  "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "use_bias": True,
                  "tie_word_embeddings": True},
        "train": {"micro_batch_size": 2, "gradient_accumulation": 36, "learning_rate": 6e-5, "min_lr": 6e-6,
                  "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "warmup_steps": 1000,
                  "lr_scheduler": "cosine", "total_tokens": 10_000_000_000, "eval_interval": 500,
                  "log_interval": 10, "save_interval": 1000, "seed": 42},
    },
}
# Read from the authors' training scripts (transformer_KQV_300_M.py, transformer_KQV_1_2B.py), the same in both:
# MLP nn.GELU() (exact erf), _init_weights N(0, initializer_range) for every Linear and Embedding (no residual
# scaling), torch.optim.AdamW(model.parameters(), ...) (weight decay on all parameters, torch's eps 1e-8), get_lr
# (linear warm-up, then cosine to min_lr), autocast(dtype=torch.bfloat16), learned positions, linear tied head.
SCRIPTS = {"gelu": "exact", "residual_scaling": False, "decay_on": "all", "eps": 1e-8, "precision": "bf16-mixed",
           "position": "learned", "output": "linear", "optimizer": "AdamW"}


def callback(config, class_name: str) -> dict:
    (found,) = [c for c in config.trainer.callbacks if c.class_path.endswith(class_name)]
    return found.init_args


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_paper_config_matches_the_authors_files_setting_by_setting(name):
    """Every value of configs/lm/<name>.yaml, parsed by the real CLI parser, against the authors' files."""
    model, train = AUTHORS[name]["model"], AUTHORS[name]["train"]
    config = QKVLightningCLI.parse_only(["--config", str(CONFIGS / "lm" / f"{name}.yaml")])
    network = config.model.init_args.network
    assert (network.n_layer, network.d_model, network.n_head, network.d_mlp) == (
        model["n_layer"], model["n_embd"], model["n_head"], model["n_inner"])
    assert network.max_seq_len == config.data.init_args.seq_len == model["n_positions"]
    assert network.vocab_size == model["vocab_size"]
    assert network.embedding_dropout == model["embd_pdrop"] and network.dropout == model["resid_pdrop"]
    assert config.model.init_args.attention.dropout == model["attn_pdrop"]
    assert network.norm_eps == model["layer_norm_epsilon"] and network.init_std == model["initializer_range"]
    assert network.bias is model["use_bias"] and network.tie_embeddings is model["tie_word_embeddings"]
    assert network.gelu == SCRIPTS["gelu"] and network.residual_scaling is SCRIPTS["residual_scaling"]
    assert network.position == SCRIPTS["position"] and network.output == SCRIPTS["output"]

    optimizer = config.model.init_args.optimizer
    assert optimizer.name == SCRIPTS["optimizer"] and optimizer.lr == train["learning_rate"]
    assert optimizer.lr * optimizer.min_lr_ratio == pytest.approx(train["min_lr"], rel=1e-12)
    assert tuple(optimizer.betas) == (train["beta1"], train["beta2"]) and optimizer.eps == SCRIPTS["eps"]
    assert optimizer.weight_decay == train["weight_decay"] and optimizer.decay_on == SCRIPTS["decay_on"]
    assert optimizer.warmup_steps == train["warmup_steps"] and optimizer.warmup_fraction is None
    assert optimizer.schedule == train["lr_scheduler"]

    trainer = config.trainer
    tokens = train["micro_batch_size"] * train["gradient_accumulation"] * GPUS * model["n_positions"]
    batch = callback(config, "GlobalBatch")
    assert batch.tokens == tokens and batch.samples is None
    assert trainer.max_steps == train["total_tokens"] // tokens  # transformer_*.py: total_tokens // tokens_per_batch
    assert config.data.init_args.batch_size == train["micro_batch_size"]
    assert trainer.accumulate_grad_batches == 1  # derived: gradient_accumulation on 8 devices
    assert batch.val_every_n_steps == train["eval_interval"] and trainer.check_val_every_n_epoch is None
    assert trainer.log_every_n_steps == train["log_interval"]
    assert callback(config, "ModelCheckpoint").every_n_train_steps == train["save_interval"]
    assert trainer.gradient_clip_val == train["grad_clip"] and trainer.precision == SCRIPTS["precision"]
    assert config.seed_everything == train["seed"]

    class EightDevices:  # the paper's run: 8 processes
        world_size = GPUS

    assert GlobalBatch(tokens=batch.tokens).accumulation(EightDevices(), config_data(config)) == train[
        "gradient_accumulation"]


def config_data(config):
    """The parsed data settings as an object with the datamodule's attributes (batch_size, seq_len)."""

    class Data:
        batch_size = config.data.init_args.batch_size
        seq_len = config.data.init_args.seq_len

    return Data()


# ------------------------------------------------------------------------------------------------- GPT options
def gpt(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=3, n_head=2, d_model=16, max_seq_len=8, vocab_size=20, **options)
    return GPT(config, AttentionConfig())


def test_gpt_options_default_to_todays_model_and_each_does_what_it_says():
    """Defaults: tanh GELU, embedding dropout = dropout, residual projections scaled. ``gelu: exact`` is erf GELU;
    ``residual_scaling: false`` draws the same numbers without the 1/sqrt(2L) factor; ``embedding_dropout``
    drops the embeddings apart from the blocks' residual dropout."""
    today, exact = gpt(), gpt(gelu="exact")
    x = torch.randn(4, 16) * 3
    mlp = today.blocks[0].mlp
    torch.testing.assert_close(mlp.act(x), F.gelu(x, approximate="tanh"), rtol=0, atol=0)
    torch.testing.assert_close(exact.blocks[0].mlp.act(x), F.gelu(x), rtol=0, atol=0)
    assert not torch.equal(F.gelu(x), F.gelu(x, approximate="tanh"))

    unscaled = gpt(residual_scaling=False)
    scaled_names = 0
    for (name, a), (_, b) in zip(today.named_parameters(), unscaled.named_parameters(), strict=True):
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            torch.testing.assert_close(b, a * (2 * 3) ** 0.5, rtol=1e-6, atol=0, msg=name)
            scaled_names += 1
        else:
            assert torch.equal(a, b), name
    assert scaled_names == 2 * 3

    assert gpt(dropout=0.1).dropout.p == 0.1  # today: the embeddings get the residual dropout
    model = gpt(dropout=0.0, embedding_dropout=0.5).train()
    assert all(m.p == 0.0 for m in model.blocks.modules() if isinstance(m, torch.nn.Dropout))
    idx = torch.arange(8).view(1, 8)
    first, second = model(idx), model(idx)
    assert not torch.equal(first, second)  # the embedding dropout draws a new mask each call
    model = gpt(dropout=0.3, embedding_dropout=0.0).train()
    embedded = model.embed(idx) + model.position(torch.arange(8))
    assert torch.equal(model.dropout(embedded), embedded)  # no embedding dropout, residual dropout 0.3
    assert {m.p for m in model.blocks.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    with pytest.raises(ConfigError, match="network.embedding_dropout"):
        GPTConfig(embedding_dropout=1.0)
    with pytest.raises(ConfigError, match="network.gelu"):
        GPTConfig(gelu="erf")


# ------------------------------------------------------------------------------------------------ global batch
class RecordBatches(L.Callback):
    """Writes ``rank<R>.json`` into ``out``: the accumulation, optimiser steps, training batches and validations."""

    def __init__(self, out: str) -> None:
        self.out, self.batches, self.validations = Path(out), 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validations += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"accumulate": trainer.accumulate_grad_batches, "steps": trainer.global_step,
                  "batches": self.batches, "validations": self.validations, "world_size": trainer.world_size}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def global_batch_args(folder: Path, tokens: int, steps: int = 2) -> list[str]:
    """The tiny synthetic fit (8 lists of 8 digits a micro-batch) with a GlobalBatch of ``tokens`` tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    return [*synthetic_args(folder, name="batch", steps=steps),
            "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "null",
            "--trainer.callbacks+=qkv_lightning.callbacks.global_batch.GlobalBatch",
            "--trainer.callbacks.tokens", str(tokens), "--trainer.callbacks.val_every_n_steps", "1",
            "--trainer.callbacks+=tests.test_paper_configs.RecordBatches",
            "--trainer.callbacks.out", str(folder / "record")]


def test_global_batch_in_tokens_derives_the_accumulation_on_one_process(tmp_path):
    """192 tokens = 1 process x 8 lists x 8 tokens x 3: a real fit accumulates 3 micro-batches per step (6 batches
    for 2 steps) and validates after every optimiser step; 100 tokens is a ConfigError naming the settings."""
    assert main(["fit", *global_batch_args(tmp_path, 192)]) == 0
    record = json.loads((tmp_path / "record" / "rank0.json").read_text())
    assert record == {"accumulate": 3, "steps": 2, "batches": 6, "validations": 2, "world_size": 1}

    (tmp_path / "bad").mkdir()
    with pytest.raises(ConfigError, match=r"100 tokens \(GlobalBatch.tokens\).*data.batch_size=8 x data.seq_len=8"):
        QKVLightningCLI(args=["fit", *global_batch_args(tmp_path / "bad", 100)], run=True)
    assert not (tmp_path / "bad" / "logs").exists()  # refused before the run wrote anything


def test_global_batch_counts_every_process_of_a_ddp_trainer():
    """A real 2-process DDP Trainer (not launched): 384 tokens = 2 x 8 lists x 8 tokens x 3 gives 3; 192 tokens is
    1.5 passes of the two processes, a ConfigError naming the device count and the micro-batch."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    data = SyntheticSequenceData(task="sort", seq_len=8, batch_size=8)
    assert trainer.world_size == 2 and GlobalBatch(tokens=384).accumulation(trainer, data) == 3
    with pytest.raises(ConfigError, match=r"2 device\(s\) x data.batch_size=8 x data.seq_len=8 = 128 tokens"):
        GlobalBatch(tokens=192).accumulation(trainer, data)


@pytest.mark.slow
def test_global_batch_in_tokens_derives_the_accumulation_on_two_processes(tmp_path):
    """Under DDP with 2 CPU processes, 384 tokens = 2 processes x 8 lists x 8 tokens x 3: each rank accumulates 3
    micro-batches per step (6 for 2 steps) and validates after each step."""
    strategy = ["--config", str(CONFIGS / "strategy" / "ddp.yaml"), "--trainer.accelerator", "cpu",
                "--trainer.devices", "2"]
    command = [sys.executable, str(ROOT / "cli.py"), "fit", *global_batch_args(tmp_path, 384), *strategy,
               "--data.init_args.train_size", "128"]  # 8 micro-batches per rank and epoch: 2 steps within one epoch
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / "record" / f"rank{rank}.json").read_text())
        assert record == {"accumulate": 3, "steps": 2, "batches": 6, "validations": 2, "world_size": 2}


# ------------------------------------------------------------------------------- variants, cache cuts, FLOPs
PAPER_VARIANTS = {  # configs/variants/<file>: (sharing, K/V heads, the paper's name)
    "gqa-4.yaml": ("QKV", 4, "GQA-4"), "q-gqa-4.yaml": ("Q-K=V", 4, "Q-GQA-4"),
    "gqa-8.yaml": ("QKV", 8, "GQA-8"), "q-gqa-8.yaml": ("Q-K=V", 8, "Q-GQA-8"), "q-mqa.yaml": ("Q-K=V", 1, "Q-MQA"),
}
SPEC = '{"vocab_size": 50304, "seq_len": 2048}'


@pytest.mark.parametrize("file", sorted(PAPER_VARIANTS))
def test_paper_variant_configs_layer_on_the_paper_config(file):
    sharing, kv, paper = PAPER_VARIANTS[file]
    base = "paper-1.2b" if file.endswith("8.yaml") else "paper-300m"
    config = QKVLightningCLI.parse_only(["--config", str(CONFIGS / "lm" / f"{base}.yaml"),
                                         "--config", str(CONFIGS / "variants" / file)])
    attention = config.model.init_args.attention
    assert (attention.sharing, attention.n_kv_heads) == (sharing, kv)
    assert Variant(sharing, kv).paper_name == paper


def report_of(config: str, sharing: list[str], kv: list[int], count_masked: bool = True) -> dict:
    loaded = load_task([str(CONFIGS / "lm" / config)], data_spec=json.loads(SPEC), prepare=False)
    task = loaded.task
    variants = variants_of(task.attention_config, task.network_config.n_head, sharing, kv)
    return report_data(loaded, variants, count_masked=count_masked)


def test_report_gives_the_papers_cache_cuts_and_flops_in_its_convention():
    """paper-300m: GQA-4 cuts the KV cache by 75%, Q-GQA-4 by 87.5%, Q-MQA by 96.9% (exactly 1 - 1/32); paper-1.2b:
    GQA-8 75%, Q-GQA-8 87.5%. Parameters and, with --count_masked, forward FLOPs of a 2048-token sequence equal the
    authors' comprehensive_flop_analysis_300M.json (forward FLOPs = 2 x its theoretical MACs); without it, exactly the
    masked half of QK^T and PV (per layer 2 products x 2 FLOPs x d_model x T(T-1)/2) is left out."""
    data = report_of("paper-300m.yaml", ["QKV", "Q-K=V", "Q=K=V"], [4, 1])
    rows = {v["paper_name"]: v for v in data["variants"]}
    cuts = {name: rows[name]["kv_cache_cut"] for name in ("QKV", "GQA-4", "Q-GQA-4", "Q-MQA")}
    assert cuts == {"QKV": 0.0, "GQA-4": 0.75, "Q-GQA-4": 0.875, "Q-MQA": 0.96875}
    text = format_report(data)
    for line, cut in (("QKV_kv4 (GQA-4)", "75.0%"), ("Q-K=V_kv4 (Q-GQA-4)", "87.5%"),
                      ("Q-K=V_kv1 (Q-MQA)", "96.9%")):
        (row,) = [r for r in text.splitlines() if r.startswith(line + " ")]
        assert row.split()[-1] == cut
    assert "counting the full T x T score matrix as the paper does" in text
    # comprehensive_flop_analysis_300M.json: "QKV", "KV" (two projections) and "K" (one) at seq_len 2048
    authors = {"QKV": (305534976, 83968000, 792689901568), "Q-K=V": (284542976, 62976000, 749740228608),
               "Q=K=V": (263550976, 41984000, 706790555648)}
    for name, (params, attention, macs) in authors.items():
        assert (rows[name]["params_total"], rows[name]["params_attention"]) == (params, attention)
        assert rows[name]["forward_flops_per_sample"] == 2 * macs, name
    ours = {v["paper_name"]: v for v in report_of("paper-300m.yaml", ["QKV"], [], count_masked=False)["variants"]}
    t, d, layers = 2048, 1024, 20
    assert rows["QKV"]["forward_flops_per_sample"] - ours["QKV"]["forward_flops_per_sample"] == (
        layers * 2 * 2 * d * t * (t - 1) // 2)

    big = {v["paper_name"]: v for v in report_of("paper-1.2b.yaml", ["QKV", "Q-K=V"], [8])["variants"]}
    assert (big["GQA-8"]["kv_cache_cut"], big["Q-GQA-8"]["kv_cache_cut"]) == (0.75, 0.875)
