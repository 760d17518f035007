"""The client's files in AGENTKEYS_HOME: a folder only this user can read, files 0600, every
write atomic (temp file, fsync, rename), and a lock file per thing minted. Standard library only:
the warm `credentials` path imports nothing heavier."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SESSION = "session.json"


class Home:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    def ensure(self) -> Path:
        # The identity session and AWS keys live here: nobody else may list or read them.
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        return self.path

    def read(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None  # missing, or unreadable: the same as absent
        return data if isinstance(data, dict) else None

    def write(self, name: str, data: dict[str, Any]) -> Path:
        """Replace `name` with `data` as JSON, atomically and 0600."""
        target = self.ensure() / name
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(target, json.dumps(data).encode())
        return target

    def remove(self, name: str) -> bool:
        try:
            (self.path / name).unlink()
        except FileNotFoundError:
            return False
        return True

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock across processes (flock), released however the holder ends."""
        path = self.ensure() / f"{name}.lock"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def credentials_name(
    broker_url: str, role_arn: str, duration: int, sts_endpoint_url: str | None = None
) -> str:
    """The cache file of one role's credentials from one broker and STS (role ARNs are not file
    names; another STS, such as a restarted stand-in, does not know the old credentials)."""
    scope = f"{broker_url}\n{role_arn}\n{duration}\n{sts_endpoint_url or ''}"
    key = hashlib.sha256(scope.encode()).hexdigest()[:24]
    return f"credentials/{key}.json"


def write_atomic(target: Path, data: bytes) -> None:
    """Replace `target` with `data`, 0600: a crash leaves the old file or the new one, never
    half, and a reader never sees a partial write."""
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
