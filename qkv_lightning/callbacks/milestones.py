"""Metrics at chosen training steps: ``val/ppl@30`` for a validation run at step 30, for studies of a training curve
(e.g. val/ppl after 5%, 10% and 25% of a budget) that report more than the final value."""

from __future__ import annotations

from typing import Any

import lightning as L

from qkv_lightning.errors import ConfigError


class MetricsAtSteps(L.Callback):
    """Record ``metrics`` after each validation that ends at one of ``steps`` as ``<metric>@<step>``.

    Validations run where ``trainer.val_check_interval`` puts them, so pick steps that are multiples of it. The
    values are kept in :attr:`recorded` (a study adds them to each cell's metrics) and logged.

    Args:
        steps: optimiser steps (``trainer.global_step`` after the step) to record at.
        metrics: logged metric names to record, e.g. ``[val/ppl, val/loss]``.
    """

    def __init__(self, steps: list[int], metrics: list[str] | None = None) -> None:
        if not steps or any(step < 0 for step in steps):
            raise ConfigError(f"MetricsAtSteps.steps={steps} must list training steps >= 0.")
        self.steps = sorted(set(steps))
        self.metrics = list(metrics or ["val/ppl"])
        self.recorded: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.global_step not in self.steps:
            return
        for name in self.metrics:
            value = trainer.callback_metrics.get(name)
            if value is not None:
                self.recorded[f"{name}@{trainer.global_step}"] = float(value)

    def state_dict(self) -> dict[str, Any]:
        return {"recorded": dict(self.recorded)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recorded = dict(state_dict.get("recorded", {}))
