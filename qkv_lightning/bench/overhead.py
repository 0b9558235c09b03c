"""The Lightning-overhead harness of ``bench --lightning_overhead``: a Lightning ``Trainer`` fit loop (bare, and as
``fit`` runs it) against a plain PyTorch loop doing the same work on the same model, batch and optimiser settings."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from qkv_lightning.bench.common import LoadedTask
from qkv_lightning.bench.report import ratio
from qkv_lightning.bench.steps import build, gemm_step, train_step
from qkv_lightning.bench.timing import synchronize
from qkv_lightning.variants import Variant


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

    task = build(loaded.task, variant.attention_config(loaded.task.attention_config), device, precision)
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
                times[kind] += [b - a for a, b in zip(ends[skip:], ends[skip + 1 :], strict=False)]
    return times


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


def measure_overhead(loaded: LoadedTask, variant: Variant, batch: tuple, device: torch.device, precision: str,
                     clip: float | None, steps: int, rounds: int, flops_per_step: int,
                     gemm: dict[str, Any] | None = None) -> dict[str, Any]:
    """``bench --lightning_overhead``: :func:`lightning_overhead` of ``variant`` summarised by
    :func:`overhead_summary`; with ``gemm`` (``bench --gemm``'s size and dtype), matrix products are timed in the same
    rounds for the GEMM peak the loops' fractions are taken of."""
    products = gemm_step(device, getattr(torch, gemm["dtype"]), gemm["size"]) if gemm else None
    times = lightning_overhead(loaded, variant, batch, device, precision, clip, steps, rounds, skip=OVERHEAD_SKIP,
                               gemm=products)
    peak = 2 * gemm["size"] ** 3 / statistics.median(times["gemm"]) if gemm else None
    overhead = overhead_summary(times["plain"], times["lightning"], times["lightning_fit"], flops_per_step, peak)
    overhead["variant"] = variant.label
    overhead["step_times_s"] = times
    overhead["gemm_flops_per_sec"] = peak
    return overhead
