"""Lightning's model summary with the FLOPs this project computes in closed form (:mod:`qkv_lightning.nn.cost`).

Lightning's summary counts FLOPs by running ``example_input_array`` through torch's FLOP counter; the tasks have none
(their inputs' shapes come from the data), so it printed a FLOPs column of zeros and ``Total FLOPs: 0``. Here the
column shows ``-`` (not counted per layer) and the total is the task's closed-form forward FLOPs of one sample
(``task.cost()``), the count the throughput metrics and ``report`` use. The CLI puts it in place of Lightning's
default summary (:meth:`qkv_lightning.lightning_cli.QKVLightningCLI.instantiate_trainer`);
``trainer.enable_model_summary: false`` still turns the summary off.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary, RichModelSummary

log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


def forward_flops_per_sample(pl_module: Any) -> int | None:
    """The task's closed-form forward FLOPs of one sample, or None for a module without a cost model or data spec."""
    cost = getattr(pl_module, "cost", None)
    if cost is None or getattr(pl_module, "data_spec", None) is None:
        return None
    try:
        return int(cost().forward_flops(1))
    except Exception:  # a network the cost model does not cover: no FLOPs rather than a failed run
        return None


class _CostFlops:
    """Mixin for Lightning's summary callbacks: no per-layer FLOPs, the total from the task's cost model."""

    _flops: int | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._flops = forward_flops_per_sample(pl_module)
        super().on_fit_start(trainer, pl_module)  # type: ignore[misc]

    def summarize(  # Lightning calls it as self.summarize(...)
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        summary_data = [(name, ["-"] * len(values) if name == "FLOPs" else values) for name, values in summary_data]
        flops = self._flops if self._flops is not None else total_flops
        super().summarize(  # type: ignore[misc]
            summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, flops,
            **summarize_kwargs,
        )
        if self._flops is not None:
            log.info("Total FLOPs: one sample's forward pass, in closed form (qkv_lightning.nn.cost).")


class CostModelSummary(_CostFlops, ModelSummary):
    """:class:`~lightning.pytorch.callbacks.ModelSummary` with the task's closed-form FLOPs."""


class CostRichModelSummary(_CostFlops, RichModelSummary):
    """:class:`~lightning.pytorch.callbacks.RichModelSummary` with the task's closed-form FLOPs."""


def with_cost_flops(callback: Any) -> Any:
    """Lightning's default summary callback replaced by its counterpart above (same depth); any other returned."""
    for plain, ours in ((RichModelSummary, CostRichModelSummary), (ModelSummary, CostModelSummary)):
        if type(callback) is plain:
            return ours(max_depth=callback._max_depth, **getattr(callback, "_summarize_kwargs", {}))
    return callback
