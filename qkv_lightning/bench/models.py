"""``bench``: every variant of a task config measured side by side on this device, with the closed-form ratios.

Run: ``python cli.py bench --config configs/bench/gpt-mid.yaml [--variants QKV Q-K=V] [--gemm]
[--lightning_overhead]``. It measures, with every variant in the same process and timed round-robin (so drifts in
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
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from qkv_lightning.accounting import NetworkCost
from qkv_lightning.bench.attention import bench_attention, interleaved_medians, interleaved_samples, synchronize
from qkv_lightning.bench.attention import format_table as format_attention_table
from qkv_lightning.bench.common import LoadedTask, Variant, add_config_arguments, load_task, task_variant, variants_of
from qkv_lightning.bench.report import render_table
from qkv_lightning.errors import ConfigError
from qkv_lightning.tasks.base import TaskModule

PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true")
PROBE_MARK = "BENCH_MEMORY_PROBE "


# --------------------------------------------------------------------------------------------------- set-up
def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a Lightning precision setting (nothing for 32-bit and bf16-true)."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_precision(precision: str) -> str:
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"bench measures precision {', '.join(PRECISIONS)}; got trainer.precision={precision!r}. Pass --precision."
        )
    return precision


def random_batch(task: TaskModule, spec: dict, batch_size: int, generator: torch.Generator) -> tuple:
    """A batch of the task's shapes with random contents (token ids or images and labels)."""
    cost = task.cost()
    if cost.network == "ViT":
        config = task.resolved_network_config(spec)
        size, channels = config.image_size, config.in_channels
        images = torch.randn(batch_size, channels, size, size, generator=generator)
        return images, torch.randint(0, config.num_classes, (batch_size,), generator=generator)
    config = task.resolved_network_config(spec)
    vocab = spec.get("vocab_size") or config.vocab_size
    t = cost.tokens_per_sample
    inputs = torch.randint(0, vocab, (batch_size, t), generator=generator)
    classes = getattr(config, "num_classes", None) or vocab
    return inputs, torch.randint(0, classes, (batch_size, t), generator=generator)


def first_batch(loaded: LoadedTask, source: str, seed: int = 0) -> tuple:
    """One training batch: the datamodule's first (``source='config'``) or random contents of its shapes."""
    datamodule = loaded.datamodule
    if source == "random":
        batch_size = getattr(datamodule, "batch_size", None) or 8
        return random_batch(loaded.task, loaded.data_spec, int(batch_size), torch.Generator().manual_seed(seed))
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return tuple(batch) if isinstance(batch, list | tuple) else (batch,)


def build(task: TaskModule, attention: Any, device: torch.device, precision: str) -> TaskModule:
    """A built, trainable copy of ``task`` with another attention variant, on ``device``."""
    variant = task_variant(task, attention)
    variant.configure_model()
    variant.to(device)
    if precision == "bf16-true":
        variant.to(torch.bfloat16)
    variant.train()
    return variant


def to_device(batch: tuple, device: torch.device, precision: str) -> tuple:
    moved = tuple(t.to(device) for t in batch)
    if precision == "bf16-true":
        moved = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in moved)
    return moved


def train_step(
    task: TaskModule, batch: tuple, precision: str, device: torch.device, clip: float | None
) -> Callable[[], None]:
    """One optimiser step, as Lightning's automatic optimisation does it: forward (loss), backward, gradient
    clipping by norm, AdamW step, scheduler step, zero_grad."""
    optimizer, scheduler = task.build_optimizer(total_steps=10**6)
    params = [p for p in task.parameters() if p.requires_grad]

    def step() -> None:
        with autocast(precision, device):
            loss = task.training_loss(batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def decode_step(task: TaskModule, batch_size: int, context: int, n_tokens: int, device: torch.device, precision: str):
    """Greedy decoding of ``n_tokens`` tokens with the KV cache after a prompt of ``context`` tokens; the prompt is
    run once, and every call rewinds the caches to it. Returns the call and the caches' bytes per token."""
    network = task.network
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, network.config.vocab_size, (batch_size, context), generator=generator).to(device)
    caches = network.new_caches(batch_size, context + n_tokens)
    with torch.inference_mode(), autocast(precision, device):
        network.hidden(prompt, caches)
    last = prompt[:, -1:]
    cache_bytes = sum(c.nbytes for c in caches) // (batch_size * (context + n_tokens))

    def step() -> None:
        for cache in caches:
            cache.length = context
        token = last
        with torch.inference_mode(), autocast(precision, device):
            for _ in range(n_tokens):
                hidden = network.hidden(token, caches)[0][:, -1:]  # (B, 1, C)
                token = network.logits(hidden)[:, 0].argmax(dim=-1, keepdim=True)  # (B, 1)

    return step, cache_bytes


GEMM = "GEMM"
"""Name of the matrix-multiply step among the timed training steps."""


def gemm_step(device: torch.device, dtype: torch.dtype, size: int) -> Callable[[], None]:
    """One ``size`` x ``size`` matrix product (2 size^3 FLOPs), written into a preallocated output."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def measure_gemm(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """The device's matrix-multiply throughput: median FLOP/s of ``size`` x ``size`` products after warm-up."""
    seconds = interleaved_medians({GEMM: gemm_step(device, dtype, size)}, repeats, 3, device)[GEMM]
    return 2 * size**3 / seconds


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# -------------------------------------------------------------------------------------------------- results
@dataclass
class Measured:
    """What was measured for one variant (None where not measured)."""

    step_s: float
    decode_s: float | None = None
    peak_memory: int | None = None
    cache_bytes_per_token: int | None = None


def ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


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


def overhead_summary(
    plain: list[float], bare: list[float], full: list[float], flops_per_step: int, gemm_flops: float | None
) -> dict[str, Any]:
    """Medians of per-step times of the three loops, Lightning's cost relative to the plain loop, and each loop's
    achieved FLOP/s (and fraction of the GEMM peak)."""
    medians = {name: statistics.median(times) for name, times in (("plain", plain), ("lightning", bare),
                                                                   ("lightning_fit", full))}
    out: dict[str, Any] = {f"{name}_step_s": value for name, value in medians.items()}
    out["steps_timed"] = {"plain": len(plain), "lightning": len(bare), "lightning_fit": len(full)}
    out["lightning_over_plain"] = medians["lightning"] / medians["plain"]
    out["lightning_fit_over_plain"] = medians["lightning_fit"] / medians["plain"]
    for name, value in medians.items():
        out[f"{name}_flops_per_sec"] = flops_per_step / value
        out[f"{name}_gemm_fraction"] = ratio(flops_per_step / value, gemm_flops)
    return out


# ------------------------------------------------------------------------------------------------ measuring
def measure_memory(argv: Sequence[str], loaded: LoadedTask, variants: list[Variant], batch: tuple,
                   device: torch.device, precision: str, clip: float | None) -> dict[str, int]:
    """Peak memory of a training step per variant: on a GPU the allocator's peak above what was allocated before the
    variant was built (one variant at a time); on a CPU a fresh process per variant (its peak RSS above its RSS
    before the model was built)."""
    out: dict[str, int] = {}
    if device.type == "cuda":
        for variant in variants:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            task = build(loaded.task, variant.attention, device, precision)
            step = train_step(task, batch, precision, device, clip)
            for _ in range(2):
                step()
            torch.cuda.synchronize(device)
            out[variant.label] = torch.cuda.max_memory_allocated(device) - before
            del task, step
        torch.cuda.empty_cache()
        return out
    for index, variant in enumerate(variants):
        command = [sys.executable, "-m", "qkv_lightning.bench.models", *argv, "--probe", str(index)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in result.stdout.splitlines() if line.startswith(PROBE_MARK)]
        if result.returncode or not lines:
            raise RuntimeError(f"memory probe of {variant.label} failed:\n{result.stderr[-2000:]}")
        out[variant.label] = json.loads(lines[-1][len(PROBE_MARK):])["delta"]
    return out


def probe(loaded: LoadedTask, variant: Variant, batch: tuple, device: torch.device, precision: str,
          clip: float | None) -> None:
    """The child process of :func:`measure_memory`: two training steps of one variant; prints its peak RSS."""
    before = current_rss()
    task = build(loaded.task, variant.attention, device, precision)
    step = train_step(task, batch, precision, device, clip)
    for _ in range(2):
        step()
    peak = peak_rss()
    print(PROBE_MARK + json.dumps({"rss_before": before, "peak": peak, "delta": max(0, peak - before)}), flush=True)


@contextlib.contextmanager
def quiet_lightning():
    """Lightning's info messages and warnings off (e.g. "max_steps reached", "no val_dataloader")."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class RepeatedBatch(Dataset):
    """``length`` times the same (already collated, already on the device) batch."""

    def __init__(self, batch: tuple, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple:
        return self.batch


class StepTimes:
    """A callback recording the time at the end of every training batch (after the optimiser step)."""

    def __new__(cls, device: torch.device):
        from lightning.pytorch.callbacks import Callback

        class _StepTimes(Callback):
            def __init__(self) -> None:
                self.ends: list[float] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                synchronize(device)
                self.ends.append(time.perf_counter())

        return _StepTimes()


OVERHEAD_SKIP = 2  # untimed first steps of each loop segment of --lightning_overhead


def lightning_overhead(loaded: LoadedTask, variant: Variant, batch: tuple, device: torch.device, precision: str,
                       clip: float | None, steps: int, rounds: int, skip: int,
                       gemm: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Per-step times of a plain PyTorch loop and of Lightning fit loops on the same model, batch and optimiser
    settings, interleaved in ``rounds``; the first ``skip`` steps of each segment are left out (warm-up, and a new
    optimiser's first step for each fit). ``lightning``: a bare Trainer; ``lightning_fit``: as ``fit`` runs it here
    (TensorBoard logging, learning-rate monitor, the non-finite guard and the perf monitor). With ``gemm``, each
    round also times that many matrix products (key ``gemm``), for the loops' fractions of the GEMM peak."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import TensorBoardLogger

    from qkv_lightning.callbacks.nonfinite import NonFiniteGuard
    from qkv_lightning.callbacks.perf import PerfMonitor

    task = build(loaded.task, variant.attention, device, precision)
    plain_step = train_step(task, batch, precision, device, clip)
    loader = DataLoader(RepeatedBatch(batch, steps), batch_size=None)  # the same batch every step, as the plain loop
    log_every = int(loaded.config.trainer.get("log_every_n_steps") or 50)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    times: dict[str, list[float]] = {"plain": [], "lightning": [], "lightning_fit": [], "gemm": []}
    kinds = ("lightning", "plain", "lightning_fit") + (("gemm",) if gemm else ())
    with tempfile.TemporaryDirectory() as logs:
        for _ in range(rounds):
            for kind in kinds:
                if kind in ("plain", "gemm"):
                    ends = []
                    for _ in range(steps):
                        (plain_step if kind == "plain" else gemm)()
                        synchronize(device)
                        ends.append(time.perf_counter())
                else:
                    timer = StepTimes(device)
                    full = kind == "lightning_fit"
                    with quiet_lightning():
                        trainer = L.Trainer(
                            accelerator=accelerator, devices=1, precision=precision, max_steps=steps,
                            gradient_clip_val=clip, limit_val_batches=0, num_sanity_val_steps=0,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            logger=TensorBoardLogger(logs, name="overhead") if full else False,
                            log_every_n_steps=log_every,
                            callbacks=[timer, *([LearningRateMonitor("step"), NonFiniteGuard(), PerfMonitor()]
                                                if full else [])],
                        )
                        trainer.fit(task, train_dataloaders=loader)
                    task.to(device)  # Lightning's teardown moves the model back to the CPU
                    ends = timer.ends
                times[kind] += [b - a for a, b in zip(ends[skip:], ends[skip + 1 :])]
    return times


# ------------------------------------------------------------------------------------------------------ main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cli.py bench",
        allow_abbrev=False,
        description="Measure every attention variant of a task config side by side on this device (interleaved, "
        "medians after warm-up) and print each figure as a ratio to QKV next to the closed-form ratios. Other "
        "options (e.g. --data.batch_size 4) change the config.",
    )
    add_config_arguments(p)
    p.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    p.add_argument("--precision", default=None, help="32-true, bf16-mixed or bf16-true; default the config's")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data", choices=("config", "random"), default="config",
                   help="the datamodule's first batch, or random contents of the same shapes (no data needed)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per variant (interleaved rounds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per variant first")
    p.add_argument("--memory", type=_bool, default=True, help="measure peak memory (a subprocess per variant on CPU)")
    p.add_argument("--decode", type=_bool, default=True, help="measure KV-cached decoding (language models)")
    p.add_argument("--decode_context", type=int, default=None, help="prompt tokens in the cache; default max - 32")
    p.add_argument("--decode_tokens", type=int, default=32, help="tokens decoded per timed call")
    p.add_argument("--decode_batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--decode_repeats", type=int, default=5, help="timed decoding calls per variant")
    p.add_argument("--attention", type=_bool, default=True,
                   help="also time the attention core against timm's Attention and torch.nn.MultiheadAttention")
    p.add_argument("--attention_repeats", type=int, default=20)
    p.add_argument("--gemm", action="store_true", help="measure the device's GEMM peak and the fraction reached")
    p.add_argument("--gemm_size", type=int, default=None, help="side of the square GEMM; default 4096 CPU, 8192 GPU")
    p.add_argument("--gemm_dtype", default=None, help="GEMM dtype; default float32 (bfloat16 for bf16 precisions)")
    p.add_argument("--lightning_overhead", action="store_true",
                   help="compare Lightning fit loops with a plain PyTorch loop on the first variant")
    p.add_argument("--overhead_steps", type=int, default=8, help="steps per loop segment")
    p.add_argument("--overhead_rounds", type=int, default=2, help="interleaved rounds of the three loops")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    p.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """``bench``: measure and print."""
    argv = list(argv or [])
    args, overrides = parser().parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_task(args.config, overrides, args.data_spec)
    precision = check_precision(args.precision or loaded.config.trainer.get("precision") or "32-true")
    clip = loaded.config.trainer.get("gradient_clip_val")
    n_head = loaded.task.network_config.n_head
    variants = variants_of(loaded.task.attention_config, n_head, args.variants, args.n_kv_heads)
    for name, value, least in (("steps", args.steps, 1), ("decode_repeats", args.decode_repeats, 1),
                               ("attention_repeats", args.attention_repeats, 1), ("overhead_rounds", args.overhead_rounds, 1),
                               ("overhead_steps", args.overhead_steps, OVERHEAD_SKIP + 2)):
        if value < least:
            raise ConfigError(f"--{name}={value} must be at least {least}"
                              + (f" (the first {OVERHEAD_SKIP} steps of each loop segment are warm-up)."
                                 if name == "overhead_steps" else "."))
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


def run_bench(args: argparse.Namespace, argv: list[str], loaded: LoadedTask, variants: list[Variant], batch: tuple,
              device: torch.device, precision: str, clip: float | None) -> dict[str, Any]:
    """Every measurement; returns the result as a plain dict (the JSON form)."""
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    task = loaded.task
    samples = task.samples_in(batch)
    costs = {v.label: task.cost(v.attention) for v in variants}
    memory = measure_memory(argv, loaded, variants, batch, device, precision, clip) if args.memory else {}

    built = {v.label: build(task, v.attention, device, precision) for v in variants}
    steps = {name: train_step(t, batch, precision, device, clip) for name, t in built.items()}
    gemm = None
    if args.gemm:  # timed in the same rounds as the training steps, so that load drifts hit both alike
        dtype_name = args.gemm_dtype or ("bfloat16" if precision.startswith("bf16") else "float32")
        size = args.gemm_size or (8192 if device.type == "cuda" else 4096)
        gemm = {"size": size, "dtype": dtype_name}
        steps[GEMM] = gemm_step(device, getattr(torch, dtype_name), size)
    samples_s = interleaved_samples(steps, args.steps, args.warmup, device)
    step_s = {name: statistics.median(values) for name, values in samples_s.items()}
    if gemm:
        gemm["flops_per_sec"] = 2 * gemm["size"] ** 3 / step_s.pop(GEMM)
        gemm["flops_per_sec_best"] = 2 * gemm["size"] ** 3 / min(samples_s.pop(GEMM))

    decode_s: dict[str, float] = {}
    cache_bytes: dict[str, int] = {}
    is_lm = costs["QKV"].network == "GPT"
    decode_setting = None
    if args.decode and is_lm:
        max_len = task.resolved_network_config(loaded.data_spec).max_seq_len
        n_new = min(args.decode_tokens, max_len - 1)
        context = args.decode_context or max(1, max_len - n_new)
        if context + n_new > max_len:
            raise ConfigError(f"--decode_context {context} + --decode_tokens {n_new} exceed max_seq_len={max_len}.")
        decoders = {}
        for name, t in built.items():
            t.eval()
            decoders[name], cache_bytes[name] = decode_step(t, args.decode_batch, context, n_new, device, precision)
        decode_s = interleaved_medians(decoders, args.decode_repeats, 1, device)
        decode_setting = {"context": context, "tokens": n_new, "batch": args.decode_batch}
    del steps, built

    measured = {
        name: Measured(step_s[name], decode_s.get(name), memory.get(name), cache_bytes.get(name)) for name in costs
    }
    decode_tokens = decode_setting["tokens"] * decode_setting["batch"] if decode_setting else None
    rows = summarise(costs, measured, samples, decode_tokens, gemm["flops_per_sec"] if gemm else None)
    for row in rows:  # the fastest round too: on a busy machine, load only ever adds time
        row["step_times_s"] = samples_s[row["name"]]
        best = min(samples_s[row["name"]])
        row["step_time_ratio_best"] = best / min(samples_s["QKV"])
        row["gemm_fraction_best"] = row["train_flops_per_step"] / best / gemm["flops_per_sec_best"] if gemm else None

    attention = attention_table = None
    if args.attention:
        cost = costs["QKV"]
        sharing = list(dict.fromkeys(v.attention.sharing for v in variants))
        timings = bench_attention(cost.d_model, cost.n_head, cost.tokens_per_sample, samples, cost.network == "GPT",
                                  sharing, None, args.attention_repeats, 3, str(device),
                                  "bfloat16" if precision.startswith("bf16") else "float32")
        ref = next(t for t in timings if t.name == "QKV")
        attention = [{"name": t.name, "median_ms": t.median_ms, "time_ratio": t.median_ms / ref.median_ms,
                      "flops_ratio": (t.flops / ref.flops) if t.flops else None} for t in timings]
        attention_table = format_attention_table(timings)
    overhead = None
    if args.lightning_overhead:
        first = variants[0]
        products = gemm_step(device, getattr(torch, gemm["dtype"]), gemm["size"]) if gemm else None
        times = lightning_overhead(loaded, first, batch, device, precision, clip, args.overhead_steps,
                                   args.overhead_rounds, skip=OVERHEAD_SKIP, gemm=products)
        peak = 2 * gemm["size"] ** 3 / statistics.median(times["gemm"]) if gemm else None
        overhead = overhead_summary(times["plain"], times["lightning"], times["lightning_fit"],
                                    costs[first.label].train_flops(samples), peak)
        overhead["variant"] = first.label
        overhead["step_times_s"] = times
        overhead["gemm_flops_per_sec"] = peak
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cost = costs["QKV"]
    return {
        "setup": {
            "command": "python cli.py bench " + " ".join(argv),
            "task": type(task).__name__,
            "network": cost.network,
            "sizes": {"n_layer": cost.n_layer, "d_model": cost.d_model, "n_head": cost.n_head},
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "precision": precision,
            "gradient_clip_val": clip,
            "batch_samples": samples,
            "tokens_per_sample": cost.tokens_per_sample,
            "sample_unit": cost.sample_unit,
            "counts_tokens": task.counts_tokens,
            "data": args.data,
            "data_spec_source": loaded.spec_source,
            "steps": args.steps,
            "warmup": args.warmup,
            "memory": ("CUDA allocator peak above the memory allocated before the variant was built" if device.type
                       == "cuda" else "peak RSS of a fresh process per variant, above its RSS before the model was "
                       "built") if args.memory else None,
            "decode": decode_setting,
        },
        "variants": rows,
        "attention_core": attention,
        "attention_table": attention_table,
        "gemm": gemm,
        "lightning_overhead": overhead,
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
