"""CIFAR-10 and CIFAR-100 in their official "python version" format (pickled batches), read safely.

The official files are Python pickles. They are read with an unpickler that can only rebuild numpy arrays (any other
global is refused), their structure is checked, and files that hold as many images as the official ones must also
have the official MD5 (listed by torchvision), so a corrupted download is caught. Smaller files in the same format
(e.g. written by tests) are accepted with a warning. Neither data set has a validation split: it is carved from the
training images by ``val_fraction``.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_url

from qkv_lightning.data.archives import check_md5, extract_archive, remove_tree
from qkv_lightning.data.image_base import Augmentation, ImageDataModule, TensorSource
from qkv_lightning.errors import ConfigError, DataError
from qkv_lightning.files import follow_umask, swap_in

MAX_CIFAR_BYTES = 1 << 30
"""Cap on what a CIFAR archive may unpack to (the official ones hold about 180 MB)."""

ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
}
"""The only globals a CIFAR pickle may name: what numpy needs to rebuild an array."""


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle names a global that a data file has no reason to hold."""


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds plain containers and numpy arrays, and refuses every other global.

    Kept instead of torchvision's ``CIFAR10``, which unpickles the batches with ``pickle.load`` (code can run).
    """

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise ForbiddenGlobal(f"{module}.{name}")


def safe_unpickle(path: str) -> object:
    """Load a pickle that may only hold containers, numbers, strings and numpy arrays.

    Raises:
        DataError: naming the file if it is truncated, corrupted or holds anything else.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()  # a length field claiming more bytes than the file holds is then "truncated"
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except ForbiddenGlobal as error:
        raise DataError(
            f"refusing to load {path}: it names the global {error}, which a data file has no reason to hold (only "
            "numpy arrays, lists, dicts, numbers and strings are allowed). It is not an official file: delete it and "
            "download the official files again (data.download: true)."
        ) from None
    except (
        pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
        OverflowError,
    ) as error:
        raise DataError(
            f"cannot read {path}: it is truncated or corrupted, or not a CIFAR file ({type(error).__name__}: {error}). "
            "Delete it and download the official files again (data.download: true)."
        ) from None


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps what, after torchvision's list of official files and MD5s."""

    name: str
    folder: str
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]
    meta: dict
    label_key: str
    num_classes: int
    official_counts: dict[str, int]
    url: str
    archive: str
    archive_md5: str

    @classmethod
    def of(cls, dataset: type, name: str, label_key: str, num_classes: int, counts: dict[str, int]) -> CifarLayout:
        return cls(
            name=name,
            folder=dataset.base_folder,
            train=[tuple(item) for item in dataset.train_list],
            test=[tuple(item) for item in dataset.test_list],
            meta=dict(dataset.meta),
            label_key=label_key,
            num_classes=num_classes,
            official_counts=counts,
            url=dataset.url,
            archive=dataset.filename,
            archive_md5=dataset.tgz_md5,
        )


CIFAR10_LAYOUT = CifarLayout.of(
    CIFAR10, "CIFAR-10", "labels", 10, {**{f"data_batch_{i}": 10000 for i in range(1, 6)}, "test_batch": 10000}
)
CIFAR100_LAYOUT = CifarLayout.of(CIFAR100, "CIFAR-100", "fine_labels", 100, {"train": 50000, "test": 10000})


def read_batch(path: str, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one CIFAR batch file, structure checked."""
    batch = safe_unpickle(path)
    if not isinstance(batch, dict) or "data" not in batch or layout.label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{path} is not a {layout.name} batch: expected a dict with 'data' and '{layout.label_key}', got {keys}. "
            f"Check that data.root points at the {layout.name} python version."
        )
    data, labels = batch["data"], np.asarray(batch[layout.label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {shape}; the file is corrupted.")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {len(data)} images but labels of shape {labels.shape}; the file is corrupted.")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DataError(
            f"{path}: labels must lie in [0, {layout.num_classes}), found {labels.min()}..{labels.max()}; the file is "
            f"corrupted or belongs to another data set."
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (Krizhevsky 2009) from the official python-version files under ``root/cifar-10-batches-py``.

    Downloaded with torchvision (archive MD5 checked) when ``download`` is set. No validation split: it is carved
    from the 50,000 training images by ``val_fraction``; ``test`` is the official test batch.

    Args:
        root: folder holding ``cifar-10-batches-py/`` (or that folder itself, or the official archive).
        augment: training augmentation (pad-crop and flips by default).
        verify_md5: check the official archive's MD5 before extracting it, and files with the official image counts
            against the official MD5s.
        **kwargs: the settings of :class:`ImageDataModule`.
    """

    layout = CIFAR10_LAYOUT
    num_classes = 10
    in_channels = 3
    native_size = 32
    stats = "cifar10"

    def __init__(
        self,
        root: str = "data",
        augment: Augmentation = Augmentation(crop="pad_crop"),
        verify_md5: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(root=root, augment=augment, **kwargs)
        self.verify_md5 = verify_md5

    def folder(self) -> str | None:
        """The folder that holds the batch files, or None if absent."""
        layout = self.layout
        for candidate in (os.path.join(self.root, layout.folder), self.root):
            if os.path.isfile(os.path.join(candidate, layout.meta["filename"])):
                return candidate
        return None

    def prepare_data(self) -> None:
        if self.folder() is not None:
            return
        archive = os.path.join(self.root, self.layout.archive)
        if not os.path.isfile(archive) and self.download:
            try:
                download_url(self.layout.url, self.root, filename=self.layout.archive, md5=self.layout.archive_md5)
            except Exception as error:  # network errors come in many types
                raise DataError(
                    f"could not download {self.layout.name} from {self.layout.url} into {self.root}: {error}. Download "
                    f"{self.layout.archive} by hand into data.root, or point data.root at an existing copy."
                ) from None
        if os.path.isfile(archive):
            self.extract(archive)

    def extract(self, archive: str) -> None:
        """Unpack the official archive into ``root``: its MD5 first (unless ``verify_md5`` is off), then the safe
        extractor (files and folders only, nothing outside ``root``, size capped) into a scratch folder that is
        moved into place when complete."""
        if self.verify_md5:
            official = f"the official {self.layout.name} archive"
            check_md5(archive, self.layout.archive_md5, official, "data.verify_md5: false")
        target = os.path.join(self.root, self.layout.folder)
        if os.path.lexists(target):
            raise ConfigError(
                f"data.root={self.root}: {target} exists but lacks {self.layout.meta['filename']}, so {archive} is not "
                f"extracted over it; move that folder away (or restore the file) and run again."
            )
        scratch = tempfile.mkdtemp(prefix=f".{self.layout.folder}-", dir=self.root)
        try:
            follow_umask(scratch, directory=True)
            extract_archive(archive, scratch, max_bytes=MAX_CIFAR_BYTES)
            inner = os.path.join(scratch, self.layout.folder)
            if not os.path.isdir(inner):
                raise DataError(
                    f"{archive} holds no {self.layout.folder}/ folder; it is not the {self.layout.name} python version."
                )
            swap_in(inner, target, replace=False)  # the complete folder, renamed into place
        finally:
            remove_tree(scratch)

    def load_splits(self) -> dict[str, TensorSource]:
        self.prepare_data()
        folder = self.folder()
        layout = self.layout
        if folder is None:
            raise DataError(
                f"{layout.name} not found: expected {os.path.join(self.root, layout.folder)}/ holding "
                f"{', '.join(n for n, _ in layout.train + layout.test)} and {layout.meta['filename']} (the official "
                f"python version from https://www.cs.toronto.edu/~kriz/cifar.html). Set data.download: true to "
                f"download it, or set data.root to the folder that holds {layout.folder}/."
            )
        meta = safe_unpickle(self.require(folder, layout.meta["filename"]))
        names = meta.get(layout.meta["key"]) if isinstance(meta, dict) else None
        if not isinstance(names, list) or len(names) != layout.num_classes:
            raise DataError(
                f"{os.path.join(folder, layout.meta['filename'])} must list {layout.num_classes} class names under "
                f"'{layout.meta['key']}'; the file is corrupted."
            )
        self.class_names = [str(n) for n in names]
        sources = {}
        unofficial: list[str] = []
        for split, files in (("train", layout.train), ("test", layout.test)):
            images, labels = [], []
            for name, md5 in files:
                path = self.require(folder, name)
                data, target = read_batch(path, layout)
                if self.verify_md5 and not check_integrity(str(path), md5):
                    if len(data) == layout.official_counts[name]:
                        raise DataError(
                            f"{path} holds {len(data)} images like the official {layout.name} file but its MD5 differs "
                            f"from the official {md5}: it is corrupted or modified. Delete it and download again "
                            "(data.download: true), or set data.verify_md5: false to use it as it is."
                        )
                    unofficial.append(name)
                images.append(data)
                labels.append(target)
            sources[split] = TensorSource(torch.from_numpy(np.concatenate(images)), np.concatenate(labels))
        if unofficial:
            rank_zero_warn(
                f"{layout.name} files {unofficial} under {folder} are not the official ones (different MD5 and image "
                "count); they are used as they are."
            )
        return sources

    def require(self, folder: str, name: str) -> str:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataError(
                f"{self.layout.name} file {path} is missing; the folder is incomplete. Delete {folder} and download "
                "again (data.download: true), or restore the file."
            )
        return path


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) from the official python-version files under ``root/cifar-100-python``.

    As :class:`CIFAR10DataModule`: downloaded by torchvision when ``download`` is set, validation carved from the
    50,000 training images by ``val_fraction``, ``test`` the official test file.

    Args:
        root: folder holding ``cifar-100-python/`` (or that folder itself, or the official archive).
        augment: training augmentation (pad-crop and flips by default).
        verify_md5: check the official archive's MD5 before extracting it, and files with the official image counts
            against the official MD5s.
        **kwargs: the settings of :class:`ImageDataModule`.
    """

    layout = CIFAR100_LAYOUT
    num_classes = 100
    stats = "cifar100"
