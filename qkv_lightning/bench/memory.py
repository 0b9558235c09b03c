"""The memory probe of ``bench``: peak memory of a training step per variant (the CUDA allocator's peak on a GPU, the
peak RSS of a fresh process per variant on a CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

import torch

from qkv_lightning.bench.common import LoadedTask
from qkv_lightning.bench.steps import build, train_step
from qkv_lightning.variants import Variant

PROBE_MARK = "BENCH_MEMORY_PROBE "
"""Start of the line on which a probe process prints its result."""


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss() -> int:
    """The peak resident set size of this process so far, in bytes."""
    import resource  # POSIX only: imported here, so that the module imports on Windows

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_memory(argv: Sequence[str], loaded: LoadedTask, variants: list[Variant], batch: tuple,
                   device: torch.device, precision: str, clip: float | None) -> dict[str, int]:
    """Peak memory of a training step per variant: on a GPU the allocator's peak above what was allocated before the
    variant was built (one variant at a time); on a CPU a fresh process per variant (its peak RSS above its RSS
    before the model was built), running ``bench`` with ``argv`` and ``--probe <index>``."""
    out: dict[str, int] = {}
    if device.type == "cuda":
        for variant in variants:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            task = build(loaded.task, variant.attention_config(loaded.task.attention_config), device, precision)
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
    task = build(loaded.task, variant.attention_config(loaded.task.attention_config), device, precision)
    step = train_step(task, batch, precision, device, clip)
    for _ in range(2):
        step()
    peak = peak_rss()
    print(PROBE_MARK + json.dumps({"rss_before": before, "peak": peak, "delta": max(0, peak - before)}), flush=True)
