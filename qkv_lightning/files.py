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

CHUNK = 1 << 22
"""Bytes read at a time when hashing."""


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (``sha256``, ``md5``, ...), streamed."""
    digest = hashlib.new(algorithm, usedforsecurity=False)  # a checksum, not a security measure
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        os.fchmod(fd, 0o666 & ~_umask())
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
