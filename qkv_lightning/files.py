"""Files the project writes, replaces and deletes: the one place that decides how an output is written and what the
tool may replace or delete.

Writing. :func:`atomic_open` writes into a temporary file beside the destination, flushes it to disk and renames it over
the destination (or, with ``replace=False``, links it to a name that must still be free), so that a crash or
``kill -9`` at any moment leaves the old file or the new one, complete, never a mix. The new file gets the
permissions a plain ``open`` would give it (``0666`` less the umask), not ``mkstemp``'s 0600, so teammates and
containers running under another uid can read checkpoints and caches. Several files that belong together are
written into a scratch folder (:func:`staged_folder`) and moved into place when all are complete; a folder is
replaced by another with :func:`swap_in` (two renames; :func:`recover_swap` repairs a crash between them).

Reading back. :func:`read_json` reads a JSON file this code wrote, checked to hold the type it wrote.

Temporaries. Every temporary file or folder is named ``.<name>.tmp-<host>-<pid>-<random>.tmp`` beside (or, for a
folder being filled, inside) its destination (:func:`temporary_prefix`). One whose process is gone from this host was
left by a killed run, and :func:`remove_stale_temporaries` deletes it: the name proves who made it.

Ownership: what the tool may replace or delete. The rule has three parts, each a proof that the tool made the thing:

* a folder the tool created holds the marker file :data:`OWNED_MARKER` (written by :func:`make_owned_dir` right after
  the folder is made; a user's folder never holds it);
* a text file the tool wrote (a saved ``config.yaml``) starts with a seal line (:func:`sealed`) that carries the SHA-256
  of the rest of the file: a user's file has none, and a saved file the user edited no longer matches its seal, so it
  is the user's from then on (:func:`is_sealed`);
* given a ``root`` that is itself an owned folder, anything inside it reached without following a link.

A link is never followed out of a folder: :func:`remove_owned` refuses a link, a path that leaves ``root`` or passes
through a link below it, and anything not proven by the rule; it raises :class:`NotOwnedError`, a one-paragraph
:class:`~qkv_lightning.errors.ConfigError` that names the path and says what to remove or move by hand.

Where output goes and whether it may replace a file come only from the user's config and command line: a checkpoint's
stored output settings are dropped by :func:`qkv_lightning.tasks.persist.stored_settings`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from qkv_lightning.errors import ConfigError, DataError

CHUNK = 1 << 22
"""Bytes read at a time when hashing."""

JSON_NAMES = {dict: "mapping", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}
"""The JSON names of the Python types ``json.loads`` returns, for errors."""

OWNED_MARKER = ".qkv-lightning-made"
"""Written into every folder the tool creates with :func:`make_owned_dir`: the proof that the folder is the tool's."""

SEAL = "# qkv-lightning sha256 "
"""How the first line of a text file the tool wrote begins (:func:`sealed`); the SHA-256 of the rest follows."""

MAX_SEALED_BYTES = 1 << 26
"""Larger files are never taken for sealed ones (a seal is for configs and notes, not data)."""


class NotOwnedError(ConfigError):
    """The tool would replace or delete a path it cannot prove it made (see the module's ownership rule), or a name
    it writes to is taken; the message names the path and what to move or remove."""


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


def _place(tmp: str | os.PathLike, path: str | os.PathLike, replace: bool) -> None:
    """Give the complete file ``tmp`` the name ``path``: renamed over it, or (``replace=False``) hard-linked to a name
    that must be free (the kernel refuses a taken one) and then unlinked; where the file system has no hard links, a
    rename after a check.

    Raises:
        FileExistsError: ``replace`` is False and ``path`` exists.
    """
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network and FUSE file systems)
        if os.path.lexists(path):
            raise FileExistsError(17, "File exists", str(path)) from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def _taken(path: Path) -> NotOwnedError:
    return NotOwnedError(
        f"{path} appeared while qkv-lightning was writing it and is left as it is (nothing is replaced); move it "
        "away or write elsewhere, then run again."
    )


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike,
    mode: str = "wb",
    prefix: str | None = None,
    encoding: str | None = None,
    replace: bool = True,
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed, synced and renamed over
    ``path``; on an exception it is removed and ``path`` is untouched.

    Args:
        path: the destination; its folder is created if missing.
        mode: ``"wb"`` or ``"w"`` (text, with ``encoding``, default UTF-8).
        prefix: the temporary file's name prefix (default :func:`temporary_prefix`); it ends in ``.tmp``.
        encoding: text encoding for ``mode="w"``.
        replace: replace an existing ``path``; False puts the file in place only under a free name.

    Raises:
        NotOwnedError: ``replace`` is False and ``path`` exists when the file is complete.
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
        try:
            _place(tmp, path, replace)
        except FileExistsError:
            raise _taken(path) from None
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str, replace: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, "w", replace=replace) as file:
        file.write(text)


def atomic_write_json(path: str | os.PathLike, data: Any, **dumps: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically; ``dumps`` go to :func:`json.dumps` (default ``indent=1``)."""
    atomic_write_text(path, json.dumps(data, **{"indent": 1, **dumps}))


# ----------------------------------------------------------------------------------------------------- temporaries
_STALE = r"\.(?P<name>.+)\.tmp-{host}-(?P<pid>\d+)-[^/]*\.tmp"


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this host (a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files and folders (named by :func:`temporary_prefix`) that processes of this host left in
    ``folder`` when they were killed: their process no longer exists. ``name``: only those of that destination.
    Returns what was deleted."""
    pattern = re.compile(_STALE.format(host=re.escape(socket.gethostname())))
    removed = []
    try:
        found = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in found:
        match = pattern.fullmatch(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _process_gone(pid):
            continue
        path = Path(entry.path)
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------------- ownership
def sealed(text: str) -> str:
    """``text`` under a seal line that carries the SHA-256 of ``text`` (see :func:`is_sealed`)."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return f"{SEAL}{digest}: written by qkv-lightning, which replaces this file only while this line matches\n{text}"


def is_sealed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file (not a link) that the tool wrote and nobody edited since: its first line is
    a seal (:func:`sealed`) whose SHA-256 is that of the rest of the file."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SEALED_BYTES:
            return False
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return False
    first, newline, rest = data.partition(b"\n")
    seal = SEAL.encode()
    if not newline or not first.startswith(seal):
        return False
    return first[len(seal) : len(seal) + 64] == hashlib.sha256(rest).hexdigest().encode()


def is_owned_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder (not a link) that holds the tool's :data:`OWNED_MARKER` (a regular file)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode) and stat.S_ISREG(os.lstat(Path(path, OWNED_MARKER)).st_mode)
    except OSError:
        return False


def make_owned_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and missing parents) and mark it as the tool's (:data:`OWNED_MARKER`).

    Raises:
        FileExistsError: ``path`` exists already (a folder found is not made by this call, so it is not marked).
    """
    path = Path(path)
    path.mkdir(parents=True)
    atomic_write_json(path / OWNED_MARKER, {"made_by": "qkv-lightning", "path": str(path.absolute())})
    return path


def escapes(path: str | os.PathLike, root: str | os.PathLike) -> str | None:
    """Why ``path`` does not lie inside ``root`` without a link on the way (None: it does): ``..`` is resolved as
    written, every folder between ``root`` and ``path`` must be a real folder, and the real paths must agree. A path
    from a file the tool reads (a checkpoint's callback state) is checked with this before anything is deleted."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    if root not in path.parents:
        return f"lies outside {root}"
    for folder in path.parents:
        if folder == root:
            break
        if folder.is_symlink():
            return f"is reached through the link {folder}"
    real_root = os.path.realpath(root)
    if not os.path.realpath(path).startswith(real_root.rstrip(os.sep) + os.sep):
        return f"lies outside {root}"
    return None


def not_owned_reason(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str | None:
    """Why the tool may not replace or delete ``path`` (None: it may), by the module's ownership rule."""
    path = Path(os.path.abspath(path))
    if path.is_symlink():
        return "is a link (the tool never follows a link out of its own folders)"
    if root is not None:
        root = Path(os.path.abspath(root))
        outside = escapes(path, root)
        if outside is not None:
            return outside
        if is_owned_dir(root):
            return None
    if path.is_dir():
        return None if is_owned_dir(path) else f"is a folder qkv-lightning did not make (it holds no {OWNED_MARKER})"
    if path.is_file():
        if is_sealed(path):
            return None
        return ("is a file qkv-lightning did not write (or one it wrote that was edited since: its first line no "
                "longer matches the rest)")
    return "is not a regular file or folder"


def check_replaceable(path: str | os.PathLike, advice: str = "") -> None:
    """That the tool may write the file ``path``: free, or a sealed file it wrote (:func:`is_sealed`).

    Args:
        path: the file about to be written.
        advice: what else the user can do (a setting to change), a sentence without its full stop.

    Raises:
        NotOwnedError: naming ``path`` and what to do.
    """
    path = Path(path)
    if not os.path.lexists(path) or is_sealed(path):
        return
    reason = "is a folder" if path.is_dir() and not path.is_symlink() else not_owned_reason(path)
    raise NotOwnedError(
        f"{path} {reason}, so it is not replaced (qkv-lightning replaces only files it wrote). Move it away"
        f"{', or ' + advice if advice else ''}; then run again. Nothing was run."
    )


def write_sealed_text(path: str | os.PathLike, text: str, advice: str = "") -> None:
    """Write ``text`` atomically to ``path`` under a seal (:func:`sealed`), after :func:`check_replaceable`."""
    check_replaceable(path, advice)
    atomic_write_text(path, sealed(text))


def remove_owned(path: str | os.PathLike, root: str | os.PathLike | None = None, advice: str = "",
                 role: str = "") -> bool:
    """Delete the file or folder ``path`` if the tool can prove it made it (the module's ownership rule): never a
    link, never anything outside ``root`` or reached through a link below it. Returns whether anything was deleted.

    Args:
        path: what to delete (missing: nothing to do).
        root: a folder that must contain ``path``; when it is an owned folder, everything inside it is the tool's.
        advice: what else the user can do, a sentence without its full stop.
        role: what ``path`` is to the caller, put before it in the message (``"the study cell folder"``).

    Raises:
        NotOwnedError: naming ``path``, why it is not the tool's, and that it must be moved or removed by hand.
    """
    if not os.path.lexists(path):
        return False
    reason = not_owned_reason(path, root)
    if reason is not None:
        raise NotOwnedError(
            f"{role + ' ' if role else ''}{path} {reason}, so qkv-lightning does not delete it (it deletes only what "
            f"it can prove it made). If it is not needed, remove it yourself; else move it away"
            f"{', or ' + advice if advice else ''}. Then run again. Nothing was deleted."
        )
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    return True


# ------------------------------------------------------------------------------------------------ folders in place
def swap_in(staged: str | os.PathLike, target: str | os.PathLike, retired: str | os.PathLike | None = None,
            replace: bool = True) -> None:
    """Put the complete file or folder ``staged`` at ``target`` by renames (same file system): an existing ``target``
    is first renamed to ``retired``, then ``staged`` to ``target``, then the retired one is deleted. A crash between
    the renames leaves ``target`` missing and both others complete: :func:`recover_swap` puts one back.

    The caller vouches that ``target`` is its own to replace (its marker, or a name only it writes).

    Args:
        staged: the new file or folder, complete and synced.
        target: where it goes.
        retired: where the old ``target`` waits (must be free); default a temporary beside ``target``.
        replace: False: ``target`` must not exist.

    Raises:
        NotOwnedError: ``target`` exists and ``replace`` is False.
        FileExistsError: ``retired`` is taken.
    """
    staged, target = Path(staged), Path(target)
    old = None
    if os.path.lexists(target):
        if not replace:
            raise _taken(target)
        if retired is None:
            old = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), suffix=".tmp", dir=target.parent))
            retired = old / "old"
        elif os.path.lexists(retired):
            raise FileExistsError(17, "File exists", str(retired))
        else:
            old = Path(retired)
        os.replace(target, retired)
        os.replace(staged, target)
    elif staged.is_file() and not staged.is_symlink():
        try:
            _place(staged, target, replace=False)
        except FileExistsError:
            raise _taken(target) from None
    else:
        os.replace(staged, target)
    fsync_dir(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)


def recover_swap(target: str | os.PathLike, candidates: Sequence[str | os.PathLike],
                 complete: Callable[[Path], bool]) -> bool:
    """Finish or undo a :func:`swap_in` that a crash interrupted between its renames: if ``target`` is missing, the
    first of ``candidates`` (the staged one, then the retired one) that is ``complete`` is put back in its place.
    Returns whether anything was moved (False also when another process repaired it first)."""
    target = Path(target)
    if os.path.lexists(target):
        return False
    for candidate in map(Path, candidates):
        if complete(candidate):
            try:
                os.replace(candidate, target)
            except FileNotFoundError:
                return False
            return True
    return False


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, last: Sequence[str] = ()) -> Iterator[Path]:
    """A scratch folder to write several files into, put in place only when the block ends without an exception:
    renamed into place whole if ``target`` does not exist (so ``target`` appears complete or not at all), else its
    files moved into ``target`` one by one under free names (``last``: after the others, e.g. a manifest). On an
    exception or ``kill -9`` nothing lies under a final name; the scratch folder a killed process left is deleted by
    the next call (:func:`remove_stale_temporaries`).

    Raises:
        NotOwnedError: ``target`` is a file, or one of the names in it is taken (nothing is replaced; checked before
            any file is moved).
    """
    target = Path(target)
    if os.path.lexists(target) and not target.is_dir():
        raise NotOwnedError(f"{target} is a file, not a folder; name a folder to write into (nothing is replaced).")
    into = target.is_dir()
    home = target if into else target.parent
    home.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(home, target.name)
    scratch = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), suffix=".tmp", dir=home))
    try:
        follow_umask(scratch, directory=True)
        yield scratch
        order = {name: i for i, name in enumerate(last)}
        names = sorted(os.listdir(scratch), key=lambda name: (order.get(name, -1), name))
        for name in names:
            if (scratch / name).is_file():
                _fsync_file(scratch / name)
        fsync_dir(scratch)
        if not into:
            swap_in(scratch, target, replace=False)
            return
        taken = [str(target / name) for name in names if os.path.lexists(target / name)]
        if taken:
            raise NotOwnedError(
                f"{target} already holds {', '.join(taken)}; nothing is replaced. Remove or move them, or write to "
                "another folder, then run again."
            )
        for name in names:
            swap_in(scratch / name, target / name, replace=False)
    finally:
        if os.path.lexists(scratch):
            shutil.rmtree(scratch, ignore_errors=True)

