"""Throughput, model FLOPs utilisation (MFU), step time and peak memory during ``fit``, logged as ``perf/...``."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.trainer.states import RunningStage

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


class PerfMonitor(ThroughputMonitor):
    """Logs throughput and efficiency of training with Lightning's ``ThroughputMonitor`` and the task's closed-form
    FLOPs (``TaskModule.flops_per_batch``), at ``trainer.log_every_n_steps``:

    - ``perf/tokens_per_sec`` (token tasks) and ``perf/samples_per_sec`` (``perf/images_per_sec`` for images), all
      devices together;
    - ``perf/flops_per_sec`` per device and ``perf/mfu``: that divided by the device's peak FLOP/s;
    - ``perf/step_time``: seconds per optimiser step;
    - ``perf/peak_memory_gb``: the CUDA allocator's peak (GPU) or the process's peak RSS (CPU), in GB (1e9 bytes).

    A time point is taken at each logging step only (every ``trainer.log_every_n_steps`` batches): on a GPU that is
    the one device synchronisation the monitor makes in training (Lightning's monitor synchronises after every
    batch, which keeps the CPU from queueing the next step's kernels). Rates are rolling averages over the last
    ``window`` time points, i.e. the last ``window - 1`` logging intervals, so they appear from the ``window``-th
    logging step on; time spent in validation (two synchronisations per validation run) is left out.

    Args:
        enabled: log the ``perf/...`` metrics.
        available_flops: peak FLOP/s of one device, for ``perf/mfu``. None takes it from Lightning's table of GPUs
            for the run's precision; CPUs have no table entry: measure their matrix-multiply peak with
            ``python cli.py bench --config <config> --gemm`` and set it here.
        window: time points (logging steps) in the rolling average, at least 2: rates average over the last
            ``window - 1`` intervals of ``trainer.log_every_n_steps`` batches.
    """

    def __init__(self, enabled: bool = True, available_flops: float | None = None, window: int = 2) -> None:
        if window < 2:
            raise ConfigError(f"perf.window={window} must be at least 2 (rates need two time points).")
        if available_flops is not None and available_flops <= 0:
            raise ConfigError(f"perf.available_flops={available_flops} must be positive (FLOP/s), or null.")
        super().__init__(batch_size_fn=self._samples_in, length_fn=self._tokens_in, window_size=window)
        self.enabled = enabled
        self.peak_flops = available_flops
        self._module: Any = None
        self._flops_since_time_point = 0  # closed-form FLOPs of the batches since the last time point
        self._validation_started: float | None = None  # when the running validation started (after a device sync)

    def _samples_in(self, batch: Any) -> int:
        return self._module.samples_in(batch)

    def _tokens_in(self, batch: Any) -> int:
        return self._module.tokens_in(batch)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        self._module = pl_module
        if not getattr(pl_module, "counts_tokens", False):
            self.length_fn = None
        super().setup(trainer, pl_module, stage)
        dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
        peak = self.peak_flops or device_peak_flops(trainer.strategy.root_device, dtype)
        self.available_flops = peak
        for throughput in self._throughputs.values():
            throughput.available_flops = peak
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def _start(self, trainer: L.Trainer) -> None:
        if self.enabled and trainer.state.stage == RunningStage.TRAINING:
            super()._start(trainer)
            self._flops_since_time_point = 0

    @torch.inference_mode()  # in case the batch's size or length functions touch tensors
    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        """Count every training batch; take a time point (a device sync) only where the metrics are logged."""
        stage = trainer.state.stage
        if not self.enabled or stage != RunningStage.TRAINING:
            return  # evaluation throughput is not logged: no per-batch synchronisation there
        if self.length_fn is not None:
            self._lengths[stage] += self.length_fn(batch)
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1
        self._flops_since_time_point += pl_module.flops_per_batch  # the closed form for this batch
        if not trainer._logger_connector.should_update_logs:
            return
        _synchronize(trainer)  # the time of work still queued on the GPU belongs to these batches
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage],
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=None if self.length_fn is None else self._lengths[stage],
            flops=self._flops_since_time_point,  # Lightning's Throughput takes FLOPs since its last update
        )
        self._flops_since_time_point = 0

    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.enabled and not trainer.sanity_checking and RunningStage.TRAINING in self._t0s:
            _synchronize(trainer)  # the training work queued so far counts as training time
            self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, *args: Any) -> None:
        """Leave the validation run's time out of the training rates."""
        if self.enabled and not trainer.sanity_checking and self._validation_started is not None:
            _synchronize(trainer)
            self._t0s[RunningStage.TRAINING] += time.perf_counter() - self._validation_started
            self._validation_started = None

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        """Log the ``perf/...`` metrics of training (Lightning's own keys renamed; evaluation is not logged)."""
        if not self.enabled or trainer.state.stage != RunningStage.TRAINING:
            return
        if not trainer._logger_connector.should_update_logs:
            return
        trainer._logger_connector.log_metrics(self.metrics(trainer))

    def metrics(self, trainer: L.Trainer) -> dict[str, float]:
        """The ``perf/...`` values now, from the training throughput window and the memory peak."""
        computed = self._throughputs[RunningStage.TRAINING].compute()
        unit = getattr(self._module, "sample_unit", "samples")
        out: dict[str, float] = {}

        def total(key: str) -> float | None:  # all devices together (Lightning gives those only when world > 1)
            return computed.get(key, computed.get(f"device/{key}"))

        if total("samples_per_sec") is not None:
            out[f"perf/{unit}_per_sec"] = float(total("samples_per_sec"))
        if total("items_per_sec") is not None:
            out["perf/tokens_per_sec"] = float(total("items_per_sec"))
        if "device/batches_per_sec" in computed:
            out["perf/step_time"] = trainer.accumulate_grad_batches / computed["device/batches_per_sec"]
        if "device/flops_per_sec" in computed:
            out["perf/flops_per_sec"] = float(computed["device/flops_per_sec"])
        if "device/mfu" in computed:
            out["perf/mfu"] = float(computed["device/mfu"])
        out["perf/peak_memory_gb"] = peak_memory_bytes(trainer.strategy.root_device) / 1e9
        return out
