"""The node's local control API: JSON status, Prometheus metrics and the dashboard (`app.pages`), on
127.0.0.1 only (plus, when configured, a metrics-only listener on `metrics_addr`). The run view (`/run`,
`/run.json`: `app.runview`) and the control endpoints are added through `routes`.

`NodeStatus` is the one mutable record of what the daemon is doing. The round machine never writes it: it
emits typed events (`intellect.node.run.events`) and `NodeStatus.apply` folds them in; the HTTP handlers,
the metrics collector and the terminal panel only read it. Metrics are produced from the same record at
scrape time (`intellect.node.app.metrics`), in a per-node registry.

`StatusServer` is a service (`run()`, `ready`): it binds 127.0.0.1 (port 0 picks a free one), writes the
port to `<data dir>/http.port` so `intellect-node status` can find it, and removes that file on exit.
`fetch_status` is the client side used by the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from intellect.node.app.config import parse_host_port
from intellect.node.app.metrics import ALLREDUCE_BUCKETS, ROUND_BUCKETS, Durations, make_registry
from intellect.node.app.pages import render_dashboard
from intellect.node.run import events as ev
from intellect.node.run.events import Event
from intellect.node.run.phase import Phase
from prometheus_client import generate_latest

logger = logging.getLogger("intellect.node.app.status")

HTTP_PORT_FILE = "http.port"


@dataclass
class AveragingOutcome:
    """The last averaging attempt: whether it completed, how long it took, with whom, and why not."""

    round: int = 0
    ok: bool = False
    seconds: float = 0.0
    group_size: int = 0
    reason: str = ""
    at: float = 0.0


@dataclass
class SyncOutcome:
    """The last state sync from peers (or resume from our own checkpoint)."""

    round: int = 0
    source: str = ""
    state_hash: str = ""
    seconds: float = 0.0
    at: float = 0.0


@dataclass
class NodeStatus:
    """What the daemon is doing now. Written only by the daemon's own tasks, read by the API and panel."""

    peer_id: str = ""
    run_id: str = ""
    run_name: str = ""
    #: starting, joining, syncing, waiting-for-peers, training, averaging, checkpointing, stopping, stopped
    phase: str = "starting"
    #: Number of completed outer steps (the global state's round).
    round: int = 0
    loss: float | None = None
    #: Tokens trained on in rounds whose average was applied (they are in the run's state).
    tokens: int = 0
    #: Tokens trained on in rounds whose all-reduce failed (that work was discarded).
    tokens_failed: int = 0
    #: Tokens trained on in the round under way, whose average is not decided yet.
    tokens_pending: int = 0
    tokens_per_s: float = 0.0
    peers: int = 0
    peer_ids: list[str] = field(default_factory=list)
    state_hash: str = ""
    rounds_ok: int = 0
    rounds_failed: int = 0
    last_allreduce: AveragingOutcome = field(default_factory=AveragingOutcome)
    last_sync: SyncOutcome = field(default_factory=SyncOutcome)
    bytes_sent: int = 0
    bytes_received: int = 0
    #: Peer input this node's run dropped, by reason (only ever counts up).
    rejected: Counter[str] = field(default_factory=Counter)
    #: The gossip service's own cumulative rejection counters (its latest snapshot; each only counts up).
    gossip_rejected: dict[str, int] = field(default_factory=dict)
    #: Verified gossip messages delivered, neighbours linked now, distinct authors heard.
    gossip_delivered: int = 0
    gossip_neighbours: int = 0
    gossip_authors: int = 0
    #: Part of `bytes_sent` that our state server sent to syncing peers.
    served_bytes: int = 0
    #: Checkpoints that could not be written (full or failing disk); training went on.
    checkpoint_errors: int = 0
    #: Checkpoints not written because they would have passed the volunteer's disk cap.
    checkpoints_skipped: int = 0
    loop_lag_s: float = 0.0
    max_loop_lag_s: float = 0.0
    started_at: float = field(default_factory=time.time)
    #: (round, loss) of recent rounds, for the dashboard's loss curve.
    loss_history: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=500))
    #: Histograms (metrics only): whole rounds, and all-reduce attempts by outcome ("ok", "failed").
    round_durations: Durations = field(default_factory=lambda: Durations(ROUND_BUCKETS))
    allreduce_durations: dict[str, Durations] = field(default_factory=dict)
    #: When the round under way started training (monotonic clock), 0.0 when none is.
    round_started: float = 0.0
    #: Whether the node is paused, and why, by source ("user", "schedule", "idle", "battery", "transfer").
    paused: bool = False
    pause_reasons: dict[str, str] = field(default_factory=dict)
    #: The volunteer limits in force and how each was applied ("unavailable: …" where it could not be).
    limits: dict[str, Any] = field(default_factory=dict)

    def all_rejected(self) -> Counter[str]:
        """Every dropped input by reason: the run's own counts plus the gossip service's."""
        return self.rejected + Counter(self.gossip_rejected)

    def apply(self, event: Event) -> None:
        """Fold one event of the round machine into the record."""
        handler = _FOLD.get(type(event))
        if handler is not None:
            handler(self, event)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rejected"] = dict(self.all_rejected())
        del out["gossip_rejected"]
        out["loss_history"] = [list(p) for p in self.loss_history]
        out["uptime_s"] = round(time.time() - self.started_at, 3)
        for name in ("round_durations", "allreduce_durations", "round_started"):
            del out[name]
        return out

    def round_ended(self) -> None:
        """The round under way ended (committed, or its average failed): observe its duration."""
        if self.round_started:
            self.round_durations.observe(time.monotonic() - self.round_started)
            self.round_started = 0.0


def _on_phase(s: NodeStatus, e: ev.PhaseChanged) -> None:
    s.phase = e.phase
    if e.phase == Phase.TRAINING:
        s.round_started = time.monotonic()


def _on_state(s: NodeStatus, e: ev.StateChanged) -> None:
    s.round, s.state_hash = e.round, e.state_hash


def _on_trained(s: NodeStatus, e: ev.Trained) -> None:
    s.tokens_pending = e.tokens  # counted once the round's average is decided
    s.loss = e.mean_loss
    s.tokens_per_s = e.tokens_per_s


def _on_averaged(s: NodeStatus, e: ev.Averaged) -> None:
    s.bytes_sent += e.bytes_sent
    s.bytes_received += e.bytes_received
    s.last_allreduce = AveragingOutcome(e.round, e.ok, e.seconds, e.group_size, e.reason, time.time())
    outcome = "ok" if e.ok else "failed"
    s.allreduce_durations.setdefault(outcome, Durations(ALLREDUCE_BUCKETS)).observe(e.seconds)
    if not e.ok:
        s.rounds_failed += 1
        s.tokens_failed += s.tokens_pending
        s.tokens_pending = 0
        s.round_ended()


def _on_committed(s: NodeStatus, e: ev.Committed) -> None:
    s.rounds_ok += 1
    s.tokens += e.tokens
    s.tokens_pending = 0
    s.loss_history.append((e.round, e.loss))
    s.round_ended()


def _on_synced(s: NodeStatus, e: ev.Synced) -> None:
    s.bytes_received += e.bytes_received
    s.last_sync = SyncOutcome(e.round, e.source, e.state_hash, e.seconds, time.time())


def _on_sync_failed(s: NodeStatus, e: ev.SyncFailed) -> None:
    s.bytes_received += e.bytes_received


def _on_members(s: NodeStatus, e: ev.MembersChanged) -> None:
    s.peers, s.peer_ids = len(e.peers), list(e.peers)


def _on_served(s: NodeStatus, e: ev.StateServed) -> None:
    s.bytes_sent += max(0, e.bytes_sent - s.served_bytes)
    s.served_bytes = max(s.served_bytes, e.bytes_sent)


def _on_checkpoint_failed(s: NodeStatus, e: ev.CheckpointFailed) -> None:
    s.checkpoint_errors += 1


def _on_disk_checked(s: NodeStatus, e: ev.DiskChecked) -> None:
    s.limits["max_disk_gb"] = e.note
    if not e.fits:
        s.checkpoints_skipped += 1


def _on_rejected(s: NodeStatus, e: ev.Rejected) -> None:
    s.rejected[e.reason.value] += 1


def _on_gossip(s: NodeStatus, e: ev.GossipCounters) -> None:
    s.gossip_rejected = dict(e.rejected)
    s.gossip_delivered, s.gossip_neighbours, s.gossip_authors = e.delivered, e.neighbours, e.authors


_FOLD: dict[type, Any] = {
    ev.PhaseChanged: _on_phase,
    ev.StateChanged: _on_state,
    ev.TrainingProgress: lambda s, e: setattr(s, "tokens_per_s", e.tokens_per_s),
    ev.Trained: _on_trained,
    ev.Averaged: _on_averaged,
    ev.Committed: _on_committed,
    ev.Synced: _on_synced,
    ev.SyncFailed: _on_sync_failed,
    ev.MembersChanged: _on_members,
    ev.StateServed: _on_served,
    ev.CheckpointFailed: _on_checkpoint_failed,
    ev.DiskChecked: _on_disk_checked,
    ev.Rejected: _on_rejected,
    ev.GossipCounters: _on_gossip,
}


class StatusServer:
    """aiohttp server on 127.0.0.1 serving `/status`, `/metrics` and `/`; a service with `run()`/`ready`.

    With `metrics_addr` ("HOST:PORT"), a second listener there serves `/metrics` and nothing else, for a
    Prometheus outside this host, container or pod: the metrics are read-only and hold nothing secret,
    while the control API (status, dashboard) stays on 127.0.0.1."""

    def __init__(
        self,
        status: NodeStatus,
        port: int = 0,
        port_file: Path | None = None,
        metrics_addr: str = "",
        routes: Callable[[web.Application], None] = lambda app: None,
    ) -> None:
        self.status = status
        self.routes = routes
        self.registry = make_registry(status)
        self.requested_port = port
        self.port_file = port_file
        self.port = 0
        self.metrics_addr = parse_host_port(metrics_addr, "metrics_addr") if metrics_addr else None
        self.ready = asyncio.Event()

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status.to_json())

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text=render_dashboard(self.status.to_json()), content_type="text/html")

    async def _metrics_site(self) -> web.AppRunner | None:
        """The metrics-only listener on `metrics_addr`, started; None without one."""
        if self.metrics_addr is None:
            return None
        host, port = self.metrics_addr
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            await runner.cleanup()
            raise OSError(
                e.errno, f"cannot serve metrics on {host}:{port} (metrics_addr): {e.strerror}"
            ) from None
        logger.info("metrics on http://%s:%d/metrics", host, port)
        return runner

    async def run(self) -> None:
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        self.routes(app)  # the control endpoints (`app.control`)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        metrics: web.AppRunner | None = None
        try:
            # Loopback only: the control API has no authentication, so it must never face the network.
            # We bind the socket ourselves so that port 0 yields the real port without private attributes.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.requested_port))
            self.port = sock.getsockname()[1]
            site = web.SockSite(runner, sock)
            await site.start()
            if self.port_file is not None:
                tmp = self.port_file.with_name(self.port_file.name + ".tmp")
                tmp.write_text(f"{self.port}\n")
                tmp.replace(self.port_file)
            logger.info("control API on http://127.0.0.1:%s/", self.port)
            metrics = await self._metrics_site()
            self.ready.set()
            await asyncio.Event().wait()  # serve until cancelled
        finally:
            if self.port_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.port_file.unlink()
            if metrics is not None:
                await metrics.cleanup()
            await runner.cleanup()


def read_port(data_dir: Path) -> int:
    """The control API port a daemon using `data_dir` wrote, or raise FileNotFoundError."""
    return int((Path(data_dir) / HTTP_PORT_FILE).read_text().strip())


def fetch_status(data_dir: Path, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET /status from the daemon that owns `data_dir` (blocking; for the CLI and the swarm driver)."""
    port = read_port(data_dir)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=timeout_s) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data
