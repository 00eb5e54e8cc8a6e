"""The node daemon's root service: one task tree, signals handled once, an ordered shutdown.

Service tree (STYLE 2–3; each child has `run()` and a `ready` event, all under one TaskGroup):

    NodeDaemon.run()
      ├─ LoopLagCanary           event-loop lag, exported in status/metrics
      ├─ StatusServer            127.0.0.1 control API (/status, /metrics, /, /run, /run.json)
      ├─ _report_loop            terminal panel or structured progress lines
      └─ body (app/body.py)      DhtService ─> pick + verify the run ─> GossipService ─> RunService.run()

Signals are handled once, in `run_daemon`: the first SIGINT/SIGTERM (or SIGHUP, unless it is ignored)
asks the daemon to stop (the body is cancelled and unwinds in order: leaving notice, checkpoint flush,
gossip, DHT, p2p daemon); a watchdog thread bounds that unwinding; a second signal kills our child
processes by PID and exits at once. A terminal's Ctrl-C reaches the daemon alone: the p2p daemon runs in a
process group of its own (`children.ChildProcessLoop`), and SIGINT is blocked in every thread and so in the
local-rank workers (a Python process started with SIGINT blocked keeps it blocked); one thread takes it
with sigwait. The data directory is locked for the daemon's lifetime (`app.lock`). The layers and the
round's phases are drawn in docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from intellect.node.app.body import run_body
from intellect.node.app.children import ChildRegistry, SigintRouter, exit_now, hold_sigint, run_async
from intellect.node.app.conditions import DailyTransfer, LimitsService
from intellect.node.app.config import NodeConfig
from intellect.node.app.control import Controls
from intellect.node.app.lock import DataDirLock
from intellect.node.app.logs import LoopLagCanary
from intellect.node.app.panel import live_panel
from intellect.node.app.preflight import explain_dht_failure
from intellect.node.app.roundlog import EventRecorder
from intellect.node.app.runview import RunLog, RunPages
from intellect.node.app.status import HTTP_PORT_FILE, NodeStatus, StatusServer
from intellect.node.app.volunteer import apply_cpu, apply_gpu, configured
from intellect.node.net.dht import DhtError
from intellect.node.net.shaping import Shaper, install, mbps
from intellect.node.run.pause import PauseGate
from intellect.node.run.phase import Phase, PhaseTracker

logger = logging.getLogger(__name__)

#: How long an orderly shutdown may take before the watchdog kills our children and exits (< 30 s).
SHUTDOWN_TIMEOUT_S = 20.0
#: Exit codes: 0 clean (signal or max rounds), 1 error, 130 second signal.
EXIT_OK, EXIT_ERROR, EXIT_FORCED = 0, 1, 130
PID_FILE = "daemon.pid"
#: Bytes moved this UTC day (the daily transfer cap survives a restart).
TRANSFER_FILE = "transfer.json"
#: Failures that are bugs rather than circumstances: logged with their traceback at any log level.
_BUGS = (
    AssertionError,
    AttributeError,
    NameError,
    TypeError,
    LookupError,
    ZeroDivisionError,
    NotImplementedError,
)


@dataclass(frozen=True)
class DaemonOptions:
    """Per-invocation options of `intellect-node start` that are not node configuration."""

    #: Stop cleanly (exit 0) after this many rounds completed by this process; None runs until a signal.
    max_rounds: int | None = None
    #: Stop cleanly (exit 0) once the global state we hold reaches this round; None: no such limit.
    until_round: int | None = None
    #: Before the first round, wait (bounded) until this many members (us included) are visible.
    min_peers: int = 1
    #: Longest wait for `min_peers` before training anyway.
    min_peers_timeout_s: float = 60.0
    #: Show a rich live panel (None: when stdout is a terminal and logs are text).
    live_panel: bool | None = None
    #: Seconds between progress log lines when there is no live panel.
    report_interval_s: float = 10.0


class StopRequested(Exception):
    """Raised inside the tree when the daemon stops on purpose (max rounds reached)."""


class NodeDaemon:
    """The root service. `await run()` returns an exit code; `request_stop()` starts an orderly shutdown."""

    def __init__(
        self,
        config: NodeConfig,
        options: DaemonOptions | None = None,
        body: Callable[[NodeDaemon], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.config = config
        self.options = options or DaemonOptions()
        self.status = NodeStatus()
        #: What the run view (`/run`, `intellect-node watch`) knows of the other members.
        self.run_log = RunLog()
        #: The one event stream of this node: status, metrics, the run view and rounds.jsonl are fed from it.
        self.events = EventRecorder(self.status, config.data_dir, also=(self.run_log.apply,))
        #: The one writer of the node's phase.
        self.phases = PhaseTracker(self.events)
        self.canary = LoopLagCanary()
        #: Closed while the node is paused (`intellect-node pause`, or a volunteer limit).
        self.gate = PauseGate()
        self.controls = Controls(self.gate, self.status)
        self.pages = pages = RunPages(self.run_log, self.status, config.data_dir)

        def routes(app: web.Application) -> None:
            self.controls.routes(app)
            pages.routes(app)

        self.http = StatusServer(
            self.status, config.http_port, config.data_dir / HTTP_PORT_FILE, config.metrics_addr, routes
        )
        self.children = ChildRegistry()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        # The body is injectable so the service tree and shutdown can be tested without a run.
        self._body_fn = body or run_body

    def request_stop(self) -> None:
        """Ask for an orderly shutdown (idempotent; safe from a signal handler on the loop)."""
        if not self._stop.is_set():
            self.phases.enter(Phase.STOPPING)
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> int:
        """Run the tree until the body finishes, fails, or a stop is requested; return the exit code."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        pid_file = self.config.data_dir / PID_FILE
        pid_file.write_text(f"{os.getpid()}\n")
        self.status.limits = {**apply_cpu(self.config), **apply_gpu(self.config), **configured(self.config)}
        code = EXIT_OK
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.canary.run(), name="canary")
                tg.create_task(self.http.run(), name="http")
                await self.http.ready.wait()
                tg.create_task(self._lag_into_status(), name="lag")
                tg.create_task(self._report_loop(), name="report")
                shaper = Shaper(mbps(self.config.max_upload_mbps), mbps(self.config.max_download_mbps))
                install(shaper)  # the all-reduce's streams and the state sync take their tokens from it
                moved = DailyTransfer(self.config.data_dir / TRANSFER_FILE, lambda: shaper.moved)
                limits = LimitsService(self.config, self.gate, self.status.limits, moved)
                if limits.needed():  # schedule, idle, battery, transfer cap: evaluated while we run
                    tg.create_task(limits.run(), name="limits")
                body = tg.create_task(self._body_fn(self), name="body")
                stop = tg.create_task(self._stop.wait(), name="stop-wait")
                self.ready.set()
                await asyncio.wait({body, stop}, return_when=asyncio.FIRST_COMPLETED)
                # Ordered unwinding: the body first (it owns run, gossip, DHT, in that order), then the
                # leaf services. Cancelling the body runs its `finally`/`async with` exits in order.
                if not body.done():
                    body.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await body
                elif body.exception() is None:
                    logger.info("run finished; stopping")
                raise StopRequested
        except* StopRequested:
            pass
        except* Exception as eg:
            for exc in eg.exceptions:
                await self._log_failure(exc)
            code = EXIT_ERROR
        finally:
            self.phases.enter(Phase.STOPPING)
            self.phases.enter(Phase.STOPPED)
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()
        return code

    async def _log_failure(self, exc: BaseException) -> None:
        """One line for an expected failure (the traceback at DEBUG); a bug keeps its traceback."""
        message = str(exc) or type(exc).__name__
        if isinstance(exc, DhtError):  # which bootstrap address failed, and how
            message = await explain_dht_failure(message, self.config.bootstrap)
        trace = isinstance(exc, _BUGS) or logger.isEnabledFor(logging.DEBUG)
        logger.error("daemon failed: %s", message, exc_info=exc if trace else None)

    async def _lag_into_status(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.status.loop_lag_s = self.canary.lag_s
            self.status.max_loop_lag_s = self.canary.max_lag_s

    async def _report_loop(self) -> None:
        """Live panel on a terminal; elsewhere one structured progress line per interval."""
        live = self.options.live_panel
        if live is None:
            live = sys.stdout.isatty() and self.config.log_format == "text"
        if live:
            await live_panel(self.status)
            return
        while True:
            await asyncio.sleep(self.options.report_interval_s)
            s = self.status
            logger.info(
                "progress: phase=%s round=%d loss=%s tokens=%d tok/s=%.0f peers=%d hash=%s",
                s.phase,
                s.round,
                "-" if s.loss is None else f"{s.loss:.4f}",
                s.tokens,
                s.tokens_per_s,
                s.peers,
                s.state_hash[:12],
                extra={
                    "event": "progress",
                    "phase": s.phase,
                    "round": s.round,
                    "loss": s.loss,
                    "tokens": s.tokens,
                    "tokens_per_s": s.tokens_per_s,
                    "peers": s.peers,
                    "state_hash": s.state_hash,
                },
            )


# ------------------------------------------------------------------------------------------------------
# Entry point with signal handling (the only place that touches signals).


def run_daemon(
    config: NodeConfig, options: DaemonOptions | None = None, lock: DataDirLock | None = None
) -> int:
    """Run a daemon in a fresh event loop until it finishes or is signalled; return the exit code.

    `lock` is the data directory's lock when the caller took it already (raises `DataDirLocked` when
    another process holds it); it is held until this returns."""
    sigint = hold_sigint()  # before any thread or child exists (`start` took it even earlier)
    with lock or DataDirLock.acquire(config.data_dir):
        code = run_async(_main(config, options or DaemonOptions(), sigint))
    logger.info("daemon exited with code %d", code)
    return code


def _other_stop_signals() -> list[signal.Signals]:
    """SIGTERM, and SIGHUP (a terminal that closes) unless it is ignored (nohup). SIGINT comes through
    the SIGINT router."""
    sigs = [signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        sigs.append(signal.SIGHUP)
    return sigs


async def _main(config: NodeConfig, options: DaemonOptions, sigint: SigintRouter) -> int:
    loop = asyncio.get_running_loop()
    daemon = NodeDaemon(config, options)
    signals_seen = 0

    def force_exit(why: str) -> None:
        # Last resort: no orderly path left. Kill what we started by PID so nothing outlives us.
        logger.error("%s: killing child processes and exiting now", why)
        daemon.children.kill_all()
        exit_now()

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            logger.info("%s received: shutting down (send it again to exit at once)", name)
            daemon.request_stop()
            watchdog = threading.Timer(SHUTDOWN_TIMEOUT_S, force_exit, args=("shutdown took too long",))
            watchdog.daemon = True
            watchdog.start()
        else:
            force_exit(f"second {name}")

    other_signals = _other_stop_signals()
    for sig in other_signals:
        loop.add_signal_handler(sig, on_signal, sig)
    sigint.target = lambda signum: loop.call_soon_threadsafe(on_signal, signum)
    try:
        return await daemon.run()
    finally:
        # The loop is closing but the process is not gone yet: a signal now (the "second Ctrl-C" of
        # someone whose first one just finished the shutdown) must still exit at once and quietly,
        # not raise KeyboardInterrupt in the interpreter's teardown (exit status -2).
        sigint.target = exit_now
        for sig in other_signals:
            loop.remove_signal_handler(sig)
            signal.signal(sig, exit_now)


__all__ = ["EXIT_ERROR", "EXIT_FORCED", "EXIT_OK", "DaemonOptions", "NodeDaemon", "run_daemon"]
