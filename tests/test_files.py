"""The one output writer (qkv_lightning/files.py): atomic writes, the ownership rule that decides what the tool may
replace or delete, folder swaps, staged folders, stale temporaries and the one JSON reader, on real files, links and
processes."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qkv_lightning.errors import DataError
from qkv_lightning.files import (
    OWNED_MARKER,
    NotOwnedError,
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    escapes,
    file_digest,
    is_sealed,
    make_owned_dir,
    read_json,
    recover_swap,
    remove_owned,
    remove_stale_temporaries,
    sealed,
    staged_folder,
    swap_in,
    write_sealed_text,
)


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


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_atomic_open_without_replace_takes_only_a_free_name(tmp_path: Path) -> None:
    """Three inputs: a free name (written), a taken one (refused at the end, kept), one taken while writing."""
    atomic_write_text(tmp_path / "new.txt", "mine", replace=False)
    assert (tmp_path / "new.txt").read_text() == "mine"
    user = tmp_path / "user.txt"
    user.write_text("the user's")
    before = sha(user)
    with pytest.raises(NotOwnedError, match="nothing is replaced"):
        atomic_write_text(user, "overwritten", replace=False)
    late = tmp_path / "late.txt"
    with pytest.raises(NotOwnedError, match=str(late)):
        with atomic_open(late, "w", replace=False) as file:
            file.write("ours")
            late.write_text("appeared meanwhile")
    assert sha(user) == before and late.read_text() == "appeared meanwhile"
    assert sorted(os.listdir(tmp_path)) == ["late.txt", "new.txt", "user.txt"]  # no temporary left


def test_a_sealed_file_is_the_tools_until_edited(tmp_path: Path) -> None:
    """Six inputs for check_replaceable / write_sealed_text: a free name and the tool's own sealed file (written),
    a user's file, a sealed file edited by one byte, a link to a sealed file and a folder (each refused, unchanged)."""
    own = tmp_path / "own.yaml"
    write_sealed_text(own, "a: 1\n")
    assert is_sealed(own) and own.read_text().endswith("\na: 1\n")
    write_sealed_text(own, "a: 2\n")
    assert own.read_text().endswith("\na: 2\n")
    user = tmp_path / "user.yaml"
    user.write_text("a: 1\n")
    edited = tmp_path / "edited.yaml"
    edited.write_text(sealed("a: 1\n").replace("a: 1", "a: 3"))
    link = tmp_path / "link.yaml"
    link.symlink_to(own)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    for path, reason in ((user, "did not write"), (edited, "edited since"), (link, "is a link"),
                         (folder, "is a folder")):
        before = sha(own) if path == link else sha(path) if path.is_file() else None
        with pytest.raises(NotOwnedError, match=reason) as refused:
            write_sealed_text(path, "b: 1\n", advice="set X to another folder")
        assert str(path) in str(refused.value) and "set X to another folder" in str(refused.value)
        assert (sha(own) if path == link else sha(path) if path.is_file() else None) == before
        assert not is_sealed(path)
    assert link.is_symlink() and folder.is_dir() and list(folder.iterdir()) == []
    check_replaceable(tmp_path / "free.yaml")


def user_tree(root: Path) -> dict[str, str]:
    (root / "sub").mkdir(parents=True)
    (root / "thesis.tex").write_text("years of work")
    (root / "sub" / "data.bin").write_bytes(os.urandom(100))
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_remove_owned_deletes_only_what_it_can_prove_it_made(tmp_path: Path) -> None:
    """Seven refused inputs (a link to a user folder, a link to an owned folder, a user folder, a user file, an
    owned folder reached through a link below root, a path outside root, a user folder inside root with an unowned
    root) and four deleted ones (an owned folder, a sealed file, a user file inside an owned root, a missing path);
    escapes() on three paths a checkpoint's callback state could carry ('..' out of the root, a link, a plain one)."""
    user = tmp_path / "user"
    before = user_tree(user)
    work = tmp_path / "work"
    owned = make_owned_dir(work / "cells" / "a")
    (owned / "x.txt").write_text("ours")
    assert (owned / OWNED_MARKER).is_file()
    link_to_user = work / "cells" / "link-user"
    link_to_user.symlink_to(user, target_is_directory=True)
    link_to_owned = work / "cells" / "link-owned"
    link_to_owned.symlink_to(owned, target_is_directory=True)
    elsewhere = make_owned_dir(tmp_path / "elsewhere" / "b")
    hop = work / "hop"
    hop.symlink_to(elsewhere.parent, target_is_directory=True)
    plain = work / "plain"
    plain.mkdir()
    refused = [
        (link_to_user, None, "is a link"),
        (link_to_owned, None, "is a link"),
        (user, None, "did not make"),
        (user / "thesis.tex", None, "did not write"),
        (hop / "b", work, "through the link"),
        (elsewhere, work, "outside"),
        (plain, work, "did not make"),
    ]
    for path, root, reason in refused:
        with pytest.raises(NotOwnedError, match=reason) as error:
            remove_owned(path, root)
        assert str(path) in str(error.value) and "Nothing was deleted" in str(error.value)
    assert tree(user) == before and (owned / "x.txt").is_file() and (elsewhere / OWNED_MARKER).is_file()
    assert link_to_user.is_symlink() and plain.is_dir()
    sealed_file = work / "config.yaml"
    write_sealed_text(sealed_file, "a: 1\n")
    owned_root = make_owned_dir(work / "root")
    (owned_root / "deep").mkdir()
    (owned_root / "deep" / "f").write_text("inside an owned root")
    assert remove_owned(owned) and not owned.exists()
    assert remove_owned(sealed_file) and not sealed_file.exists()
    assert remove_owned(owned_root / "deep", owned_root) and not (owned_root / "deep").exists()
    assert not remove_owned(work / "missing")
    assert tree(user) == before
    # a path as a checkpoint's callback state could name it: '..' and links below the root are caught
    cells = work / "cells"
    assert escapes(cells / ".." / ".." / "user" / "thesis.tex", cells) == f"lies outside {cells}"
    assert "through the link" in escapes(link_to_user / "thesis.tex", work / "cells")
    assert escapes(work / "root" / "f", work) is None


def test_swap_in_replaces_a_folder_and_a_crash_between_its_renames_is_recovered(tmp_path: Path) -> None:
    """Swap over an existing folder, into a free name, refusal with replace=False, and the two crash states
    (target missing: the complete staged folder, else the retired one, is put back)."""
    target, staged = tmp_path / "t", tmp_path / "s"
    target.mkdir()
    (target / "v").write_text("1")
    staged.mkdir()
    (staged / "v").write_text("2")
    swap_in(staged, target)
    assert (target / "v").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["t"]
    staged.mkdir()
    with pytest.raises(NotOwnedError):
        swap_in(staged, target, replace=False)
    assert (target / "v").read_text() == "2" and staged.is_dir()
    swap_in(staged, tmp_path / "free", replace=False)
    assert (tmp_path / "free").is_dir() and not staged.exists()

    def complete(path: Path) -> bool:
        return (path / "v").is_file()

    for staged_complete, expected in ((True, "new"), (False, "old")):
        retired = tmp_path / "t.old"
        os.replace(target, retired)  # the crash: after the first rename of a swap
        staged.mkdir()
        if staged_complete:
            (staged / "v").write_text("new")
        (retired / "v").write_text("old")
        assert recover_swap(target, [staged, retired], complete)
        assert (target / "v").read_text() == expected
        assert not recover_swap(target, [staged, retired], complete)  # nothing missing: nothing moved
        for leftover in (staged, retired):
            if leftover.exists():
                shutil.rmtree(leftover)


def test_staged_folder_puts_files_in_place_only_when_all_are_complete(tmp_path: Path) -> None:
    """A new folder appears whole; an existing one gets the files under free names; a taken name or an exception
    publishes nothing; a file --out is refused; no scratch folder is left in any case."""
    new = tmp_path / "new"
    with staged_folder(new, last=("manifest.json",)) as stage:
        (stage / "a.bin").write_bytes(b"a")
        (stage / "manifest.json").write_text("{}")
        assert not new.exists()
    assert sorted(os.listdir(new)) == ["a.bin", "manifest.json"]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "user.txt").write_text("the user's")
    with staged_folder(existing) as stage:
        (stage / "b.bin").write_bytes(b"b")
    assert sorted(os.listdir(existing)) == ["b.bin", "user.txt"]
    with pytest.raises(NotOwnedError, match="user.txt"):
        with staged_folder(existing) as stage:
            (stage / "c.bin").write_bytes(b"c")
            (stage / "user.txt").write_text("overwritten")
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "never") as stage:
            (stage / "d.bin").write_bytes(b"d")
            raise RuntimeError("failed part-way")
    with pytest.raises(NotOwnedError, match="is a file"):
        with staged_folder(existing / "user.txt"):
            pass
    assert (existing / "user.txt").read_text() == "the user's"
    assert sorted(os.listdir(existing)) == ["b.bin", "user.txt"]
    assert sorted(os.listdir(tmp_path)) == ["existing", "new"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_processes_of_this_host_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """Seven entries: a dead process's temporary file and folder (removed), and kept: a live process's, this
    process's, another host's, another destination's (with a name filter), and a user's file of a similar name."""
    host, gone = socket.gethostname(), dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".out.tmp-{host}-{gone}-abc123.tmp": "removed",
            f".out.tmp-{host}-{gone}-dir456.tmp/": "removed",
            f".out.tmp-{host}-{sleeper.pid}-abc.tmp": "kept",
            f".out.tmp-{host}-{os.getpid()}-abc.tmp": "kept",
            f".out.tmp-other-host-{gone}-abc.tmp": "kept",
            f".other.tmp-{host}-{gone}-abc.tmp": "kept",
            "out.tmp-notes.txt": "kept",
        }
        for name in names:
            if name.endswith("/"):
                (tmp_path / name).mkdir()
                (tmp_path / name / "inside").write_text("x")
            else:
                (tmp_path / name).write_text("x")
        removed = remove_stale_temporaries(tmp_path, "out")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in removed) == sorted(n.rstrip("/") for n, v in names.items() if v == "removed")
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, v in names.items() if v == "kept")


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
