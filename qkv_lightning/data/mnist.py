"""MNIST and Fashion-MNIST (the paper's small vision tasks), read by torchvision from the official IDX files.

``root`` is either torchvision's layout (``root/MNIST/raw/train-images-idx3-ubyte`` ...) or a folder of the four
official files, gzipped or not (e.g. the offline copy); the latter are un-gzipped once into ``extract_dir``. Neither
data set has a validation split: it is carved from the 60,000 training images by ``val_fraction``.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.utils import check_integrity, extract_archive

from qkv_lightning.data.archives import gunzip_file
from qkv_lightning.data.image_base import Augmentation, ImageDataModule, TensorSource
from qkv_lightning.errors import DataError

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
"""The official file names (both data sets use the same ones), without ``.gz``."""

OFFICIAL_SHAPES = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}
"""The official shape of each file (images N x 28 x 28 uint8, labels N uint8)."""

MAX_MNIST_BYTES = 256 << 20
"""Cap on what one MNIST file may un-gzip to (the largest official one is 47 MB)."""


def check_idx_file(path: str) -> int:
    """Check an IDX file's header against its official shape and its size against the header; returns N.

    Fewer items than the official file are allowed (small test files), other image dimensions are not.

    Raises:
        DataError: naming the file and what differs.
    """
    name = os.path.basename(path)
    official = OFFICIAL_SHAPES[name]
    with open(path, "rb") as file:
        header = file.read(4 + 4 * len(official))
    size = os.path.getsize(path)
    if len(header) < 4 + 4 * len(official) or header[:2] != b"\0\0" or header[2] != 0x08 or header[3] != len(official):
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes with {len(official)} dimension(s) like the official {name}; "
            "the file is corrupted or not an MNIST file: replace it with the official file."
        )
    dims = struct.unpack(f">{len(official)}I", header[4:])
    if tuple(dims[1:]) != official[1:] or not 0 < dims[0] <= official[0]:
        raise DataError(
            f"{path} declares the shape {' x '.join(map(str, dims))}, but the official {name} is "
            f"{' x '.join(map(str, official))} (at most {official[0]} items of "
            f"{' x '.join(map(str, official[1:])) or 'one byte'}): "
            "the file is edited or not an MNIST file; replace it with the official file."
        )
    expected = len(header) + int(np.prod(dims))
    if size != expected:
        raise DataError(
            f"{path} holds {size} bytes, but its header ({' x '.join(map(str, dims))}) needs {expected}: the file is "
            "truncated or edited; replace it with the official file."
        )
    return dims[0]


def find_files(folder: str) -> dict[str, str] | None:
    """Each official file's path in ``folder``, raw or gzipped (raw preferred); None if any is missing."""
    found = {}
    for name in MNIST_FILES:
        for candidate in (name, name + ".gz"):
            if os.path.isfile(os.path.join(folder, candidate)):
                found[name] = os.path.join(folder, candidate)
                break
        else:
            return None
    return found


def unpack_once(files: dict[str, str], raw_dir: str, official_md5: dict[str, str] | None = None) -> None:
    """Un-gzip (or copy) the four files into ``raw_dir`` unless these very files were unpacked there already.

    A ``.gz`` file whose MD5 is the official one (``official_md5``: torchvision's ``resources``) takes torchvision's
    MD5-checked path (``check_integrity``, then ``extract_archive``). Any other file (re-compressed, or the small
    files tests write) is un-gzipped by the safe ``gunzip_file`` with a size cap and is checked by its IDX header.
    """
    stamp = "\n".join(f"{os.path.abspath(p)} {os.stat(p).st_size} {int(os.stat(p).st_mtime)}" for p in files.values())
    marker = os.path.join(raw_dir, ".unpacked-from")
    if os.path.isfile(marker):
        with open(marker) as file:
            if file.read() == stamp:
                return
    try:
        os.makedirs(raw_dir, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create {raw_dir} ({error}); set data.extract_dir to a writable folder.") from None
    for name, source in files.items():
        md5 = (official_md5 or {}).get(os.path.basename(source))
        if md5 is not None and check_integrity(source, md5):
            target = os.path.join(raw_dir, name)
            if os.path.lexists(target):
                os.remove(target)  # an earlier unpack of other files (the marker above did not match)
            extract_archive(source, raw_dir)
        else:
            gunzip_file(source, os.path.join(raw_dir, name), max_bytes=MAX_MNIST_BYTES)
    with open(marker, "w") as file:
        file.write(stamp)


class MNISTDataModule(ImageDataModule):
    """MNIST handwritten digits (28x28 grayscale, 10 classes).

    Args:
        root: torchvision's MNIST root (holding ``MNIST/raw/``), or a folder of the four official (.gz) files.
        extract_dir: writable folder the .gz files are un-gzipped into (once).
        augment: training augmentation (small pad-crop, no flips: digits are not mirror-symmetric).
        **kwargs: the settings of :class:`ImageDataModule` (``download: true`` fetches the files with torchvision).
    """

    dataset_class = MNIST
    num_classes = 10
    in_channels = 1
    native_size = 28
    stats = "mnist"

    def __init__(
        self,
        root: str = "data",
        extract_dir: str = ".cache/data",
        augment: Augmentation = Augmentation(crop="pad_crop", padding=2, hflip=False),
        **kwargs,
    ) -> None:
        super().__init__(root=root, augment=augment, **kwargs)
        self.extract_dir = os.path.expanduser(extract_dir)

    @property
    def name(self) -> str:
        return self.dataset_class.__name__

    def torchvision_root(self) -> str | None:
        """A root whose ``<Name>/raw/`` holds the raw files, un-gzipping a flat folder of them first; or None."""
        raw = os.path.join(self.root, self.name, "raw")
        if os.path.isdir(raw) and all(os.path.isfile(os.path.join(raw, n)) for n in MNIST_FILES):
            return self.root
        for folder in (raw, self.root):
            files = find_files(folder)
            if files is not None:
                digest = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:10]
                target = os.path.join(self.extract_dir, f"{self.name}-{digest}")
                unpack_once(files, os.path.join(target, self.name, "raw"), dict(self.dataset_class.resources))
                return target
        return None

    def prepare_data(self) -> None:
        if self.torchvision_root() is None and self.download:
            try:
                for train in (True, False):
                    self.dataset_class(self.root, train=train, download=True)
            except Exception as error:  # network errors come in many types
                raise DataError(f"could not download {self.name} into data.root={self.root}: {error}") from None

    def load_splits(self) -> dict[str, TensorSource]:
        self.prepare_data()
        root = self.torchvision_root()
        if root is None:
            raise DataError(
                f"{self.name} not found under data.root={self.root}: expected {self.name}/raw/ holding "
                f"{', '.join(MNIST_FILES)}, or a folder of those files (.gz or not). Set data.download: true to "
                "download them, or point data.root at them."
            )
        raw = os.path.join(root, self.name, "raw")
        counts = {name: check_idx_file(os.path.join(raw, name)) for name in MNIST_FILES}
        for images_file, labels_file in ((MNIST_FILES[0], MNIST_FILES[1]), (MNIST_FILES[2], MNIST_FILES[3])):
            if counts[images_file] != counts[labels_file]:
                raise DataError(
                    f"{os.path.join(raw, images_file)} holds {counts[images_file]} images but "
                    f"{os.path.join(raw, labels_file)} {counts[labels_file]} labels; replace them with the official "
                    "files."
                )
        sources = {}
        for split, train in (("train", True), ("test", False)):
            try:
                dataset = self.dataset_class(root, train=train, download=False)
            except (AssertionError, RuntimeError, ValueError, OSError) as error:
                raise DataError(
                    f"cannot read the {self.name} {split} files in {os.path.join(root, self.name, 'raw')} "
                    f"({type(error).__name__}: {error}); they are truncated or corrupted: replace them."
                ) from None
            images, labels = dataset.data, dataset.targets.numpy()
            if len(images) != len(labels) or (len(labels) and not 0 <= labels.min() <= labels.max() < 10):
                raise DataError(
                    f"the {self.name} {split} files in {root} disagree ({len(images)} images, {len(labels)} labels in "
                    f"{labels.min()}..{labels.max()}); replace them with the official files."
                )
            sources[split] = TensorSource(images[:, None].contiguous(), labels.astype(np.int64))  # (N, 1, 28, 28)
        self.class_names = list(self.dataset_class.classes)
        return sources


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Zalando; 28x28 grayscale clothing, 10 classes), same files and layout as MNIST.

    Args:
        root: torchvision's root (holding ``FashionMNIST/raw/``), or a folder of the four official (.gz) files.
        extract_dir: writable folder the .gz files are un-gzipped into (once).
        augment: training augmentation (small pad-crop and flips).
        **kwargs: the settings of :class:`ImageDataModule`.
    """

    dataset_class = FashionMNIST
    stats = "fashion_mnist"

    def __init__(
        self,
        root: str = "data",
        extract_dir: str = ".cache/data",
        augment: Augmentation = Augmentation(crop="pad_crop", padding=2, hflip=True),
        **kwargs,
    ) -> None:
        super().__init__(root=root, extract_dir=extract_dir, augment=augment, **kwargs)
