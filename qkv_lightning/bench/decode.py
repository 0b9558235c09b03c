"""``bench-decode``: prefill and KV-cached decoding of every variant over a grid of context lengths and batch sizes.

Run: ``python cli.py bench-decode --config configs/bench/decode-gpt2-small.yaml [--contexts '[256, 1024, 4096]']
[--batch_sizes '[1, 8]'] [--variants '[QKV, Q-K=V]'] [--n_kv_heads '[4, 1]'] [--rope_keys '[on_read, copy,
window:1024]'] [--cache dynamic|static] [--compile true] [--memory_budget 80GB] [--serve true] [--out results/]``.

Every cell (context, batch) builds one prompt of ``context`` random tokens per sequence and, for each contender
(a variant, and for K=V variants with RoPE each ``--rope_keys`` scheme), times the prefill and ``--new_tokens``
greedy decoding steps, every step on its own; contenders run round-robin in ``--rounds`` rounds, so that drifts in
machine load hit all alike, and ratios to ``QKV`` (or ``--baseline``) come from the same rounds. A cell gives prefill
tokens/s, decode tokens/s, time per output token (median and p90 over all timed steps), the KV cache's bytes
(measured on the cache tensors), the peak memory above what was resident before (CUDA allocator peak; on Linux CPUs
the peak resident set, reset per contender), and the bytes a decoding step must read per generated token in closed
form (weights once per step, shared by the batch, plus every cached tensor), with the bandwidth that implies.

``--memory_budget`` adds, per contender and context, the largest batch whose weights, static cache and one decoding
step fit in the budget: computed in closed form, then checked by allocating it (in a child process whose data
segment the kernel limits to the budget on CPUs; against the CUDA allocator's peak on GPUs), with one more sequence
checked not to fit. ``--serve`` runs a serving-style loop per variant: many requests of mixed prompt lengths
through ``--serve_slots`` slots of one static cache, a finished request's slot refilled at once (continuous
batching), with throughput and latency.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from qkv_lightning.bench.decode_memory import DTYPES, fit_probe, largest_batch, param_bytes, parse_bytes
from qkv_lightning.bench.decode_tables import format_tables, plot
from qkv_lightning.bench.decode_timing import bench_cell, contenders_of
from qkv_lightning.bench.serving import serve
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.kv_cache import ROPE_KEYS_DEFAULT, is_fused, parse_rope_keys


# ----------------------------------------------------------------------------------------------------- main
def parser() -> Any:
    """The parser of ``bench-decode`` (:mod:`qkv_lightning.command_line`; built on call, so that the memory probe's
    child process starts without the task machinery)."""
    from qkv_lightning.bench.common import VariantOptions
    from qkv_lightning.command_line import command_parser

    @dataclasses.dataclass
    class DecodeOptions(VariantOptions):
        """The options of ``bench-decode``."""

        labels: list[str] | None = None
        """keep only these of the variants' labels, e.g. '[QKV, QKV_kv4, Q-K=V, Q-K=V_kv1]'"""
        baseline: str = "QKV"
        """the variant the ratio columns (x ...) compare with, one of the labels, e.g. QKV_kv3 for a model shipped
        with 3 K/V heads"""
        contexts: list[int] = dataclasses.field(default_factory=lambda: [256, 1024])
        """prompt tokens in the cache, e.g. '[256, 1024]'"""
        batch_sizes: list[int] = dataclasses.field(default_factory=lambda: [1])
        """sequences decoded together, e.g. '[1, 8]'"""
        new_tokens: int = 16
        """tokens generated per sequence (the first by prefill)"""
        rounds: int = 3
        """interleaved timed rounds per cell"""
        warmup: int = 1
        """untimed rounds per cell first"""
        prefill_rounds: int = 1
        """first rounds that also prefill, timed (the others rewind the cache to the prompt and decode)"""
        rope_keys: list[str] = dataclasses.field(default_factory=lambda: [ROPE_KEYS_DEFAULT])
        """K=V variants with RoPE: on_read (half the cache), copy (rotated copy: QKV's size), window:W, fused (on_read's
        cache, keys rotated inside a Triton kernel; CUDA); one contender each, e.g. '[on_read, fused]'"""
        cache: Literal["dynamic", "static"] = "dynamic"
        """the growing KVCache, or a static preallocated cache (fixed shapes; masked attention)"""
        compile: bool = False
        """torch.compile the static-cache decoding step (CUDA graphs on GPUs); implies --cache static"""
        dtype: Literal["float32", "bfloat16", "float16"] = "float32"
        """weights, activations and cache"""
        device: str | None = None
        """torch device; default cuda if available, else cpu"""
        threads: int | None = None
        """torch CPU threads (default: torch's choice)"""
        memory_budget: str | None = None
        """e.g. 80GB: the largest batch per contender and context, computed and checked"""
        serve: bool = False
        """also run the serving-style loop per variant"""
        serve_requests: int = 16
        """requests of the serving loop"""
        serve_prompt_lens: list[int] = dataclasses.field(default_factory=lambda: [64, 512])
        """the shortest and longest prompt of the serving loop, '[MIN, MAX]'"""
        serve_new_tokens: int = 32
        """tokens generated per request of the serving loop"""
        serve_slots: int = 4
        """sequences decoding together in the serving loop"""
        serve_rounds: int = 1
        """rounds of the serving loop (the median is reported)"""
        out: str | None = None
        """folder for result.json, table.md and decode.png (must not hold them)"""
        progress: bool = True
        """a progress bar on stderr"""
        format: Literal["table", "markdown", "json"] = "table"
        """how the tables are printed"""

    return command_parser(
        "bench-decode",
        DecodeOptions,
        description="Prefill and KV-cached decoding of every variant of a language-model config over context lengths "
        "and batch sizes, interleaved, with ratios to QKV (or --baseline). Other --model... options change the "
        "config.",
        task_config="required",
    )


def _check(args: argparse.Namespace, max_len: int) -> None:
    for name in ("new_tokens", "rounds", "prefill_rounds", "serve_requests", "serve_slots", "serve_rounds"):
        least = 2 if name == "new_tokens" else 1
        if getattr(args, name) < least:
            raise ConfigError(f"--{name}={getattr(args, name)} must be at least {least}.")
    if args.prefill_rounds > args.rounds + args.warmup:
        raise ConfigError(f"--prefill_rounds={args.prefill_rounds} cannot exceed --rounds plus --warmup.")
    if args.warmup < 0 or min(args.contexts) < 1 or min(args.batch_sizes) < 1:
        raise ConfigError("--warmup must be at least 0, and --contexts and --batch_sizes at least 1.")
    if max(args.contexts) + args.new_tokens > max_len:
        raise ConfigError(f"--contexts up to {max(args.contexts)} + --new_tokens {args.new_tokens} exceed "
                          f"network.max_seq_len={max_len}; raise --model.network.max_seq_len.")
    for scheme in args.rope_keys:
        kept = parse_rope_keys(scheme, 1 << 30)
        if (args.cache == "static" or args.memory_budget) and (kept not in (0, 1 << 30) or is_fused(scheme)):
            raise ConfigError(f"--rope_keys {scheme}: the static cache takes on_read or copy (--cache static, and "
                              "--memory_budget, which sizes a static cache); window:W and fused are dynamic.")
    if len(args.serve_prompt_lens) != 2:
        raise ConfigError(f"--serve_prompt_lens {args.serve_prompt_lens}: give two lengths, '[MIN, MAX]'.")
    lo, hi = args.serve_prompt_lens
    if args.serve and not 1 <= lo <= hi or (args.serve and hi + args.serve_new_tokens > max_len):
        raise ConfigError(f"--serve_prompt_lens '[{lo}, {hi}]' must be increasing, at least 1, and with "
                          f"--serve_new_tokens fit network.max_seq_len={max_len}.")


def main(argv: Sequence[str] | None = None) -> int:
    """``bench-decode``: measure, print, and write the outputs."""
    argv = list(argv or [])
    if argv[:1] == ["--fit_probe"]:
        fit_probe(argv[1])
        return 0
    from qkv_lightning.command_line import parse_with_overrides, torch_device

    args, overrides = parse_with_overrides(parser(), argv)
    if args.compile:
        args.cache = "static"
    device = torch_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else None
    names = ("result.json", "table.md", "decode.png")
    if out is not None and any((out / n).exists() for n in names):
        raise ConfigError(f"--out {out} already holds results ({', '.join(n for n in names if (out / n).exists())});"
                          " pick another folder (nothing is overwritten).")
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    from qkv_lightning.bench.common import load_task, variants_of
    from qkv_lightning.bench.steps import build

    loaded = load_task(args.config, overrides, args.data_spec)
    task = loaded.task
    if not task.autoregressive:
        raise ConfigError("bench-decode needs a language-model config (model.class_path: ...LanguageModel).")
    max_len = task.resolved_network_config(loaded.data_spec).max_seq_len
    _check(args, max_len)
    variants = variants_of(task.attention_config, task.network_config.n_head, args.variants, args.n_kv_heads)
    if args.labels:
        unknown = [name for name in args.labels if name not in [v.label for v in variants]]
        if unknown:
            raise ConfigError(f"--labels {' '.join(unknown)}: not among the variants {[v.label for v in variants]}.")
        variants = [v for v in variants if v.label in args.labels]
    if args.baseline not in [v.label for v in variants]:
        raise ConfigError(f"bench-decode compares with --baseline {args.baseline}, which is not among the variants "
                          f"{[v.label for v in variants]}: keep it among --variants (and --labels), or name another.")
    dtype = DTYPES[args.dtype]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    models = {}
    for v in variants:
        network = build(task, v.attention_config(task.attention_config), device, "32-true").network.eval()
        network.fuse()  # depth-factorised projections as one matmul each, as they are served
        models[v.label] = network.to(dtype)
    contenders = contenders_of(variants, models, list(dict.fromkeys(args.rope_keys)))
    cells = [(c, b) for b in args.batch_sizes for c in args.contexts]
    total = len(cells) * (args.warmup + args.rounds) * len(contenders)
    from tqdm.auto import tqdm

    progress = tqdm(total=total, desc="bench-decode", disable=not args.progress, file=sys.stderr)
    rows = []
    for context, batch in cells:
        progress.set_postfix_str(f"context {context}, batch {batch}")
        rows += bench_cell(contenders, context, batch, args, device, progress)
    progress.close()
    memory = None
    if budget:
        budget_rows = []
        for context in args.contexts:
            for c in contenders:
                found = largest_batch(c.model, context + args.new_tokens, c.rope_keys, budget, device)
                budget_rows.append({"name": c.label, "context": context, **found})
        memory = {"bytes": budget, "rows": budget_rows}
    serving = None
    if args.serve:
        lo, hi = args.serve_prompt_lens
        lens = torch.randint(lo, hi + 1, (args.serve_requests,), generator=torch.Generator().manual_seed(1)).tolist()
        per_variant = [c for c in contenders if c.rope_keys == args.rope_keys[0] or not c.kv_shared]
        runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in per_variant}
        for _ in range(args.serve_rounds):
            for c in per_variant:
                runs[c.label].append(serve(c, lens, args.serve_new_tokens, args.serve_slots, device))
        serving_rows = []
        for results in runs.values():
            serving_rows.append(sorted(results, key=lambda r: r["seconds"])[len(results) // 2])  # the median round
        serving = {"requests": args.serve_requests, "prompt_lens": [lo, hi], "new_tokens": args.serve_new_tokens,
                   "slots": args.serve_slots, "rounds": args.serve_rounds, "rows": serving_rows}
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    config = models[args.baseline].config
    from qkv_lightning.bench.models import _cpu_name

    result = {
        "setup": {
            "command": "python cli.py bench-decode " + shlex.join(argv), "network": "GPT", "n_layer": config.n_layer,
            "d_model": config.d_model, "n_head": config.n_head, "position": config.position,
            "vocab_size": config.vocab_size, "dtype": args.dtype, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average_before": load_before,
            "load_average_after": load_after, "cache": args.cache, "compile": args.compile,
            "new_tokens": args.new_tokens, "rounds": args.rounds, "warmup": args.warmup,
            "prefill_rounds": args.prefill_rounds, "contexts": args.contexts, "batch_sizes": args.batch_sizes,
            "weights_bytes": param_bytes(models[args.baseline]), "baseline": args.baseline,
            "peak_memory": "CUDA allocator peak above the memory allocated before" if device.type == "cuda" else
            "peak resident set above the resident set before (all contenders' weights), reset per contender",
        },
        "cells": rows,
        "memory_budget": memory,
        "serving": serving,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        (out / "table.md").write_text(format_tables(result, markdown=True) + "\n")
        plot(result, out / "decode.png")
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(format_tables(result, markdown=args.format == "markdown"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
