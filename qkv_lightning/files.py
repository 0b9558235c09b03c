"""Files the project writes and checks: one atomic writer and one checksum helper for every module.

:func:`atomic_open` writes into a temporary file beside the destination, flushes it to disk and renames it over the
destination, so that a crash or ``kill -9`` at any moment leaves the old file or the new one, complete, never a mix.
The new file gets the permissions a plain ``open`` would give it (``0666`` less the umask), not ``mkstemp``'s 0600,
so teammates and containers running under another uid can read checkpoints and caches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from qkv_lightning.errors import DataError

CHUNK = 1 << 22
"""Bytes read at a time when hashing."""

JSON_NAMES = {dict: "mapping", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}
"""The JSON names of the Python types ``json.loads`` returns, for errors."""


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (``sha256``, ``md5``, ...), streamed."""
    digest = hashlib.new(algorithm, usedforsecurity=False)  # a checksum, not a security measure
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(
    path: str | os.PathLike, what: str = "the file", instead: str | None = None, expected: type = dict,
    damaged_ok: bool = False,
) -> Any | None:
    """Read back a JSON file this code wrote: its contents, checked to be of the type it wrote (a mapping by
    default), or None when there is no file.

    Args:
        path: the file.
        what: what the file is, for the error (``"the cache metadata"``).
        instead: what the user may do instead of removing the file, for the error (``"point data.cache_dir
            elsewhere"``).
        expected: the type of the JSON value this code writes there.
        damaged_ok: a file that cannot be read or is not JSON reads as None (for a file the code rebuilds when it
            is missing) instead of raising.

    Raises:
        DataError: one paragraph naming the file: a folder or special file stands at ``path`` (left alone); the file
            cannot be read or is not JSON (damaged), unless ``damaged_ok``; or it holds another type of JSON value
            (edited or replaced).
    """
    path = Path(path)
    alternative = f", or {instead}" if instead else ""
    if path.exists() and not path.is_file():
        kind = "folder" if path.is_dir() else "special file"
        raise DataError(
            f"{what} path {path} is a {kind}, not a file; it was not made by this code, so it is left alone. Move it "
            f"away{alternative}."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # unreadable, or damaged: not UTF-8, not JSON
        if damaged_ok:
            return None
        problem = f"cannot be read ({error})" if isinstance(error, OSError) else f"is damaged: not JSON ({error})"
        raise DataError(f"{what} {path} {problem}. Delete it so that it is written again{alternative}.") from error
    if not isinstance(data, expected):
        raise DataError(
            f"{what} {path} holds a JSON {JSON_NAMES.get(type(data), type(data).__name__)}, not the "
            f"{JSON_NAMES.get(expected, expected.__name__)} this code writes: it was edited or replaced. Delete it so "
            f"that it is written again{alternative}."
        )
    return data


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where possible, which, unlike ``os.umask``, changes nothing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike, directory: bool | None = None) -> None:
    """Give ``path`` the mode a plain ``open`` (0666) or ``mkdir`` (0777) would have given it under the umask
    (``mkdtemp`` scratch folders are 0700)."""
    if directory is None:
        directory = os.path.isdir(path)
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_prefix(path: Path) -> str:
    """The default temporary name of a file being written to ``path``: hidden, and unique to this machine and
    process (nodes may share a file system)."""
    return f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "wb", prefix: str | None = None, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed, synced and renamed over
    ``path``; on an exception it is removed and ``path`` is untouched.

    Args:
        path: the destination; its folder is created if missing.
        mode: ``"wb"`` or ``"w"`` (text, with ``encoding``, default UTF-8).
        prefix: the temporary file's name prefix (default :func:`temporary_prefix`); it ends in ``.tmp``.
        encoding: text encoding for ``mode="w"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        text = "b" not in mode
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if text else None) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, "w") as file:
        file.write(text)


def atomic_write_json(path: str | os.PathLike, data: Any, **dumps: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically; ``dumps`` go to :func:`json.dumps` (default ``indent=1``)."""
    atomic_write_text(path, json.dumps(data, **{"indent": 1, **dumps}))
