"""Decoding with the KV cache: long-context cached decoding against the full forward pass for every variant and RoPE
K=V cache scheme, the static cache (and its compiled step) against eager, exported graphs against eager, the
memory-budget batch under a limit the test enforces, and the bench-decode command."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkv_lightning.accounting import AttentionShape, kv_cache_bytes_per_token
from qkv_lightning.bench.decode_memory import (
    computed_largest_batch,
    largest_batch,
    model_spec,
    param_bytes,
    parse_bytes,
)
from qkv_lightning.cli import main
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn import kv_cache
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.cost import attention_shapes
from qkv_lightning.nn.decoding import StaticDecoder
from qkv_lightning.nn.gpt import GPT, GPTConfig
from qkv_lightning.nn.kv_cache import parse_rope_keys
from qkv_lightning.nn.sharing import CANONICAL_VARIANTS

ROOT = Path(__file__).resolve().parents[1]
CASES = [(v, None) for v in CANONICAL_VARIANTS] + [("QKV", 2), ("Q-K=V", 1)]
SCHEMES = ("on_read", "copy", "window:20")
POSITIONS = ["rope", "rope_rf0.5", "rope_rk4", "learned", "none"]
"""Positions of the decoding tests: full RoPE, partial rotary (half of each head), a decoupled rotary key of 4
dimensions, learned absolute positions and none (NoPE)."""
ROPE_OPTIONS = {"rf": "rope_fraction", "rk": "rope_key_dim"}

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_shapes(model: GPT) -> tuple[AttentionShape, ...]:
    c = model.config
    return attention_shapes(c.d_model, c.n_head, model.trunk.attention, c.bias, c.n_layer)


def model_for(variant: str, n_kv: int | None, position: str, max_seq_len: int = 96, **network) -> GPT:
    """A small double-precision GPT; ``position`` is a network position, ``rope_rf0.5`` (rope_fraction 0.5) or
    ``rope_rk4`` (rope_key_dim 4)."""
    torch.manual_seed(0)
    position, _, option = position.partition("_")
    rope = {ROPE_OPTIONS[option[:2]]: float(option[2:]) if option[:2] == "rf" else int(option[2:])} if option else {}
    attention = AttentionConfig(sharing=variant, n_kv_heads=n_kv, score_encoding=variant == "Q=K-V",
                                mask_self=variant == "Q=K=V", **rope)
    config = GPTConfig(**{**dict(n_layer=2, n_head=4, d_model=32, d_mlp=48, max_seq_len=max_seq_len, vocab_size=50,
                                 init_std=0.3, position=position), **network})
    return GPT(config, attention).double().eval()


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize(("variant", "n_kv"), CASES)
def test_long_context_cached_decoding_equals_the_full_forward_pass(variant, n_kv, position):
    model = model_for(variant, n_kv, position)
    tokens = torch.randint(0, 50, (2, 90), generator=torch.Generator().manual_seed(1))
    full = model(tokens)  # (B, T, V)
    rotates = model.blocks[0].attn.kv_shared and position in ("rope", "rope_rf0.5")  # K=V keys rotated on read
    schemes = SCHEMES if rotates else ("on_read",)
    with torch.inference_mode():  # the decoding path: keys rotated on read into the shared workspace
        for scheme in schemes:
            caches = model.new_caches(2, 90, rope_keys=scheme)
            steps = [model(tokens[:, :60], caches)] + [model(tokens[:, t : t + 1], caches) for t in range(60, 90)]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10, msg=scheme)
            copied = {"on_read": 0.0, "copy": 1.0, "window:20": 20 / 90}[scheme] if rotates else 0.0
            per_token = sum(kv_cache_bytes_per_token(shape, 8, copied=copied) for shape in layer_shapes(model))
            assert sum(c.nbytes for c in caches) == pytest.approx(2 * 90 * per_token, rel=1e-12)  # closed form
            kept = caches[0].rotated
            if scheme == "copy":  # a rotated copy of the rotated dimensions (half of them with rope_fraction 0.5)
                copy = 2 if position == "rope" else 1.5
                assert kept.shape[2] == 90 and sum(c.nbytes for c in caches) == copy * sum(
                    b.numel() * 8 for c in caches for b in c.buffers)
            elif scheme == "window:20":
                assert kept.shape[2] == 20
            else:
                assert kept is None
    assert caches[0].length == 90


@pytest.mark.parametrize("n_kv", [None, 2, 1])
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_partial_rotary_k_equal_v_decoding_block_by_block_equals_the_full_forward_pass(monkeypatch, n_kv, backend):
    """Q-K=V with rope_fraction 0.5: each decoding step scores the rotated dimensions block by block (blocks of 16
    positions here, so 90 tokens take 6) without rotating the cache; every rope_keys scheme, the dynamic cache under
    inference mode and with autograd on, and the static cache with and without its workspace, equal the full forward
    pass."""
    monkeypatch.setattr(kv_cache, "ROTARY_SCORE_BLOCK", 16)
    model = model_for("Q-K=V", n_kv, "rope_rf0.5")
    for block in model.blocks:
        block.attn.config = dataclasses.replace(block.attn.config, backend=backend)
    tokens = torch.randint(0, 50, (2, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)  # (B, T, V)
    for grad, scheme in [(False, "on_read"), (False, "copy"), (False, "window:20"), (True, "window:20")]:
        with torch.inference_mode(not grad), torch.set_grad_enabled(grad):
            caches = model.new_caches(2, 90, rope_keys=scheme)
            steps = [model(tokens[:, :50], caches)] + [model(tokens[:, t : t + 1], caches) for t in range(50, 90)]
        assert steps[-1].requires_grad == grad
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10, msg=scheme)
    with torch.inference_mode():
        for scheme, workspace in [("on_read", True), ("on_read", False), ("copy", True)]:
            decoder = StaticDecoder(model, 90, rope_keys=scheme, workspace=workspace)
            logits, cache = decoder.prefill(tokens[:, :50])
            for t in range(50, 90):
                torch.testing.assert_close(logits, full[:, t - 1], rtol=1e-10, atol=1e-10, msg=scheme)
                logits, cache = decoder.step(tokens[:, t : t + 1], torch.tensor([t]), cache)


LLAMA_TRUNKS = {
    "llama": dict(norm="rms", mlp="swiglu", bias=False, tie_embeddings=False, rope_base=500.0),
    "qwen2": dict(norm="rms", mlp="swiglu", bias=False, qkv_bias=True, rope_base=1e6),
}


@pytest.mark.parametrize("trunk", list(LLAMA_TRUNKS))
@pytest.mark.parametrize(("variant", "n_kv"), [("QKV", 2), ("QKV", None), ("Q-K=V", 2)])
def test_llama_style_trunks_decode_with_every_cache_as_their_full_forward_pass(trunk, variant, n_kv):
    """RMSNorm, SwiGLU, q/k/v-only biases, their own RoPE base, untied head: the dynamic cache (each K=V RoPE scheme)
    and the static cache give the full forward pass's logits."""
    model = model_for(variant, n_kv, "rope", **LLAMA_TRUNKS[trunk])
    assert isinstance(model.blocks[0].norm_mlp, torch.nn.RMSNorm) and model.blocks[0].mlp.gate.bias is None
    assert (model.blocks[0].attn.qkv.bias is not None) == (trunk == "qwen2") and model.blocks[0].attn.proj.bias is None
    tokens = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    full = model(tokens)  # (B, T, V)
    with torch.inference_mode():
        for scheme in SCHEMES if model.blocks[0].attn.kv_shared else ("on_read",):
            caches = model.new_caches(2, 40, rope_keys=scheme)
            steps = [model(tokens[:, :25], caches)] + [model(tokens[:, t : t + 1], caches) for t in range(25, 40)]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10, msg=scheme)
        decoder = StaticDecoder(model, 40)
        logits, cache = decoder.prefill(tokens[:, :25])
        for t in range(25, 40):
            torch.testing.assert_close(logits, full[:, t - 1], rtol=1e-10, atol=1e-10)
            logits, cache = decoder.step(tokens[:, t : t + 1], torch.tensor([t]), cache)


def test_rope_schemes_keep_k_equal_v_caches_at_half_the_bytes_unless_a_copy_is_asked_for():
    qkv = model_for("QKV", None, "rope").new_caches(1, 64)
    kv = model_for("Q-K=V", None, "rope")
    assert sum(c.nbytes for c in kv.new_caches(1, 64)) * 2 == sum(c.nbytes for c in qkv)
    assert sum(c.nbytes for c in kv.new_caches(1, 64, rope_keys="copy")) == sum(c.nbytes for c in qkv)
    assert sum(c.nbytes for c in kv.new_caches(1, 64, rope_keys="window:16")) * 64 == sum(c.nbytes for c in qkv) * 40
    learned = model_for("Q-K=V", None, "learned")  # no rotary positions: nothing to copy
    assert all(c.rotated is None for c in learned.new_caches(1, 64, rope_keys="copy"))
    assert parse_rope_keys("window:99", 64) == 64
    with pytest.raises(ConfigError, match="rope_keys='twice'"):
        parse_rope_keys("twice", 64)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize(("variant", "n_kv"), CASES)
def test_static_cache_steps_equal_the_dynamic_cache(variant, n_kv, position):
    model = model_for(variant, n_kv, position)
    prompt = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    reference = model.generate(prompt, 20, use_cache=False)
    rotates = model.blocks[0].attn.kv_shared and position in ("rope", "rope_rf0.5")
    schemes = ("on_read", "copy") if rotates else ("on_read",)
    with torch.inference_mode():
        for scheme in schemes:
            for workspace in (False, True):
                decoder = StaticDecoder(model, 30, rope_keys=scheme, workspace=workspace)
                assert torch.equal(decoder.generate(prompt, 20), reference)
                caches = model.new_caches(2, 30)
                eager = model(reference[:, :7], caches)[:, -1]
                logits, cache = decoder.prefill(reference[:, :7])
                assert len(cache) == sum(decoder.tensors_per_layer())
                shapes = [shape for layer in decoder.cache_shapes(2) for shape in layer]
                assert [tuple(t.shape) for t in cache] == shapes == [tuple(t.shape) for t in decoder.new_cache(2)]
                assert sum(t.numel() * 8 for t in cache) == decoder.cache_bytes(2)  # closed form = measured
                for t in range(7, 26):
                    torch.testing.assert_close(logits, eager, rtol=1e-10, atol=1e-10)
                    eager = model(reference[:, t : t + 1], caches)[:, -1]
                    logits, cache = decoder.step(reference[:, t : t + 1], torch.tensor([t]), cache)


@pytest.mark.parametrize(("variant", "n_kv", "position"), [("Q-K=V", 1, "rope"), ("Q=K-V", None, "learned"),
                                                           ("Q=K=V", None, "rope")])
def test_static_steps_at_one_position_per_sequence_equal_each_sequence_alone(variant, n_kv, position):
    """Requests of different lengths in one batch (the serving loop): each row decodes as if it were alone."""
    model = model_for(variant, n_kv, position)
    decoder = StaticDecoder(model, 24, workspace=True)
    prompts = [torch.randint(0, 50, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 11)]
    with torch.inference_mode():
        cache = decoder.new_cache(2)
        tokens, pos = torch.zeros(2, 1, dtype=torch.long), torch.tensor([5, 11])
        for row, prompt in enumerate(prompts):
            logits, filled = decoder.prefill(prompt)
            for target, source in zip(cache, filled, strict=True):
                target[row : row + 1] = source
            tokens[row] = logits.argmax(dim=-1)
        together = [tokens.clone()]
        for _ in range(8):
            logits, cache = decoder.step(tokens, pos, cache)
            tokens, pos = logits.argmax(dim=-1, keepdim=True), pos + 1
            together.append(tokens.clone())
    joint = torch.cat(together, dim=1)  # (2, 9)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt, 9, use_cache=False)[:, prompt.shape[1]:]
        assert torch.equal(joint[row : row + 1], alone)


@pytest.mark.slow
def test_compiled_static_step_equals_eager():
    model = model_for("Q-K=V", 2, "rope").float()
    decoder = StaticDecoder(model, 24)
    compiled = torch.compile(decoder.step, dynamic=False)
    prompt = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits, cache = decoder.prefill(prompt)
        eager_logits, eager_cache = decoder.prefill(prompt)
        token = logits.argmax(dim=-1, keepdim=True)
        for t in range(6, 20):
            logits, cache = compiled(token, torch.tensor([t]), cache)
            eager_logits, eager_cache = decoder.step(token, torch.tensor([t]), eager_cache)
            torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
            token = eager_logits.argmax(dim=-1, keepdim=True)
        for a, b in zip(cache, eager_cache, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("variant", "n_kv", "position", "per_layer"), [("Q-K=V", None, "rope", 1),
                                                                        ("QKV", 2, "learned", 2),
                                                                        ("Q-K=V", None, "rope_rf0.5", 1),
                                                                        ("Q-K=V", 2, "rope_rk4", 2),
                                                                        ("QKV", None, "rope_rk4", 3)])
def test_exported_graphs_equal_eager_decoding_token_by_token(variant, n_kv, position, per_layer):
    from qkv_lightning.export import check_exported, export_graphs

    model = model_for(variant, n_kv, position).float()
    exported = export_graphs(model, 24, 6, 2)
    assert exported["layout"]["tensors_per_layer"] == [per_layer, per_layer]
    rope_key = [[2, 1, 24, 4]] if position == "rope_rk4" else []  # the decoupled rotary key's cache
    layer = [[2, n_kv or 4, 24, 8]] * (per_layer - len(rope_key)) + rope_key
    assert exported["layout"]["cache_shapes"] == layer * 2
    check = check_exported(model, exported["prefill"], exported["step"], exported["prompt"], 12)
    assert check["tokens_equal"] and check["max_abs_logit_diff"] < 1e-4 * max(1.0, check["max_abs_logit"])
    # the decode-step graph takes the cache as inputs and returns it: its outputs are logits plus one per input
    signature = exported["step"].graph_signature
    assert len(signature.user_outputs) == 1 + 2 * per_layer and len(signature.user_inputs) == 2 + 2 * per_layer


def test_static_decoder_and_export_refuse_a_rope_keys_window(tmp_path, capsys):
    """A static cache (and so ``export``) has no window layout: ``rope_keys=window:W`` with W below the capacity is a
    one-paragraph error naming rope_keys, not an export of another layout (a window as wide as the cache is exactly
    the copy layout). Through the real export command: exit 2, nothing written, the checkpoint unchanged."""
    model = model_for("Q-K=V", None, "rope", max_seq_len=32).float()
    copy = StaticDecoder(model, 32, rope_keys="copy").tensors_per_layer()
    assert copy == [2, 2] and StaticDecoder(model, 32).tensors_per_layer() == [1, 1]
    for window in (1, 8, 31):
        with pytest.raises(ConfigError, match=rf"rope_keys='window:{window}': a static cache takes on_read or copy"):
            StaticDecoder(model, 32, rope_keys=f"window:{window}")
    assert StaticDecoder(model, 32, rope_keys="window:32").tensors_per_layer() == copy
    from qkv_lightning.tasks.language_model import LanguageModel

    network = GPTConfig(n_layer=2, n_head=4, d_model=32, d_mlp=48, max_seq_len=32, vocab_size=50, position="rope")
    task = LanguageModel(network=network, attention=AttentionConfig(sharing="Q-K=V"), data_spec={"vocab_size": 50})
    task.configure_model()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "exported"
    capsys.readouterr()
    assert main(["export", "--ckpt_path", str(path), "--out", str(out), "--rope_keys", "window:8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "rope_keys='window:8'" in err and "\n\n" not in err and "Traceback" not in err
    assert not out.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == digest


@pytest.mark.slow
def test_export_command_writes_checked_graphs_and_never_overwrites(tmp_path, capsys):
    from qkv_lightning.tasks.language_model import LanguageModel

    network = GPTConfig(n_layer=2, n_head=4, d_model=32, d_mlp=48, max_seq_len=32, vocab_size=50, position="rope")
    task = LanguageModel(network=network, attention=AttentionConfig(sharing="Q-K=V"), data_spec={"vocab_size": 50})
    task.configure_model()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    out = tmp_path / "exported"
    args = ["export", "--ckpt_path", str(path), "--out", str(out), "--prompt_len", "5", "--check_tokens", "6"]
    assert main(args) == 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["tensors_per_layer"] == [1, 1] and manifest["check"]["tokens_equal"]
    program = torch.export.load(out / "decode_step.pt2")
    assert len(program.graph_signature.user_inputs) == 2 + 2
    assert main(args) == 2
    assert "nothing is overwritten" in capsys.readouterr().err


CHILD = """
import json, resource, sys, torch
from qkv_lightning.bench.decode_memory import fit_step, param_bytes, rebuild
from qkv_lightning.bench.memory import proc_status
torch.set_num_threads(1)
job = json.loads(sys.argv[1])
model = rebuild(job["spec"], torch.device("cpu"))
fit_step(model, 1, job["capacity"], "on_read")
held = proc_status("VmData")
resource.setrlimit(resource.RLIMIT_DATA, (held + job["budget"] - param_bytes(model), resource.RLIM_INFINITY))
try:
    fit_step(model, job["batch"], job["capacity"], "on_read")
    print("FITS")
except (RuntimeError, MemoryError):
    print("DOES NOT FIT")
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc are Linux's")
@pytest.mark.parametrize("variant", ["Q-K=V"])
def test_the_largest_batch_for_a_budget_fits_and_one_more_does_not(variant):
    model = model_for(variant, None, "rope", max_seq_len=2048, d_model=128, d_mlp=256, vocab_size=64).float()
    budget = param_bytes(model) + 40 * 2**20  # weights + 40 MiB; a K=V cache is 2 MiB per sequence here
    found = largest_batch(model, 2048, "on_read", budget, torch.device("cpu"))
    batch = found["checked"]
    assert batch >= 5 and abs(found["computed"] - batch) <= max(2, 0.3 * batch)
    assert found["computed"] == computed_largest_batch(model, 2048, "on_read", budget)

    def under_the_budget(n: int) -> bool:  # the test's own limit on a fresh process's data segment
        job = json.dumps({"spec": model_spec(model), "capacity": 2048, "budget": budget, "batch": n})
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        result = subprocess.run([sys.executable, "-c", CHILD, job], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.strip().endswith("FITS") and "DOES NOT" not in result.stdout

    assert under_the_budget(batch)
    assert not under_the_budget(batch + 1)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory probe reads Linux's /proc")
@pytest.mark.usefixtures("plain_argv")
def test_bench_decode_memory_budget_counts_the_weights_once_and_fits_sequences_in_the_rest(capsys):
    """With weights worth 16 sequences, ``bench-decode --memory_budget`` finds the largest batch that fits the budget
    minus the weights: computed exactly as the closed form written out here, checked by allocation close to it, and
    far from the batch the whole budget would give."""
    vocab, d, heads, mlp, layers, capacity = 8192, 64, 4, 128, 2, 58  # QKV, RoPE, tied embeddings, fp32
    per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp + mlp * d + d)  # 2 LNs, qkv, proj, MLP
    weights = 4 * (vocab * d + layers * per_layer + 2 * d)  # + the final LN
    cache = 4 * layers * 2 * d * capacity  # K and V of every layer at every position
    step = 4 * (d * capacity + 2 * vocab + 4 * (mlp + 3 * d) + 3 * heads * capacity)  # keys, logits, hidden, scores
    per_sequence = cache + step
    budget = weights + 6 * per_sequence + per_sequence // 2
    assert weights > 15 * per_sequence and budget // per_sequence == 22  # the whole budget: 22 sequences
    args = ["bench-decode", "--config", str(ROOT / "configs/bench/decode-gpt2-small.yaml"), "--model.network.n_layer",
            str(layers), "--model.network.d_model", str(d), "--model.network.n_head", str(heads),
            "--model.network.d_mlp", str(mlp), "--model.network.vocab_size", str(vocab), "--model.network.max_seq_len",
            "64", "--data_spec", json.dumps({"vocab_size": vocab, "seq_len": 64}), "--threads", "1", "--progress",
            "false", "--variants", "[QKV]", "--contexts", f"[{capacity - 2}]", "--new_tokens", "2", "--rounds", "1",
            "--warmup", "0", "--memory_budget", str(budget), "--format", "json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["setup"]["weights_bytes"] == weights
    (row,) = result["memory_budget"]["rows"]
    assert row["capacity"] == capacity and row["computed"] == 6  # (budget - weights) // per_sequence
    assert abs(row["checked"] - 6) <= 3  # allocated for real under the budget less the weights


def test_memory_amounts_parse_and_bad_ones_are_one_clear_error():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1e9") == 10**9
    with pytest.raises(ConfigError, match="--memory_budget='lots'"):
        parse_bytes("lots")


TINY = ["--config", str(ROOT / "configs/bench/decode-gpt2-small.yaml"), "--model.network.n_layer", "2",
        "--model.network.d_model", "32", "--model.network.n_head", "4", "--model.network.d_mlp", "64",
        "--model.network.vocab_size", "64", "--model.network.max_seq_len", "64", "--data_spec",
        '{"vocab_size": 64, "seq_len": 64}', "--threads", "1", "--progress", "false"]


@pytest.mark.usefixtures("plain_argv")
def test_bench_decode_memory_budget_refuses_a_rope_keys_window_before_measuring(capsys):
    """--memory_budget sizes a static cache, which has no window layout: a window:W contender is a one-paragraph
    error before anything is measured (it was a bare traceback from the memory probe after the timings)."""
    args = ["bench-decode", *TINY, "--variants", "[QKV, Q-K=V]", "--rope_keys", "[on_read, window:4]", "--contexts",
            "[8]", "--new_tokens", "2", "--rounds", "1", "--warmup", "0", "--memory_budget", "20MB"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "--rope_keys window:4: the static cache takes on_read or copy" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.usefixtures("plain_argv")
def test_bench_decode_command_measures_every_contender_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "results"
    args = ["bench-decode", *TINY, "--variants", "[QKV, Q-K=V]", "--n_kv_heads", "[2]", "--labels",
            "[QKV, Q-K=V, QKV_kv2]", "--rope_keys", "[on_read, copy]", "--contexts", "[8, 24]", "--batch_sizes",
            "[1, 2]", "--new_tokens", "3", "--rounds", "1", "--warmup", "0", "--serve", "true", "--serve_requests", "3",
            "--serve_prompt_lens", "[4, 12]", "--serve_new_tokens", "3", "--serve_slots", "2", "--out", str(out),
            "--format", "json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    cells = result["cells"]
    assert {c["name"] for c in cells} == {"QKV", "Q-K=V", "Q-K=V [copy]", "QKV_kv2"}
    assert len(cells) == 4 * 2 * 2
    for cell in cells:
        capacity = cell["context"] + 3
        assert cell["steps_timed"] == 2 and cell["decode_tokens_per_sec"] > 0
        shape = AttentionShape(32, 4, "Q-K=V" if "Q-K=V" in cell["name"] else "QKV", 2 if "_kv2" in cell["name"] else 4)
        per_token = 2 * kv_cache_bytes_per_token(shape, 4)  # fp32, two layers
        per_token *= 2 if "[copy]" in cell["name"] else 1  # the rotated copy
        assert cell["kv_cache_bytes"] == per_token * cell["batch"] * capacity
        if cell["name"] == "QKV":
            weights = result["setup"]["weights_bytes"]
            assert cell["bytes_read_per_token"] == int(weights / cell["batch"] + cell["context"] * per_token)
    ratios = {c["name"]: c["kv_bytes_ratio"] for c in cells}
    assert ratios == {"QKV": 1.0, "Q-K=V": 0.5, "Q-K=V [copy]": 1.0, "QKV_kv2": 0.5}
    assert all(c["decode_ratio"] == 1.0 for c in cells if c["name"] == "QKV")
    serving = {row["name"]: row for row in result["serving"]["rows"]}
    assert set(serving) == {"QKV", "Q-K=V", "QKV_kv2"}
    assert all(row["generated_tokens"] == 3 * 3 for row in serving.values())
    assert {p.name for p in out.iterdir()} == {"result.json", "table.md", "decode.png"}
    assert "| QKV |" in (out / "table.md").read_text()
    assert main(args) == 2  # the outputs exist: nothing is overwritten
    assert "nothing is overwritten" in capsys.readouterr().err
    bad = ["bench-decode", *TINY, "--contexts", "[64]", "--new_tokens", "4"]
    assert main(bad) == 2 and "max_seq_len=64" in capsys.readouterr().err
    assert main(["bench-decode", *TINY, "--contexts", "[8]", "--cache", "static", "--rope_keys", "[window:4]"]) == 2
    assert "static cache takes on_read or copy" in capsys.readouterr().err


@pytest.mark.usefixtures("plain_argv")
def test_bench_decode_baseline_is_the_variant_every_ratio_divides_by(capsys):
    """``--baseline QKV_kv1`` (a model shipped with fewer K/V heads than query heads): every ratio column divides by
    that variant's row, QKV itself need not be measured, the table names the baseline, and a baseline that is not
    among the variants is one error naming --baseline. Cache bytes per token, 4 heads of 8 channels, fp32, 2 layers:
    Q-K=V 4 tensors of a head, QKV_kv1 2, Q-K=V_kv1 1."""
    args = ["bench-decode", *TINY, "--variants", "[QKV, Q-K=V]", "--n_kv_heads", "[1]", "--labels",
            "[Q-K=V, QKV_kv1, Q-K=V_kv1]", "--baseline", "QKV_kv1", "--contexts", "[8]", "--new_tokens", "2",
            "--rounds", "1", "--warmup", "0"]
    assert main([*args, "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {c["name"]: c for c in result["cells"]}
    assert list(rows) == ["Q-K=V", "QKV_kv1", "Q-K=V_kv1"] and result["setup"]["baseline"] == "QKV_kv1"
    assert {name: row["kv_bytes_ratio"] for name, row in rows.items()} == {"Q-K=V": 2.0, "QKV_kv1": 1.0,
                                                                          "Q-K=V_kv1": 0.5}
    for row in rows.values():
        assert row["decode_ratio"] == row["decode_tokens_per_sec"] / rows["QKV_kv1"]["decode_tokens_per_sec"]
        assert row["prefill_ratio"] == row["prefill_tokens_per_sec"] / rows["QKV_kv1"]["prefill_tokens_per_sec"]
    assert main([*args, "--format", "markdown"]) == 0
    table = capsys.readouterr().out
    assert "| variant | context | prefill tok/s | x QKV_kv1 | decode tok/s | x QKV_kv1 |" in table
    assert "| QKV_kv1 | 8 |" in table and "| x QKV |" not in table
    assert main([a if a != "QKV_kv1" else "QKV" for a in args]) == 2  # QKV is left out by --labels
    error = capsys.readouterr().err
    assert "--baseline QKV, which is not among the variants ['Q-K=V', 'QKV_kv1', 'Q-K=V_kv1']" in error
