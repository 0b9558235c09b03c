"""Image datamodules on small files in the official formats (written to tmp_path), and the offline MNIST copy."""

from __future__ import annotations

import gzip
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

import qkv_lightning.data.cifar as cifar
from qkv_lightning.data.image_base import NO_AUGMENTATION, Augmentation, carve_validation
from qkv_lightning.data.images import (
    MEAN_STD,
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    MNISTDataModule,
)
from qkv_lightning.errors import ConfigError, DataError
from qkv_lightning.files import file_digest
from tests.imagedata import (
    class_images,
    idx_bytes,
    tar_tree,
    write_cifar10,
    write_cifar100,
    write_image_tree,
    write_mnist_gz,
)
from tests.lm_fixtures import SHARED

SHARED_MNIST = str(SHARED / "mnist")


def read_back(dataset: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.tensor(labels)


def unnormalise(images: torch.Tensor, stats: str) -> torch.Tensor:
    mean, std = (torch.tensor(v)[:, None, None] for v in MEAN_STD[stats])
    return torch.round((images * std + mean) * 255)


# ------------------------------------------------------------------------------------------------------ CIFAR
def test_cifar10_reads_the_official_batch_format_pixel_for_pixel(tmp_path) -> None:
    folder = write_cifar10(str(tmp_path), per_batch=6, n_test=5)
    dm = CIFAR10DataModule(root=str(tmp_path), val_fraction=0.0, num_workers=0, augment=NO_AUGMENTATION)
    with pytest.warns(UserWarning, match="not the official ones"):
        dm.setup("fit")
    assert dm.spec() == {"num_classes": 10, "image_size": 32, "in_channels": 3}
    assert dm.class_names[0] == "airplane" and len(dm.class_names) == 10
    expected_rows, expected_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(os.path.join(folder, name), "rb") as file:
            batch = pickle.load(file)
        expected_rows.append(batch["data"])
        expected_labels += batch["labels"]
    images, labels = read_back(dm.datasets["train"])
    rows = np.concatenate(expected_rows)  # official layout: 1024 red, 1024 green, 1024 blue values, rows of 32
    c, y, x = 2, 5, 17
    assert torch.equal(unnormalise(images, "cifar10")[:, c, y, x], torch.tensor(rows[:, c * 1024 + y * 32 + x]).float())
    assert torch.equal(unnormalise(images, "cifar10"), torch.tensor(rows.reshape(-1, 3, 32, 32)).float())
    assert labels.tolist() == expected_labels
    assert len(dm.datasets["val"]) == len(dm.datasets["test"]) == 5  # val_fraction 0 validates on test


def test_cifar100_uses_fine_labels_and_meta_names(tmp_path) -> None:
    folder = write_cifar100(str(tmp_path), n_train=40, n_test=10)
    dm = CIFAR100DataModule(root=folder, val_fraction=0.25, num_workers=0)  # root may be the folder itself
    with pytest.warns(UserWarning):
        dm.setup("fit")
    assert dm.spec()["num_classes"] == 100 and dm.class_names[3] == "class3"
    with open(os.path.join(folder, "train"), "rb") as file:
        fine = pickle.load(file)["fine_labels"]
    train_idx, val_idx = carve_validation(40, 0.25, 0)
    assert read_back(dm.datasets["val"])[1].tolist() == [fine[i] for i in val_idx]
    assert len(dm.datasets["train"]) == 30 and len(dm.datasets["test"]) == 10


def test_cifar_unpickler_refuses_anything_but_numpy_arrays(tmp_path) -> None:
    folder = write_cifar10(str(tmp_path), per_batch=2, n_test=2)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(os.path.join(folder, "data_batch_3"), "wb") as file:
        pickle.dump({"data": Evil(), "labels": [0]}, file, protocol=2)
    with pytest.raises(DataError, match=r"refusing to load .*data_batch_3: it names the global io.open"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup()
    assert not marker.exists()


def test_truncated_cifar_batch_is_a_clear_error(tmp_path) -> None:
    folder = write_cifar10(str(tmp_path), per_batch=4, n_test=4)
    path = os.path.join(folder, "test_batch")
    size = os.path.getsize(path)
    with open(path, "r+b") as file:
        file.truncate(size // 2)
    with pytest.raises(DataError, match=r"cannot read .*test_batch: it is truncated or corrupted.*data.download"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup()


def test_file_with_the_official_image_count_must_have_the_official_md5(tmp_path, monkeypatch) -> None:
    folder = write_cifar10(str(tmp_path), per_batch=3, n_test=3)
    labels = np.arange(10000) % 10
    batch = {"data": class_images(labels[:1], 3, 32, 0).reshape(1, 3072).repeat(10000, 0), "labels": labels.tolist()}
    with open(os.path.join(folder, "data_batch_2"), "wb") as file:
        pickle.dump(batch, file, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_2 holds 10000 images like the official CIFAR-10 file but its MD5"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup()
    unchecked = CIFAR10DataModule(root=str(tmp_path), num_workers=0, verify_md5=False, val_fraction=0.0)
    unchecked.setup()
    assert len(unchecked.datasets["train"]) == 10000 + 4 * 3
    # files whose MD5s are the expected ones are accepted silently
    md5s = {name: file_digest(os.path.join(folder, name), "md5") for name in os.listdir(folder)}
    layout = cifar.CIFAR10_LAYOUT
    train, test = [(n, md5s[n]) for n, _ in layout.train], [("test_batch", md5s["test_batch"])]
    patched = cifar.CifarLayout(**{**layout.__dict__, "train": train, "test": test})
    monkeypatch.setattr(CIFAR10DataModule, "layout", patched)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup()


def test_missing_cifar_names_root_and_download(tmp_path) -> None:
    with pytest.raises(DataError, match=r"CIFAR-10 not found.*data.download: true.*data.root"):
        CIFAR10DataModule(root=str(tmp_path / "nowhere"), num_workers=0).setup()
    folder = write_cifar10(str(tmp_path), per_batch=2, n_test=2)
    os.remove(os.path.join(folder, "data_batch_4"))
    with pytest.raises(DataError, match=r"data_batch_4 is missing"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup()


# ------------------------------------------------------------------------------------------- splits, transforms
def test_validation_split_and_training_subset_are_seeded_and_disjoint() -> None:
    train, val = carve_validation(1000, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(1000))
    again, _ = carve_validation(1000, 0.1, seed=3)
    other, _ = carve_validation(1000, 0.1, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    with pytest.raises(ConfigError, match="val_fraction"):
        carve_validation(3, 0.9, 0)


def test_training_subset_comes_from_the_training_split(tmp_path) -> None:
    write_cifar10(str(tmp_path), per_batch=10, n_test=4)
    with pytest.warns(UserWarning):
        dm = CIFAR10DataModule(root=str(tmp_path), val_fraction=0.2, train_subset=7, num_workers=0)
        dm.setup()
    assert len(dm.datasets["train"]) == 7 and len(dm.datasets["val"]) == 10
    assert set(dm.datasets["train"].indices) <= set(carve_validation(50, 0.2, 0)[0])


def test_augmentations_keep_the_image_size_and_eval_is_deterministic(tmp_path) -> None:
    write_cifar10(str(tmp_path), per_batch=4, n_test=4)
    augment = Augmentation(crop="pad_crop", randaugment=True, random_erasing=0.5)
    dm = CIFAR10DataModule(root=str(tmp_path), augment=augment, num_workers=0, batch_size=4)
    with pytest.warns(UserWarning):
        dm.setup()
    torch.manual_seed(0)
    first, second = dm.datasets["train"][0][0], dm.datasets["train"][0][0]
    assert first.shape == (3, 32, 32) and not torch.equal(first, second)
    assert torch.equal(dm.datasets["val"][0][0], dm.datasets["val"][0][0])
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (4, 3, 32, 32) and batch[0].dtype == torch.float32


# ------------------------------------------------------------------------------------------------------ MNIST
def test_mnist_from_a_folder_of_gz_files_unpacks_once_and_never_writes_next_to_them(tmp_path) -> None:
    source = str(tmp_path / "gz")
    written = write_mnist_gz(source, n_train=30, n_test=10)
    before = sorted(os.listdir(source))
    cache = tmp_path / "cache"
    dm = MNISTDataModule(root=source, extract_dir=str(cache), val_fraction=0.2, num_workers=0, augment=NO_AUGMENTATION)
    dm.setup()
    assert sorted(os.listdir(source)) == before
    assert dm.spec() == {"num_classes": 10, "image_size": 28, "in_channels": 1}
    raw = next(cache.glob("MNIST-*/MNIST/raw"))
    stamp = (raw / "train-images-idx3-ubyte").stat().st_mtime_ns
    MNISTDataModule(root=source, extract_dir=str(cache), num_workers=0).setup()
    assert (raw / "train-images-idx3-ubyte").stat().st_mtime_ns == stamp  # not unpacked again
    images, labels = read_back(dm.datasets["test"])
    assert images.shape == (10, 1, 28, 28)
    assert torch.equal(unnormalise(images, "mnist")[:, 0], torch.tensor(written["test"][0]).float())
    assert labels.tolist() == written["test"][1].tolist()


def test_corrupt_mnist_file_is_a_clear_error(tmp_path) -> None:
    source = str(tmp_path / "gz")
    write_mnist_gz(source, n_train=10, n_test=5)
    path = os.path.join(source, "t10k-images-idx3-ubyte.gz")
    with open(path, "wb") as file:  # raw IDX bytes of the wrong length, not gzipped
        file.write(idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz.*truncated or corrupted"):
        MNISTDataModule(root=source, extract_dir=str(tmp_path / "cache"), num_workers=0).setup()
    with gzip.open(path, "wb") as file:  # gzipped, but the IDX data stops short of what its header says
        file.write(idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte holds 3836 bytes, but its header \(5 x 28 x 28\) "
                       r"needs 3936: the file is truncated"):
        MNISTDataModule(root=source, extract_dir=str(tmp_path / "cache"), num_workers=0).setup()


def test_missing_mnist_names_the_setting(tmp_path) -> None:
    with pytest.raises(DataError, match=r"FashionMNIST not found under data.root=.*data.download: true"):
        FashionMNISTDataModule(root=str(tmp_path), extract_dir=str(tmp_path / "c"), num_workers=0).setup()


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="the offline MNIST copy is not here")
def test_offline_mnist_counts_and_normalisation_statistics(tmp_path) -> None:
    dm = MNISTDataModule(root=SHARED_MNIST, extract_dir=str(tmp_path), val_fraction=0.0, num_workers=0)
    sources = dm.load_splits()
    train = sources["train"].images.float() / 255
    assert len(train) == 60000 and len(sources["test"].labels) == 10000
    assert np.bincount(sources["train"].labels).tolist()[:2] == [5923, 6742]
    mean, std = MEAN_STD["mnist"]
    assert train.mean().item() == pytest.approx(mean[0], abs=1e-4)
    assert train.std().item() == pytest.approx(std[0], abs=1e-4)


# ----------------------------------------------------------------------------------------------- image folders
CLASSES = ["cat", "dog", "emu"]


def test_image_folder_classes_labels_and_splits(tmp_path) -> None:
    root = write_image_tree(str(tmp_path / "tree"), CLASSES, per_class=3, size=36, splits=("train", "val"))
    dm = ImageFolderDataModule(root=root, image_size=32, num_workers=0, augment=NO_AUGMENTATION)
    dm.setup()
    assert dm.spec() == {"num_classes": 3, "image_size": 32, "in_channels": 3}
    assert dm.class_names == CLASSES
    images, labels = read_back(dm.datasets["val"])
    assert images.shape == (9, 3, 32, 32) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(dm.datasets["train"]) == 9 and len(dm.datasets["test"]) == 9  # test falls back to val/
    rrc = ImageFolderDataModule(root=root, image_size=16, num_workers=0)  # random-resized crops
    rrc.setup()
    assert rrc.datasets["train"][0][0].shape == (3, 16, 16)


def test_archive_is_extracted_once_outside_its_folder(tmp_path) -> None:
    tree = write_image_tree(str(tmp_path / "pics"), CLASSES, per_class=2, size=32, splits=("train", "test"))
    archive_dir = tmp_path / "readonly"
    archive_dir.mkdir()
    archive = tar_tree(tree, str(archive_dir / "pics.tar.gz"))
    cache = tmp_path / "cache"
    dm = ImageFolderDataModule(root=archive, extract_dir=str(cache), image_size=32, val_fraction=0.5, num_workers=0)
    dm.prepare_data()
    dm.setup()
    assert os.listdir(archive_dir) == ["pics.tar.gz"]
    marker = cache / "pics" / ".extracted-from"
    stamp = marker.stat().st_mtime_ns
    assert dm.locate() == str(cache / "pics" / "pics")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 3 and len(dm.datasets["test"]) == 6
    again = ImageFolderDataModule(root=archive, extract_dir=str(cache), image_size=32, num_workers=0)
    again.prepare_data()
    assert marker.stat().st_mtime_ns == stamp


def test_empty_class_folder_names_the_folder(tmp_path) -> None:
    root = write_image_tree(str(tmp_path / "tree"), CLASSES, per_class=2, splits=("train", "val"))
    empty = tmp_path / "tree" / "train" / "fox"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*train/fox holds no images"):
        ImageFolderDataModule(root=root, image_size=32, num_workers=0).setup()


def test_folder_layout_errors(tmp_path) -> None:
    with pytest.raises(DataError, match=r"data.root=.*does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "missing"), num_workers=0).setup()
    only_train = write_image_tree(str(tmp_path / "a"), CLASSES, per_class=1, splits=("train",))
    with pytest.raises(DataError, match="neither val/ nor test/"):
        ImageFolderDataModule(root=only_train, num_workers=0).setup()
    stray = write_image_tree(str(tmp_path / "b"), CLASSES, per_class=1, splits=("train", "val"))
    write_image_tree(str(tmp_path / "b"), ["yak"], per_class=1, splits=("val",))
    with pytest.raises(DataError, match="class folder 'yak' that train/ does not have"):
        ImageFolderDataModule(root=stray, num_workers=0).setup()
    with pytest.raises(DataError, match="no train/ folder"):
        ImageFolderDataModule(root=str(tmp_path / "a" / "train"), num_workers=0).setup()


def test_unreadable_images_are_skipped_with_a_counted_warning(tmp_path) -> None:
    root = write_image_tree(str(tmp_path / "tree"), CLASSES, per_class=4, splits=("train", "val"))
    broken = [tmp_path / "tree" / "train" / "dog" / "0005.png", tmp_path / "tree" / "train" / "emu" / "0008.jpg"]
    broken[0].write_bytes(b"not an image")
    broken[1].write_bytes(broken[1].read_bytes()[:60])  # truncated JPEG
    dm = ImageFolderDataModule(root=root, image_size=32, num_workers=0, batch_size=4, val_fraction=0.0)
    dm.setup()
    with pytest.warns(UserWarning, match="skipped unreadable image file") as caught:
        batches = list(dm.train_dataloader())
    assert sum(len(b[1]) for b in batches) == 12  # replaced by readable images
    messages = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(messages) == 2 and "2 unreadable image file(s) skipped so far" in messages[-1]
    assert set(dm.datasets["train"].unreadable) == {str(p) for p in broken}
    for path in (tmp_path / "tree" / "train").rglob("*.*"):
        path.write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="image files in a row are unreadable"):
        dm.datasets["train"][0]


# ---------------------------------------------------------------------------------------------------- ImageNet
def test_imagenet_absent_explains_where_to_get_it(tmp_path) -> None:
    with pytest.raises(DataError, match=r"ImageNet not found.*cannot be downloaded automatically.*image-net.org"):
        ImageNetDataModule(root=str(tmp_path), num_workers=0).setup()


def test_imagenet_prepared_tree_and_torchvision_layout(tmp_path) -> None:
    wnids = ["n01440764", "n01443537"]
    root = write_image_tree(str(tmp_path / "in"), wnids, per_class=2, size=40, splits=("train", "val"))
    dm = ImageNetDataModule(root=root, image_size=32, num_workers=0)
    dm.setup()
    assert dm.spec() == {"num_classes": 2, "image_size": 32, "in_channels": 3}
    assert len(dm.datasets["val"]) == 4 and dm.datasets["test"] is not None
    # torchvision's layout: meta.bin maps WordNet ids to names
    torch.save(({wnids[0]: ("tench", "Tinca tinca"), wnids[1]: ("goldfish",)}, []), os.path.join(root, "meta.bin"))
    tv = ImageNetDataModule(root=root, image_size=32, num_workers=0)
    tv.setup()
    assert tv.class_names == ["tench", "goldfish"]
    assert read_back(tv.datasets["val"])[1].tolist() == [0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------------- archives
def _tar_of(path, members: list[tuple[str, bytes | None, int]]) -> str:
    """A tar file of (name, data or None for a folder, mode) members."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_tar_extraction_takes_modes_from_the_umask_and_prints_its_progress(tmp_path, caplog) -> None:
    """tarfile's data filter keeps the archive's (safe) modes; ours are the user's umask's (0o777 or set-uid bits in
    the archive give 0o600 files and 0o700 folders under umask 077), and the check of the members and the extraction
    log their start and their end (a line every few seconds between)."""
    import logging

    from qkv_lightning.data.archives import extract_archive

    archive = _tar_of(tmp_path / "a.tar", [("d", None, 0o777), ("d/run.sh", b"#!/bin/sh\n", 0o4777),
                                           ("d/x.bin", bytes(3000), 0o644)])
    old = os.umask(0o077)
    try:
        with caplog.at_level(logging.INFO, logger="qkv_lightning.data"):
            names = extract_archive(archive, tmp_path / "out")
    finally:
        os.umask(old)
    assert sorted(names) == ["d/run.sh", "d/x.bin"]
    assert (tmp_path / "out/d/x.bin").read_bytes() == bytes(3000)
    modes = {p.name: p.stat().st_mode & 0o7777 for p in (tmp_path / "out").rglob("*")}
    assert modes == {"d": 0o700, "run.sh": 0o600, "x.bin": 0o600}
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == f"checking the members of {archive} ..." and "done, 3 members" in lines[1]
    assert lines[2] == f"extracting {archive} ..." and "done, 3.01k bytes" in lines[-1]


def test_tar_refusals_repeated_member_and_a_python_without_the_data_filter(tmp_path, monkeypatch) -> None:
    import tarfile

    from qkv_lightning.data.archives import extract_archive

    twice = _tar_of(tmp_path / "twice.tar", [("a.txt", b"first", 0o644), ("./a.txt", b"second", 0o644)])
    with pytest.raises(DataError, match="appears twice"):
        extract_archive(twice, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())  # checked before anything was written
    ok = _tar_of(tmp_path / "ok.tar", [("a.txt", b"first", 0o644)])
    monkeypatch.delattr(tarfile, "data_filter")  # as on Python < 3.10.12 / 3.11.4
    with pytest.raises(DataError, match=r"no tarfile 'data' filter .*3\.10\.12, 3\.11\.4"):
        extract_archive(ok, tmp_path / "out2")
    assert not (tmp_path / "out2" / "a.txt").exists()
