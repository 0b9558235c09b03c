"""Image-classification datamodules: CIFAR-10/100, ImageNet-1k, TinyImageNet, any ImageFolder tree, MNIST and
Fashion-MNIST.

Validation splits: ImageNet and image folders with a ``val/`` folder use it; CIFAR-10/100, MNIST, Fashion-MNIST
and image folders without ``val/`` carve it from the training images by ``val_fraction`` (seeded by
``split_seed``; ``val_fraction: 0`` validates on the test split). Every module's ``spec()`` gives
``{"num_classes", "image_size", "in_channels"}``.
"""

from qkv_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from qkv_lightning.data.image_base import MEAN_STD, Augmentation, ImageDataModule
from qkv_lightning.data.image_folder import ImageFolderDataModule, ImageNetDataModule
from qkv_lightning.data.mnist import FashionMNISTDataModule, MNISTDataModule
from qkv_lightning.data.tinyimagenet import TinyImageNetDataModule

__all__ = [
    "MEAN_STD",
    "Augmentation",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "TinyImageNetDataModule",
]
