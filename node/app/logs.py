"""Logging for the daemon: one setup call, text or JSON lines, and an event-loop lag canary.

`setup_logging` is called once by the command that starts a long-lived process (never at import time).
Text logs go to stderr (through rich when stderr is a terminal); `--log-format json` writes one JSON object
per line with `ts`, `level`, `logger`, `msg` and any `extra={...}` fields, so a log shipper can parse it.

`LoopLagCanary` is a small service (STYLE 14): it sleeps a fixed interval and measures how late it wakes
up. The lag it sees is what every other coroutine on the loop sees too (a CPU-bound call that forgot its
worker thread, a blocking read); it is exported in status and metrics and warned about when large.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
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
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("hivemind", "asyncio", "aiohttp.access", "libp2p", "multiaddr"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


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
