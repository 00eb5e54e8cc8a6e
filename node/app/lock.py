"""One process per data directory: an exclusive advisory lock on `<data dir>/LOCK` (like kubo's repo.lock
and geth's LOCK).

The lock is `flock(2)` on an open file, so the kernel drops it when the process exits, however it exits
(SIGKILL and power loss included): a stale LOCK file never blocks a restart. After locking, the holder
writes its PID into the file, so a second process can say which one holds the directory. The file is
opened close-on-exec, so a child (the p2p daemon) never inherits the lock and cannot keep it alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

LOCK_FILE = "LOCK"


class DataDirLocked(RuntimeError):
    """Another process holds the data directory's lock; `pid` is its PID when it wrote one."""

    def __init__(self, data_dir: Path, pid: int | None, what: str = "daemon") -> None:
        self.data_dir = data_dir
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(
            f"data directory {data_dir} is in use by {holder} (another intellect-node {what}?); "
            f"stop it first, or pass another --data-dir"
        )


class DataDirLock:
    """`DataDirLock.acquire(data_dir)` or `with DataDirLock.acquire(data_dir):`; raises `DataDirLocked`
    at once (never waits) when another process holds it. `release()` is idempotent."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path, what: str = "daemon") -> DataDirLock:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DataDirLocked(data_dir, pid, what) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no PID of a process that no longer holds it
        os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    """The holder's PID; it writes it just after locking, so an empty file is given a moment."""
    for _ in range(10):
        with contextlib.suppress(OSError):
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if text.isdigit():
                return int(text)
        time.sleep(0.05)
    return None
