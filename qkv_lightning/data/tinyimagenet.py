"""TinyImageNet (200 classes of 64 x 64 ImageNet images; the paper's large vision task) in its official layout.

The official ``tiny-imagenet-200.zip`` unpacks to::

    tiny-imagenet-200/
      wnids.txt                      the 200 class ids (WordNet ids such as n01443537), one a line
      words.txt                      "<wnid>\\t<names>" for every WordNet id (more than the 200)
      train/<wnid>/images/*.JPEG     500 training images per class (plus <wnid>_boxes.txt)
      val/images/*.JPEG              10,000 validation images in one folder
      val/val_annotations.txt        "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" per validation image
      test/images/*.JPEG             unlabelled test images (not used)

The validation images get their classes from ``val_annotations.txt`` (read in place: nothing is moved or written),
and serve as validation and test split, as in the paper (the test labels are not public).
"""

from __future__ import annotations

import os

import numpy as np

from qkv_lightning.data.image_base import Augmentation
from qkv_lightning.data.image_folder import (
    FileSource,
    ImageFolderDataModule,
    class_folders,
    scan_split,
)
from qkv_lightning.errors import DataError

TREE_NAME = "tiny-imagenet-200"
"""The folder the official archive unpacks to."""


def read_wnids(path: str) -> list[str]:
    """The class ids of ``wnids.txt``, in file order.

    Raises:
        DataError: naming the file if it is missing, empty or repeats an id.
    """
    if not os.path.isfile(path):
        raise DataError(
            f"{path} is missing: a TinyImageNet tree holds wnids.txt (the class ids), words.txt, train/ and val/. "
            "Point data.root at the unpacked tiny-imagenet-200 folder (or at tiny-imagenet-200.zip)."
        )
    with open(path, encoding="utf-8") as file:
        wnids = [line.strip() for line in file if line.strip()]
    if not wnids:
        raise DataError(f"{path} lists no class ids; replace it with the official wnids.txt.")
    repeated = sorted({w for w in wnids if wnids.count(w) > 1})
    if repeated:
        raise DataError(f"{path} lists the class ids {repeated[:5]} more than once; replace it with the official file.")
    return wnids


def read_words(path: str, wnids: list[str]) -> list[str]:
    """The first name of each class in ``words.txt`` ("goldfish" for n01443537), or the wnid where it has none."""
    if not os.path.isfile(path):
        return list(wnids)
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            wnid, _, words = line.rstrip("\n").partition("\t")
            names[wnid] = words.split(",")[0].strip() or wnid
    return [names.get(w, w) for w in wnids]


def read_val_annotations(val_dir: str, class_to_idx: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Paths (UTF-8 bytes) and labels of ``val/images/*`` from ``val/val_annotations.txt``, in the file's order.

    Raises:
        DataError: naming the file and line for a missing annotation file, a malformed line, an unknown class id, an
            image named twice, or an image file that is not there.
    """
    annotations = os.path.join(val_dir, "val_annotations.txt")
    images = os.path.join(val_dir, "images")
    if not os.path.isfile(annotations) or not os.path.isdir(images):
        raise DataError(
            f"{val_dir} must hold images/ and val_annotations.txt (the official TinyImageNet validation layout); "
            f"found {sorted(os.listdir(val_dir)) if os.path.isdir(val_dir) else 'no such folder'}. Unpack the "
            "official tiny-imagenet-200.zip again."
        )
    paths: list[bytes] = []
    labels: list[int] = []
    seen: set[str] = set()
    with open(annotations, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            where = f"{annotations}, line {number}"
            if len(fields) < 2 or not fields[0] or os.sep in fields[0] or fields[0] in (".", ".."):
                raise DataError(f"{where} is not '<file>\\t<wnid>\\t...': {line.strip()!r}; use the official file.")
            name, wnid = fields[0], fields[1]
            if wnid not in class_to_idx:
                raise DataError(f"{where} gives {name} the class {wnid!r}, which wnids.txt does not list.")
            if name in seen:
                raise DataError(f"{where} annotates {name} a second time; use the official file.")
            path = os.path.join(images, name)
            if not os.path.isfile(path):
                raise DataError(f"{where} names {name}, but {path} does not exist; unpack the official archive again.")
            seen.add(name)
            paths.append(path.encode())
            labels.append(class_to_idx[wnid])
    if not paths:
        raise DataError(f"{annotations} annotates no images; use the official file.")
    return np.array(paths), np.array(labels, dtype=np.int64)


class TinyImageNetDataModule(ImageFolderDataModule):
    """TinyImageNet-200 in the official layout (see the module docstring); 64-px RGB images, 200 classes.

    Classes are the ids of ``wnids.txt`` in sorted order (``class_names`` holds their first names from
    ``words.txt``); validation and test are the 10,000 annotated validation images.

    Args:
        root: the ``tiny-imagenet-200`` folder, a folder holding it, or the official ``tiny-imagenet-200.zip``
            (extracted once into ``extract_dir``).
        image_size: side of the images the network sees (64 native; the paper's ViT-B/16 resizes to 224).
        augment: training augmentation (by default the paper's: flips only; images are resized, not cropped).
        **kwargs: the settings of :class:`ImageFolderDataModule` (``channels``, ``extract_dir``, ...).
    """

    native_size = 64
    stats = "tinyimagenet"

    def __init__(
        self,
        root: str = "data/tiny-imagenet-200",
        image_size: int = 64,
        augment: Augmentation = Augmentation(crop="none", hflip=True),
        **kwargs,
    ) -> None:
        super().__init__(root=root, image_size=image_size, augment=augment, **kwargs)
        self.wnids: list[str] | None = None

    def locate(self) -> str:
        """The folder holding ``wnids.txt``, ``train/`` and ``val/`` (extracting the archive first if ``root`` is
        one)."""
        if self.tree is not None:
            return self.tree
        folder = self.unpacked_root(
            "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and point data.root at it (or at the folder it "
            "unpacks to)", "the tiny-imagenet-200.zip archive")
        for candidate in (folder, os.path.join(folder, TREE_NAME)):
            if os.path.isfile(os.path.join(candidate, "wnids.txt")):
                self.tree = candidate
                return candidate
        raise DataError(
            f"no wnids.txt in {folder} or {os.path.join(folder, TREE_NAME)}: a TinyImageNet tree holds wnids.txt (the "
            "class ids), words.txt, train/<wnid>/images/ and val/images/ with val/val_annotations.txt. Point "
            "data.root at the unpacked tiny-imagenet-200 folder (or at tiny-imagenet-200.zip)."
        )

    def describe(self) -> None:
        if self.wnids is None:
            tree = self.locate()
            self.wnids = sorted(read_wnids(os.path.join(tree, "wnids.txt")))
            self.class_names = read_words(os.path.join(tree, "words.txt"), self.wnids)
        self.num_classes = len(self.wnids)

    def load_splits(self) -> dict[str, FileSource]:
        self.describe()
        tree = self.locate()
        class_to_idx = {wnid: i for i, wnid in enumerate(self.wnids)}
        train_dir = os.path.join(tree, "train")
        if not os.path.isdir(train_dir):
            raise DataError(f"{train_dir} is missing: TinyImageNet's training images are train/<wnid>/images/*.JPEG.")
        missing = sorted(set(self.wnids) - set(class_folders(train_dir)))
        if missing:
            raise DataError(
                f"{train_dir} has no folder for the classes {missing[:5]}{' ...' if len(missing) > 5 else ''} that "
                "wnids.txt lists; unpack the official archive again."
            )
        mode = "RGB" if self.in_channels == 3 else "L"
        train = FileSource(*scan_split(train_dir, class_to_idx), mode)  # train/<wnid>/images/*.JPEG
        val = FileSource(*read_val_annotations(os.path.join(tree, "val"), class_to_idx), mode)
        return {"train": train, "val": val, "test": val}
