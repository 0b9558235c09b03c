"""Side-by-side timing of the attention core: every sharing variant, ``timm``'s ``Attention`` and
``torch.nn.MultiheadAttention``, forward plus backward, interleaved, medians after warm-up.

Run: ``python cli.py bench-attention [--d_model 384 --n_head 6 --seq_len 197 --batch_size 8 --causal false]``.
``--score_encodings '[none, paper, relative]'`` also times each variant with each score encoding and prints the
step-time ratio of each encoding to the same variant without one (and, on CUDA, the SDPA kernels each may use).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qkv_lightning.accounting import AttentionShape, attention_forward_flops, score_encoding_flops
from qkv_lightning.bench.timing import Timing, interleaved_medians
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import (
    CANONICAL_VARIANTS,
    Attention,
    AttentionConfig,
    canonical_score_encoding,
)
from qkv_lightning.variants import Variant


class _MHA(nn.Module):
    """``nn.MultiheadAttention`` used as self-attention, returning only the output."""

    def __init__(self, d_model: int, n_head: int, causal: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d_model, n_head, bias=True, batch_first=True)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device) if self.causal else None
        return self.mha(x, x, x, need_weights=False, attn_mask=mask, is_causal=self.causal)[0]


class _Ours(nn.Module):
    def __init__(self, attention: Attention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)[0]


class _Timm(nn.Module):
    def __init__(self, attention: nn.Module, causal: bool) -> None:
        super().__init__()
        self.attention, self.causal = attention, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, is_causal=self.causal) if self.causal else self.attention(x)


def contenders(
    d_model: int,
    n_head: int,
    causal: bool,
    variants: Sequence[str],
    n_kv_heads: int | None,
    score_encodings: Sequence[str] = ("none",),
) -> dict[str, tuple[nn.Module, int | None]]:
    """The modules to time, with their closed-form forward FLOPs where known (our variants, each with each score
    encoding: ``Q=K=V``, ``Q=K=V+score`` for the paper's, ``Q=K=V+relative``)."""
    modules: dict[str, tuple[nn.Module, int | None]] = {}
    for variant in variants:
        kv = None if Variant(variant).query_shared else n_kv_heads
        for mode in score_encodings:
            config = AttentionConfig(sharing=variant, n_kv_heads=kv, score_encoding=mode)
            label = Variant.of(config, n_head).label
            modules[label] = (_Ours(Attention(d_model, n_head, config, causal=causal)), 1)
    try:
        from timm.layers import Attention as TimmAttention

        modules["timm Attention"] = (_Timm(TimmAttention(d_model, n_head, qkv_bias=True), causal), None)
    except ImportError:  # the optional `bench` extra
        pass
    modules["nn.MultiheadAttention"] = (_MHA(d_model, n_head, causal), None)
    return modules


def bench_attention(
    d_model: int = 384,
    n_head: int = 6,
    seq_len: int = 197,
    batch_size: int = 8,
    causal: bool = False,
    variants: Sequence[str] = CANONICAL_VARIANTS,
    n_kv_heads: int | None = None,
    repeats: int = 30,
    warmup: int = 5,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    score_encodings: Sequence[str] = ("none",),
) -> list[Timing]:
    """Time forward+backward of the attention core against timm and torch.nn.MultiheadAttention, each contender on
    the same input; returns one timing each.

    Args:
        d_model: model width.
        n_head: query heads.
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
        causal: decoder (causal) instead of encoder attention.
        variants: sharing variants of the core to time.
        n_kv_heads: K/V heads for the variants that keep Q separate (GQA/MQA); None for MHA.
        repeats: timed rounds (each contender once per round, interleaved).
        warmup: untimed steps per contender first.
        device: torch device.
        dtype: float32, bfloat16 or float16.
        seed: seed of the input and the contenders' weights.
        score_encodings: score encodings to time each variant with (none, paper, relative); with more than
            none, ``bench-attention`` prints a second table giving each encoding's step time as a ratio to the same
            variant without one.
    """
    torch.manual_seed(seed)
    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    x = torch.randn(batch_size, seq_len, d_model, device=dev, dtype=torch_dtype, requires_grad=True)
    steps, flops = {}, {}
    modes = [canonical_score_encoding(mode) for mode in score_encodings]
    for name, (module, known) in contenders(d_model, n_head, causal, variants, n_kv_heads, modes).items():
        module.to(device=dev, dtype=torch_dtype).train()

        def step(module: nn.Module = module) -> None:
            module(x).sum().backward()

        steps[name] = step
        if known is not None:
            attention = module.attention
            shape = AttentionShape.from_config(d_model, n_head, attention.config)
            encoding = 2 * score_encoding_flops(shape, seq_len, seq_len)  # once per batch; its input needs no grad
            flops[name] = 3 * batch_size * attention_forward_flops(shape, seq_len, seq_len, causal) + encoding
    medians = interleaved_medians(steps, repeats, warmup, dev)
    return [Timing(name, medians[name] * 1e3, flops.get(name)) for name in steps]


def format_table(timings: list[Timing], reference: str = "QKV") -> str:
    """Markdown table with each time and FLOP count as a ratio to ``reference``."""
    ref = next(t for t in timings if t.name == reference)
    lines = [
        "| attention | fwd+bwd ms (median) | time / QKV | FLOPs / QKV |",
        "|---|---:|---:|---:|",
    ]
    for t in timings:
        flop_ratio = f"{t.flops / ref.flops:.3f}" if t.flops and ref.flops else "-"
        lines.append(f"| {t.name} | {t.median_ms:.3f} | {t.median_ms / ref.median_ms:.3f} | {flop_ratio} |")
    return "\n".join(lines)


def format_encoding_table(timings: list[Timing], modes: Sequence[str]) -> str:
    """Markdown table: one row per variant, its step time without a score encoding and each encoding's time as a
    ratio to it (the cost of the encoding on the same variant)."""
    by_name = {t.name: t for t in timings}
    others = [mode for mode in modes if mode != "none"]
    header = "| variant | none ms | " + " | ".join(f"{mode} ms | {mode} / none" for mode in others) + " |"
    lines = [header, "|---|---:|" + "---:|---:|" * len(others)]
    for t in timings:
        try:
            variant = Variant.parse(t.name)
        except ConfigError:  # timm's, torch's
            continue
        if variant.attention_config().score_encoding != "none":
            continue
        cells = [f"{t.median_ms:.3f}"]
        for mode in others:
            other = by_name.get(variant.with_settings(score_encoding=mode).label)
            cells += ["-", "-"] if other is None else [f"{other.median_ms:.3f}", f"{other.median_ms / t.median_ms:.3f}"]
        lines.append(f"| {t.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sdpa_kernels(
    d_model: int, n_head: int, seq_len: int, batch_size: int, causal: bool, mode: str, device: str, dtype: str
) -> list[str]:
    """The SDPA kernels (flash, efficient, cudnn, math) that accept a forward plus backward of the QKV core with
    score encoding ``mode`` on this CUDA device, each tried alone (the others disabled)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch_dtype = getattr(torch, dtype)
    attention = Attention(d_model, n_head, AttentionConfig(score_encoding=mode), causal=causal)
    attention = attention.to(device=device, dtype=torch_dtype)
    x = torch.randn(batch_size, seq_len, d_model, device=device, dtype=torch_dtype, requires_grad=True)
    names = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "math": SDPBackend.MATH,
    }
    usable = []
    for name, backend in names.items():
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                attention(x)[0].sum().backward()
            usable.append(name)
        except RuntimeError:
            pass
    return usable


def main(argv: Sequence[str] | None = None) -> int:
    """``bench-attention``: print the side-by-side table."""
    from qkv_lightning.command_line import function_args, torch_device

    settings = function_args("bench-attention", bench_attention, argv or [], positional=False)
    torch_device(settings["device"])  # a device this machine has
    modes = list(dict.fromkeys(canonical_score_encoding(mode) for mode in ["none", *settings["score_encodings"]]))
    timings = bench_attention(**{**settings, "score_encodings": modes})
    d_model, n_head, seq_len, batch_size, causal, device, dtype, repeats = (settings[key] for key in (
        "d_model", "n_head", "seq_len", "batch_size", "causal", "device", "dtype", "repeats"))
    print(
        f"attention core, forward+backward, B={batch_size} T={seq_len} C={d_model} H={n_head} "
        f"causal={causal} {device} {dtype} threads={torch.get_num_threads()}, {repeats} interleaved rounds"
    )
    print(format_table(timings))
    if len(modes) > 1:
        print()
        print("score encodings: step time of each variant with the encoding / the same variant without one")
        print(format_encoding_table(timings, modes))
        if torch.device(device).type == "cuda":
            for mode in modes:
                kernels = sdpa_kernels(d_model, n_head, seq_len, batch_size, causal, mode, device, dtype)
                print(f"SDPA kernels usable with score_encoding={mode}: {', '.join(kernels) or 'none'}")
    return 0
