"""Files we write get the permissions of the user's umask, as ``open`` would give them.

``tempfile.mkstemp`` and ``mkdtemp`` (used for atomic writes and scratch folders) create mode 0600 / 0700, which
teammates and containers running under another uid cannot read once the file is renamed into place.
"""

from __future__ import annotations

import os


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
    """Give ``path`` the mode a plain ``open`` (0666) or ``mkdir`` (0777) would have given it under the umask."""
    if directory is None:
        directory = os.path.isdir(path)
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
