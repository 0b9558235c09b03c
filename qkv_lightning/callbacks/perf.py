"""Throughput, model FLOPs utilisation (MFU), step time and peak memory during ``fit``, logged as ``perf/...``."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback

from qkv_lightning.errors import ConfigError

DENSE_PEAKS: dict[str, dict[Any, float]] = {
    "h100": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12},
    "h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12},
}
"""Dense (not sparse) peak FLOP/s of GPUs whose names Lightning's table does not resolve (e.g. "NVIDIA H200"),
from NVIDIA's SXM data sheets."""


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of ``device`` for ``dtype``: Lightning's table of GPUs, then :data:`DENSE_PEAKS`; None for CPUs."""
    if device.type != "cuda":
        return None
    flops = get_available_flops(device, dtype)
    if flops:
        return float(flops)
    name = torch.cuda.get_device_name(device).lower()
    if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
        dtype = "tfloat32"
    for chip, peaks in DENSE_PEAKS.items():
        if chip in name and dtype in peaks:
            return peaks[dtype]
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """The CUDA allocator's peak on a GPU; the process's peak resident set size (RSS) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource  # POSIX only: imported here, so that the module imports on Windows

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _synchronize(trainer: L.Trainer) -> None:
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize(trainer.strategy.root_device)


def precision_dtype(precision: str | None) -> torch.dtype:
    """The compute dtype of a Trainer's ``precision`` setting (``"bf16-mixed"``, ``"16-true"``, ``"32-true"``, ...),
    from the setting's public name, for the peak-FLOP/s tables."""
    text = str(precision or "32-true").lower()
    if text.startswith("bf16") or text == "transformer-engine":
        return torch.bfloat16
    if text.startswith("16") or text.endswith("float16"):
        return torch.float16
    if text.startswith("64"):
        return torch.float64
    return torch.float32


class PerfMonitor(Callback):
    """Logs throughput and efficiency of training with Lightning's public
    :class:`~lightning.fabric.utilities.throughput.Throughput` and the task's closed-form FLOPs
    (``TaskModule.flops_per_batch``), at the logging steps (every ``trainer.log_every_n_steps`` optimiser steps):

    - ``perf/tokens_per_sec`` (token tasks) and ``perf/samples_per_sec`` (``perf/images_per_sec`` for images), all
      devices together;
    - ``perf/flops_per_sec`` per device and ``perf/mfu``: that divided by the device's peak FLOP/s;
    - ``perf/step_time``: seconds per optimiser step;
    - ``perf/peak_memory_gb``: the CUDA allocator's peak (GPU) or the process's peak RSS (CPU), in GB (1e9 bytes).

    A time point is taken at each logging step only: on a GPU that is the one device synchronisation the monitor makes
    in training (Lightning's ``ThroughputMonitor`` synchronises after every batch, which keeps the CPU from queueing
    the next step's kernels). Rates are rolling averages over the last ``window`` time points, i.e. the last
    ``window - 1`` logging intervals, so they appear from the ``window``-th logging step on; time spent in
    validation (two synchronisations per validation run) is left out. The values go through
    ``LightningModule.log`` (``on_step``), so every logger gets them at the step of ``train/loss``.

    Args:
        enabled: log the ``perf/...`` metrics.
        available_flops: peak FLOP/s of one device, for ``perf/mfu``. None takes it from Lightning's table of GPUs
            for the run's precision; CPUs have no table entry: measure their matrix-multiply peak with
            ``python cli.py bench --config <config> --gemm true`` and set it here.
        window: time points (logging steps) in the rolling average, at least 2: rates average over the last
            ``window - 1`` intervals of ``trainer.log_every_n_steps`` batches.
    """

    def __init__(self, enabled: bool = True, available_flops: float | None = None, window: int = 2) -> None:
        if window < 2:
            raise ConfigError(f"perf.window={window} must be at least 2 (rates need two time points).")
        if available_flops is not None and available_flops <= 0:
            raise ConfigError(f"perf.available_flops={available_flops} must be positive (FLOP/s), or null.")
        super().__init__()
        self.enabled = enabled
        self.peak_flops = available_flops
        self.window = window
        self.available_flops: float | None = None
        self.throughput: Throughput | None = None
        self._counts_tokens = False
        self._reset_counts()
        self._t0 = 0.0
        self._last_global_step = 0
        self._validation_started: float | None = None  # when the running validation started (after a device sync)

    def _reset_counts(self) -> None:
        self._batches = self._samples = self._tokens = 0
        self._flops_since_time_point = 0  # closed-form FLOPs of the batches since the last time point

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        self._counts_tokens = bool(getattr(pl_module, "counts_tokens", False))
        device = trainer.strategy.root_device
        self.available_flops = self.peak_flops or device_peak_flops(device, precision_dtype(trainer.precision))
        self.throughput = Throughput(
            available_flops=self.available_flops, world_size=trainer.world_size, window_size=self.window
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.throughput is None:
            return
        self.throughput.reset()
        self._reset_counts()
        self._last_global_step = trainer.global_step
        _synchronize(trainer)
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count every training batch; after an optimiser step that is a logging step, take a time point (a device
        sync) and log the rates."""
        if self.throughput is None:
            return
        self._samples += pl_module.samples_in(batch)
        if self._counts_tokens:
            self._tokens += pl_module.tokens_in(batch)
        self._batches += 1
        self._flops_since_time_point += pl_module.flops_per_batch or 0  # the closed form for this batch
        stepped = trainer.global_step != self._last_global_step  # not inside a gradient accumulation
        self._last_global_step = trainer.global_step
        if not stepped or trainer.log_every_n_steps < 1 or trainer.global_step % trainer.log_every_n_steps:
            return
        _synchronize(trainer)  # the time of work still queued on the GPU belongs to these batches
        self.throughput.update(
            time=time.perf_counter() - self._t0,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens if self._counts_tokens else None,
            flops=self._flops_since_time_point,  # Throughput takes the FLOPs since its last update
        )
        self._flops_since_time_point = 0
        pl_module.log_dict(self.metrics(trainer, pl_module), on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.throughput is not None and not trainer.sanity_checking and trainer.state.fn == "fit":
            _synchronize(trainer)  # the training work queued so far counts as training time
            self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Leave the validation run's time out of the training rates."""
        if self._validation_started is not None:
            _synchronize(trainer)
            self._t0 += time.perf_counter() - self._validation_started
            self._validation_started = None

    def metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The ``perf/...`` values now, from the training throughput window and the memory peak."""
        computed = self.throughput.compute() if self.throughput is not None else {}
        unit = getattr(pl_module, "sample_unit", "samples")
        out: dict[str, float] = {}

        def total(key: str) -> float | None:  # all devices together (Throughput gives those only when world > 1)
            return computed.get(key, computed.get(f"device/{key}"))

        if total("samples_per_sec") is not None:
            out[f"perf/{unit}_per_sec"] = float(total("samples_per_sec"))
        if total("items_per_sec") is not None:
            out["perf/tokens_per_sec"] = float(total("items_per_sec"))
        if "device/batches_per_sec" in computed:
            out["perf/step_time"] = trainer.accumulate_grad_batches / float(computed["device/batches_per_sec"])
        if "device/flops_per_sec" in computed:
            out["perf/flops_per_sec"] = float(computed["device/flops_per_sec"])
        if "device/mfu" in computed:
            out["perf/mfu"] = float(computed["device/mfu"])
        out["perf/peak_memory_gb"] = peak_memory_bytes(trainer.strategy.root_device) / 1e9
        return out
