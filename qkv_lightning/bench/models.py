"""``bench``: every variant of a task config measured side by side on this device, with the closed-form ratios.

Run: ``python cli.py bench --config configs/bench/gpt-mid.yaml [--variants '[QKV, Q-K=V]'] [--gemm true]
[--lightning_overhead true]``. It measures, with every variant in the same process and timed round-robin (so drifts in
machine load hit all alike), medians after warm-up:

- the training step (forward, backward, gradient clipping, AdamW step, zero_grad) on one fixed batch: time,
  samples (tokens) per second, achieved FLOP/s from the closed-form FLOPs;
- peak memory of a training step (CUDA allocator peak; on CPUs the peak RSS of a fresh process per variant);
- decoding with the KV cache (language models): tokens per second at a given context;
- the attention core against ``timm``'s ``Attention`` and ``torch.nn.MultiheadAttention`` (``bench-attention``);
- with ``--gemm``, the device's matrix-multiply peak (large square products) and each variant's fraction of it;
- with ``--lightning_overhead``, a Lightning ``Trainer`` fit loop against a plain PyTorch loop doing the same work.

Every figure is also given as a ratio to ``QKV``, next to the closed-form FLOP and KV-cache ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jsonargparse
import torch

from qkv_lightning.accounting import NetworkCost
from qkv_lightning.bench.attention import bench_attention
from qkv_lightning.bench.attention import format_table as format_attention_table
from qkv_lightning.bench.common import LoadedTask, VariantOptions, load_task, variants_of
from qkv_lightning.bench.memory import measure_memory, probe
from qkv_lightning.bench.overhead import OVERHEAD_SKIP, measure_overhead
from qkv_lightning.bench.report import ratio, render_table
from qkv_lightning.bench.steps import (
    GEMM,
    build,
    check_precision,
    decode_step,
    first_batch,
    gemm_step,
    to_device,
    train_step,
)
from qkv_lightning.bench.timing import interleaved_medians, interleaved_samples, print_progress
from qkv_lightning.command_line import command_parser, parse_with_overrides, torch_device
from qkv_lightning.errors import ConfigError
from qkv_lightning.tasks.base import TaskModule
from qkv_lightning.variants import Variant


# -------------------------------------------------------------------------------------------------- results
@dataclass
class Measured:
    """What was measured for one variant (None where not measured)."""

    step_s: float
    decode_s: float | None = None
    peak_memory: int | None = None
    cache_bytes_per_token: int | None = None


def summarise(
    costs: dict[str, NetworkCost],
    measured: dict[str, Measured],
    batch_samples: int,
    decode_tokens: int | None = None,
    gemm_flops: float | None = None,
    reference: str = "QKV",
) -> list[dict[str, Any]]:
    """One row per variant: measured figures, rates derived from them, and ratios to ``reference``.

    ``step_s`` is a training step on ``batch_samples`` samples; ``decode_s`` is the time to decode
    ``decode_tokens`` tokens per sequence (times the decode batch, folded into ``decode_tokens``).
    """
    ref_cost, ref = costs[reference], measured[reference]
    rows = []
    for name, cost in costs.items():
        m = measured[name]
        flops = cost.train_flops(batch_samples)
        time_ratio = ratio(m.step_s, ref.step_s)
        flops_ratio = flops / ref_cost.train_flops(batch_samples)
        decode_rate = decode_tokens / m.decode_s if m.decode_s and decode_tokens else None
        ref_decode = decode_tokens / ref.decode_s if ref.decode_s and decode_tokens else None
        rows.append(
            {
                "name": name,
                "sharing": cost.sharing,
                "n_kv_heads": cost.n_kv_heads,
                "step_time_s": m.step_s,
                "samples_per_sec": batch_samples / m.step_s,
                "tokens_per_sec": batch_samples * cost.tokens_per_sample / m.step_s,
                "train_flops_per_step": flops,
                "achieved_flops_per_sec": flops / m.step_s,
                "gemm_fraction": ratio(flops / m.step_s, gemm_flops),
                "step_time_ratio": time_ratio,
                "flops_ratio": flops_ratio,
                "time_over_flops_ratio": ratio(time_ratio, flops_ratio),
                "peak_memory_bytes": m.peak_memory,
                "memory_ratio": ratio(m.peak_memory, ref.peak_memory),
                "decode_tokens_per_sec": decode_rate,
                "decode_ratio": ratio(decode_rate, ref_decode),
                "kv_cache_bytes_per_token": cost.kv_cache_bytes_per_token,
                "kv_bytes_ratio": cost.kv_cache_bytes_per_token / ref_cost.kv_cache_bytes_per_token,
                "measured_cache_bytes_per_token": m.cache_bytes_per_token,
            }
        )
    return rows


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_variants(rows: list[dict[str, Any]], unit: str, counts_tokens: bool, markdown: bool = False) -> str:
    """The per-variant table: measured figures and their ratios to QKV beside the closed-form ratios."""
    rate = "tokens/s" if counts_tokens else f"{unit}s/s"
    header = ["variant", "step ms", rate, "time x QKV", "FLOPs x QKV", "time/FLOPs", "TFLOP/s", "of GEMM peak",
              "peak MB", "mem x QKV", "decode tok/s", "decode x QKV", "KV bytes x QKV"]
    table = [header]
    for r in rows:
        table.append(
            [
                r["name"],
                f"{1e3 * r['step_time_s']:.1f}",
                f"{r['tokens_per_sec' if counts_tokens else 'samples_per_sec']:,.0f}",
                _f(r["step_time_ratio"]),
                _f(r["flops_ratio"]),
                _f(r["time_over_flops_ratio"]),
                f"{r['achieved_flops_per_sec'] / 1e12:.4g}",
                "-" if r["gemm_fraction"] is None else f"{100 * r['gemm_fraction']:.1f}%",
                "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:,.0f}",
                _f(r["memory_ratio"]),
                "-" if r["decode_tokens_per_sec"] is None else f"{r['decode_tokens_per_sec']:,.1f}",
                _f(r["decode_ratio"]),
                _f(r["kv_bytes_ratio"]),
            ]
        )
    return render_table(table, markdown)


# ------------------------------------------------------------------------------------------------------ main
@dataclass
class BenchOptions(VariantOptions):
    """The options of ``bench``."""

    device: str | None = None
    """torch device; default cuda if available, else cpu"""
    precision: str | None = None
    """32-true, bf16-mixed or bf16-true; default the config's"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)"""
    data: Literal["config", "random"] = "config"
    """the datamodule's first batch, or random contents of the same shapes (no data needed)"""
    steps: int = 5
    """timed training steps per variant (interleaved rounds)"""
    warmup: int = 2
    """untimed training steps per variant first"""
    memory: bool = True
    """measure peak memory (a subprocess per variant on CPU)"""
    decode: bool = True
    """measure KV-cached decoding (language models)"""
    decode_context: int | None = None
    """prompt tokens in the cache; default max - 32"""
    decode_tokens: int = 32
    """tokens decoded per timed call"""
    decode_batch: int = 1
    """sequences decoded together"""
    decode_repeats: int = 5
    """timed decoding calls per variant"""
    attention: bool = True
    """also time the attention core against timm's Attention and torch.nn.MultiheadAttention"""
    attention_repeats: int = 20
    """timed rounds of the attention core"""
    gemm: bool = False
    """measure the device's GEMM peak and the fraction reached"""
    gemm_size: int | None = None
    """side of the square GEMM; default 4096 CPU, 8192 GPU"""
    gemm_dtype: str | None = None
    """GEMM dtype; default float32 (bfloat16 for bf16 precisions)"""
    lightning_overhead: bool = False
    """compare Lightning fit loops with a plain PyTorch loop on the first variant"""
    overhead_steps: int = 8
    """steps per loop segment"""
    overhead_rounds: int = 2
    """interleaved rounds of the three loops"""
    format: Literal["table", "markdown", "json"] = "table"
    """how the results are printed"""


def parser() -> jsonargparse.ArgumentParser:
    """The parser of ``bench`` (:mod:`qkv_lightning.command_line`); ``--probe N`` (hidden) measures the memory of
    variant N in this process (:func:`qkv_lightning.bench.memory.measure_memory` starts one per variant)."""
    p = command_parser(
        "bench",
        BenchOptions,
        description="Measure every attention variant of a task config side by side on this device (interleaved, "
        "medians after warm-up) and print each figure as a ratio to QKV next to the closed-form ratios. Other "
        "options (e.g. --data.batch_size 4) change the config.",
        task_config="required",
    )
    p.add_argument("--probe", type=int | None, default=None, help=argparse.SUPPRESS)
    return p


def check_counts(args: argparse.Namespace) -> None:
    """The repeat and step counts of the command line are large enough.

    Raises:
        ConfigError: naming the option that is too small.
    """
    for name, value, least in (("steps", args.steps, 1), ("decode_repeats", args.decode_repeats, 1),
                               ("attention_repeats", args.attention_repeats, 1),
                               ("overhead_rounds", args.overhead_rounds, 1),
                               ("overhead_steps", args.overhead_steps, OVERHEAD_SKIP + 2)):
        if value < least:
            raise ConfigError(f"--{name}={value} must be at least {least}"
                              + (f" (the first {OVERHEAD_SKIP} steps of each loop segment are warm-up)."
                                 if name == "overhead_steps" else "."))


def main(argv: Sequence[str] | None = None) -> int:
    """``bench``: measure and print."""
    argv = list(argv or [])
    args, overrides = parse_with_overrides(parser(), argv)
    device = torch_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_task(args.config, overrides, args.data_spec)
    precision = check_precision(args.precision or loaded.config.trainer.get("precision") or "32-true")
    clip = loaded.config.trainer.get("gradient_clip_val")
    n_head = loaded.task.network_config.n_head
    variants = variants_of(loaded.task.attention_config, n_head, args.variants, args.n_kv_heads)
    check_counts(args)
    if "QKV" not in [v.label for v in variants] and not args.probe:
        raise ConfigError("bench compares with QKV: keep QKV among --variants.")
    batch = to_device(first_batch(loaded, args.data), device, precision)
    if args.probe is not None:
        probe(loaded, variants[args.probe], batch, device, precision, clip)
        return 0
    result = run_bench(args, argv, loaded, variants, batch, device, precision, clip)
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(format_bench(result, markdown=args.format == "markdown"))
    return 0


# ------------------------------------------------------------------------------------------------ measuring
def time_training_steps(
    args: argparse.Namespace, built: dict[str, TaskModule], batch: tuple, device: torch.device, precision: str,
    clip: float | None,
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, Any] | None]:
    """Every variant's training step, timed in interleaved rounds (with ``--gemm`` a matrix product too, in the same
    rounds, so that load drifts hit both alike). Returns the seconds of each round, their medians, and the GEMM
    setting and rates (None without ``--gemm``)."""
    steps = {name: train_step(t, batch, precision, device, clip) for name, t in built.items()}
    gemm = None
    if args.gemm:
        dtype_name = args.gemm_dtype or ("bfloat16" if precision.startswith("bf16") else "float32")
        size = args.gemm_size or (8192 if device.type == "cuda" else 4096)
        gemm = {"size": size, "dtype": dtype_name}
        steps[GEMM] = gemm_step(device, getattr(torch, dtype_name), size)
    samples_s = interleaved_samples(steps, args.steps, args.warmup, device, print_progress, "training step")
    step_s = {name: statistics.median(values) for name, values in samples_s.items()}
    if gemm:
        gemm["flops_per_sec"] = 2 * gemm["size"] ** 3 / step_s.pop(GEMM)
        gemm["flops_per_sec_best"] = 2 * gemm["size"] ** 3 / min(samples_s.pop(GEMM))
    return samples_s, step_s, gemm


def time_decoding(
    args: argparse.Namespace, loaded: LoadedTask, built: dict[str, TaskModule], device: torch.device, precision: str
) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
    """KV-cached greedy decoding of every variant (a language model's), timed in interleaved rounds. Returns the
    median seconds per call, the caches' bytes per token, and the setting (context, tokens, batch).

    Raises:
        ConfigError: if the context and the decoded tokens do not fit the model's positions.
    """
    max_len = loaded.task.resolved_network_config(loaded.data_spec).max_seq_len
    n_new = min(args.decode_tokens, max_len - 1)
    context = args.decode_context or max(1, max_len - n_new)
    if context + n_new > max_len:
        raise ConfigError(f"--decode_context {context} + --decode_tokens {n_new} exceed max_seq_len={max_len}.")
    decoders, cache_bytes = {}, {}
    for name, t in built.items():
        t.eval()
        decoders[name], cache_bytes[name] = decode_step(t, args.decode_batch, context, n_new, device, precision)
    decode_s = interleaved_medians(decoders, args.decode_repeats, 1, device, print_progress, "decoding")
    return decode_s, cache_bytes, {"context": context, "tokens": n_new, "batch": args.decode_batch}


def time_attention_core(
    args: argparse.Namespace, cost: NetworkCost, causal: bool, variants: list[Variant], samples: int,
    device: torch.device,
    precision: str,
) -> tuple[list[dict[str, Any]], str]:
    """The attention core alone (``bench-attention``) at the task's width, heads and tokens: rows of the result and
    the table."""
    sharing = list(dict.fromkeys(v.sharing for v in variants))
    timings = bench_attention(cost.d_model, cost.n_head, cost.tokens_per_sample, samples, causal,
                              sharing, None, args.attention_repeats, 3, str(device),
                              "bfloat16" if precision.startswith("bf16") else "float32")
    ref = next(t for t in timings if t.name == "QKV")
    rows = [{"name": t.name, "median_ms": t.median_ms, "time_ratio": t.median_ms / ref.median_ms,
             "flops_ratio": (t.flops / ref.flops) if t.flops else None} for t in timings]
    return rows, format_attention_table(timings)


def add_best_rounds(rows: list[dict[str, Any]], samples_s: dict[str, list[float]], gemm: dict | None) -> None:
    """Add the fastest round of each variant to its row: on a busy machine, load only ever adds time."""
    for row in rows:
        row["step_times_s"] = samples_s[row["name"]]
        best = min(samples_s[row["name"]])
        row["step_time_ratio_best"] = best / min(samples_s["QKV"])
        row["gemm_fraction_best"] = row["train_flops_per_step"] / best / gemm["flops_per_sec_best"] if gemm else None


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_bench(args: argparse.Namespace, argv: list[str], loaded: LoadedTask, variants: list[Variant], batch: tuple,
              device: torch.device, precision: str, clip: float | None) -> dict[str, Any]:
    """Every measurement; returns the result as a plain dict (the JSON form)."""
    load_before = _load_average()
    task = loaded.task
    samples = task.samples_in(batch)
    costs = {v.label: task.cost(v.attention_config(task.attention_config)) for v in variants}
    memory = measure_memory(argv, loaded, variants, batch, device, precision, clip) if args.memory else {}

    built = {v.label: build(task, v.attention_config(task.attention_config), device, precision) for v in variants}
    samples_s, step_s, gemm = time_training_steps(args, built, batch, device, precision, clip)
    decode_s: dict[str, float] = {}
    cache_bytes: dict[str, int] = {}
    decode_setting = None
    if args.decode and task.autoregressive:
        decode_s, cache_bytes, decode_setting = time_decoding(args, loaded, built, device, precision)
    del built

    measured = {
        name: Measured(step_s[name], decode_s.get(name), memory.get(name), cache_bytes.get(name)) for name in costs
    }
    decode_tokens = decode_setting["tokens"] * decode_setting["batch"] if decode_setting else None
    rows = summarise(costs, measured, samples, decode_tokens, gemm["flops_per_sec"] if gemm else None)
    add_best_rounds(rows, samples_s, gemm)

    attention = attention_table = None
    if args.attention:
        attention, attention_table = time_attention_core(
            args, costs["QKV"], task.autoregressive, variants, samples, device, precision
        )
    overhead = None
    if args.lightning_overhead:
        first = variants[0]
        overhead = measure_overhead(loaded, first, batch, device, precision, clip, args.overhead_steps,
                                    args.overhead_rounds, costs[first.label].train_flops(samples), gemm)
    setup = setup_of(args, argv, loaded, costs["QKV"], samples, device, precision, clip, decode_setting)
    setup["load_average_before"], setup["load_average_after"] = load_before, _load_average()
    return {
        "setup": setup,
        "variants": rows,
        "attention_core": attention,
        "attention_table": attention_table,
        "gemm": gemm,
        "lightning_overhead": overhead,
    }


def setup_of(args: argparse.Namespace, argv: list[str], loaded: LoadedTask, cost: NetworkCost, samples: int,
             device: torch.device, precision: str, clip: float | None, decode: dict | None) -> dict[str, Any]:
    """What was measured, where and how: the ``setup`` part of the result (the load averages are filled in by
    :func:`run_bench`)."""
    return {
        "command": "python cli.py bench " + shlex.join(argv),
        "task": type(loaded.task).__name__,
        "network": cost.network,
        "sizes": {"n_layer": cost.n_layer, "d_model": cost.d_model, "n_head": cost.n_head},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before": None,
        "load_average_after": None,
        "precision": precision,
        "gradient_clip_val": clip,
        "batch_samples": samples,
        "tokens_per_sample": cost.tokens_per_sample,
        "sample_unit": cost.sample_unit,
        "counts_tokens": loaded.task.counts_tokens,
        "data": args.data,
        "data_spec_source": loaded.spec_source,
        "steps": args.steps,
        "warmup": args.warmup,
        "memory": ("CUDA allocator peak above the memory allocated before the variant was built" if device.type
                   == "cuda" else "peak RSS of a fresh process per variant, above its RSS before the model was "
                   "built") if args.memory else None,
        "decode": decode,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def format_bench(result: dict[str, Any], markdown: bool = False) -> str:
    """The bench result as text: set-up, the per-variant table, the attention core, GEMM and loop overhead."""
    s = result["setup"]
    unit = s["sample_unit"]
    load = f"{s['load_average_before']:.2f} -> {s['load_average_after']:.2f}" if s["load_average_before"] else "-"
    lines = [
        f"{s['command']}\n{s['task']} / {s['network']} ({s['sizes']['n_layer']} layers, width "
        f"{s['sizes']['d_model']}, {s['sizes']['n_head']} heads)",
        f"device {s['device']} ({s['device_name']}), torch {s['torch']}, {s['threads']} threads, load average "
        f"{load}, precision {s['precision']}",
        f"training step: forward, backward, clip ({s['gradient_clip_val']}), AdamW, zero_grad on one {s['data']} "
        f"batch of {s['batch_samples']} {unit}s x {s['tokens_per_sample']} tokens; median of {s['steps']} "
        f"interleaved rounds after {s['warmup']} warm-up steps. Data values from {s['data_spec_source']}.",
        "FLOPs: closed form (cli.py report); TFLOP/s = FLOPs per step / step time. time/FLOPs = (time x QKV) / "
        "(FLOPs x QKV): 1.0 means a variant's saved FLOPs are saved in time.",
    ]
    if s["memory"]:
        lines.append(f"peak memory: {s['memory']}.")
    if s["decode"]:
        d = s["decode"]
        lines.append(f"decode: greedy, KV cache, {d['batch']} sequence(s), {d['tokens']} new tokens after a "
                     f"{d['context']}-token context; tok/s counts new tokens.")
    blocks = ["\n".join(lines), format_variants(result["variants"], unit, s["counts_tokens"], markdown)]
    best = [
        f"{r['name']} {r['step_time_ratio_best']:.3f}"
        + ("" if r.get("gemm_fraction_best") is None else f" ({100 * r['gemm_fraction_best']:.1f}% of GEMM peak)")
        for r in result["variants"]
        if r.get("step_time_ratio_best") is not None
    ]
    if best:
        blocks.append("fastest round of each (load only adds time), time x QKV: " + ", ".join(best))
    if result.get("attention_table"):
        blocks.append("attention core alone (forward + backward, same batch and width):\n" + result["attention_table"])
    gemm = result.get("gemm")
    if gemm:
        blocks.append(f"GEMM peak: {gemm['flops_per_sec'] / 1e12:.4g} TFLOP/s ({gemm['size']}^3 {gemm['dtype']} "
                      "products, median, timed in the same rounds as the training steps); 'of GEMM peak' above is "
                      "each variant's achieved FLOP/s over it. Set it as --perf.available_flops for fit's perf/mfu.")
    o = result.get("lightning_overhead")
    if o:
        def frac(key: str) -> str:
            return "" if o[key] is None else f", {100 * o[key]:.1f}% of GEMM peak"

        blocks.append(
            f"Lightning overhead ({o['variant']}, same model, batch, optimiser and clipping; median step time):\n"
            f"  plain PyTorch loop       {1e3 * o['plain_step_s']:9.1f} ms{frac('plain_gemm_fraction')}\n"
            f"  Lightning Trainer (bare) {1e3 * o['lightning_step_s']:9.1f} ms  x{o['lightning_over_plain']:.3f}"
            f"{frac('lightning_gemm_fraction')}\n"
            f"  Lightning as fit runs it {1e3 * o['lightning_fit_step_s']:9.1f} ms  "
            f"x{o['lightning_fit_over_plain']:.3f}"
            f"{frac('lightning_fit_gemm_fraction')} (TensorBoard, LR monitor, non-finite guard, perf monitor)"
            + ("" if o.get("gemm_flops_per_sec") is None else
               f"\n  GEMM peak in these rounds {o['gemm_flops_per_sec'] / 1e12:.4g} TFLOP/s")
        )
    return "\n\n".join(blocks)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
