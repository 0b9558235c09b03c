"""The one atomic writer, checksum helper and JSON reader (qkv_lightning/files.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from qkv_lightning.errors import DataError
from qkv_lightning.files import atomic_open, atomic_write_json, file_digest, read_json


def test_atomic_open_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as file:
            file.write(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["a.bin"]
    with atomic_open(target) as file:
        file.write(b"new")
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["a.bin"]


def test_written_files_keep_the_umask_not_mkstemps_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644


def test_file_digest_equals_hashlib(tmp_path: Path) -> None:
    data = os.urandom(5_000_000)  # more than one chunk
    path = tmp_path / "data"
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(data).hexdigest()


def one_paragraph_naming(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_read_json_gives_back_what_was_written_and_none_for_no_file(tmp_path: Path) -> None:
    data = {"format": 1, "range": [0, None], "nested": {"a": "b"}}
    atomic_write_json(tmp_path / "meta.json", data)
    assert read_json(tmp_path / "meta.json") == data
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json", expected=list) == [1, 2]


@pytest.mark.parametrize("text", ['{"format": 1, "n_tok', "", "\udcff"], ids=["truncated", "empty", "not utf-8"])
def test_a_damaged_json_file_is_one_paragraph_naming_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "meta.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(DataError) as error:
        read_json(path, "the cache metadata", "point data.cache_dir elsewhere")
    message = one_paragraph_naming(error, path)
    assert message.startswith(f"the cache metadata {path} is damaged: not JSON (") and message.endswith(
        "Delete it so that it is written again, or point data.cache_dir elsewhere.")
    assert read_json(path, damaged_ok=True) is None  # a cache the caller rebuilds
    assert path.read_bytes() == text.encode("utf-8", "surrogateescape")  # left as it was


@pytest.mark.parametrize("name", ["list", "string", "null", "number"])
def test_json_of_another_type_is_one_paragraph_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / "result.json"
    path.write_text({"list": "[1, 2, 3]", "string": '"x"', "null": "null", "number": "7"}[name])
    for damaged_ok in (False, True):  # not damaged but edited: an error either way
        with pytest.raises(DataError) as error:
            read_json(path, "the stored result", damaged_ok=damaged_ok)
        message = one_paragraph_naming(error, path)
        assert message == (f"the stored result {path} holds a JSON {name}, not the mapping this code writes: it was "
                           "edited or replaced. Delete it so that it is written again.")


def test_a_folder_where_the_json_file_should_be_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "meta.json"
    folder.mkdir()
    (folder / "mine.txt").write_text("x")
    with pytest.raises(DataError) as error:
        read_json(folder, "the cache metadata", damaged_ok=True)
    assert "is a folder, not a file; it was not made by this code" in one_paragraph_naming(error, folder)
    assert (folder / "mine.txt").read_text() == "x"
