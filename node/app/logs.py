"""Logging for the daemon: one setup call, text or JSON lines, and an event-loop lag canary.

`setup_logging` is called once by the command that starts a long-lived process (never at import time).
Text logs go to stderr (through rich when stderr is a terminal); `--log-format json` writes one JSON object
per line with `ts`, `level`, `logger`, `msg` and any `extra={...}` fields, so a log shipper can parse it.
hivemind's loggers (which carry the p2p daemon's own Go log lines) and Python warnings go through the same
handler. `StdioCapture` makes the rest JSON too: what child processes (local ranks) and C++ libraries write
straight to file descriptors 1 and 2.

`LoopLagCanary` is a small service (STYLE 14): it sleeps a fixed interval and measures how late it wakes
up. The lag it sees is what every other coroutine on the loop sees too (a CPU-bound call that forgot its
worker thread, a blocking read); it is exported in status and metrics and warned about when large.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import sys
import threading
import time
from typing import Any

logger = logging.getLogger("intellect.node.app.logs")

#: Attributes every LogRecord has; anything else on a record came from `extra=` and is emitted in JSON.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (unix seconds), level, logger, msg, extra fields, exc (if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def setup_logging(log_format: str = "text", level: str = "INFO", *, rich_console: bool | None = None) -> None:
    """Configure the root logger once for this process (replacing any handlers set before).

    `rich_console=None` uses rich only when stderr is a terminal and the format is text. hivemind's own
    loggers are quietened to WARNING because their INFO lines are per-message noise at our level.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    use_rich = log_format == "text" and (sys.stderr.isatty() if rich_console is None else rich_console)
    if use_rich:
        from rich.console import Console
        from rich.logging import RichHandler

        # On stderr like every log line: stdout carries a command's result (`runs --json | jq`).
        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # hivemind gives its loggers a text handler of their own that does not propagate (the p2p daemon's Go
    # log lines arrive through them): hand them to ours, so one format holds for everything.
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    logging.captureWarnings(True)
    for noisy in ("hivemind", "asyncio", "aiohttp.access", "libp2p", "multiaddr"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class StdioCapture:
    """JSON logs from everything this process and its children write to file descriptors 1 and 2.

    `start()` points fds 1 and 2 at pipes (children inherit them: local-rank workers, and C++ libraries
    write there directly) and starts a thread that copies each complete line to the real stderr: a line
    that is a JSON object as it is (our own handler's), anything else as a JSON record of logger `stdout`
    or `stderr`. `stop()` puts the real fds back and forwards what is still in the pipes; call it (or
    `stop_capture()`) before `os._exit`, or the last lines are lost.
    """

    def __init__(self) -> None:
        self._saved: dict[int, int] = {}
        self._pipes: dict[int, int] = {}  # read end -> the fd it stands in for
        self._partial: dict[int, bytes] = {}
        self._out = -1
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._out = os.dup(2)
        os.set_inheritable(self._out, False)
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
            os.set_inheritable(self._saved[fd], False)
            r, w = os.pipe()
            os.dup2(w, fd)  # the duplicate on 1 or 2 is inheritable; the originals are not
            os.close(w)
            self._pipes[r] = fd
            self._partial[r] = b""
        self._thread = threading.Thread(target=self._pump, name="stdio-capture", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # our own writes go straight out again; children may still hold the pipes
        self._stopping.set()
        self._thread.join(timeout_s)
        self._thread = None

    def _pump(self) -> None:
        while self._pipes:
            ready, _, _ = select.select(list(self._pipes), [], [], 0.05)
            if not ready and self._stopping.is_set():
                break  # drained: nothing arrived for 50 ms after stop()
            for r in ready:
                chunk = os.read(r, 65536)
                if not chunk:  # every writer is gone
                    self._emit(r, self._partial.pop(r, b""))
                    del self._pipes[r]
                    continue
                lines = (self._partial[r] + chunk).split(b"\n")
                self._partial[r] = lines.pop()
                for line in lines:
                    self._emit(r, line)
        for r in list(self._pipes):
            self._emit(r, self._partial.get(r, b""))

    def _emit(self, r: int, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        if not line.strip():
            return
        if not (line.startswith("{") and _is_json_object(line)):
            stream = "stdout" if self._pipes.get(r) == 1 else "stderr"
            record = logging.LogRecord(stream, logging.INFO, "", 0, line, None, None)
            line = JsonFormatter().format(record)
        with contextlib.suppress(OSError):
            os.write(self._out, (line + "\n").encode())


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


_capture: StdioCapture | None = None


def capture_stdio() -> None:
    """Start the process-wide `StdioCapture` (JSON logs only; idempotent)."""
    global _capture
    if _capture is None:
        _capture = StdioCapture()
        _capture.start()


def stop_capture() -> None:
    """Forward what is left and restore fds 1 and 2 (before `os._exit`); a no-op without a capture."""
    global _capture
    if _capture is not None:
        _capture.stop()
        _capture = None


class LoopLagCanary:
    """Measures how late the event loop wakes a sleeping coroutine; warns when it exceeds a threshold.

    `lag_s` is the last measurement and `max_lag_s` the worst since start; `ready` is set after the first
    measurement so a parent can await it like any child service.
    """

    def __init__(self, interval_s: float = 0.25, warn_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.warn_s = warn_s
        self.lag_s = 0.0
        self.max_lag_s = 0.0
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(self.interval_s)
            self.lag_s = max(0.0, time.monotonic() - start - self.interval_s)
            self.max_lag_s = max(self.max_lag_s, self.lag_s)
            self.ready.set()
            if self.lag_s > self.warn_s:
                logger.warning("event loop stalled for %.3f s (something blocked the loop)", self.lag_s)
