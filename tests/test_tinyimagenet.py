"""TinyImageNet in its official layout (a tiny tree of real JPEGs written here), and Fashion-MNIST's IDX files."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from qkv_lightning.data.image_base import NO_AUGMENTATION
from qkv_lightning.data.images import MEAN_STD, FashionMNISTDataModule, TinyImageNetDataModule
from qkv_lightning.errors import DataError
from tests.imagedata import class_images, write_mnist_gz

WNIDS = ["n09256479", "n01443537", "n02124075"]  # wnids.txt order is not sorted, as in the official file
WORDS = {"n01443537": "goldfish, Carassius auratus", "n02124075": "Egyptian cat", "n09256479": "coral reef"}


def write_tinyimagenet(root: str, per_class: int = 2, n_val: int = 7, seed: int = 0) -> tuple[str, list[str]]:
    """``root/tiny-imagenet-200`` in the official layout with 64-px JPEGs; returns the tree and the wnid of each
    validation image in ``val_annotations.txt`` order (val_0.JPEG, val_1.JPEG, ...)."""
    tree = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(tree)
    with open(os.path.join(tree, "wnids.txt"), "w") as file:
        file.write("\n".join(WNIDS) + "\n")
    with open(os.path.join(tree, "words.txt"), "w") as file:  # more ids than the classes, as the official file
        file.write("n00001740\tentity\n" + "".join(f"{w}\t{WORDS[w]}\n" for w in sorted(WORDS)))
    labels = np.arange(len(WNIDS))
    for c, wnid in enumerate(WNIDS):
        folder = os.path.join(tree, "train", wnid, "images")
        os.makedirs(folder)
        with open(os.path.join(tree, "train", wnid, f"{wnid}_boxes.txt"), "w") as file:
            file.write("".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))
        for i, image in enumerate(class_images(np.full(per_class, c), 3, 64, seed=seed + c)):
            Image.fromarray(image.transpose(1, 2, 0)).save(os.path.join(folder, f"{wnid}_{i}.JPEG"), quality=95)
    rng = np.random.default_rng(seed)
    val_wnids = [WNIDS[int(k)] for k in rng.integers(0, len(WNIDS), size=n_val)]
    os.makedirs(os.path.join(tree, "val", "images"))
    os.makedirs(os.path.join(tree, "test", "images"))  # unlabelled, never read
    with open(os.path.join(tree, "val", "val_annotations.txt"), "w") as file:
        for i, wnid in enumerate(val_wnids):
            image = class_images(labels[WNIDS.index(wnid) : WNIDS.index(wnid) + 1], 3, 64, seed=100 + i)[0]
            Image.fromarray(image.transpose(1, 2, 0)).save(os.path.join(tree, "val", "images", f"val_{i}.JPEG"))
            file.write(f"val_{i}.JPEG\t{wnid}\t1\t2\t60\t61\n")
    Image.new("RGB", (64, 64)).save(os.path.join(tree, "test", "images", "test_0.JPEG"))
    return tree, val_wnids


def test_val_images_get_the_classes_of_val_annotations(tmp_path):
    tree, val_wnids = write_tinyimagenet(str(tmp_path))
    dm = TinyImageNetDataModule(root=str(tmp_path), num_workers=0, augment=NO_AUGMENTATION)  # the folder above
    dm.setup()
    assert dm.spec() == {"num_classes": 3, "image_size": 64, "in_channels": 3}
    assert dm.wnids == sorted(WNIDS)  # classes in sorted wnid order, as ImageFolder and the authors' loader
    assert dm.class_names == ["goldfish", "Egyptian cat", "coral reef"]
    val = dm.datasets["val"]
    paths = [val.paths[j].decode() for j in val.indices]
    assert [os.path.basename(p) for p in paths] == [f"val_{i}.JPEG" for i in range(len(val_wnids))]
    labels = [val[i][1] for i in range(len(val))]
    assert [dm.wnids[label] for label in labels] == val_wnids  # the annotation file's classes
    assert len(dm.datasets["test"]) == len(val_wnids)  # test is the validation set (test labels are not public)
    train = dm.datasets["train"]
    assert len(train) == 6
    for i in range(len(train)):  # train/<wnid>/images/<wnid>_k.JPEG has the class of its folder
        path = train.paths[train.indices[i]].decode()
        assert dm.wnids[train[i][1]] == os.path.basename(path).split("_")[0]
    image, _ = train[0]
    mean, std = (torch.tensor(v)[:, None, None] for v in MEAN_STD["tinyimagenet"])
    pixels = np.asarray(Image.open(train.paths[train.indices[0]].decode()).convert("RGB")).transpose(2, 0, 1)
    torch.testing.assert_close(torch.round((image * std + mean) * 255), torch.tensor(pixels).float())
    assert sorted(os.listdir(os.path.join(tree, "val"))) == ["images", "val_annotations.txt"]  # nothing moved
    assert len(os.listdir(os.path.join(tree, "val", "images"))) == len(val_wnids)


def test_resized_to_224_and_read_from_the_official_zip(tmp_path):
    write_tinyimagenet(str(tmp_path / "src"), per_class=1, n_val=3)
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for folder, _, files in os.walk(tmp_path / "src"):
            for name in files:
                path = os.path.join(folder, name)
                zipped.write(path, os.path.relpath(path, tmp_path / "src"))
    dm = TinyImageNetDataModule(root=str(archive), image_size=224, extract_dir=str(tmp_path / "cache"), num_workers=0)
    dm.setup()
    assert dm.datasets["train"][0][0].shape == (3, 224, 224) and dm.datasets["val"][0][0].shape == (3, 224, 224)
    assert dm.spec()["image_size"] == 224 and len(dm.datasets["val"]) == 3


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_wnids", r"no wnids.txt in .*Point data.root at the unpacked tiny-imagenet-200"),
        ("no_annotations", r"val must hold images/ and val_annotations.txt"),
        ("unknown_class", r"val_annotations.txt, line 2 gives val_1.JPEG the class 'n99999999', which wnids.txt"),
        ("missing_image", r"val_annotations.txt, line 1 names val_0.JPEG, but .*val_0.JPEG does not exist"),
        ("missing_class_folder", r"has no folder for the classes \['n02124075'\] that wnids.txt lists"),
        ("extra_class_folder", r"has a class folder 'n00000001' that train/ does not have|class folder 'n00000001'"),
        ("bad_line", r"val_annotations.txt, line 3 is not '<file>\\t<wnid>\\t...'"),
    ],
)
def test_broken_layout_is_a_clear_error(tmp_path, breakage, message):
    tree, _ = write_tinyimagenet(str(tmp_path))
    annotations = os.path.join(tree, "val", "val_annotations.txt")
    lines = open(annotations).read().splitlines()
    if breakage == "no_wnids":
        os.remove(os.path.join(tree, "wnids.txt"))
    elif breakage == "no_annotations":
        os.remove(annotations)
    elif breakage == "unknown_class":
        lines[1] = lines[1].replace(lines[1].split("\t")[1], "n99999999")
    elif breakage == "missing_image":
        os.remove(os.path.join(tree, "val", "images", "val_0.JPEG"))
    elif breakage == "missing_class_folder":
        os.rename(os.path.join(tree, "train", "n02124075"), os.path.join(tmp_path, "moved"))
    elif breakage == "extra_class_folder":
        os.makedirs(os.path.join(tree, "train", "n00000001", "images"))
        Image.new("RGB", (64, 64)).save(os.path.join(tree, "train", "n00000001", "images", "x.JPEG"))
    elif breakage == "bad_line":
        lines[2] = "just-one-field"
    if breakage in ("unknown_class", "bad_line"):
        with open(annotations, "w") as file:
            file.write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        TinyImageNetDataModule(root=tree, num_workers=0).setup()


def test_fashion_mnist_reads_the_official_idx_files_pixel_for_pixel(tmp_path):
    source = str(tmp_path / "gz")
    written = write_mnist_gz(source, n_train=30, n_test=10, seed=4)
    dm = FashionMNISTDataModule(root=source, extract_dir=str(tmp_path / "cache"), val_fraction=0.0, num_workers=0,
                                augment=NO_AUGMENTATION)
    dm.setup()
    assert dm.spec() == {"num_classes": 10, "image_size": 28, "in_channels": 1}
    assert dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot"
    assert next((tmp_path / "cache").glob("FashionMNIST-*/FashionMNIST/raw/train-images-idx3-ubyte")).is_file()
    for split, (images, labels) in (("train", written["train"]), ("test", written["test"])):
        dataset = dm.datasets[split]
        got = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 1, 28, 28)
        mean, std = MEAN_STD["fashion_mnist"]
        assert torch.equal(torch.round((got * std[0] + mean[0]) * 255)[:, 0], torch.tensor(images).float())
        assert [dataset[i][1] for i in range(len(dataset))] == labels.tolist()
