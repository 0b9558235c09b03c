"""The one safe way data archives are unpacked: tar (plain or compressed), zip and single gzip files.

Kept instead of torchvision's ``extract_archive``, which follows the archive's links, names and modes as given.

Tar archives are extracted by ``tarfile`` with its ``"data"`` filter (PEP 706: nothing outside the target, no devices
or FIFOs, no set-uid bits), and on top of it: no absolute names, only regular files and folders (no links at all, so
no later member can land through one), no member name twice, modes from the user's umask (none from the archive),
the total size capped (from the headers, before anything is written). Zip archives (``zipfile`` has no such filter)
get the same checks here. Every member is checked before the first is written, extraction prints its progress
(``[data] extracting ...``, :mod:`qkv_lightning.data.progress`), and an official archive's MD5 is checked before it
is opened (:func:`check_md5`).

tarfile's filters exist from Python 3.10.12 / 3.11.4 (and in distributions' backports); an older Python is told
which version extracts the archive (:func:`require_tar_filter`), never given a tar extraction without the filter.
"""

from __future__ import annotations

import gzip
import os
import platform
import posixpath
import shutil
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from torchvision.datasets.utils import calculate_md5

from qkv_lightning.data.progress import Progress
from qkv_lightning.errors import DataError
from qkv_lightning.files import atomic_open

MAX_EXTRACTED_BYTES = 64 << 30
"""Default cap on the bytes one archive may unpack to (64 GiB: ImageNet's training tree is about 140 GB in several
archives of at most 64 GB each); more is refused as a likely archive bomb."""

CHUNK = 1 << 20

PROGRESS_EVERY = 5.0
"""Seconds between two progress lines of one extraction."""


def check_md5(path: str | os.PathLike, expected: str, what: str, setting: str) -> None:
    """Refuse an archive whose MD5 is not the official one, before it is opened.

    Args:
        path: the archive.
        expected: the official MD5.
        what: what the archive should be, for the message (e.g. "the official CIFAR-10 archive").
        setting: the setting that bypasses the check, for the message.

    Raises:
        DataError: naming the file, both checksums and the setting.
    """
    found = calculate_md5(str(path))
    if found != expected:
        raise DataError(
            f"{path} has MD5 {found}, not the {expected} of {what}: it is damaged or modified, so it is not "
            f"extracted. Delete it and download it again, or set {setting} to use it as it is."
        )


def _safe_name(name: str, archive: str | os.PathLike) -> str | None:
    """The member's path relative to the target, normalised; None for the archive's root itself.

    Raises:
        DataError: for an absolute name or one that leaves the target.
    """
    text = name.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise DataError(f"refusing to extract {archive}: its member {name!r} has an absolute path.")
    normal = posixpath.normpath(text)
    if normal == "." or normal == "":
        return None
    if normal == ".." or normal.startswith("../") or "\x00" in normal:
        raise DataError(f"refusing to extract {archive}: its member {name!r} points outside the target folder.")
    return normal


def _check_total(total: int, limit: int, archive: str | os.PathLike) -> None:
    if total > limit:
        raise DataError(
            f"refusing to extract {archive}: it unpacks to more than {limit:,} bytes (the cap of one archive), which "
            "a data archive of this kind does not need; it may be an archive bomb. Check the file."
        )


def _write_member(source: Iterable[bytes], target: Path, written: list[int], limit: int, archive: str) -> None:
    """Write a fresh file (``O_EXCL``: never through an existing file or link), counting bytes against ``limit``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "wb") as out:
        _copy_capped(source, out, written, limit, archive)


def _copy_capped(source: Iterable[bytes], out: IO[bytes], written: list[int], limit: int, archive: str) -> None:
    """Copy chunks into ``out``, counting the bytes of the whole extraction against ``limit``."""
    for chunk in source:
        written[0] += len(chunk)
        _check_total(written[0], limit, archive)
        out.write(chunk)


def _chunks(stream: object) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):  # type: ignore[attr-defined]
        yield chunk


def _inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, checked to stay inside ``folder`` once links on the way are resolved."""
    target = folder / relative
    if not target.parent.resolve().is_relative_to(folder.resolve()):
        raise DataError(f"refusing to extract into {target}: a folder on its way leads outside {folder}.")
    return target


def require_tar_filter(archive: str | os.PathLike) -> None:
    """Refuse to extract a tar archive on a Python whose ``tarfile`` lacks the ``"data"`` filter.

    Raises:
        DataError: naming the Python versions that have it.
    """
    if not hasattr(tarfile, "data_filter"):
        raise DataError(
            f"cannot extract {archive} safely: this Python ({platform.python_version()}) has no tarfile 'data' "
            "filter (PEP 706), which came with Python 3.10.12, 3.11.4 and 3.12. Use one of those (or newer), or "
            "extract the archive yourself and point data.root at the folder."
        )


def _member_filter(archive: str) -> object:
    """``tarfile``'s ``"data"`` filter, then: only files and folders, modes and owners left to the user's umask."""

    def only_files_and_folders(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo:
        if member.name.startswith(("/", os.sep)):  # the filter would strip the "/": refused, as tar does by default
            raise DataError(f"refusing to extract {archive}: its member {member.name!r} has an absolute path.")
        try:
            member = tarfile.data_filter(member, destination)
        except tarfile.FilterError as error:
            why = "points outside the target folder" if isinstance(
                error, tarfile.OutsideDestinationError | tarfile.LinkOutsideDestinationError) else (
                "has an absolute path" if isinstance(error, tarfile.AbsolutePathError | tarfile.AbsoluteLinkError)
                else "is a special file")
            raise DataError(
                f"refusing to extract {archive}: its member {error.tarinfo.name!r} {why} ({error}); a data archive "
                "holds only files and folders inside it."
            ) from None
        if not (member.isfile() or member.isdir()):
            kind = "link" if member.issym() or member.islnk() else "special file"
            raise DataError(
                f"refusing to extract {archive}: its member {member.name!r} is a {kind}; a data archive holds only "
                "files and folders (a link could make later members land outside the target)."
            )
        return member.replace(mode=None, uid=None, gid=None, uname=None, gname=None, deep=False)

    return only_files_and_folders


def _extract_tar(archive: str, folder: Path, max_bytes: int) -> list[str]:
    """Extract a tar archive with :func:`_member_filter` after checking every member (see the module docstring)."""
    require_tar_filter(archive)
    keep = _member_filter(archive)
    with tarfile.open(archive) as tar:
        listing = Progress(f"checking the members of {archive}", unit="members", every=PROGRESS_EVERY)
        members: list[tarfile.TarInfo] = []
        seen: set[str] = set()
        total = 0
        for member in tar:  # all of them before the first is written (a compressed archive is read through once)
            keep(member, str(folder))
            total += member.size if member.isfile() else 0
            _check_total(total, max_bytes, archive)
            name = posixpath.normpath(member.name)
            if name in seen and not member.isdir():
                raise DataError(
                    f"refusing to extract {archive}: its member {member.name!r} appears twice (the second would "
                    "replace the first); nothing is overwritten."
                )
            seen.add(name)
            members.append(member)
            listing.update(1)
        listing.done()
        progress = Progress(f"extracting {archive}", unit="bytes", total=total, every=PROGRESS_EVERY)

        def counted(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo:
            progress.update(member.size if member.isfile() else 0)
            return keep(member, destination)

        tar.extractall(folder, members=members, filter=counted)
        progress.done()
        return [posixpath.normpath(m.name) for m in members if m.isfile()]


def _extract_zip(archive: str, folder: Path, max_bytes: int) -> list[str]:
    """Extract a zip archive: names, types and size checked first, files written fresh (``zipfile`` has no filter)."""
    written = [0]
    names: list[str] = []
    with zipfile.ZipFile(archive) as zipped:
        members = zipped.infolist()
        total = sum(m.file_size for m in members)
        _check_total(total, max_bytes, archive)
        plan = []
        for member in members:
            name = _safe_name(member.filename, archive)
            mode = (member.external_attr >> 16) & 0o170000
            if mode and mode not in (0o100000, 0o040000):  # a symlink or a special file
                raise DataError(
                    f"refusing to extract {archive}: its member {member.filename!r} is a link or a special "
                    "file; a data archive holds only files and folders."
                )
            if name is not None:
                plan.append((member, name))
        progress = Progress(f"extracting {archive}", unit="bytes", total=total, every=PROGRESS_EVERY)
        for member, name in plan:
            target = _inside(folder, name)
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with zipped.open(member) as src:
                _write_member(_chunks(src), target, written, max_bytes, archive)
            progress.update(member.file_size)
            names.append(name)
        progress.done()
    return names


def extract_archive(
    archive: str | os.PathLike, destination: str | os.PathLike, max_bytes: int = MAX_EXTRACTED_BYTES
) -> list[str]:
    """Extract a ``.tar``/``.tar.gz``/``.tgz``/``.tar.bz2``/``.tar.xz`` or ``.zip`` archive into ``destination``.

    Every member is checked first (names, types, total size); then regular files are written and folders created,
    all with the user's umask, with a progress line every few seconds.

    Returns:
        The extracted files' names (normalised, relative to ``destination``).

    Raises:
        DataError: for an unreadable archive, a member with an absolute name or one leaving ``destination``, a link,
            device or other special member, a member name given twice, more than ``max_bytes`` of content, a file
            that already exists (zip), or a Python without tarfile's ``"data"`` filter (tar).
    """
    archive = str(archive)
    folder = Path(destination)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, folder, max_bytes)
        return _extract_tar(archive, folder, max_bytes)
    except FileExistsError as error:
        raise DataError(
            f"refusing to extract {archive}: {error.filename} exists already (a member is repeated, or the target "
            "folder is not empty); nothing is overwritten."
        ) from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, gzip.BadGzipFile, OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(
            f"cannot extract {archive} ({type(error).__name__}: {error}): the archive is truncated or corrupted. "
            "Delete it and download it again."
        ) from None


def extract_zip_members(
    archive: str | os.PathLike, members: dict[str, Path], max_bytes: int = MAX_EXTRACTED_BYTES
) -> None:
    """Extract the named members of a zip archive, each to its own path (written to a temporary name, then renamed).

    Args:
        archive: the zip file.
        members: member name -> destination file.
        max_bytes: cap on the bytes written in all.
    """
    written = [0]
    try:
        with zipfile.ZipFile(archive) as zipped:
            _check_total(sum(zipped.getinfo(name).file_size for name in members), max_bytes, str(archive))
            for name, target in members.items():
                with zipped.open(name) as src, atomic_open(target) as out:  # a fresh temporary file, then renamed
                    _copy_capped(_chunks(src), out, written, max_bytes, str(archive))
    except KeyError as error:
        raise DataError(f"{archive} lacks the member {error}; it is not the official archive.") from None
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise DataError(f"cannot extract {archive} ({type(error).__name__}: {error}); download it again.") from None


def gunzip_file(source: str | os.PathLike, target: str | os.PathLike, max_bytes: int = MAX_EXTRACTED_BYTES) -> None:
    """Un-gzip (or copy, if not ``.gz``) ``source`` to ``target`` through a temporary name, at most ``max_bytes``.

    Raises:
        DataError: the file is truncated or corrupted, or unpacks to more than ``max_bytes``.
    """
    source = str(source)
    try:
        with gzip.open(source) if source.endswith(".gz") else open(source, "rb") as src, atomic_open(target) as out:
            _copy_capped(_chunks(src), out, [0], max_bytes, source)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"cannot read {source}: {error}; the file is truncated or corrupted.") from None


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder this module's callers created (a scratch folder), ignoring errors."""
    shutil.rmtree(path, ignore_errors=True)
