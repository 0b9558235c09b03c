"""Image files in the ImageFolder layout (``train/<class>/<image>`` plus ``val/`` or ``test/``), and ImageNet-1k.

A data set may also be given as a ``.tar``/``.tar.gz`` archive of such a tree: it is extracted once into
``extract_dir`` (never next to the archive). Unreadable image files are skipped with a warning that counts them.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageNet
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from qkv_lightning.data.archives import extract_archive, remove_tree
from qkv_lightning.data.image_base import Augmentation, ImageDataModule
from qkv_lightning.errors import ConfigError, DataError
from qkv_lightning.files import atomic_write_text, follow_umask, swap_in

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
EXTRACTED_MARKER = ".extracted-from"
"""Written into a folder that :func:`extract_once` made: only such folders are ever replaced."""
MAX_CONSECUTIVE_UNREADABLE = 16
"""A run of this many unreadable files in a row is an error rather than a warning."""


def archive_stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def extract_once(archive: str, extract_dir: str) -> str:
    """Extract ``archive`` into ``extract_dir/<name>`` unless an extraction of this very file is already there.

    The archive is extracted (by :func:`qkv_lightning.data.archives.extract_archive`: only files and folders, nothing
    outside the target, total size capped) into a scratch folder made here, which is renamed into place when
    complete, so an interrupted extraction is never mistaken for a complete one. A folder of that name that this code
    did not make (it lacks the ``.extracted-from`` marker) is never touched: that is an error naming the folder.

    Returns:
        The folder the archive was extracted into.

    Raises:
        ConfigError: ``extract_dir/<name>`` exists and is not an extraction made here (or holds the archive).
        DataError: the archive is unsafe or unreadable, or ``extract_dir`` is not writable.
    """
    stat = os.stat(archive)
    stamp = f"{os.path.abspath(archive)} {stat.st_size} {int(stat.st_mtime)}"
    target = os.path.join(extract_dir, archive_stem(archive))
    marker = os.path.join(target, EXTRACTED_MARKER)
    if os.path.isfile(marker):
        with open(marker) as file:
            if file.read() == stamp:
                return target
    archive_inside = os.path.realpath(archive).startswith(os.path.realpath(target) + os.sep)
    if os.path.lexists(target) and (not os.path.isfile(marker) or os.path.islink(target) or archive_inside):
        raise ConfigError(
            f"data.extract_dir={extract_dir}: the folder {target}, where {archive} would be extracted, exists and was "
            "not made by an earlier extraction (it has no .extracted-from marker), so it is left alone. Set "
            "data.extract_dir to another folder (not one that holds the archive), or move that folder away."
        )
    try:
        os.makedirs(extract_dir, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=f".{archive_stem(archive)}-", dir=extract_dir)
        follow_umask(scratch, directory=True)
    except OSError as error:
        raise DataError(
            f"cannot create a folder in data.extract_dir={extract_dir} to extract {archive} ({error}); set "
            "data.extract_dir to a writable folder."
        ) from None
    try:
        extract_archive(archive, scratch)
        atomic_write_text(os.path.join(scratch, EXTRACTED_MARKER), stamp)
        swap_in(scratch, target)  # replaces an extraction made here of an earlier version of the archive
    except OSError as error:
        raise DataError(
            f"cannot extract {archive} into {extract_dir}: {error}. Check the archive (data.root)."
        ) from None
    finally:
        if os.path.isdir(scratch):
            remove_tree(scratch)
    return target


def find_tree(folder: str) -> str:
    """``folder`` if it holds ``train/``, else its only sub-folder that does (archives often wrap the tree)."""
    if os.path.isdir(os.path.join(folder, "train")):
        return folder
    subfolders = [e.path for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
    inner = [s for s in subfolders if os.path.isdir(os.path.join(s, "train"))]
    if len(inner) == 1:
        return inner[0]
    raise DataError(
        f"no train/ folder in {folder}: an image-folder data set needs train/<class>/<image> plus val/ or test/ "
        "laid out the same way. Point data.root at the folder (or archive) that holds train/."
    )


def class_folders(split_dir: str) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def images_under(folder: str) -> list[str]:
    """The image files under ``folder``, each once: links to folders are followed only while they stay inside
    ``folder`` and lead to a folder not visited yet (so a link loop such as ``loop -> .`` adds nothing), and a file
    reached twice (through a link) is counted once."""
    root = os.path.realpath(folder)
    seen_dirs: set[str] = set()
    walked: list[tuple[str, list[str]]] = []
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs or not (real == root or real.startswith(root + os.sep)):
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        walked.append((dirpath, files))
    seen_files: set[str] = set()
    found: list[str] = []
    for dirpath, files in sorted(walked):
        for file in sorted(files):
            path = os.path.join(dirpath, file)
            real_file = os.path.realpath(path)
            inside = real_file.startswith(root + os.sep)
            if file.lower().endswith(IMG_EXTENSIONS) and inside and real_file not in seen_files:
                seen_files.add(real_file)
                found.append(path)
    return found


def scan_split(split_dir: str, class_to_idx: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Paths (as UTF-8 bytes, cheap to share with workers) and labels of the images under ``split_dir/<class>/``.

    Raises:
        DataError: naming the folder when a class folder holds no images or is unknown to the training split.
    """
    paths: list[bytes] = []
    labels: list[int] = []
    for name in class_folders(split_dir):
        if name not in class_to_idx:
            raise DataError(
                f"{split_dir} has a class folder {name!r} that train/ does not have; every class of val/ and test/ "
                "must have a folder in train/. Rename or remove the folder."
            )
        folder = os.path.join(split_dir, name)
        found = images_under(folder)
        if not found:
            raise DataError(
                f"class folder {folder} holds no images (files ending in {', '.join(IMG_EXTENSIONS)}): add its images "
                "or remove the folder."
            )
        paths += [p.encode() for p in found]
        labels += [class_to_idx[name]] * len(found)
    if not paths:
        raise DataError(f"no class folders with images in {split_dir}; expected {split_dir}/<class>/<image>.")
    return np.array(paths), np.array(labels, dtype=np.int64)  # fixed-width bytes: no per-item objects


class ImageFiles(Dataset):
    """Images read from files; an unreadable file is skipped (the next image is returned) with a warning.

    Args:
        paths: image paths as UTF-8 bytes.
        labels: class index of each path.
        indices: which of them this dataset holds.
        transform: applied to each PIL image.
        mode: PIL mode the images are converted to ("RGB" or "L").
    """

    def __init__(
        self, paths: np.ndarray, labels: np.ndarray, indices: np.ndarray, transform: v2.Compose, mode: str
    ) -> None:
        self.paths, self.labels, self.indices, self.transform, self.mode = paths, labels, indices, transform, mode
        self.unreadable: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, path: str) -> Image.Image:
        with open(path, "rb") as file:
            image = Image.open(file)
            return image.convert(self.mode)  # decodes the whole file, so truncated files fail here

    def __getitem__(self, i: int):
        for attempt in range(MAX_CONSECUTIVE_UNREADABLE):
            j = int(self.indices[(i + attempt) % len(self.indices)])
            path = self.paths[j].decode()
            try:
                image = self.load(path)
            except Exception as error:  # PIL reports broken files with many exception types
                self.unreadable[path] = f"{type(error).__name__}: {error}"
                warnings.warn(
                    f"skipped unreadable image file {path} ({self.unreadable[path]}); {len(self.unreadable)} "
                    "unreadable image file(s) skipped so far in this process. Replace or delete the file.",
                    stacklevel=2,
                )
                continue
            return self.transform(image), int(self.labels[j])
        raise DataError(
            f"{MAX_CONSECUTIVE_UNREADABLE} image files in a row are unreadable (the last: {path}); the data under "
            "data.root looks broken. Check the files (they must be images PIL can open)."
        )


class FileSource:
    """An ImageSource of image files."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray, mode: str) -> None:
        self.paths, self.labels, self.mode = paths, labels, mode

    def dataset(self, indices: np.ndarray, transform: v2.Compose) -> ImageFiles:
        return ImageFiles(self.paths, self.labels, indices, transform, self.mode)


class ImageFolderDataModule(ImageDataModule):
    """Any data set in the ImageFolder layout: ``train/<class>/<image>`` plus ``val/`` and/or ``test/``.

    Classes are the folder names of ``train/`` (sorted). Validation is ``val/`` when present, else carved from
    ``train/`` by ``val_fraction``; testing is ``test/`` when present, else ``val/``. ``root`` may also be a
    ``.tar``/``.tar.gz`` archive of such a tree (e.g. the offline CIFAR-10 JPEG tree), extracted once into
    ``extract_dir``.

    Args:
        root: the folder holding ``train/`` (or a folder whose only sub-folder does), or an archive of it.
        image_size: side of the images the network sees (resized and cropped to it).
        channels: 3 for RGB, 1 for grayscale (images are converted).
        extract_dir: writable folder where archives are extracted (once).
        augment: training augmentation and evaluation crop.
        **kwargs: the settings of :class:`ImageDataModule`.
    """

    def __init__(
        self,
        root: str = "data",
        image_size: int = 224,
        channels: int = 3,
        extract_dir: str = ".cache/data",
        augment: Augmentation = Augmentation(crop="random_resized_crop", eval_crop_ratio=0.875),
        **kwargs,
    ) -> None:
        super().__init__(root=root, image_size=image_size, augment=augment, **kwargs)
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels} must be 3 (RGB) or 1 (grayscale).")
        self.in_channels = channels
        self.extract_dir = os.path.expanduser(extract_dir)
        self.tree: str | None = None

    def prepare_data(self) -> None:
        self.locate()

    def locate(self) -> str:
        """The folder that holds ``train/``, extracting the archive first if ``root`` is one."""
        if self.tree is not None:
            return self.tree
        self.tree = find_tree(self.unpacked_root(
            "point it at a folder holding train/<class>/<image> (plus val/ or test/), or at a .tar/.tar.gz/.zip "
            "archive of one", "a .tar/.tar.gz/.zip archive of an image tree"))
        return self.tree

    def unpacked_root(self, expected: str, archive: str) -> str:
        """``data.root`` as a folder: itself, or the folder its archive is extracted into (once).

        Args:
            expected: what the error for a missing root asks for.
            archive: what a file given as root must be.

        Raises:
            DataError: the root does not exist, or is a file but not an archive.
        """
        if not os.path.exists(self.root):
            raise DataError(f"data.root={self.root} does not exist; {expected}.")
        if not os.path.isfile(self.root):
            return self.root
        if not self.root.endswith(ARCHIVE_SUFFIXES):
            raise DataError(f"data.root={self.root} is a file but not {archive}.")
        return extract_once(self.root, self.extract_dir)

    def describe(self) -> None:
        if self.class_names is None:
            tree = self.locate()
            self.class_names = class_folders(os.path.join(tree, "train"))
            if not self.class_names:
                raise DataError(f"no class folders in {os.path.join(tree, 'train')}; expected train/<class>/<image>.")
        self.num_classes = len(self.class_names)

    def load_splits(self) -> dict[str, FileSource]:
        self.describe()
        tree = self.locate()
        class_to_idx = {name: i for i, name in enumerate(self.class_names)}
        mode = "RGB" if self.in_channels == 3 else "L"
        present = {s: os.path.join(tree, s) for s in ("train", "val", "test") if os.path.isdir(os.path.join(tree, s))}
        if "val" not in present and "test" not in present:
            raise DataError(
                f"{tree} has train/ but neither val/ nor test/; add a val/ or test/ folder laid out like train/."
            )
        sources = {split: FileSource(*scan_split(folder, class_to_idx), mode) for split, folder in present.items()}
        sources.setdefault("test", sources.get("val"))
        return sources


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k (ILSVRC 2012). It cannot be downloaded automatically (get it from image-net.org).

    ``root`` is either torchvision's ImageNet layout (``ILSVRC2012_devkit_t12.tar.gz`` or the ``meta.bin`` it
    makes, plus ``train/`` and ``val/`` or the ILSVRC2012 archives, which torchvision unpacks once), or any
    prepared ``train/<wnid>/*.JPEG`` + ``val/<wnid>/*.JPEG`` tree. Validation and test are both the official
    validation set (the test labels are not public).

    Args:
        root: the ImageNet folder.
        image_size: side of the images the network sees.
        augment: training augmentation (random-resized crop and flips; eval resizes to 256 and centre-crops 224).
        **kwargs: the settings of :class:`ImageFolderDataModule`.
    """

    stats = "imagenet"

    def __init__(
        self,
        root: str = "data/imagenet",
        image_size: int = 224,
        augment: Augmentation = Augmentation(crop="random_resized_crop", eval_crop_ratio=0.875),
        **kwargs,
    ) -> None:
        super().__init__(root=root, image_size=image_size, augment=augment, **kwargs)

    def torchvision_layout(self) -> bool:
        """Whether ``root`` has what torchvision's ImageNet class reads (the devkit or its meta.bin)."""
        return any(os.path.isfile(os.path.join(self.root, f)) for f in ("meta.bin", "ILSVRC2012_devkit_t12.tar.gz"))

    def missing(self) -> DataError:
        return DataError(
            f"ImageNet not found under data.root={self.root}. It cannot be downloaded automatically: download "
            "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz from "
            "https://image-net.org into data.root (torchvision unpacks them on first use), or point data.root at a "
            "prepared tree train/<wnid>/*.JPEG + val/<wnid>/*.JPEG."
        )

    def prepare_data(self) -> None:
        if self.torchvision_layout():
            for split in ("train", "val"):
                unpacked = os.path.isfile(os.path.join(self.root, "meta.bin")) and os.path.isdir(
                    os.path.join(self.root, split)
                )
                if not unpacked:
                    self.open_torchvision(split)  # torchvision unpacks the archives once, on one process
        else:
            self.locate()

    def open_torchvision(self, split: str) -> ImageNet:
        try:
            return ImageNet(self.root, split=split)
        except (RuntimeError, OSError) as error:
            raise DataError(
                f"torchvision could not open ImageNet ({split}) under data.root={self.root}: {error}"
            ) from None

    def locate(self) -> str:
        if not os.path.isdir(self.root) or not os.path.isdir(os.path.join(self.root, "train")):
            raise self.missing()
        if not os.path.isdir(os.path.join(self.root, "val")):
            raise DataError(
                f"ImageNet under data.root={self.root} has train/ but no val/: put the validation images in "
                "val/<wnid>/ (torchvision does this from ILSVRC2012_img_val.tar and the devkit)."
            )
        self.tree = self.root
        return self.tree

    def describe(self) -> None:
        if self.class_names is None and self.torchvision_layout():
            dataset = self.open_torchvision("val")
            self.class_names = [names[0] for names in dataset.classes]
        super().describe()

    def load_splits(self) -> dict[str, FileSource]:
        if not self.torchvision_layout():
            return super().load_splits()
        mode = "RGB" if self.in_channels == 3 else "L"
        sources = {}
        for split in ("train", "val"):
            dataset = self.open_torchvision(split)
            paths = np.array([p.encode() for p, _ in dataset.samples])
            sources[split] = FileSource(paths, np.array(dataset.targets, dtype=np.int64), mode)
        self.class_names = [names[0] for names in dataset.classes]
        self.num_classes = len(self.class_names)
        sources["test"] = sources["val"]
        return sources
