"""Timing helpers shared by the bench commands: device synchronisation and interleaved (round-robin) timing."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """One contender's result."""

    name: str
    median_ms: float
    flops: int | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values``: the smallest value at or above a fraction ``q`` of them."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPUs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Progress = Callable[[str], None]
"""Where the timing loops report, one line per contender and round (the bench commands print to stderr)."""


def print_progress(line: str) -> None:
    """Print a progress line to stderr (stdout carries the tables and JSON)."""
    print(line, file=sys.stderr, flush=True)


def interleaved_medians(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device,
    progress: Progress | None = None, what: str = "step",
) -> dict[str, float]:
    """Median seconds of each step, timed round-robin so that drifts in machine load hit every contender alike."""
    samples = interleaved_samples(steps, repeats, warmup, device, progress, what)
    return {name: statistics.median(values) for name, values in samples.items()}


def interleaved_samples(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device,
    progress: Progress | None = None, what: str = "step",
) -> dict[str, list[float]]:
    """Seconds of each step in each of ``repeats`` round-robin rounds, after ``warmup`` untimed calls of each.

    ``progress`` gets one line per contender after its warm-up and one per contender and round
    (``bench step: round 3/10 Q-K=V 12.3 ms``)."""
    for name, step in steps.items():
        started = time.perf_counter()
        for _ in range(warmup):
            step()
        if progress is not None and warmup:
            synchronize(device)
            progress(f"bench {what}: warm-up {name} ({warmup} calls, {time.perf_counter() - started:.1f} s)")
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
            if progress is not None:
                progress(f"bench {what}: round {round_ + 1}/{repeats} {name} {1e3 * samples[name][-1]:.1f} ms")
    return samples

