"""Attention maps of a few heads as images at validation (TensorBoard, MLflow, W&B), e.g. to see the symmetric maps
of Q=K."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from qkv_lightning.errors import ConfigError
from qkv_lightning.loggers import ImageLogging
from qkv_lightning.nn.attention import Attention


def head_strip(maps: Tensor, heads: int, max_tokens: int) -> Tensor:
    """Maps of the first ``heads`` heads of ``maps`` (H, T, S), side by side with a one-pixel white gap, each
    cropped to ``max_tokens`` and scaled from its own minimum (0) to its maximum (1): an image
    (T, n * (S + 1) - 1)."""
    maps = maps[:heads, :max_tokens, :max_tokens].float()  # (n, T, S)
    low = maps.amin(dim=(1, 2), keepdim=True)
    maps = (maps - low) / (maps.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
    n, t, s = maps.shape
    strip = maps.new_ones(t, n * (s + 1) - 1)
    for i in range(n):
        strip[:, i * (s + 1) : i * (s + 1) + s] = maps[i]
    return strip


class AttentionMaps(Callback):
    """Logs attention maps of the first validation sample as images, heads side by side (row = query, column =
    key, each map scaled to its own range): ``attention/layer<i>/probs``, the probabilities (explicit attention
    path, ``need_weights=True``), and ``attention/layer<i>/logits``, the scores q k^T / sqrt(d) (plus the score
    encoding) before masks and softmax, which are symmetric when Q and K share a projection (row-wise softmax and
    causal masks hide that symmetry in the probabilities).

    One eager forward pass (compiled blocks run uncompiled for it) of one (cropped) sample, on the first validation
    batch of every ``every_n_validations``-th validation run, on rank 0, to every logger that stores images
    (:func:`qkv_lightning.loggers.log_image`: TensorBoard images, MLflow artifacts ``<tag>/step_<step>.png``, W&B
    images; a logger that cannot, such as CSV, is named in a warning once). Sharded models (FSDP) are skipped.

    Args:
        enabled: log the maps.
        every_n_validations: log at every n-th validation run (sanity checks do not count).
        layers: block indices to show (negative counts from the end); None shows the first and the last block.
        heads: the first this many heads of each block.
        max_tokens: crop sequences (and the maps) to their first this many tokens.
        logits: also log the logits.
    """

    def __init__(
        self,
        enabled: bool = True,
        every_n_validations: int = 1,
        layers: list[int] | None = None,
        heads: int = 4,
        max_tokens: int = 64,
        logits: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("every_n_validations", every_n_validations), ("heads", heads), ("max_tokens", max_tokens)):
            if value < 1:
                raise ConfigError(f"attention_maps.{name}={value} must be at least 1.")
        self.enabled = enabled
        self.every_n_validations = every_n_validations
        self.layers = None if layers is None else list(layers)
        self.heads = heads
        self.max_tokens = max_tokens
        self.logits = logits
        self.validations = 0
        self._warned = False
        self._log_images = ImageLogging("attention_maps")

    def should_log(self, trainer: L.Trainer) -> bool:
        return (
            self.enabled
            and not trainer.sanity_checking
            and trainer.is_global_zero
            and self.validations % self.every_n_validations == 0
            and bool(trainer.loggers)
        )

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or not self.should_log(trainer):
            return
        if self.sharded(trainer):
            return
        self._log_images(trainer, self.compute(pl_module, batch), trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validations += 1

    def sharded(self, trainer: L.Trainer) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if not isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            return False
        if not self._warned:
            rank_zero_info("attention_maps: not logged for sharded (FSDP) models.")
            self._warned = True
        return True

    @torch.no_grad()
    def compute(self, pl_module: L.LightningModule, batch: Any) -> dict[str, Tensor]:
        """Images (T, heads * (S + 1) - 1) of the chosen layers, by tag, for the batch's first sample."""
        inputs = batch[0] if isinstance(batch, list | tuple) else batch
        if getattr(pl_module, "counts_tokens", False):
            inputs = inputs[:1, : self.max_tokens]  # token sequences: crop before the forward pass
        attentions = [m for m in pl_module.network.modules() if isinstance(m, Attention)]
        n = len(attentions)
        chosen = [0, n - 1] if self.layers is None else self.layers
        layers = sorted({i % n for i in chosen if -n <= i < n})
        logits: dict[int, Tensor] = {}

        def capture(layer: int):
            def hook(module: Attention, args: tuple) -> None:  # args: (x (1, T, C), rope, cache, need_weights, ...)
                shared_kv = args[4] if len(args) > 4 else None  # the source's K/V for a layer that reuses them
                logits[layer] = module.logits(args[0], args[1] if len(args) > 1 else None, shared_kv)[0]  # (H, T, T)

            return hook

        handles = [attentions[i].register_forward_pre_hook(capture(i)) for i in layers] if self.logits else []
        compiled = [(m, m._compiled_call_impl) for m in pl_module.modules() if m._compiled_call_impl is not None]
        for module, _ in compiled:  # eager for this one pass: no recompilation for hooks and need_weights
            module._compiled_call_impl = None
        try:
            maps = pl_module.attention_maps((inputs[:1],))  # per block (1, H, T, S)
        finally:
            for handle in handles:
                handle.remove()
            for module, call in compiled:
                module._compiled_call_impl = call
        images = {f"attention/layer{i}/probs": head_strip(maps[i][0], self.heads, self.max_tokens) for i in layers}
        for i, scores in logits.items():
            images[f"attention/layer{i}/logits"] = head_strip(scores, self.heads, self.max_tokens)
        return {tag: image.cpu() for tag, image in sorted(images.items())}
