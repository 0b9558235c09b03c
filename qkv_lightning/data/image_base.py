"""What the image datamodules share: augmentation, normalisation, splits and subsets, data loaders and ``spec()``.

Each data set supplies its splits as an :class:`ImageSource` (images held in memory, or image files on disk); the
base class carves a validation split from train where the data set has none, takes a seeded training subset if
asked, and builds the transforms (torchvision transforms v2).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from qkv_lightning.data.loading import check_loader_settings, train_loader
from qkv_lightning.errors import ConfigError, DataError

MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}
"""Per-channel mean and standard deviation of the training images (pixel values scaled to [0, 1])."""


@dataclass
class Augmentation:
    """Training-time augmentation (torchvision transforms v2) and the evaluation crop."""

    crop: Literal["pad_crop", "random_resized_crop", "none"] = "pad_crop"
    """Training crop: 'pad_crop' pads by ``padding`` pixels and crops back (CIFAR); 'random_resized_crop' crops a
    random area and aspect ratio and resizes (ImageNet); 'none' only resizes and centre-crops."""

    padding: int = 4
    """Padding of 'pad_crop', in pixels."""

    scale_min: float = 0.08
    """Smallest crop area of 'random_resized_crop', as a fraction of the image."""

    hflip: bool = True
    """Random horizontal flips (turn off for digits)."""

    randaugment: bool = False
    """Apply RandAugment after cropping."""

    randaugment_ops: int = 2
    """Operations per image of RandAugment."""

    randaugment_magnitude: int = 9
    """Magnitude (0-30) of RandAugment's operations."""

    random_erasing: float = 0.0
    """Probability of random erasing (after normalisation; DeiT uses 0.25)."""

    eval_crop_ratio: float = 1.0
    """Evaluation: resize the shorter side to ``image_size / eval_crop_ratio``, then centre-crop ``image_size``
    (0.875 is the usual ImageNet ratio: 256 -> 224)."""

    def __post_init__(self) -> None:
        if self.padding < 0:
            raise ConfigError(f"data.augment.padding={self.padding} must be >= 0.")
        if not 0.0 < self.scale_min <= 1.0:
            raise ConfigError(f"data.augment.scale_min={self.scale_min} must lie in (0, 1].")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ConfigError(f"data.augment.random_erasing={self.random_erasing} must lie in [0, 1].")
        if not 0.0 < self.eval_crop_ratio <= 1.0:
            raise ConfigError(f"data.augment.eval_crop_ratio={self.eval_crop_ratio} must lie in (0, 1].")


NO_AUGMENTATION = Augmentation(crop="none", hflip=False)
"""Augmentation that leaves training images as the evaluation ones (resize and centre crop only)."""


def build_transform(
    augment: Augmentation, image_size: int, mean: Sequence[float], std: Sequence[float], train: bool
) -> v2.Compose:
    """The transform from a PIL image or a uint8 (C, H, W) tensor to a normalised float (C, S, S) tensor."""
    resize = [v2.Resize(round(image_size / augment.eval_crop_ratio), antialias=True), v2.CenterCrop(image_size)]
    steps: list = [v2.ToImage()]
    if not train:
        steps += resize
    else:
        if augment.crop == "random_resized_crop":
            steps.append(v2.RandomResizedCrop(image_size, scale=(augment.scale_min, 1.0), antialias=True))
        else:
            steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]  # no-op at native size
            if augment.crop == "pad_crop" and augment.padding:
                steps.append(v2.RandomCrop(image_size, padding=augment.padding))
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if augment.randaugment:
            steps.append(v2.RandAugment(num_ops=augment.randaugment_ops, magnitude=augment.randaugment_magnitude))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if train and augment.random_erasing > 0:
        steps.append(v2.RandomErasing(p=augment.random_erasing, value=0))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


class ImageSource(Protocol):
    """One split of a data set: its labels, and a way to make a Dataset of some of its images."""

    labels: np.ndarray
    """Class index of every image, shape (N,)."""

    def dataset(self, indices: np.ndarray, transform: v2.Compose) -> Dataset:
        """A Dataset of the images ``indices``, each returned as ``(transform(image), label)``."""
        ...


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, indices: np.ndarray, transform: v2.Compose) -> None:
        self.images, self.labels, self.indices, self.transform = images, labels, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        return self.transform(tv_tensors.Image(self.images[j])), int(self.labels[j])  # (C, S, S)


class TensorSource:
    """An :class:`ImageSource` of images in memory, uint8 (N, C, H, W), and labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise DataError(
                f"expected uint8 images (N, C, H, W) and N labels, got {tuple(images.shape)} and {len(labels)}"
            )
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def dataset(self, indices: np.ndarray, transform: v2.Compose) -> Dataset:
        return TensorImages(self.images, self.labels, indices, transform)


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) that depends only on ``seed`` (and n)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


def carve_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) into (train, validation) indices, ``round(fraction * n)`` of them (at least 1) for validation."""
    order = seeded_permutation(n, seed)
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise ConfigError(
            f"data.val_fraction={fraction} leaves no training images out of {n}; lower it (e.g. 0.1)."
        )
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class ImageDataModule(L.LightningDataModule):
    """Base of the image-classification datamodules.

    Subclasses set ``num_classes``/``in_channels``/``native_size`` (or discover them) and implement
    :meth:`load_splits`. The splits are ``train``, ``val`` and ``test``; where a data set has no validation split
    (``has_val_split = False``) one is carved from train by a seeded fraction.

    Args:
        root: where the data set lives (or is downloaded to).
        batch_size: images per batch (per device).
        eval_batch_size: images per validation/test batch; None means ``batch_size``.
        num_workers: data-loading worker processes.
        pin_memory: pin batches in page-locked memory; None means only when CUDA is available.
        image_size: side of the images the network sees; None keeps the data set's own size.
        augment: training augmentation and evaluation crop.
        mean: per-channel normalisation mean; None takes the data set's statistics.
        std: per-channel normalisation standard deviation; None takes the data set's statistics.
        val_fraction: fraction of the training images held out for validation, for data sets without a validation
            split (seeded by ``split_seed``). 0 validates on the test split instead (as many papers report).
        split_seed: seed of the validation split and of the training subset (independent of the training seed).
        train_subset: train on this many images only (a seeded random subset of the training split), e.g. for quick
            CPU runs; None uses them all.
        download: download the data set if it is missing (only where it can be downloaded).
    """

    num_classes: int | None = None
    in_channels: int | None = None
    native_size: int | None = None
    has_val_split: bool = False
    stats: str = "imagenet"

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        image_size: int | None = None,
        augment: Augmentation = Augmentation(),
        mean: list[float] | None = None,
        std: list[float] | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        train_subset: int | None = None,
        download: bool = False,
    ) -> None:
        super().__init__()
        check_loader_settings(batch_size, eval_batch_size, num_workers)
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction} must lie in [0, 1).")
        if train_subset is not None and train_subset < 1:
            raise ConfigError(f"data.train_subset={train_subset} must be at least 1 (or null for all images).")
        if image_size is not None and image_size < 1:
            raise ConfigError(f"data.image_size={image_size} must be at least 1.")
        self.root = os.path.expanduser(str(root))
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.requested_size = image_size
        self.augment = augment if isinstance(augment, Augmentation) else Augmentation(**(augment or {}))
        self.mean, self.std = mean, std
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.train_subset = train_subset
        self.download = download
        self.datasets: dict[str, Dataset] = {}
        self.class_names: list[str] | None = None

    # ------------------------------------------------------------------------------------------ what subclasses do
    def load_splits(self) -> dict[str, ImageSource]:
        """The data set's splits: ``train`` and ``test``, plus ``val`` if it has its own validation split."""
        raise NotImplementedError

    def describe(self) -> None:
        """Discover ``num_classes``, ``in_channels`` and ``native_size`` without loading images (if not fixed)."""

    # --------------------------------------------------------------------------------------------------- shared
    @property
    def image_size(self) -> int:
        """Side of the images the network sees."""
        if self.requested_size is not None:
            return self.requested_size
        if self.native_size is None:
            self.describe()
        if self.native_size is None:
            raise ConfigError(f"{type(self).__name__} needs data.image_size (its images have no fixed size).")
        return self.native_size

    def normalisation(self) -> tuple[list[float], list[float]]:
        """Mean and std of each channel: the settings, else the data set's statistics."""
        mean, std = MEAN_STD[self.stats]
        mean = list(self.mean) if self.mean is not None else list(mean)
        std = list(self.std) if self.std is not None else list(std)
        channels = self.spec()["in_channels"]
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(
                f"data.mean and data.std need {channels} value(s), one per channel; got {len(mean)} and {len(std)}."
            )
        if any(s <= 0 for s in std):
            raise ConfigError(f"data.std={std} must be positive.")
        return mean, std

    def settings_spec(self) -> dict:
        """What the settings and the data set's fixed properties decide, without reading any file: image size, and
        channels and classes where the data set fixes them."""
        size = self.requested_size if self.requested_size is not None else self.native_size
        known = {"image_size": size, "in_channels": self.in_channels, "num_classes": self.num_classes}
        return {key: value for key, value in known.items() if value is not None}

    def spec(self) -> dict:
        """What the network needs from the data: ``num_classes``, ``image_size`` and ``in_channels``."""
        if self.num_classes is None or self.in_channels is None:
            self.describe()
        return {"num_classes": self.num_classes, "image_size": self.image_size, "in_channels": self.in_channels}

    def transform(self, train: bool) -> v2.Compose:
        mean, std = self.normalisation()
        return build_transform(self.augment if train else NO_AUGMENTATION, self.image_size, mean, std, train)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        sources = self.load_splits()
        train, test = sources["train"], sources["test"]
        train_idx = np.arange(len(train.labels))
        if "val" in sources:
            val, val_idx = sources["val"], np.arange(len(sources["val"].labels))
        elif self.val_fraction > 0:
            train_idx, val_idx = carve_validation(len(train.labels), self.val_fraction, self.split_seed)
            val = train
        else:
            val, val_idx = test, np.arange(len(test.labels))
        if self.train_subset is not None and self.train_subset < len(train_idx):
            chosen = seeded_permutation(len(train_idx), self.split_seed + 1)[: self.train_subset]
            train_idx = np.sort(train_idx[chosen])
        test_idx = np.arange(len(test.labels))
        for name, idx in {"train": train_idx, "val": val_idx, "test": test_idx}.items():
            if len(idx) == 0:
                raise DataError(f"the {name} split of {type(self).__name__} under {self.root} holds no images.")
        train_tf, eval_tf = self.transform(train=True), self.transform(train=False)
        self.datasets = {
            "train": train.dataset(train_idx, train_tf),
            "val": val.dataset(val_idx, eval_tf),
            "test": test.dataset(test_idx, eval_tf),
        }

    def loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled in a seeded order (``seed_everything``'s seed), resumable mid-epoch from checkpoints."""
        if not self.datasets:
            self.setup()
        return train_loader(
            self.datasets["train"],
            self.batch_size,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)

