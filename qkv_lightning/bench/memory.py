"""The memory probes of the bench commands, in one place: the process's memory from ``/proc/self/status``,
:class:`PeakMemory` (the peak of a block of work above what it started with: the CUDA allocator's peak on a GPU,
the kernel's peak resident set, reset at the start, on a Linux CPU), and ``bench``'s peak memory of a training step
per variant (:func:`measure_memory`: one variant at a time on a GPU, a fresh process per variant on a CPU).

No Lightning import at module level: ``bench-decode``'s memory-budget child process imports this module and starts
fast."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from qkv_lightning.bench.timing import synchronize

if TYPE_CHECKING:
    from qkv_lightning.bench.common import LoadedTask
    from qkv_lightning.variants import Variant

PROBE_MARK = "BENCH_MEMORY_PROBE "
"""Start of the line on which a probe process prints its result."""


def proc_status(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``VmData``, ...) in bytes; None where there is
    no such file (not Linux) or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux; 0 where /proc is missing)."""
    return proc_status("VmRSS") or 0


def peak_rss() -> int:
    """The peak resident set size of this process so far, in bytes."""
    import resource  # POSIX only: imported here, so that the module imports on Windows

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak memory of a block of work above what was allocated (CUDA) or resident (CPU, Linux) when it began.

    On CPUs the kernel's peak resident set is reset through ``/proc/self/clear_refs``; None where that is not
    possible."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = 0
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.before = proc_status("VmRSS") or 0
            except OSError:
                self.before = -1
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.before
        elif self.before >= 0:
            high = proc_status("VmHWM")
            self.peak = None if high is None else max(0, high - self.before)


def measure_memory(argv: Sequence[str], loaded: LoadedTask, variants: list[Variant], batch: tuple,
                   device: torch.device, precision: str, clip: float | None) -> dict[str, int]:
    """Peak memory of a training step per variant: on a GPU the allocator's peak above what was allocated before the
    variant was built (one variant at a time); on a CPU a fresh process per variant (its peak RSS above its RSS
    before the model was built), running ``bench`` with ``argv`` and ``--probe <index>``."""
    from qkv_lightning.bench.steps import build, train_step  # imports Lightning

    out: dict[str, int] = {}
    if device.type == "cuda":
        for variant in variants:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            with PeakMemory(device) as peak:
                task = build(loaded.task, variant.attention_config(loaded.task.attention_config), device, precision)
                step = train_step(task, batch, precision, device, clip)
                for _ in range(2):
                    step()
            out[variant.label] = peak.peak
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
    from qkv_lightning.bench.steps import build, train_step  # imports Lightning

    before = current_rss()
    task = build(loaded.task, variant.attention_config(loaded.task.attention_config), device, precision)
    step = train_step(task, batch, precision, device, clip)
    for _ in range(2):
        step()
    peak = peak_rss()
    print(PROBE_MARK + json.dumps({"rss_before": before, "peak": peak, "delta": max(0, peak - before)}), flush=True)
