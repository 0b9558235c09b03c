"""Stop (or, within a budget, skip) optimiser steps whose loss or gradients are not finite, and fail a validation or
test whose metrics are not finite."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from qkv_lightning.errors import ConfigError, QKVError


class NonFiniteError(QKVError, RuntimeError):
    """The loss or a gradient became NaN or infinite."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class NonFiniteGuard(Callback):
    """Checks every optimiser step for a non-finite loss or gradient.

    By default the run stops with a message naming the step; checkpoints saved before it are kept (no checkpoint is
    written with the bad state). With ``max_skipped_steps > 0`` up to that many bad steps are skipped instead: their
    gradients are dropped so that the optimiser leaves weights and moments untouched; the count is logged as
    ``train/skipped_steps``. Ranks agree on every decision.

    A validation or test whose metrics (``val/*``, ``test/*``) hold a NaN or an infinity fails the same way, in
    ``fit`` (before a checkpoint of that validation is saved) and in ``validate`` / ``test``: the command prints the
    error and exits non-zero instead of printing ``val/loss nan`` as a result. That check costs nothing per step and
    is always on.

    Args:
        max_skipped_steps: bad steps that may be skipped before the run stops (0: stop at the first).
        enabled: check every step; the check costs one device synchronisation per step, which on a GPU can stall the
            queue of kernels (false turns the per-step check off).
    """

    def __init__(self, max_skipped_steps: int = 0, enabled: bool = True) -> None:
        super().__init__()
        if max_skipped_steps < 0:
            raise ConfigError(
                f"nonfinite.max_skipped_steps={max_skipped_steps} must be >= 0 (0: stop at the first bad step)."
            )
        self.max_skipped_steps = max_skipped_steps
        self.enabled = enabled
        self.skipped_steps = 0
        self._last_loss: torch.Tensor | None = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        self._last_loss = loss.detach()  # kept as a tensor: no device sync here

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.enabled:
            return
        grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        checks = [n.float().reshape(1) for n in torch._foreach_norm(grads)] if grads else []
        if self._last_loss is not None:
            checks.append(self._last_loss.float().reshape(1).to(checks[0].device if checks else "cpu"))
        local_bad = bool(checks) and not bool(torch.cat(checks).isfinite().all())  # one device sync per step
        bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        if not bad:
            return
        loss = None if self._last_loss is None else float(self._last_loss)
        what = f"loss ({loss})" if loss is not None and not math.isfinite(loss) else "gradient"
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {trainer.fit_loop.batch_idx})"
        if self.skipped_steps < self.max_skipped_steps:
            self.skipped_steps += 1
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None  # AdamW skips parameters without gradients: weights and moments unchanged
            pl_module.log("train/skipped_steps", float(self.skipped_steps), rank_zero_only=False, sync_dist=False)
            return
        raise NonFiniteError(
            f"non-finite {what} at {where}: training stopped and no checkpoint was written from this state; the "
            f"checkpoints saved before it are kept (resume with --ckpt_path last). Lower optimizer.lr, raise "
            f"optimizer.warmup_steps, check the data, or allow skipping bad steps with "
            f"--nonfinite.max_skipped_steps N (skipped so far: {self.skipped_steps})."
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_metrics(trainer, "val", "validation")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_metrics(trainer, "test", "test")

    def _check_metrics(self, trainer: L.Trainer, stage: str, what: str) -> None:
        """Raise :class:`NonFiniteError` when a metric of ``stage`` (``val/loss``, ...) is not finite on any rank."""
        bad = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(f"{stage}/") and not math.isfinite(float(value))
        }
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return
        found = ", ".join(f"{name} {value}" for name, value in sorted(bad.items())) or "on another process"
        if trainer.state.fn == "fit":
            when = f"global step {trainer.global_step}"
            if trainer.sanity_checking:
                when = "the sanity check before training"
            outcome = ("training stopped and no checkpoint was written from this state; the checkpoints saved before "
                       "it are kept. Lower optimizer.lr, raise optimizer.warmup_steps, or check the data")
        else:
            when = "the end"
            outcome = ("no result is reported. The checkpoint's weights or the evaluation overflowed: check the "
                       "checkpoint (--ckpt_path), or evaluate in 32-bit floats (--trainer.precision 32-true)")
        raise NonFiniteError(f"the {what} at {when} gave non-finite metrics ({found}): {outcome}.")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """No checkpoint of the state that produced the non-finite values, even from ``ModelCheckpoint(
        save_on_exception=True)`` (which runs after this callback)."""
        if isinstance(exception, NonFiniteError):
            for callback in trainer.checkpoint_callbacks:
                if getattr(callback, "save_on_exception", False):
                    callback.save_on_exception = False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
