"""A global batch given in tokens (or samples), whatever the device count: the gradient accumulation is derived at
fit start from the devices, the micro-batch and the sequence length."""

from __future__ import annotations

from typing import Any

import lightning as L

from qkv_lightning.errors import ConfigError


class GlobalBatch(L.Callback):
    """Set ``trainer.accumulate_grad_batches`` so that one optimiser step sees ``tokens`` tokens (or ``samples``
    samples) over all devices: accumulation = tokens / (devices x nodes x data.batch_size x data.seq_len).

    The paper gives its batch as micro-batch x accumulation x 8 GPUs (6 x 24 x 8 x 2048 = 2,359,296 tokens at 300M);
    with this callback the same config keeps that batch on 1, 8 or 64 devices. A batch that the devices and micro-batch
    do not divide is a :class:`ConfigError` naming the settings, before anything runs (``fit`` checks it with the
    other settings; the callback checks again when the fit starts). ``val_every_n_steps`` runs validation every that
    many optimiser steps (Lightning's ``val_check_interval`` counts micro-batches, so it depends on the accumulation).

    Args:
        tokens: tokens per optimiser step over all devices (a task whose samples are token sequences).
        samples: samples per optimiser step over all devices, instead of ``tokens``.
        val_every_n_steps: validate every this many optimiser steps (sets ``trainer.val_check_interval`` to this
            times the accumulation; needs ``trainer.check_val_every_n_epoch: null``); None leaves it as configured.
    """

    def __init__(self, tokens: int | None = None, samples: int | None = None, val_every_n_steps: int | None = None):
        if (tokens is None) == (samples is None):
            raise ConfigError("GlobalBatch needs exactly one of tokens (per optimiser step) and samples.")
        for name, value in (("tokens", tokens), ("samples", samples), ("val_every_n_steps", val_every_n_steps)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"GlobalBatch {name}={value!r} must be a positive integer.")
        self.tokens = tokens
        self.samples = samples
        self.val_every_n_steps = val_every_n_steps

    def accumulation(self, trainer: L.Trainer, datamodule: Any) -> int:
        """The accumulation that gives the global batch with this trainer's devices and the data's micro-batch.

        Raises:
            ConfigError: if the data has no ``batch_size`` (or ``seq_len``), or the batch does not divide.
        """
        micro = getattr(datamodule, "batch_size", None)
        if not isinstance(micro, int) or micro < 1:
            raise ConfigError("GlobalBatch needs a datamodule with a batch_size setting (the micro-batch per device).")
        devices = trainer.world_size
        per_sample, unit = 1, "samples"
        if self.tokens is not None:
            spec = datamodule.settings_spec() if hasattr(datamodule, "settings_spec") else {}
            per_sample = spec.get("seq_len") or getattr(datamodule, "seq_len", None)
            if not isinstance(per_sample, int) or per_sample < 1:
                raise ConfigError("GlobalBatch(tokens=...) needs a datamodule with a seq_len setting.")
            unit = "tokens"
        target = self.tokens if self.tokens is not None else self.samples
        per_pass = devices * micro * per_sample
        if target % per_pass:
            divisors = [m for m in range(1, micro + 1) if target % (devices * m * per_sample) == 0]
            raise ConfigError(
                f"the global batch of {target:,} {unit} (GlobalBatch.{unit}) is not a whole number of passes of "
                f"{devices} device(s) x data.batch_size={micro}"
                + (f" x data.seq_len={per_sample}" if unit == "tokens" else "")
                + f" = {per_pass:,} {unit}: change data.batch_size"
                + (f" (values that divide it here: {divisors})" if divisors else "")
                + f", the device count (trainer.devices, trainer.num_nodes) or GlobalBatch.{unit}."
            )
        return target // per_pass

    def apply(self, trainer: L.Trainer, datamodule: Any) -> int:
        """Set the trainer's accumulation (and validation interval) for this run; returns the accumulation."""
        accumulation = self.accumulation(trainer, datamodule)
        configured = trainer.accumulate_grad_batches
        if configured not in (1, accumulation):
            raise ConfigError(
                f"trainer.accumulate_grad_batches={configured} contradicts GlobalBatch, which derives {accumulation} "
                "from the devices and the micro-batch: leave trainer.accumulate_grad_batches at 1."
            )
        trainer.accumulate_grad_batches = accumulation
        if self.val_every_n_steps is not None:
            if trainer.check_val_every_n_epoch is not None:
                raise ConfigError(
                    "GlobalBatch.val_every_n_steps needs trainer.check_val_every_n_epoch: null (validation by steps)."
                )
            trainer.val_check_interval = self.val_every_n_steps * accumulation
        return accumulation

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.apply(trainer, trainer.datamodule)
