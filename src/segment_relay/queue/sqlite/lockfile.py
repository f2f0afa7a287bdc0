"""The daemon's lock beside its queue database: one process per queue."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ...errors import StoreError


class LockFile:
    """An exclusive lock beside the database, so a second daemon refuses to share it."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(
                f"cannot write to the queue's directory {self.path.parent} ({exc.strerror}): "
                "it is read-only or not this user's; the queue needs it writable"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"the queue {self.path.with_suffix('')} is in use by another segment-relay process"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
