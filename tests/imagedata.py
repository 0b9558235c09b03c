"""Writers of small image data sets in their official formats, for the image tests (never downloads)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile

import numpy as np
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_images(labels: np.ndarray, channels: int, size: int, seed: int) -> np.ndarray:
    """uint8 images (N, C, H, W) whose class is easy to see: class c brightens row band c (plus noise)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 96, size=(len(labels), channels, size, size), dtype=np.int64)
    bands = max(1, size // 10)
    for i, label in enumerate(labels):
        row = (int(label) % 10) * bands
        images[i, :, row : row + bands] += 150
    return images.clip(0, 255).astype(np.uint8)


def write_cifar10(root: str, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> str:
    """``root/cifar-10-batches-py`` with five training batches, a test batch and batches.meta (protocol-2 pickles)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        labels = rng.integers(0, 10, size=n)
        images = class_images(labels, 3, 32, seed=int(rng.integers(1 << 30)))
        batch = {
            "batch_label": f"{name} of 5",
            "labels": [int(x) for x in labels],
            "data": images.reshape(n, 3072),
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        with open(os.path.join(folder, name), "wb") as file:
            pickle.dump(batch, file, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as file:
        pickle.dump({"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, file, protocol=2)
    return folder


def write_cifar100(root: str, n_train: int = 100, n_test: int = 20, seed: int = 0) -> str:
    """``root/cifar-100-python`` with train, test and meta files (protocol-2 pickles)."""
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, size=n)
        batch = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": [int(x) for x in fine],
            "coarse_labels": [int(x) // 5 for x in fine],
            "data": class_images(fine, 3, 32, seed=seed + len(name)).reshape(n, 3072),
        }
        with open(os.path.join(folder, name), "wb") as file:
            pickle.dump(batch, file, protocol=2)
    meta = {
        "fine_label_names": [f"class{i}" for i in range(100)],
        "coarse_label_names": [f"super{i}" for i in range(20)],
    }
    with open(os.path.join(folder, "meta"), "wb") as file:
        pickle.dump(meta, file, protocol=2)
    return folder


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian int32 sizes, then the data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_gz(
    folder: str, n_train: int = 60, n_test: int = 20, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four official MNIST file names, gzipped IDX, in a flat folder; returns each split's (images, labels)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = class_images(labels, 1, 28, seed=seed + n)[:, 0]  # (N, 28, 28)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            with gzip.open(os.path.join(folder, f"{prefix}-{kind}-ubyte.gz"), "wb") as file:
                file.write(idx_bytes(array))
        written["train" if prefix == "train" else "test"] = (images, labels)
    return written


def write_image_tree(
    root: str, classes: list[str], per_class: int, size: int = 36, splits: tuple[str, ...] = ("train", "val"), seed=0
) -> str:
    """``root/<split>/<class>/<i>.jpg`` (PNG for odd i) with class-dependent images."""
    labels = np.repeat(np.arange(len(classes)), per_class)
    for s, split in enumerate(splits):
        images = class_images(labels, 3, size, seed=seed + s)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = os.path.join(root, split, classes[label])
            os.makedirs(folder, exist_ok=True)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(image.transpose(1, 2, 0)).save(os.path.join(folder, f"{i:04d}.{ext}"))
    return root


def tar_tree(folder: str, archive: str) -> str:
    """A .tar.gz of ``folder`` that holds it under its own name (as the offline CIFAR-10 JPEG archive does)."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    return archive
