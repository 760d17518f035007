"""Files the worker keeps in its state folder: written whole, fsynced and renamed (or linked)
into place, so a crash leaves the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def create_once(path: Path, data: bytes) -> bytes:
    """Write `data` to `path` (0600) unless it exists, then return what `path` holds.

    Written whole to a temporary file, then hard-linked: link fails if `path` exists (like
    O_EXCL), so concurrent starts agree on one file and no reader sees half of one."""
    if not path.exists():
        temp = _write_temp(path, data, mode=0o600)
        try:
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)
        finally:
            os.unlink(temp)
        sync_folder(path.parent)
    return path.read_bytes()


def write_replace(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically: temporary file, fsync, rename, fsync the folder."""
    os.replace(_write_temp(path, data, mode=mode), path)
    sync_folder(path.parent)


def _write_temp(path: Path, data: bytes, *, mode: int) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # O_EXCL, 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


def sync_folder(folder: Path) -> None:
    """The rename or link itself survives a power cut only once the folder is synced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
