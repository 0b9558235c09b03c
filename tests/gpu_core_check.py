"""GPU checks of the attention core: a script for a machine with a GPU, not collected by pytest (CI has none).

For every sharing variant x {MHA, GQA, MQA where valid} x {causal, bidirectional}, in bf16 autocast:
- forward and backward run with torch's flash-attention kernel alone (``sdpa_kernel(FLASH_ATTENTION)`` raises when a
  call cannot use it), and the output is close to the explicit fp32 path with the same weights;
- with the score encoding (an additive bias, which flash attention cannot take) SDPA's own choice of kernel runs.
For every variant, a GPT's KV-cached decoding equals the full forward pass on the GPU in fp32 (TF32 off).

    python tests/gpu_core_check.py
"""

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qkv_lightning.errors import ConfigError  # noqa: E402
from qkv_lightning.nn.attention import Attention, AttentionConfig  # noqa: E402
from qkv_lightning.nn.gpt import GPT, GPTConfig  # noqa: E402
from qkv_lightning.nn.sharing import CANONICAL_VARIANTS  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
device = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu runs the same code on the CPU
print("torch", torch.__version__, "device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
      flush=True)
failures = []


def attention_pair(variant: str, kv: int | None, causal: bool, score: bool = False):
    """The same weights twice: the SDPA path and the explicit fp32 reference."""
    config = AttentionConfig(sharing=variant, n_kv_heads=kv, score_encoding=score)
    torch.manual_seed(0)
    fused = Attention(512, 8, config, causal=causal).to(device)
    explicit = Attention(512, 8, dataclasses.replace(config, backend="explicit"), causal=causal).to(device)
    explicit.load_state_dict(fused.state_dict())
    return fused, explicit


def check_kernel(variant: str, kv: int | None, causal: bool, backend: SDPBackend | None, score: bool = False) -> None:
    try:
        fused, explicit = attention_pair(variant, kv, causal, score)
    except ConfigError:
        return  # Q shared with fewer K/V heads: rejected by design
    x = torch.randn(4, 256, 512, device=device, requires_grad=True)  # (B, T, C)
    reference = explicit(x)[0].detach()  # fp32, explicit softmax(QK^T)V
    try:
        kernels = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        with torch.autocast(device.type, dtype=torch.bfloat16), kernels:
            out = fused(x)[0]  # (B, T, C)
            out.float().square().mean().backward()
        error = ((out.float() - reference).abs().max() / reference.abs().max()).item()
        grads = all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())
        ok = error < 2e-2 and grads
        line = (
            f"{'ok' if ok else 'FAIL'}  max rel. error vs fp32 explicit {error:.2e}, finite grads on all params {grads}"
        )
    except RuntimeError as e:  # no kernel of this backend can run the call
        ok, line = False, f"FAIL  {str(e).splitlines()[0][:160]}"
    kind = "causal" if causal else "bidir "
    name = f"{variant:6s} kv={kv!s:4s} {kind} {'score ' if score else ''}{backend.name if backend else 'SDPA default'}"
    print(f"{name:52s} {line}", flush=True)
    if not ok:
        failures.append(name)


start = time.time()
for variant in CANONICAL_VARIANTS:
    for kv in (None, 2, 1):
        for causal in (True, False):
            check_kernel(variant, kv, causal, SDPBackend.FLASH_ATTENTION)
for variant in ("Q=K-V", "Q=K=V"):  # an additive bias that needs a gradient: whichever kernel SDPA picks
    check_kernel(variant, None, False, None, score=True)

for variant in CANONICAL_VARIANTS:
    for kv in (None, 2):
        for position in ("learned", "rope"):
            try:
                config = GPTConfig(n_layer=2, n_head=8, d_model=256, d_mlp=1024, max_seq_len=128, vocab_size=512,
                                   position=position, dropout=0.0)
                torch.manual_seed(0)
                model = GPT(config, AttentionConfig(sharing=variant, n_kv_heads=kv)).to(device).eval()
            except ConfigError:
                continue
            idx = torch.randint(0, 512, (2, 96), device=device)
            with torch.no_grad():
                full = model(idx)  # (B, T, V)
                caches = model.new_caches(2)
                steps = [model(idx[:, :64], caches)] + [model(idx[:, t : t + 1], caches) for t in range(64, 96)]
            error = (torch.cat(steps, dim=1) - full).abs().max().item()
            nbytes = sum(c.nbytes for c in caches)
            ok = error < 1e-4
            name = f"GPT decode {variant:6s} kv={kv!s:4s} {position:7s}"
            print(f"{name:52s} {'ok' if ok else 'FAIL'}  cached vs full max abs diff {error:.2e}, cache {nbytes} B",
                  flush=True)
            if not ok:
                failures.append(name)

print(f"core checks: {len(failures)} failed ({time.time() - start:.1f} s): {failures}", flush=True)
sys.exit(1 if failures else 0)
