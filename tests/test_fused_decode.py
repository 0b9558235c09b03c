"""``rope_keys: fused``: K=V decoding steps whose keys are rotated inside one Triton kernel
(:mod:`qkv_lightning.nn.fused_decode`), against written-out attention and the eager full forward pass.

Without a GPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, which Triton reads when the kernel
is defined, so in a fresh process); with a CUDA device the same checks run compiled. Where it cannot run, the
setting is one clear error naming ``rope_keys``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkv_lightning import cli
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.decoding import StaticDecoder
from qkv_lightning.nn.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[1]

CASES = [  # (sharing, K/V heads, rope_fraction, q_norm, k_norm)
    ("Q-K=V", None, 1.0, "none", "none"),
    ("Q-K=V", 2, 0.5, "none", "none"),
    ("Q-K=V", 1, 0.25, "rms", "none"),
    ("Q=K=V", None, 1.0, "none", "none"),
    ("Q=K=V", None, 0.5, "rms", "none"),
    ("Q-K=V", 2, 1.0, "none", "rms"),  # a norm on the keys only: keys are not values, so this layer decodes on_read
]


def written_out_attention(q: torch.Tensor, kv: torch.Tensor, rotated: int) -> torch.Tensor:
    """softmax(q . R(n) kv_n / sqrt(D)) kv with Hugging Face's partial rotary written out (positions 0 .. L-1,
    base 10000), GQA heads repeated: q (B, H, 1, D), kv (B, H_kv, L, D) -> (B, H, 1, D), in float64."""
    q, kv = q.double(), kv.double()
    length, dim = kv.shape[2], kv.shape[3]
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotated, 2, dtype=torch.float64) / rotated)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # (L, R)
    part = kv[..., :rotated]
    half = rotated // 2
    keys = torch.cat([part * cos + torch.cat([-part[..., half:], part[..., :half]], -1) * sin, kv[..., rotated:]], -1)
    repeat = q.shape[1] // kv.shape[1]
    keys, values = keys.repeat_interleave(repeat, dim=1), kv.repeat_interleave(repeat, dim=1)  # (B, H, L, D)
    weights = (q @ keys.transpose(-2, -1) / dim**0.5).softmax(dim=-1)  # (B, H, 1, L)
    return weights @ values


def model_for(sharing: str, n_kv: int | None, fraction: float, q_norm: str, k_norm: str) -> GPT:
    torch.manual_seed(0)
    attention = AttentionConfig(sharing=sharing, n_kv_heads=n_kv, rope_fraction=fraction, q_norm=q_norm,
                                k_norm=k_norm)
    config = GPTConfig(n_layer=2, n_head=4, d_model=64, d_mlp=64, max_seq_len=200, vocab_size=50, init_std=0.3,
                       position="rope")
    return GPT(config, attention).eval()


def fused_checks(device: str) -> None:
    """The checks, on ``device`` (run under the interpreter on CPU, or on CUDA): the kernel against written-out
    attention over several position splits, and fused decoding steps against the full forward pass for each case,
    with the kernel called once per layer and step exactly where the layer allows it."""
    from qkv_lightning.nn import fused_decode
    from qkv_lightning.nn.positional import rope_tables

    generator = torch.Generator().manual_seed(0)
    for bsz, heads, kv_heads, length, dim, rotated in [(2, 4, 4, 37, 16, 16), (1, 6, 2, 300, 16, 8),
                                                        (2, 4, 1, 5, 8, 4), (1, 3, 3, 130, 24, 4)]:
        q = torch.randn(bsz, heads, 1, dim, generator=generator).to(device)
        kv = torch.randn(bsz, kv_heads, length + 7, dim, generator=generator).to(device)[:, :, :length]  # a view
        cos, sin = (t.to(device) for t in rope_tables(torch.arange(length), rotated))
        out = fused_decode.rotary_decode_attention(q, kv, cos, sin)
        torch.testing.assert_close(out.double().cpu(), written_out_attention(q.cpu(), kv.cpu(), rotated),
                                   rtol=1e-5, atol=1e-5, msg=f"kernel, length {length}")

    calls = []
    kernel = fused_decode.rotary_decode_attention
    fused_decode.rotary_decode_attention = lambda *args: calls.append(1) or kernel(*args)
    tokens = torch.randint(0, 50, (2, 60), generator=generator).to(device)
    for case in CASES:
        model = model_for(*case).to(device)
        cache_bytes = {}
        with torch.inference_mode():
            full = model(tokens)  # (B, T, V): every key rotated by apply_rope, SDPA
            for scheme in ("fused", "on_read"):
                calls.clear()
                caches = model.new_caches(2, 60, rope_keys=scheme)
                steps = [model(tokens[:, :40], caches)] + [model(tokens[:, t : t + 1], caches) for t in range(40, 60)]
                torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4, msg=f"{case} {scheme}")
                fuses = scheme == "fused" and case[4] == "none"
                assert len(calls) == (2 * 20 if fuses else 0), (case, scheme, len(calls))
                assert [c.fused for c in caches] == [fuses, fuses]
                cache_bytes[scheme] = sum(c.nbytes for c in caches)
        assert cache_bytes["fused"] == cache_bytes["on_read"] == 2 * 2 * 60 * model.blocks[0].attn.n_kv_heads * 16 * 4
    print("fused decode checks passed")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (torch's Linux CUDA wheels ship it)")
def test_fused_decoding_equals_written_out_attention_and_the_full_pass_under_tritons_interpreter():
    """The kernel runs on the CPU under Triton's interpreter, in a fresh process (the interpreter is chosen when
    the kernel is defined)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.test_fused_decode import fused_checks; fused_checks('cpu')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fused decode checks passed" in done.stdout


def ptxas() -> Path | None:
    """The ptxas that Triton's NVIDIA backend ships, or None."""
    if not HAS_TRITON:
        return None
    spec = importlib.util.find_spec("triton.backends.nvidia")
    found = Path(spec.origin).parent / "bin" / "ptxas" if spec and spec.origin else None
    return found if found and found.is_file() else None


@pytest.mark.skipif(ptxas() is None, reason="Triton's NVIDIA backend (and its ptxas) is not installed")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_the_kernel_compiles_for_an_h100_with_its_tiles_in_registers(dtype, tmp_path):
    """Without a GPU: Triton compiles the kernel ahead of time for sm_90 (H100) at the tiles it launches with (head
    sizes 64 and 128, 1 to 16 query heads per K/V head, full and partial rotary), and ptxas reports no register
    spills (a tile too large for the registers spills to local memory: 16,384 elements did, with 148 bytes)."""
    import inspect
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qkv_lightning.nn import fused_decode

    kernel = fused_decode._rotary_decode_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    types = {name: f"*{dtype}" for name in names[:4]} | {name: "*fp32" for name in names[4:7]}
    types |= {name: "i32" for name in names[7:15]} | {"scale": "fp32"}
    for group, head_dim, rotary in [(1, 64, 64), (1, 64, 16), (3, 64, 16), (12, 64, 64), (1, 128, 128),
                                    (4, 128, 128), (16, 128, 32)]:
        block_g, block_d, block_n = fused_decode.block_sizes(group, head_dim)
        constants = dict(GROUP=group, HEAD_DIM=head_dim, ROTARY=rotary, BLOCK_G=block_g, BLOCK_D=block_d,
                         BLOCK_N=block_n)
        source = ASTSource(fn=kernel, signature={name: types.get(name, "constexpr") for name in names},
                           constexprs={(names.index(name),): value for name, value in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": fused_decode.NUM_WARPS})
        (tmp_path / "k.ptx").write_text(compiled.asm["ptx"])
        report = subprocess.run([str(ptxas()), "-arch=sm_90a", "-v", str(tmp_path / "k.ptx"), "-o",
                                 str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True).stderr
        spills = re.search(r"(\d+) bytes spill stores", report)
        assert spills and spills.group(1) == "0", (group, head_dim, rotary, report)


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA device and Triton")
def test_fused_decoding_on_a_gpu_equals_written_out_attention_and_the_full_pass():
    fused_checks("cuda")


@pytest.mark.usefixtures("plain_argv")
@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the fused step can run here")
def test_fused_keys_where_the_kernel_cannot_run_are_one_clear_error(capsys):
    model = model_for("Q-K=V", None, 1.0, "none", "none")
    with pytest.raises(ConfigError, match="rope_keys=fused") as caught:
        model.new_caches(1, 16, rope_keys="fused")
    assert "on_read" in str(caught.value)
    args = ["bench-decode", "--config", str(ROOT / "configs/bench/decode-gpt2-small.yaml"), "--model.network.n_layer",
            "1", "--model.network.d_model", "32", "--model.network.n_head", "4", "--model.network.d_mlp", "64",
            "--model.network.vocab_size", "64", "--model.network.max_seq_len", "64", "--data_spec",
            '{"vocab_size": 64, "seq_len": 64}', "--device", "cpu", "--variants", "[Q-K=V]", "--baseline", "Q-K=V",
            "--contexts", "[8]", "--new_tokens", "2", "--rounds", "1", "--warmup", "0", "--rope_keys", "[fused]",
            "--progress", "false"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "rope_keys=fused" in err and "Traceback" not in err


def test_a_static_cache_refuses_fused_keys():
    model = model_for("Q-K=V", None, 1.0, "none", "none")
    with pytest.raises(ConfigError, match="fused are steps of the dynamic cache"):
        StaticDecoder(model, 16, rope_keys="fused")
