"""What keeps a study from damaging files it did not make and from running twice at once.

* A marker file (:data:`MARKER`), written when the study folder is created, names the task; a non-empty folder without
  it (or of another task), or a regular file, is refused before anything is written.
* A lock file (:data:`LOCK`) holds the pid, host and start time of the study process; a second study on the same
  folder is refused while that process lives, and a lock left by a killed process (``kill -9``) is taken over.
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
"""Held (created exclusively) by the study process running in the folder."""

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


@contextlib.contextmanager
def study_lock(study_dir: Path) -> Iterator[None]:
    """Hold the study folder's lock file while the study runs; a lock of a process that is gone is taken over.

    Raises:
        ConfigError: another live study process holds the lock (or one on another host may).
    """
    path = study_dir / LOCK
    if path.is_dir() or (path.exists() and not path.is_file()):  # not a lock this tool wrote: never removed
        raise ConfigError(
            f"{path}, the lock file of study.output={study_dir}, is a {'folder' if path.is_dir() else 'special file'}, "
            "not a file this tool wrote; nothing was run. Move it away, or name another study.output."
        )
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            owner = _read_json(path)
            if owner is None:  # being written this instant, or damaged: look again
                time.sleep(0.2)
                owner = _read_json(path)
            alive = is_alive(owner) if owner else False
            if alive is False:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # left by a killed study process
                continue
            where = "" if alive else f" on host {owner.get('host')} (its liveness cannot be checked from here)"
            raise ConfigError(
                f"study.output={study_dir} is in use by another study process (pid {owner.get('pid')}{where}); two "
                "studies on one folder would train every cell twice. Wait for it to finish or stop it, or name another "
                f"study.output. If you are sure that process is gone, delete {path}."
            ) from None
        with os.fdopen(fd, "w") as file:
            json.dump(identity(), file)
        break
    else:
        raise ConfigError(f"could not take the lock {path} of study.output={study_dir}; try again.")
    try:
        yield
    finally:
        owner = _read_json(path)
        if owner is not None and owner.get("pid") == os.getpid():
            path.unlink(missing_ok=True)


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
