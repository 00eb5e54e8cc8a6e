"""The child processes a daemon started (p2p daemon, local ranks): their process groups, and the
last-resort kill.

A terminal's Ctrl-C sends SIGINT to its whole foreground process group. A child in that group would stop
on its own, before the daemon has stopped what depends on it (the p2p daemon carries the leaving notice),
and print its own traceback. `ChildProcessLoop` starts every subprocess of the event loop in a process
group of its own (the p2p daemon that hivemind starts through `asyncio.create_subprocess_exec`), and
`run_async` runs a coroutine on such a loop. Local-rank workers (multiprocessing, not the loop) are kept
out of it by `hold_sigint`: the daemon ignores SIGINT as a disposition, which every child inherits (a
Python child keeps an ignored SIGINT ignored), and receives it nonetheless with sigwait while it is
blocked (Linux queues a blocked signal even when its disposition is to ignore it).

An orderly shutdown stops each child through its own service; `ChildRegistry` is for the watchdog and the
second Ctrl-C, when no orderly path is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ChildProcessLoop(asyncio.SelectorEventLoop):
    """An event loop whose subprocesses start in a process group of their own (same session), so that a
    terminal's SIGINT reaches only us and we stop them in order. Callers that choose a session or group
    themselves keep their choice."""

    async def subprocess_exec(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if not kwargs.get("start_new_session"):
            kwargs.setdefault("process_group", 0)
        return await super().subprocess_exec(*args, **kwargs)

    async def subprocess_shell(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if not kwargs.get("start_new_session"):
            kwargs.setdefault("process_group", 0)
        return await super().subprocess_shell(*args, **kwargs)


class SigintRouter:
    """SIGINT for this process alone; see `hold_sigint`. `target(signum)` is called from the router's
    thread for every SIGINT; until someone sets it, a SIGINT exits at once with code 130 (nothing has
    been started yet that needs stopping)."""

    def __init__(self) -> None:
        self.target: Callable[[int], None] = exit_now
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # first: from now on it stays pending
        if sys.platform.startswith("linux"):  # elsewhere an ignored signal is dropped even while blocked
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        threading.Thread(target=self._wait, name="sigint", daemon=True).start()

    def _wait(self) -> None:
        while True:
            signum = signal.sigwait({signal.SIGINT})
            try:
                self.target(signum)
            except RuntimeError:  # the event loop the target calls into has just closed
                exit_now(signum)


_router: SigintRouter | None = None


def hold_sigint() -> SigintRouter:
    """Take SIGINT for this process alone (idempotent). Call it from the main thread before other threads
    and children exist: it is blocked in this thread and so in every thread started later, ignored as a
    disposition so that child processes start with it ignored, and taken by one thread with sigwait."""
    global _router
    if _router is None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("hold_sigint() must be called from the main thread")
        _router = SigintRouter()
    return _router


def exit_now(signum: int = signal.SIGINT, frame: object = None) -> None:
    """Exit at once with code 130, after flushing the logs (a signal when no orderly path is left)."""
    from intellect.node.app.logs import stop_capture

    logging.shutdown()
    stop_capture()
    os._exit(130)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on a `ChildProcessLoop`: for every command that starts a p2p daemon."""
    with asyncio.Runner(loop_factory=ChildProcessLoop) as runner:
        return runner.run(main)


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
