"""``bench``: ratios computed from given timings, the tables, and tiny runs of the command (no timing assertions)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from qkv_lightning.accounting import network_cost
from qkv_lightning.bench.common import load_task
from qkv_lightning.bench.models import Measured, format_bench, format_variants, summarise
from qkv_lightning.bench.overhead import overhead_summary
from qkv_lightning.bench.steps import first_batch, measure_gemm
from qkv_lightning.cli import main
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.gpt import GPTConfig
from tests.imagedata import write_cifar10
from tests.lm_fixtures import write_wikitext
from tests.run_fixtures import options, wikitext_data

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ["--config", str(ROOT / "configs/synthetic/reverse.yaml"), "--model.network.d_model", "16",
             "--data.batch_size", "4", "--data.seq_len", "8", "--data.train_size", "64"]
LM = ["--config", str(ROOT / "configs/lm/wikitext2-offline.yaml"), "--data", "random", "--data_spec",
      '{"vocab_size": 60, "seq_len": 12}', "--model.network.n_layer", "1", "--model.network.d_model", "16",
      "--model.network.d_mlp", "32", "--model.network.max_seq_len", "16", "--model.network.output", "linear",
      "--data.batch_size", "2"]
FAST = ["--steps", "1", "--warmup", "0", "--attention_repeats", "1", "--decode_repeats", "1", "--memory", "false"]


pytestmark = pytest.mark.usefixtures("one_thread", "plain_argv")


def costs() -> dict:
    config = GPTConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=50)
    return {name: network_cost(config, AttentionConfig(sharing=name), 16) for name in ("QKV", "Q-K=V", "Q=K=V")}


def test_summary_ratios_follow_from_the_given_timings():
    c = costs()
    measured = {
        "QKV": Measured(step_s=2.0, decode_s=4.0, peak_memory=1000, cache_bytes_per_token=512),
        "Q-K=V": Measured(step_s=1.5, decode_s=2.0, peak_memory=800, cache_bytes_per_token=256),
        "Q=K=V": Measured(step_s=1.0, decode_s=None, peak_memory=None),
    }
    rows = {r["name"]: r for r in summarise(c, measured, batch_samples=4, decode_tokens=8, gemm_flops=1e9)}
    qkv, kv, single = rows["QKV"], rows["Q-K=V"], rows["Q=K=V"]
    assert qkv["step_time_ratio"] == 1.0 and kv["step_time_ratio"] == 0.75 and single["step_time_ratio"] == 0.5
    flops_kv = c["Q-K=V"].train_flops(4) / c["QKV"].train_flops(4)
    assert kv["flops_ratio"] == pytest.approx(flops_kv)
    assert kv["time_over_flops_ratio"] == pytest.approx(0.75 / flops_kv)
    assert kv["samples_per_sec"] == pytest.approx(4 / 1.5)
    assert kv["tokens_per_sec"] == pytest.approx(4 * 16 / 1.5)
    assert kv["achieved_flops_per_sec"] == pytest.approx(c["Q-K=V"].train_flops(4) / 1.5)
    assert kv["gemm_fraction"] == pytest.approx(kv["achieved_flops_per_sec"] / 1e9)
    assert qkv["decode_tokens_per_sec"] == 2.0 and kv["decode_tokens_per_sec"] == 4.0 and kv["decode_ratio"] == 2.0
    assert single["decode_tokens_per_sec"] is None and single["decode_ratio"] is None
    assert kv["memory_ratio"] == 0.8 and single["memory_ratio"] is None
    assert kv["kv_bytes_ratio"] == 0.5 and single["kv_bytes_ratio"] == 0.5
    table = format_variants(list(rows.values()), "sequence", counts_tokens=True)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["variant", "step", "ms", "tokens/s"]
    kv_line = next(line for line in lines if line.startswith("Q-K=V"))
    assert kv_line.split()[1:4] == ["1500.0", "43", "0.750"]


def test_overhead_summary_is_the_ratio_of_medians():
    out = overhead_summary([1.0, 1.2, 1.1], [1.3, 1.2, 1.25], [1.3, 1.4, 5.0], flops_per_step=10**9, gemm_flops=2e9)
    assert out["plain_step_s"] == 1.1 and out["lightning_step_s"] == 1.25 and out["lightning_fit_step_s"] == 1.4
    assert out["lightning_over_plain"] == pytest.approx(1.25 / 1.1)
    assert out["lightning_fit_over_plain"] == pytest.approx(1.4 / 1.1)
    assert out["plain_gemm_fraction"] == pytest.approx(1e9 / 1.1 / 2e9)
    assert out["steps_timed"] == {"plain": 3, "lightning": 3, "lightning_fit": 3}


def test_gemm_measures_a_positive_rate():
    assert measure_gemm(torch.device("cpu"), torch.float32, 64, repeats=3) > 0


@pytest.mark.parametrize("kind", ["synthetic", "lm", "vit"])
def test_random_batches_come_from_the_task_with_the_shapes_and_types_of_the_data(kind, tmp_path):
    """``bench --data random``: each task's ``example_batch`` has the shapes and dtypes of its datamodule's first
    batch, and ids and labels within the network's vocabulary and classes."""
    if kind == "synthetic":
        configs, overrides = [SYNTHETIC[1]], SYNTHETIC[2:]
    elif kind == "lm":
        data = write_wikitext(tmp_path / "data")
        configs = [LM[1]]
        overrides = [*options("data", {**wikitext_data(data, tmp_path / "cache"), "batch_size": 2, "seq_len": 12}),
                     *options("model.network", {"n_layer": 1, "d_model": 16, "output": "linear"})]
    else:
        write_cifar10(str(tmp_path / "data"))
        configs = [str(ROOT / "configs/vit/cifar10.yaml")]
        overrides = ["--data.root", str(tmp_path / "data"), "--data.download", "false", "--data.num_workers", "0",
                     "--data.batch_size", "4", "--model.network.n_layer", "1"]
    loaded = load_task(configs, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small CIFAR files are "not the official" ones
        real = first_batch(loaded, "config")
    made = first_batch(loaded, "random")
    assert [(t.shape, t.dtype) for t in made] == [(t.shape, t.dtype) for t in real]
    config = loaded.task.resolved_network_config(loaded.data_spec)
    inputs, targets = made
    if not inputs.is_floating_point():
        assert 0 <= inputs.min() and inputs.max() < config.vocab_size
    classes = getattr(config, "num_classes", None) or config.vocab_size
    assert 0 <= targets.min() and targets.max() < classes
    assert torch.equal(made[0], first_batch(loaded, "random")[0])  # seeded: the same batch every time


def run_json(capsys, *args: str) -> dict:
    assert main(["bench", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_command_runs_every_variant_with_attention_core_gemm_and_overhead(capsys):
    result = run_json(capsys, *SYNTHETIC, *FAST, "--variants", "[QKV, Q=K=V]", "--n_kv_heads", "[2]", "--gemm", "true",
                      "--gemm_size", "64", "--lightning_overhead", "true", "--overhead_steps", "4", "--overhead_rounds",
                      "1")
    names = [row["name"] for row in result["variants"]]
    assert names == ["QKV", "Q=K=V", "QKV_kv2"]
    qkv = result["variants"][0]
    for row in result["variants"]:
        assert row["step_time_s"] > 0 and row["decode_tokens_per_sec"] is None  # an encoder: no decoding
        assert row["step_time_ratio"] == pytest.approx(row["step_time_s"] / qkv["step_time_s"])
        assert row["gemm_fraction"] == pytest.approx(row["achieved_flops_per_sec"] / result["gemm"]["flops_per_sec"])
        assert row["step_time_s"] == pytest.approx(sorted(row["step_times_s"])[0])  # one round: median = minimum
        assert row["step_time_ratio_best"] == pytest.approx(min(row["step_times_s"]) / min(qkv["step_times_s"]))
    setup = result["setup"]
    assert setup["threads"] == 1 and setup["batch_samples"] == 4 and setup["tokens_per_sample"] == 8
    attention = {row["name"] for row in result["attention_core"]}
    assert {"QKV", "Q=K=V", "nn.MultiheadAttention"} <= attention
    overhead = result["lightning_overhead"]
    assert overhead["steps_timed"] == {"plain": 1, "lightning": 1, "lightning_fit": 1}  # 4 steps, 2 skipped
    assert overhead["lightning_over_plain"] == pytest.approx(overhead["lightning_step_s"] / overhead["plain_step_s"])
    text = format_bench(result)
    assert "Lightning Trainer (bare)" in text and "GEMM peak" in text and "nn.MultiheadAttention" in text


def test_bench_decodes_language_models_with_caches_of_the_closed_form_size(capsys):
    result = run_json(capsys, *LM, *FAST, "--variants", "[QKV, Q-K=V]", "--decode_tokens", "3", "--attention", "false")
    rows = {row["name"]: row for row in result["variants"]}
    assert result["setup"]["decode"] == {"context": 13, "tokens": 3, "batch": 1}
    for row in rows.values():
        assert row["decode_tokens_per_sec"] > 0
        # fp32 caches (4 bytes) against the closed form at 2 bytes per element
        assert row["measured_cache_bytes_per_token"] == 2 * row["kv_cache_bytes_per_token"]
    assert rows["Q-K=V"]["kv_bytes_ratio"] == 0.5
    assert result["attention_core"] is None


@pytest.mark.slow
def test_bench_measures_memory_in_a_fresh_process_per_variant(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the child runs `python -m qkv_lightning.bench.models` from here
    result = run_json(capsys, *SYNTHETIC, *FAST[:-2], "--variants", "[QKV, Q=K=V]", "--attention", "false")
    assert all(row["peak_memory_bytes"] > 0 for row in result["variants"])
    assert result["variants"][0]["memory_ratio"] == 1.0
    assert "fresh process" in result["setup"]["memory"]


def test_bench_bad_input_is_one_clear_error(capsys):
    assert main(["bench", *SYNTHETIC, "--variants", "[Q=K=V]"]) == 2
    assert "keep QKV among --variants" in capsys.readouterr().err
    assert main(["bench", *SYNTHETIC, "--precision", "16-mixed"]) == 2
    assert "--precision" in capsys.readouterr().err
    # 3 steps per loop segment leave none to time after the 2 warm-up steps
    assert main(["bench", *SYNTHETIC, "--lightning_overhead", "true", "--overhead_steps", "3"]) == 2
    assert "--overhead_steps=3 must be at least 4" in capsys.readouterr().err
    assert main(["bench", *SYNTHETIC, "--steps", "0"]) == 2
    assert "--steps=0 must be at least 1" in capsys.readouterr().err
