"""Image classification with a Vision Transformer: cross-entropy with label smoothing, mixup/cutmix, top-1/top-5."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from qkv_lightning.errors import ConfigError
from qkv_lightning.hparams import as_config
from qkv_lightning.nn.vit import ViT, ViTConfig, check_patch_grid
from qkv_lightning.tasks.base import TaskModule


class ImageClassifier(TaskModule):
    """Trains a :class:`ViT` to classify images; logs ``train/loss``, ``val/loss``, ``val/acc``, ``val/acc_top5``.

    The data decides ``num_classes``, ``image_size`` and ``in_channels`` (the datamodule's ``spec()``). Validation
    and test losses are the plain cross-entropy (no smoothing), so they compare across recipes.

    Args:
        network: sizes and options of the ViT.
        label_smoothing: label smoothing of the training loss (0.1 in DeiT).
        mixup_alpha: Beta(alpha, alpha) mixing of image pairs and their labels on each training batch; 0 is off.
        cutmix_alpha: CutMix (pasted boxes) with Beta(alpha, alpha) areas; 0 is off. With both on, each batch uses
            one of the two, chosen at random (as DeiT).
        **kwargs: the settings every task shares (``attention``, ``optimizer``, ``data_spec``, ``compile``,
            ``activation_checkpointing``, ``init_from``, ``distill``), declared once in :class:`TaskModule`.
    """

    def __init__(
        self,
        network: ViTConfig = ViTConfig(),
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(as_config(ViTConfig, network), **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"model.label_smoothing={label_smoothing} must lie in [0, 1).")
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if alpha < 0:
                raise ConfigError(f"model.{name}={alpha} must be >= 0 (0 turns it off).")
        self.label_smoothing = label_smoothing
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.mix: nn.Module | None = None
        self.train_metrics: MetricCollection | None = None
        self.val_metrics: MetricCollection | None = None
        self.test_metrics: MetricCollection | None = None
        self.save_task_hyperparameters(
            network=self.network_config,
            label_smoothing=label_smoothing,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
        )

    # ----------------------------------------------------------------------------------------------- building
    sample_unit = "images"
    counts_tokens = False

    def resolved_network_config(self, data_spec: dict) -> ViTConfig:
        return self.network_config.with_data(data_spec)

    def check_data_spec(self, spec: dict, stage: str = "fit") -> None:
        """Image size against the patch size, and sizes set in the network against the data's, before any image is
        read."""
        config = self.network_config.with_data(spec)  # raises on a disagreement
        if config.image_size is not None:
            check_patch_grid(config.image_size, config.patch_size, config.pad_images)

    def build_network(self, data_spec: dict) -> ViT:
        return ViT(self.resolved_network_config(data_spec), self.attention_config)

    def example_batch(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Random images (B, C, S, S) of the data's size and channels, and class labels (B,)."""
        self.cost()  # the data's spec is there and fits the network
        config = self.resolved_network_config(self.data_spec)
        size, channels = config.image_size, config.in_channels
        images = torch.randn(batch_size, channels, size, size, generator=generator)  # (B, C, S, S)
        return images, torch.randint(0, config.num_classes, (batch_size,), generator=generator)  # (B,)

    def configure_model(self) -> None:
        super().configure_model()
        if self.val_metrics is not None:
            return
        classes = self.network.config.num_classes
        top_k = min(5, classes)

        def metrics(prefix: str, top5: bool) -> MetricCollection:
            chosen = {"acc": MulticlassAccuracy(classes, average="micro")}
            if top5:
                chosen["acc_top5"] = MulticlassAccuracy(classes, top_k=top_k, average="micro")
            return MetricCollection(chosen, prefix=prefix)

        self.train_metrics = metrics("train/", top5=False)
        self.val_metrics = metrics("val/", top5=True)
        self.test_metrics = metrics("test/", top5=True)
        mixers = []
        if self.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=self.mixup_alpha, num_classes=classes))
        if self.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=self.cutmix_alpha, num_classes=classes))
        self.mix = v2.RandomChoice(mixers) if len(mixers) > 1 else (mixers[0] if mixers else None)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits (B, classes) of normalised images (B, C, H, W)."""
        return self.network(images)

    # -------------------------------------------------------------------------------------------------- steps
    def _training_forward(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Training loss (label smoothing, mixup/cutmix) and the logits (B, classes)."""
        images, labels = batch  # (B, C, H, W), (B,)
        targets: Tensor = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)  # targets: (B, classes) mixed one-hot
        logits = self.network(images)  # (B, classes)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing), logits

    def training_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self._training_forward(batch)[0]

    def attention_maps(self, batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        return self.network.attention_maps(batch[0][:1])  # per block (1, H, T, T)

    def distill_outputs(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, None]:
        """The training loss (label smoothing, mixup/cutmix), the student's logits (B, classes), the (mixed) images
        the teacher must see, and no mask."""
        images, labels = batch  # (B, C, H, W), (B,)
        targets: Tensor = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        logits = self.network(images).float()  # (B, classes)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing), logits, images, None

    def teacher_logits(self, network: nn.Module, inputs: Tensor) -> Tensor:
        return network(inputs)  # (B, classes)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        labels = batch[1]  # (B,)
        loss, logits = self.distilled_training_loss(batch) if self.distilling else self._training_forward(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(labels))
        if self.mix is None:  # accuracy on mixed images is not meaningful
            self.train_metrics.update(logits, labels)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> Tensor:
        images, labels = batch
        logits = self.network(images)  # (B, classes)
        loss = F.cross_entropy(logits.float(), labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(labels))
        metrics.update(logits, labels)
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val", batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.evaluate(batch, "test", self.test_metrics)

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        """Class probabilities (B, classes)."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self.network(images).float().softmax(dim=-1)

