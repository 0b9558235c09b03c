"""``bench-decode``: prefill and KV-cached decoding of every variant over a grid of context lengths and batch sizes.

Run: ``python cli.py bench-decode --config configs/bench/decode-gpt2-small.yaml [--contexts 256 1024 4096]
[--batch_sizes 1 8] [--variants QKV Q-K=V] [--n_kv_heads 4 1] [--rope_keys on_read copy window:1024]
[--cache dynamic|static] [--compile] [--memory_budget 80GB] [--serve] [--out results/]``.

Every cell (context, batch) builds one prompt of ``context`` random tokens per sequence and, for each contender
(a variant, and for K=V variants with RoPE each ``--rope_keys`` scheme), times the prefill and ``--new_tokens``
greedy decoding steps, every step on its own; contenders run round-robin in ``--rounds`` rounds, so that drifts in
machine load hit all alike, and ratios to ``QKV`` come from the same rounds. A cell gives prefill tokens/s, decode
tokens/s, time per output token (median and p90 over all timed steps), the KV cache's bytes (measured on the cache
tensors), the peak memory above what was resident before (CUDA allocator peak; on Linux CPUs the peak resident set,
reset per contender), and the bytes a decoding step must read per generated token in closed form (weights once per
step, shared by the batch, plus every cached tensor), with the bandwidth that implies.

``--memory_budget`` adds, per contender and context, the largest batch whose weights, static cache and one decoding
step fit in the budget: computed in closed form, then checked by allocating it (in a child process whose data
segment the kernel limits to the budget on CPUs; against the CUDA allocator's peak on GPUs), with one more sequence
checked not to fit. ``--serve`` runs a serving-style loop per variant: many requests of mixed prompt lengths
through ``--serve_slots`` slots of one static cache, a finished request's slot refilled at once (continuous
batching), with throughput and latency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qkv_lightning.bench.decode_memory import DTYPES, fit_probe, largest_batch, param_bytes, parse_bytes
from qkv_lightning.bench.decode_tables import format_tables, plot
from qkv_lightning.bench.decode_timing import bench_cell, contenders_of
from qkv_lightning.bench.serving import serve
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.kv_cache import ROPE_KEYS_DEFAULT, parse_rope_keys


# ----------------------------------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    from qkv_lightning.bench.common import add_config_arguments

    p = argparse.ArgumentParser(
        prog="cli.py bench-decode", allow_abbrev=False,
        description="Prefill and KV-cached decoding of every variant of a language-model config over context lengths "
        "and batch sizes, interleaved, with ratios to QKV. Other --model... options change the config.")
    add_config_arguments(p)
    p.add_argument("--labels", nargs="+", default=None,
                   help="keep only these of the variants' labels, e.g. QKV QKV_kv4 Q-K=V Q-K=V_kv1")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024], help="prompt tokens in the cache")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1], help="sequences decoded together")
    p.add_argument("--new_tokens", type=int, default=16, help="tokens generated per sequence (the first by prefill)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per cell")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per cell first")
    p.add_argument("--prefill_rounds", type=int, default=1,
                   help="first rounds that also prefill, timed (the others rewind the cache to the prompt and decode)")
    p.add_argument("--rope_keys", nargs="+", default=[ROPE_KEYS_DEFAULT],
                   help="K=V variants with RoPE: on_read (half the cache), copy (rotated copy: QKV's size), "
                   "window:W; one contender each")
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                   help="the growing KVCache, or a static preallocated cache (fixed shapes; masked attention)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the static-cache decoding step (CUDA graphs on GPUs); implies --cache static")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights, activations and cache")
    p.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--memory_budget", default=None,
                   help="e.g. 80GB: the largest batch per contender and context, computed and checked")
    p.add_argument("--serve", action="store_true", help="also run the serving-style loop per variant")
    p.add_argument("--serve_requests", type=int, default=16)
    p.add_argument("--serve_prompt_lens", type=int, nargs=2, default=[64, 512], metavar=("MIN", "MAX"))
    p.add_argument("--serve_new_tokens", type=int, default=32)
    p.add_argument("--serve_slots", type=int, default=4, help="sequences decoding together")
    p.add_argument("--serve_rounds", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for result.json, table.md and decode.png (must not hold them)")
    p.add_argument("--progress", type=lambda s: s.lower() not in ("0", "false", "no"), default=True,
                   help="a progress bar on stderr (default true)")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    return p


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
        if (args.cache == "static" or args.memory_budget) and kept not in (0, 1 << 30):
            raise ConfigError(f"--rope_keys {scheme}: the static cache takes on_read or copy (--cache static, and "
                              "--memory_budget, which sizes a static cache).")
    lo, hi = args.serve_prompt_lens
    if args.serve and not 1 <= lo <= hi or (args.serve and hi + args.serve_new_tokens > max_len):
        raise ConfigError(f"--serve_prompt_lens {lo} {hi} must be increasing, at least 1, and with "
                          f"--serve_new_tokens fit network.max_seq_len={max_len}.")


def main(argv: Sequence[str] | None = None) -> int:
    """``bench-decode``: measure, print, and write the outputs."""
    argv = list(argv or [])
    if argv[:1] == ["--fit_probe"]:
        fit_probe(argv[1])
        return 0
    args, overrides = parser().parse_known_args(argv)
    if args.compile:
        args.cache = "static"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    if "QKV" not in [v.label for v in variants]:
        raise ConfigError("bench-decode compares with QKV: keep QKV among --variants.")
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
    config = models["QKV"].config
    from qkv_lightning.bench.models import _cpu_name

    result = {
        "setup": {
            "command": "python cli.py bench-decode " + " ".join(argv), "network": "GPT", "n_layer": config.n_layer,
            "d_model": config.d_model, "n_head": config.n_head, "position": config.position,
            "vocab_size": config.vocab_size, "dtype": args.dtype, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average_before": load_before,
            "load_average_after": load_after, "cache": args.cache, "compile": args.compile,
            "new_tokens": args.new_tokens, "rounds": args.rounds, "warmup": args.warmup,
            "prefill_rounds": args.prefill_rounds, "contexts": args.contexts, "batch_sizes": args.batch_sizes,
            "weights_bytes": param_bytes(models["QKV"]),
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
