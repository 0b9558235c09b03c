"""Validation metrics as one printed line, for runs without a progress bar (the offline configs)."""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only


def format_metrics(metrics: dict, prefix: str = "val/") -> str:
    """``val/loss 4.8123  val/ppl 123.4`` from a metrics mapping (tensors or numbers), sorted by name."""
    parts = []
    for name in sorted(k for k in metrics if k.startswith(prefix)):
        value = float(metrics[name])
        text = f"{value:.0f}" if name.endswith("tokens") and math.isfinite(value) else f"{value:.4g}"
        parts.append(f"{name} {text}")
    return "  ".join(parts)


class PrintValidationMetrics(Callback):
    """Print the validation metrics (``val/*``) on rank 0: after the run (``fit``), and after every validation with
    ``every``.

    Args:
        every: also print after each validation during training, not only the final values.
    """

    def __init__(self, every: bool = False) -> None:
        super().__init__()
        self.every = every

    @rank_zero_only
    def _print(self, trainer: L.Trainer, when: str) -> None:
        line = format_metrics(trainer.callback_metrics)
        if line:
            print(f"{when} (step {trainer.global_step}): {line}", flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._print(trainer, "validation")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, "final validation")
