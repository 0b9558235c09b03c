"""What keeps a study from damaging files it did not make and from running twice at once.

* A marker file (:data:`MARKER`), written when the study folder is created, names the task; a non-empty folder without
  it (or of another task), or a regular file, is refused before anything is written.
* A kernel lock on :data:`LOCK` (``filelock``: ``flock``) is held by the study process while it runs, and
  :data:`LOCK_OWNER` names it (pid, host, start time); a second study on the same folder is refused, naming that
  process, and the kernel releases the lock when the process ends, ``kill -9`` included, so the next study runs.
  On a shared file system the lock keeps hosts apart where it shares locks (NFS, Lustre and most cluster file
  systems do); where it does not, another host's record that is still refreshed is refused too (:func:`study_lock`).
  Nothing of another process's lock is ever deleted.
* Every cell folder gets an owner file (:data:`OWNER`) while a process runs it; a study refuses to start while an
  earlier process still runs one of its cells (a survivor), so two processes never share a cell folder.
* Worker processes die with the study process (:func:`die_with_parent`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from qkv_lightning.errors import ConfigError

MARKER = ".qkv-study.json"
"""Written into a study folder when it is created: its task. Only a folder with it is ever written into."""

LOCK = ".qkv-study.lock"
"""The study folder's lock file: a kernel lock (``filelock``) on it is held by the study process running there. The
file stays in place (deleting a lock file races with a process that opened it); it is free once that process ends."""

LOCK_OWNER = ".qkv-study.lock.json"
"""Who holds :data:`LOCK`: pid, host and start time, written when the lock is taken, refreshed (its modification time)
every :data:`HEARTBEAT_S` seconds, removed when the lock is given back."""

HEARTBEAT_S = 30.0
"""Seconds between two refreshes of :data:`LOCK_OWNER` while a study runs."""

STALE_S = 300.0
"""A :data:`LOCK_OWNER` of another host not refreshed for this long belongs to a study that is gone (clocks of two
hosts may differ by a minute or two; refreshes come every :data:`HEARTBEAT_S` seconds)."""

OWNER = ".owner.json"
"""Written into a cell folder by the process running the cell; removed when the cell is done."""

PARENT_ENV = "QKV_STUDY_PARENT"
"""Environment variable through which a worker learns its study process's pid."""


# ------------------------------------------------------------------------------------------------- processes
def process_start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from ``/proc``), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def identity() -> dict:
    """This process: pid, host and start time (which tells a reused pid from the original process)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start_time(os.getpid())}


def is_alive(owner: dict) -> bool | None:
    """Whether the process ``owner`` (from :func:`identity`) still runs: None when it ran on another host."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    start = process_start_time(pid)
    if start is not None and owner.get("start") is not None and start != owner["start"]:
        return False  # the pid was reused by another process
    if start is not None and _is_zombie(pid):
        return False
    return True


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def die_with_parent() -> None:
    """Make this (worker) process die when the study process that started it dies, even by ``kill -9``.

    On Linux the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``); elsewhere a thread polls
    the parent pid. Either way, a parent already gone when this runs ends the process at once.
    """
    expected = int(os.environ.get(PARENT_ENV, "0") or 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if expected and os.getppid() != expected:
        os._exit(1)

    def watch() -> None:
        parent = expected or os.getppid()
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


# ------------------------------------------------------------------------------------------------ the folder
def check_output(study_dir: Path, task: str | list[str]) -> None:
    """Refuse a study folder that is a file, is not writable, or is a non-empty folder that is not a study of
    ``task``; writes nothing.

    Raises:
        ConfigError: naming the folder and ``study.output``.
    """
    from qkv_lightning.guards import check_writable_folder

    if study_dir.exists() and not study_dir.is_dir():
        raise ConfigError(
            f"study.output={study_dir} is a file, not a folder; name a new folder (or a study folder) to write into."
        )
    check_writable_folder(study_dir, "study.output")
    if not study_dir.is_dir() or not any(study_dir.iterdir()):
        return
    marker = _read_json(study_dir / MARKER)
    if marker is None:
        raise ConfigError(
            f"study.output={study_dir} is a folder that holds files but is not a study folder (it has no {MARKER}); "
            "a study writes runs/, results.csv, summary.md and study.yaml there and would replace files of those "
            "names, so name a new or empty folder (or an earlier study's folder)."
        )
    if marker.get("task") != task_identity(task):
        raise ConfigError(
            f"study.output={study_dir} holds a study of another task ({marker.get('task')}, this one is "
            f"{task_identity(task)}); name another folder for this study."
        )


def task_identity(task: str | list[str]) -> str:
    """The task as the marker records it: the config file's absolute path (several joined by ``" + "``)."""
    paths = [task] if isinstance(task, str) else list(task)
    return " + ".join(str(Path(path).expanduser().resolve()) for path in paths)


def write_marker(study_dir: Path, task: str | list[str]) -> None:
    """Mark ``study_dir`` (just created, or a study folder already) as a study of ``task``."""
    path = study_dir / MARKER
    if not path.exists():
        path.write_text(json.dumps({"task": task_identity(task), "created_by": identity()}, indent=1))


def _in_use(study_dir: Path, owner: dict | None, why: str = "") -> ConfigError:
    """The refusal of a second study on ``study_dir``, naming the process that holds its lock."""
    if owner:
        who = f"pid {owner.get('pid')} on host {owner.get('host')}"
        who += "" if owner.get("host") != socket.gethostname() else " (this host)"
    else:
        who = f"a process that has not written {LOCK_OWNER} yet"
    return ConfigError(
        f"study.output={study_dir} is in use by another study process ({who}){why}; two studies on one folder "
        "would train every cell twice. Wait for it to finish or stop it, or name another study.output. Its lock is "
        "released when that process ends, however it ends; nothing of it was changed."
    )


def _refresh(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


@contextlib.contextmanager
def study_lock(study_dir: Path) -> Iterator[None]:
    """Hold the study folder's lock (:data:`LOCK`, a kernel lock through ``filelock``) while the study runs.

    The lock is taken without waiting. Held by another process (on this host, or on another one through a shared
    file system that shares locks), the study is refused, naming the holder from :data:`LOCK_OWNER`. A free lock
    whose :data:`LOCK_OWNER` names a process of another host that refreshed it within :data:`STALE_S` seconds is
    refused too: that study runs, on a file system that does not share locks between hosts. A record of a process
    that is gone (this host's, or a stale one) is replaced.

    Raises:
        ConfigError: the lock is held, naming the process and host; nothing is deleted or changed.
    """
    from filelock import FileLock, Timeout

    from qkv_lightning.files import atomic_write_json

    owner_path, path = study_dir / LOCK_OWNER, study_dir / LOCK
    for what in (path, owner_path):
        if what.is_dir() or (what.exists() and not what.is_file()):  # not a file this tool wrote: never touched
            raise ConfigError(
                f"{what}, the lock of study.output={study_dir}, is a {'folder' if what.is_dir() else 'special file'}, "
                "not a file this tool wrote; nothing was run. Move it away, or name another study.output."
            )
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise _in_use(study_dir, _read_json(owner_path)) from None
    stop = threading.Event()
    try:
        owner = _read_json(owner_path)
        if owner and owner.get("host") != socket.gethostname():
            with contextlib.suppress(OSError):
                age = time.time() - owner_path.stat().st_mtime
                if age < STALE_S:
                    raise _in_use(
                        study_dir, owner, f", refreshed {age:.0f} s ago although its lock is free: the file system "
                        f"does not share locks between hosts. If that study is gone, wait {STALE_S:.0f} s"
                    )
        atomic_write_json(owner_path, identity())
        threading.Thread(target=_refresh, args=(owner_path, stop), daemon=True, name="study-lock-refresh").start()
        yield
    finally:
        stop.set()
        owner = _read_json(owner_path)
        if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            owner_path.unlink(missing_ok=True)
        lock.release()


def check_no_survivors(cell_dirs: list[Path]) -> None:
    """Refuse to run while a process of an earlier study still runs one of these cells (its owner file names it).

    Raises:
        ConfigError: naming the cell folder and the process.
    """
    for directory in cell_dirs:
        owner = _read_json(directory / OWNER)
        if owner and owner.get("pid") != os.getpid() and is_alive(owner) is not False:
            raise ConfigError(
                f"the study cell {directory} is still being run by process {owner.get('pid')} on "
                f"{owner.get('host')} (left over from an earlier study run); stop that process or wait for it, then "
                "run the study again. Nothing was run."
            )


def claim_cell(directory: Path) -> None:
    """Record this process as the one running the cell in ``directory``."""
    (directory / OWNER).write_text(json.dumps(identity()))


def release_cell(directory: Path) -> None:
    (directory / OWNER).unlink(missing_ok=True)
