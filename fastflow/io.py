"""Atomic file writes: a temp file in the same folder, fsynced, renamed over the final name.

A crash or an exception mid-write leaves the previous file intact and no partial file behind;
concurrent writers of one path each use their own temp file (the last rename wins whole).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["atomic_write", "fsync_dir"]


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(directory: Union[str, Path]) -> None:
    """Make a rename in ``directory`` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> Path:
    """``write(handle)`` into a temp file next to ``path``, fsync, rename over ``path``, fsync the
    folder. The file gets the permissions a plain ``open`` would give (0666 minus the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), _default_mode())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
