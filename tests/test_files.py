"""The one atomic writer and checksum helper (qkv_lightning/files.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from qkv_lightning.files import atomic_open, atomic_write_json, file_digest


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
