"""Timing helpers shared by the bench commands: device synchronisation and interleaved (round-robin) timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """One contender's result."""

    name: str
    median_ms: float
    flops: int | None = None


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPUs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each step, timed round-robin so that drifts in machine load hit every contender alike."""
    samples = interleaved_samples(steps, repeats, warmup, device)
    return {name: statistics.median(values) for name, values in samples.items()}


def interleaved_samples(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each step in each of ``repeats`` round-robin rounds, after ``warmup`` untimed calls of each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples

