"""The child processes a daemon started (p2p daemon, local ranks), for the last-resort kill.

An orderly shutdown stops each child through its own service; this registry is for the watchdog and the
second Ctrl-C, when no orderly path is left.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable, Sequence


class ChildRegistry:
    """Where to find the PIDs of the child processes we started (p2pd, local ranks) for the last-resort
    kill. A child may be restarted, so we keep getters rather than PIDs, and remember the last PID each
    getter gave: a service that is shutting down forgets its child's handle before the child has exited,
    which is exactly when a second Ctrl-C arrives."""

    def __init__(self) -> None:
        self._getters: list[Callable[[], int | None]] = []
        self._last: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, getter: Callable[[], int | None]) -> None:
        with self._lock:
            self._getters.append(getter)

    def add_pids(self, pids: Sequence[int]) -> None:
        """Register children whose PIDs are fixed (local-rank workers)."""
        for pid in pids:
            self.add(functools.partial(int, pid))

    def pids(self) -> list[int]:
        with self._lock:
            getters = list(enumerate(self._getters))
        out = []
        for i, get in getters:
            pid = None
            with contextlib.suppress(Exception):  # a getter on a half-torn-down service may raise anything
                pid = get()
            if pid:
                self._last[i] = pid
            pid = pid or self._last.get(i)
            if pid:
                out.append(pid)
        return out

    def kill_all(self) -> None:
        """SIGKILL every registered child, and every other direct child of ours (a p2p daemon that was
        still starting when we were told to die has no registered handle yet). A remembered PID is killed
        only while it is still our child, so a recycled PID is never hit."""
        me = os.getpid()
        for pid in {*self.pids(), *_direct_children(me)}:
            if _parent_of(pid) == me:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _direct_children(pid: int) -> list[int]:
    """Our live children, from /proc (Linux; elsewhere only the registered PIDs are killed)."""
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    return [int(e) for e in entries if _parent_of(int(e)) == pid]
