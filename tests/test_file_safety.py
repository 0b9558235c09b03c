"""Files never run code, nothing is deleted or overwritten that this code did not make, and data files that lie
about themselves are refused (issue 13, items 1, 3, 9, 10, 11 and 13): real malicious archives, real user folders.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv_lightning.checkpoints import atomic_save
from qkv_lightning.data.cifar import CIFAR10DataModule
from qkv_lightning.data.image_folder import ImageFolderDataModule, extract_once
from qkv_lightning.data.mnist import MNISTDataModule
from qkv_lightning.data.wikitext import WikiText
from qkv_lightning.errors import ConfigError, DataError
from tests.imagedata import idx_bytes, tar_tree, write_cifar10, write_image_tree, write_mnist_gz
from tests.lm_fixtures import write_wikitext


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_link(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    tar.addfile(info)


def cifar_archive(root: Path, evil: callable) -> Path:
    """``root/cifar-10-python.tar.gz``: a real (small) CIFAR-10 tree, plus what ``evil`` adds to the archive."""
    tree = root.parent / "tree"
    write_cifar10(str(tree))
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        evil(tar)
        tar.add(tree / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


# ---------------------------------------------------------------------------------------------- item 1: archives
@pytest.mark.parametrize("attack", ["parent", "absolute", "symlink-then-file"])
def test_a_malicious_cifar_archive_writes_nothing_outside_data_root(tmp_path, attack):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    outside = tmp_path / "escaped.txt"

    def evil(tar):
        if attack == "parent":
            add_file(tar, "../escaped.txt", b"written outside data.root")
        elif attack == "absolute":
            add_file(tar, str(outside), b"written outside data.root")
        else:  # a link, then a file of the same name: the file's bytes would land in the link's target
            add_link(tar, "notes", str(victim))
            add_file(tar, "notes", b"overwritten")

    root = tmp_path / "root"
    cifar_archive(root, evil)
    data = CIFAR10DataModule(root=str(root), verify_md5=False, batch_size=4, num_workers=0)
    with pytest.raises(DataError, match="refusing to extract"):
        data.prepare_data()
    assert victim.read_text() == "the user's file"
    assert not outside.exists()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]  # no partial extraction left


def test_the_cifar_archive_md5_is_checked_before_it_is_extracted(tmp_path):
    root = tmp_path / "root"
    cifar_archive(root, lambda tar: add_file(tar, "../escaped.txt", b"x"))
    with pytest.raises(DataError, match=r"MD5 .* not the c58f30108f718f92721af3b95e74349a of the official CIFAR-10"):
        CIFAR10DataModule(root=str(root), batch_size=4, num_workers=0).prepare_data()
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]


def test_a_safe_cifar_archive_extracts_and_loads(tmp_path, umask_022):
    root = tmp_path / "root"
    cifar_archive(root, lambda tar: None)
    data = CIFAR10DataModule(root=str(root), verify_md5=False, batch_size=4, num_workers=0)
    data.prepare_data()
    batches = root / "cifar-10-batches-py"
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".gz")) == ["cifar-10-batches-py"]
    assert stat.S_IMODE(batches.stat().st_mode) == 0o755
    assert stat.S_IMODE((batches / "test_batch").stat().st_mode) == 0o644
    assert len(data.load_splits()["test"].labels) == 20


def test_the_extractor_caps_the_total_size_and_refuses_links_and_special_files(tmp_path):
    from qkv_lightning.data.archives import extract_archive

    archive = tmp_path / "big.tar"
    with tarfile.open(archive, "w") as tar:
        add_file(tar, "a.bin", bytes(600))
        add_file(tar, "b.bin", bytes(600))
    with pytest.raises(DataError, match="more than 1,000 bytes"):
        extract_archive(archive, tmp_path / "out", max_bytes=1000)
    assert not list((tmp_path / "out").iterdir())
    assert sorted(extract_archive(archive, tmp_path / "ok", max_bytes=1200)) == ["a.bin", "b.bin"]

    fifo = tmp_path / "fifo.tar"
    with tarfile.open(fifo, "w") as tar:
        info = tarfile.TarInfo("pipe")
        info.type = tarfile.FIFOTYPE
        tar.addfile(info)
    with pytest.raises(DataError, match="special file"):
        extract_archive(fifo, tmp_path / "out2")

    zipped = tmp_path / "evil.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("../escaped.txt", "x")
    with pytest.raises(DataError, match="points outside the target folder"):
        extract_archive(zipped, tmp_path / "out3")
    assert not (tmp_path / "escaped.txt").exists()


# ------------------------------------------------------------------------------- item 3: extract_once deletes nothing
def test_extract_dir_at_the_archives_grandparent_deletes_nothing(tmp_path):
    tree = write_image_tree(str(tmp_path / "src" / "tree"), ["a", "b"], 2, size=8)
    folder = tmp_path / "data" / "tree"  # the archive's own folder is called like the archive
    folder.mkdir(parents=True)
    archive = Path(tar_tree(tree, str(folder / "tree.tar.gz")))
    (folder / "sibling.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=rf"data.extract_dir={tmp_path / 'data'}: the folder {folder}"):
        extract_once(str(archive), str(tmp_path / "data"))
    assert archive.is_file() and (folder / "sibling.txt").read_text() == "keep me"


def test_a_user_folder_named_like_the_archive_is_left_alone_and_an_own_extraction_is_replaced(tmp_path):
    tree = write_image_tree(str(tmp_path / "src" / "tree"), ["a", "b"], 2, size=8)
    archive = tar_tree(tree, str(tmp_path / "tree.tar.gz"))
    user = tmp_path / "extract" / "tree"
    user.mkdir(parents=True)
    (user / "thesis.tex").write_text("months of work")
    with pytest.raises(ConfigError, match="was not made by an earlier extraction"):
        extract_once(archive, str(tmp_path / "extract"))
    assert (user / "thesis.tex").read_text() == "months of work"
    assert sorted(p.name for p in (tmp_path / "extract").iterdir()) == ["tree"]  # no scratch folder left

    target = extract_once(archive, str(tmp_path / "own"))
    os.utime(archive, (1, 1))  # the archive changed: the extraction made here is redone
    assert extract_once(archive, str(tmp_path / "own")) == target
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == ["tree"]


# ------------------------------------------------------------------------------------ item 9: links in image trees
def test_a_link_loop_in_an_image_archive_is_refused(tmp_path):
    tree = Path(write_image_tree(str(tmp_path / "src" / "tree"), ["a", "b"], 4, size=8))
    os.symlink(".", tree / "train" / "a" / "loop")
    archive = tar_tree(str(tree), str(tmp_path / "tree.tar.gz"))
    data = ImageFolderDataModule(root=archive, extract_dir=str(tmp_path / "x"), image_size=8, batch_size=2)
    with pytest.raises(DataError, match="is a link"):
        data.prepare_data()


def test_an_image_folder_counts_each_file_once_and_follows_no_link_out_of_a_class(tmp_path):
    tree = Path(write_image_tree(str(tmp_path / "tree"), ["a", "b"], 4, size=8))
    os.symlink(".", tree / "train" / "a" / "loop")  # a loop
    os.symlink("../b", tree / "train" / "a" / "other")  # into another class: would mislabel b's images
    os.symlink("0000.jpg", tree / "train" / "a" / "again.jpg")  # the same file twice
    data = ImageFolderDataModule(root=str(tree), extract_dir=str(tmp_path / "x"), image_size=8, batch_size=2)
    data.prepare_data()
    train = data.load_splits()["train"]
    assert np.bincount(train.labels).tolist() == [4, 4]


# ------------------------------------------------------------------------------------ item 10: lying data files
def test_an_mnist_file_with_edited_dimensions_is_refused(tmp_path):
    write_mnist_gz(str(tmp_path / "mnist"))
    images = np.zeros((60 * 4, 14, 14), dtype=np.uint8).reshape(60, 14, 56)  # as many bytes, other dimensions
    with gzip.open(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", "wb") as file:
        file.write(idx_bytes(images))
    data = MNISTDataModule(root=str(tmp_path / "mnist"), extract_dir=str(tmp_path / "x"), batch_size=4)
    with pytest.raises(DataError, match=r"declares the shape 60 x 14 x 56, but the official .* is 60000 x 28 x 28"):
        data.load_splits()


def wikitext(tmp_path: Path, **kwargs) -> WikiText:
    settings = dict(dataset="wikitext-2", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                    verify=False, seq_len=16, batch_size=4, num_workers=0)
    return WikiText(**{**settings, **kwargs})


def test_an_edited_token_cache_dtype_or_count_is_not_trusted(tmp_path):
    write_wikitext(tmp_path / "data")
    wikitext(tmp_path).prepare_data()
    meta_path = tmp_path / "cache" / "word" / "train.json"
    meta = json.loads(meta_path.read_text())
    assert meta["dtype"] == "uint16"
    good = (tmp_path / "cache" / "word" / "train.bin").read_bytes()
    edited = {**meta, "dtype": "uint32", "n_tokens": len(good) // 4 - 1, "array_bytes": len(good)}
    meta_path.write_text(json.dumps(edited))
    with pytest.raises(DataError, match="its dtype is 'uint32', but the current one is 'uint16'"):
        wikitext(tmp_path, rebuild_cache=False).prepare_data()
    meta_path.write_text(json.dumps({**meta, "n_tokens": meta["n_tokens"] - 2}))  # fewer tokens, same size
    with pytest.raises(DataError, match="does not make the"):
        wikitext(tmp_path, rebuild_cache=False).prepare_data()
    data = wikitext(tmp_path)  # rebuilding allowed: rebuilt, not reinterpreted
    data.prepare_data()
    data.setup("fit")
    assert json.loads(meta_path.read_text()) == meta
    assert data.datasets["train"].dtype == np.uint16 and data.datasets["train"].length == meta["n_tokens"] + 1


def test_cache_metadata_that_is_not_a_mapping_and_a_token_file_that_is_a_folder_are_errors(tmp_path):
    write_wikitext(tmp_path / "data")
    wikitext(tmp_path).prepare_data()
    meta_path = tmp_path / "cache" / "word" / "val.json"
    meta_path.write_text("[1, 2]")
    with pytest.raises(DataError, match="holds a JSON list, not the mapping"):
        wikitext(tmp_path).prepare_data()
    meta_path.unlink()
    bin_path = tmp_path / "cache" / "word" / "val.bin"
    bin_path.unlink()
    bin_path.mkdir()
    (bin_path / "mine.txt").write_text("x")
    with pytest.raises(DataError, match="is a folder, not a file"):
        wikitext(tmp_path).prepare_data()
    assert (bin_path / "mine.txt").read_text() == "x"


# ------------------------------------------------------------------------------------------ item 11: batch size 0
@pytest.mark.parametrize("make", ["wikitext", "images"])
def test_eval_batch_size_zero_is_an_error(tmp_path, make):
    with pytest.raises(ConfigError, match="data.eval_batch_size=0 must be at least 1"):
        if make == "wikitext":
            wikitext(tmp_path, eval_batch_size=0)
        else:
            CIFAR10DataModule(root=str(tmp_path), batch_size=4, eval_batch_size=0)


# ------------------------------------------------------------------------------------------------ item 13: umask
def test_written_files_follow_the_umask(tmp_path, umask_022):
    atomic_save({"x": torch.zeros(1)}, tmp_path / "a.ckpt")
    assert stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode) == 0o644
    tree = write_image_tree(str(tmp_path / "src" / "tree"), ["a", "b"], 2, size=8)
    target = Path(extract_once(tar_tree(tree, str(tmp_path / "tree.tar.gz")), str(tmp_path / "x")))
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.rglob("*.jpg")} == {0o644}
    write_mnist_gz(str(tmp_path / "mnist"))
    MNISTDataModule(root=str(tmp_path / "mnist"), extract_dir=str(tmp_path / "m"), batch_size=4).load_splits()
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").rglob("*-ubyte")} == {0o644}
    shutil.rmtree(tmp_path / "m")
