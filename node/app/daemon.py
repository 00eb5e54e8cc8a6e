"""The node daemon: one root service that owns every task, and the run service's DiLoCo round loop.

Service tree (STYLE 2–3; each child has `run()` and a `ready` event, all under one TaskGroup):

    NodeDaemon.run()
      ├─ LoopLagCanary           event-loop lag, exported in status/metrics
      ├─ StatusServer            127.0.0.1 control API (/status, /metrics, /)
      ├─ _report_loop            terminal panel or structured progress lines
      └─ _body                   DhtService ─> pick + verify the run ─> GossipService ─> RunService.run()

Signals are handled once, in `run_daemon`: the first SIGINT/SIGTERM asks the daemon to stop (the body is
cancelled and unwinds in order: leaving notice, checkpoint flush, gossip, DHT, p2p daemon); a watchdog
thread bounds that unwinding; a second signal kills our child processes by PID and exits at once.

A round (RunService._round), with r = completed rounds + 1:

    train H inner steps (worker thread) ─> Δ = θ − θ_local + error-feedback residual
      ─> all-reduce Δ weighted by tokens (deadline; a lone peer gives up once others are past round r)
      ─> ok:     keep what compression lost as the next residual, outer step, round = r, checkpoint
                 (a full disk is logged, not fatal), announce (gossip progress + state, DHT membership)
      ─> failed: keep θ untouched, reset the local copy, log and expose it; catch up next round

Rounds need no coordinator: the round number is the global state's step count, which every member of the
run announces (gossip, and the DHT records that repair lost gossip); a peer that sees others ahead
(newcomer, laggard, failed average) waits a bounded time for a fresh announcement, syncs the state most
live peers vouch for (verified by hash, its step count checked against its round) and joins the round
after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from intellect.crypto.identity import Identity
from intellect.node.app.config import NodeConfig, hosts
from intellect.node.app.logs import LoopLagCanary
from intellect.node.app.status import HTTP_PORT_FILE, AllReduceOutcome, NodeStatus, StatusServer, SyncOutcome

if TYPE_CHECKING:
    from intellect.node.engine.data import TokenStream
    from intellect.node.net.averaging import AveragerConfig
    from intellect.node.net.dht import DhtService
    from intellect.node.net.gossip import GossipService
    from intellect.node.net.statesync import SyncTarget
    from intellect.protocol.manifest import Manifest, SignedManifest
    from intellect.protocol.records import MembershipRecord

logger = logging.getLogger("intellect.node.app.daemon")

#: How long an orderly shutdown may take before the watchdog kills our children and exits (< 30 s).
SHUTDOWN_TIMEOUT_S = 20.0
#: Exit codes: 0 clean (signal or max rounds), 1 error, 130 second signal.
EXIT_OK, EXIT_ERROR, EXIT_FORCED = 0, 1, 130
#: One JSON line per completed round, read by `intellect-node swarm` for its summary.
ROUNDS_LOG = "rounds.jsonl"
PID_FILE = "daemon.pid"


@dataclass(frozen=True)
class DaemonOptions:
    """Per-invocation options of `intellect-node start` that are not node configuration."""

    #: Stop cleanly (exit 0) after this many completed rounds; None runs until a signal.
    max_rounds: int | None = None
    #: Before the first round, wait (bounded) until this many members (us included) are visible.
    min_peers: int = 1
    #: Longest wait for `min_peers` before training anyway.
    min_peers_timeout_s: float = 60.0
    #: Show a rich live panel (None: when stdout is a terminal and logs are text).
    live_panel: bool | None = None
    #: Seconds between progress log lines when there is no live panel.
    report_interval_s: float = 10.0


class _ChildRegistry:
    """Where to find the PIDs of the child processes we started (p2pd, gossip child) for the last-resort
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
        self.canary = LoopLagCanary()
        self.http = StatusServer(self.status, config.http_port, config.data_dir / HTTP_PORT_FILE)
        self.children = _ChildRegistry()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        # The body is injectable so the service tree and shutdown can be tested without a run.
        self._body_fn = body or _run_body

    def request_stop(self) -> None:
        """Ask for an orderly shutdown (idempotent; safe from a signal handler on the loop)."""
        if not self._stop.is_set():
            self.status.phase = "stopping"
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> int:
        """Run the tree until the body finishes, fails, or a stop is requested; return the exit code."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        pid_file = self.config.data_dir / PID_FILE
        pid_file.write_text(f"{os.getpid()}\n")
        code = EXIT_OK
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.canary.run(), name="canary")
                tg.create_task(self.http.run(), name="http")
                await self.http.ready.wait()
                tg.create_task(self._lag_into_status(), name="lag")
                tg.create_task(self._report_loop(), name="report")
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
                logger.error("daemon failed: %s", exc, exc_info=exc)
            code = EXIT_ERROR
        finally:
            self.status.phase = "stopped"
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()
        return code

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
            await _live_panel(self.status)
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


async def _live_panel(status: NodeStatus) -> None:
    from rich.live import Live
    from rich.table import Table

    def render() -> Table:
        t = Table(title=f"intellect-node {status.peer_id[:16]}…", show_header=False)
        ar = status.last_allreduce
        rows = [
            ("run", f"{status.run_name} {status.run_id[:12]}"),
            ("phase", status.phase),
            ("round", str(status.round)),
            ("loss", "-" if status.loss is None else f"{status.loss:.4f}"),
            ("tokens/s", f"{status.tokens_per_s:.0f}"),
            ("peers", str(status.peers)),
            (
                "last all-reduce",
                f"{'ok' if ar.ok else 'failed'} {ar.seconds:.2f}s {ar.reason}" if ar.at else "-",
            ),
            ("last sync", f"round {status.last_sync.round} from {status.last_sync.source}"),
            ("state hash", status.state_hash[:16]),
        ]
        for k, v in rows:
            t.add_row(k, v)
        return t

    with Live(render(), refresh_per_second=2, transient=False) as live:
        while True:
            await asyncio.sleep(0.5)
            live.update(render())


# ------------------------------------------------------------------------------------------------------
# The body: DHT, run selection, gossip, round loop.

#: How long `start --run RUN_ID` keeps looking for the run's manifest in the DHT before giving up.
RUN_LOOKUP_TIMEOUT_S = 60.0
#: Membership record lifetime and refresh period (refresh at a third of the TTL survives lost refreshes).
MEMBER_TTL_S = 60.0
MEMBER_REFRESH_S = 20.0
#: Seconds a training chunk should last: the trainer is stopped between chunks, which bounds how long a
#: shutdown waits for the worker thread (torch cannot be interrupted inside a step).
TRAIN_CHUNK_S = 1.0
#: Name of the error-feedback residual in the trainer checkpoint (next to the optimizer state).
RESIDUAL_TENSOR = "error_feedback.residual"


def load_run_manifest(path: Path | None = None) -> Manifest:
    """The run manifest at `path`, or the built-in tiny demo run (`examples/tiny-run.toml`, shipped inside
    the package so that the demo works from a plain, non-editable install too)."""
    from intellect.protocol.manifest import load_manifest_toml

    if path is None:
        path = Path(__file__).resolve().parent.parent / "runs" / "tiny-run.toml"
    return load_manifest_toml(path)


def is_admitted(manifest: Manifest, researcher: str, peer_id: str, ticket: bytes = b"") -> bool:
    """The manifest's admission policy: open, allowlist (the researcher is always in), or tickets."""
    from intellect.protocol.records import ticket_valid

    policy = manifest.admission.policy
    if policy == "open" or peer_id == researcher:
        return True
    if policy == "allowlist":
        return peer_id in manifest.admission.peers
    return bool(ticket) and ticket_valid(ticket, researcher, manifest.run_id, peer_id)


async def pick_run(
    dht: DhtService,
    wanted: str,
    peer_id: str,
    ticket_for: Callable[[str], bytes],
    timeout_s: float = RUN_LOOKUP_TIMEOUT_S,
) -> SignedManifest:
    """The run to join: `wanted` when given (waiting for it to appear), else the verifiable run we are
    admitted to that has the most live members (ties: name). Unverifiable manifests are never returned."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        runs, invalid = await dht.get_manifests()
        if invalid:
            logger.warning("ignored %d run records that failed verification", invalid)
        candidates = [
            r
            for r in runs
            if (not wanted or r.run_id == wanted)
            and is_admitted(r.manifest, r.researcher, peer_id, ticket_for(r.run_id))
        ]
        if candidates:
            if len(candidates) == 1:
                return candidates[0]
            sizes = {r.run_id: len(await dht.get_members(r.run_id)) for r in candidates}
            return max(candidates, key=lambda r: (sizes[r.run_id], r.manifest.name))
        if time.monotonic() > deadline:
            what = f"run {wanted}" if wanted else "any run this node is admitted to"
            raise RuntimeError(f"found no verifiable manifest for {what} in the DHT within {timeout_s:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def _ticket_loader(config: NodeConfig) -> Callable[[str], bytes]:
    """Admission tickets a researcher gave this node live in `<data dir>/tickets/<run_id>`."""

    def load(run_id: str) -> bytes:
        path = config.data_dir / "tickets" / run_id
        return path.read_bytes() if path.is_file() else b""

    return load


async def _run_body(daemon: NodeDaemon) -> None:
    from intellect.node.net.dht import DhtService
    from intellect.node.net.gossip import GossipConfig, GossipService

    config = daemon.config
    status = daemon.status
    identity = load_identity(config)
    status.peer_id = identity.peer_id
    status.phase = "joining"
    tickets = _ticket_loader(config)
    async with DhtService(config, config.identity_path) as dht:
        daemon.children.add(lambda: dht.daemon_pid)
        signed = await pick_run(dht, config.run, identity.peer_id, tickets)
        if not signed.verify():  # pick_run only returns verified ones; checked again before training
            raise RuntimeError(f"manifest of run {signed.run_id} does not verify")
        manifest = signed.manifest
        status.run_id, status.run_name = signed.run_id, manifest.name
        logger.info("joining run %s (%s) of researcher %s", manifest.name, signed.run_id, signed.researcher)
        # Any node training a run keeps its self-authenticating manifest alive in the DHT.
        await dht.publish_manifest(signed)
        members_tickets: dict[str, bytes] = {}

        def admitted(peer: str) -> bool:
            return is_admitted(manifest, signed.researcher, peer, members_tickets.get(peer, b""))

        listen_host, _ = hosts(config, dht.visible_maddrs)
        gossip_cfg = GossipConfig(listen_host=listen_host, listen_port=config.gossip_port)
        async with GossipService(config.identity_path, signed.run_id, admitted, config=gossip_cfg) as gossip:
            daemon.children.add(lambda: gossip.child_pid)
            run = RunService(daemon, identity, dht, gossip, signed, members_tickets, tickets(signed.run_id))
            await run.run()


@dataclass
class _Announced:
    """The latest state a peer announced (gossip CHECKPOINT), with when we heard it."""

    round: int
    state_hash: str
    num_bytes: int
    chunk_size: int
    received_at: float


class RunService:
    """One run's DiLoCo round loop on this node (see the module docstring for a round's steps)."""

    def __init__(
        self,
        daemon: NodeDaemon,
        identity: Identity,
        dht: DhtService,
        gossip: GossipService,
        signed: SignedManifest,
        members_tickets: dict[str, bytes],
        ticket: bytes,
    ) -> None:
        self.daemon = daemon
        self.status = daemon.status
        self.config = daemon.config
        self.identity = identity
        self.dht = dht
        self.gossip = gossip
        self.signed = signed
        self.manifest = signed.manifest
        self.run_id = signed.run_id
        self.ticket = ticket
        self.members_tickets = members_tickets
        #: Completed outer steps of the global state we hold.
        self.round = 0
        self.state_hash = ""
        self.announced: dict[str, _Announced] = {}
        self.members: list[str] = []
        #: Each member's latest verified DHT membership record (round, state hash, throughput).
        self.member_records: dict[str, MembershipRecord] = {}
        #: Peers caught serving state that does not match its hash: their vouches no longer count.
        self.distrusted: set[str] = set()
        #: Peers that said they are leaving (gossip LEAVING), until they announce a state again: their DHT
        #: records outlive them by up to the record TTL, and must not count as holders of a state.
        self.departed: set[str] = set()
        self._new_announcement = asyncio.Event()
        #: Seconds between one peer's announcements of consecutive rounds (a moving average), i.e. how
        #: long a round of the others takes; bounds how long a laggard waits for their next one.
        self._round_period: float | None = None
        #: Error feedback: what earlier all-reduces lost of our pseudo-gradients to compression (flat fp32,
        #: in `allreduce.flatten` order), added to the next one. Kept in the trainer checkpoint.
        self.residual: Any = None
        self._chunk_steps = 1
        self._pending_commit: asyncio.Future[Any] | None = None
        #: Why we lack the run's pinned initial state (`_initial_state`); fatal only if we must train round 0.
        self.init_error: Exception | None = None
        #: Ranks training inside this node (`engine.localgroup`), and their group when more than one.
        self.local_ranks = 1
        self.local: Any = None
        self._last_stats: Any = None

    # ---- setup ---------------------------------------------------------------------------------------

    def _build(self) -> None:
        """Tokenizer, data, model (from the manifest's seed), outer optimizer, trainer, checkpoint stores."""
        import torch
        from intellect.node.engine.checkpoint import CheckpointStore
        from intellect.node.engine.data import ShardInfo, ShardResolver
        from intellect.node.engine.localgroup import LocalGroup, local_batch
        from intellect.node.engine.model import Llama, ModelConfig
        from intellect.node.engine.outer import OuterOptimizer
        from intellect.node.engine.tokenizer import load_tokenizer
        from intellect.node.engine.trainer import InnerTrainer, TrainerConfig

        m = self.manifest
        d = m.diloco
        spec = "byte" if m.tokenizer.kind == "byte" else m.tokenizer.uri
        tok = load_tokenizer(spec, m.tokenizer.sha256 or None)
        self.resolver = ShardResolver(tok, base_dir=self.config.data_dir / "shards")
        self.shards = [ShardInfo(s.uri, s.sha256, s.tokens) for s in m.shards]
        cfg = ModelConfig.from_dict(m.model.to_dict())
        self.model = Llama(cfg, seed=m.init.seed)
        self.outer = OuterOptimizer.from_model(
            self.model, lr=d.outer_lr, momentum=d.outer_momentum, nesterov=d.nesterov
        )
        rounds_total = max(1, m.token_budget // max(1, m.max_tokens_per_round()))
        self.local_ranks = self._local_ranks()
        tcfg = TrainerConfig(
            lr=d.inner_lr,
            warmup_steps=d.warmup_steps,
            total_steps=max(d.warmup_steps + 1, rounds_total * d.inner_steps),
            min_lr=d.inner_lr * 0.1 if d.schedule != "constant" else d.inner_lr,
            weight_decay=d.weight_decay,
            # With several local ranks each takes its share of the batch: the node's step is unchanged.
            batch=local_batch(d.batch_size, self.local_ranks),
            seq_len=d.seq_len,
            device=self.config.device,
        )
        self.trainer = InnerTrainer(self.model, tcfg, self._stream_for(1), device=self.config.device)
        if self.local_ranks > 1:
            self.local = LocalGroup(
                self.trainer,
                world=self.local_ranks,
                model=m.model.to_dict(),
                tokenizer=spec,
                tokenizer_sha256=m.tokenizer.sha256 or None,
                shards=self.shards,
                shards_dir=self.config.data_dir / "shards",
            )
            for pid in self.local.pids:
                self.daemon.children.add(functools.partial(int, pid))
        root = self.config.data_dir / "runs" / self.run_id[:16]
        self.global_store = CheckpointStore(root / "global", keep=3)
        self.trainer_store = CheckpointStore(root / "trainer", keep=3)
        self.rounds_log = self.config.data_dir / ROUNDS_LOG
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()))

    def _local_ranks(self) -> int:
        """Ranks that train inside this node: the configured number, or (0) one per visible GPU."""
        import torch
        from intellect.node.engine.trainer import resolve_device

        if self.config.local_ranks:
            return self.config.local_ranks  # an explicit count that does not divide the batch is an error
        if resolve_device(self.config.device).type != "cuda":
            return 1
        gpus = max(1, torch.cuda.device_count())
        batch = self.manifest.diloco.batch_size
        # Automatic: as many GPUs as split the run's batch evenly (e.g. 2 of 3 GPUs for a batch of 8).
        ranks = max(w for w in range(1, gpus + 1) if batch % w == 0)
        if ranks < gpus:
            logger.warning(
                "using %d of %d GPUs: the run's batch_size %d does not split over more", ranks, gpus, batch
            )
        return ranks

    def _round_data(self, round_: int) -> tuple[list[Any], int]:
        """This round's shards (by rendezvous over run, round and live members) and data seed."""
        from intellect.node.engine.data import assign_shards

        peers = sorted({*self.members, self.identity.peer_id})
        mine = assign_shards(self.run_id, round_, peers, self.shards).get(self.identity.peer_id) or []
        if not mine:
            # More peers than shards: train on everything rather than idle (duplicates are harmless).
            mine = list(self.shards)
        return mine, int.from_bytes(self.identity.peer_id.encode()[-4:], "big") ^ round_

    def _stream_for(self, round_: int) -> TokenStream:
        """This round's data for our own trainer (rank 0's part when the node has several local ranks)."""
        return self._rank0_stream(*self._round_data(round_))

    def _rank0_stream(self, mine: list[Any], seed: int) -> TokenStream:
        from intellect.node.engine.localgroup import local_batch, rank_stream

        d = self.manifest.diloco
        batch = local_batch(d.batch_size, self.local_ranks)
        return rank_stream(self.resolver, mine, 0, self.local_ranks, batch, d.seq_len, seed)

    def _resume(self) -> bool:
        """Restore the last verified checkpoint of this run from our data dir; True if one was used."""
        ckpt = self.global_store.load_latest()
        if ckpt is None or ckpt.meta.get("run_id") != self.run_id:
            return False
        self.outer.load_state_dict(ckpt.tensors)
        self.outer.copy_to(self.model)
        self.round = int(ckpt.meta["round"])
        self.state_hash = ckpt.state_hash
        tr = self.trainer_store.load_latest()
        if tr is not None and tr.meta.get("round") == self.round:
            # Each round builds a fresh data stream (its shards follow the live membership), so the saved
            # cursor belongs to a round that is over: restore the optimizer and step, not the stream.
            self.residual = tr.tensors.get(RESIDUAL_TENSOR)
            try:
                self.trainer.import_state(tr.tensors, tr.meta["trainer"], stream=False)
            except (ValueError, KeyError) as e:
                logger.warning("our trainer checkpoint does not fit (%s); inner optimizer starts afresh", e)
        logger.info("resumed from our checkpoint of round %d (%s)", self.round, self.state_hash[:12])
        self.status.last_sync = SyncOutcome(self.round, "own checkpoint", self.state_hash, 0.0, time.time())
        return True

    def _initial_state(self) -> None:
        """Round 0's global state: the seeded init, or the file that the manifest's `init.sha256` pins.

        If the pinned file is missing or bad, the error is kept, not raised: a node that finds peers past
        round 0 syncs their state and never needs the file. `_rounds` raises it before training round 0.
        """
        from intellect.node.engine.initstate import InitStateError, init_state_path, load_init_state

        self.state_hash = self._hash_now()
        pinned = self.manifest.init.sha256
        if not pinned or self.state_hash == pinned:
            return
        try:
            load_init_state(init_state_path(self.config.data_dir, pinned), pinned, self.outer)
        except (InitStateError, OSError) as e:
            self.init_error = InitStateError(str(e))
            logger.warning("%s; starting only if peers are past round 0 and we sync their state", e)
            return
        self.outer.copy_to(self.model)
        self.state_hash = self._hash_now()
        logger.info("loaded the run's initial state %s", self.state_hash[:12])

    # ---- the service ---------------------------------------------------------------------------------

    async def run(self) -> None:
        self.status.phase = "loading"
        try:
            await asyncio.to_thread(self._build)
            await self._serve()
        finally:
            if self.local is not None:
                await asyncio.to_thread(self.local.close)

    async def _serve(self) -> None:
        from intellect.node.net.averaging import Averager
        from intellect.node.net.statesync import StateServer

        resumed = await asyncio.to_thread(self._resume)
        if not resumed:
            await asyncio.to_thread(self._initial_state)
        self._publish_status_state()
        listen_host, public_host = self._hosts()
        async with StateServer(self.dht.p2p, self.identity, self.run_id, admitted=self._admitted) as server:
            self.server = server
            self.averager = Averager(
                self.dht,
                self.identity,
                self.run_id,
                self._averager_config(),
                listen_host=listen_host,
                listen_port=self.config.averaging_port,
                announce_host=public_host,
                admitted=self._admitted,
            )
            async with self.averager:
                await self._announce_state()
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self._listen_checkpoints(), name="listen-checkpoint"),
                        tg.create_task(self._listen_progress(), name="listen-progress"),
                        tg.create_task(self._listen_leaving(), name="listen-leaving"),
                        tg.create_task(self._listen_misbehaviour(), name="listen-misbehaviour"),
                        tg.create_task(self._membership_loop(), name="membership"),
                    ]
                    try:
                        await self._rounds()
                    finally:
                        await self._leave()
                        for t in tasks:
                            t.cancel()

    def _averager_config(self) -> AveragerConfig:
        from intellect.node.net.averaging import AveragerConfig

        a = self.manifest.averaging
        return AveragerConfig(
            min_group_size=a.min_group,
            target_group_size=a.group_size,
            matchmaking_time=a.matchmaking_s,
            compression=a.compression,
            max_weight=float(self.manifest.max_tokens_per_round()),
            reducer=a.reducer,
        )

    def _hosts(self) -> tuple[str, str]:
        """(listen, public) host of our gossip and data-plane sockets (`config.hosts`)."""
        return hosts(self.config, self.dht.visible_maddrs)

    def _admitted(self, peer: str) -> bool:
        return is_admitted(self.manifest, self.signed.researcher, peer, self.members_tickets.get(peer, b""))

    def _hash_now(self) -> str:
        from intellect.node.engine.statehash import state_hash

        return state_hash(self.outer.state_dict())

    def _publish_status_state(self) -> None:
        self.status.round = self.round
        self.status.state_hash = self.state_hash

    # ---- the loop ------------------------------------------------------------------------------------

    async def _rounds(self) -> None:
        opts = self.daemon.options
        if self.round == 0 and opts.min_peers > 1:
            await self._wait_for_peers(opts.min_peers, opts.min_peers_timeout_s)
        while opts.max_rounds is None or self.round < opts.max_rounds:
            await self._catch_up()
            if opts.max_rounds is not None and self.round >= opts.max_rounds:
                break
            if self.round == 0 and self.init_error is not None:
                raise self.init_error  # training from another origin would poison everyone's average
            await self._round()
        logger.info("reached round %d: done", self.round)

    async def _wait_for_peers(self, n: int, timeout_s: float) -> None:
        self.status.phase = "waiting-for-peers"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await self._refresh_members()
            if len(self.members) >= n:
                logger.info("%d members present; starting", len(self.members))
                return
            await asyncio.sleep(0.5)
        logger.warning("only %d of %d peers after %.0f s; starting anyway", len(self.members), n, timeout_s)

    def _target(self) -> tuple[SyncTarget, float] | None:
        """The state most distinct peers vouch for (ties: higher round), as `statesync.pick_target` picks
        it from gossip announcements and DHT membership records together, and when we last heard a gossip
        announcement of it (0.0 when only the DHT vouches: the DHT repairs lost gossip)."""
        from intellect.node.net.statesync import Vouch, pick_target

        vouches = [
            Vouch(p, a.round, a.state_hash, a.chunk_size, a.num_bytes)
            for p, a in self.announced.items()
            if self._counts(p)
        ]
        from_dht = (Vouch.from_membership(rec) for p, rec in self.member_records.items() if self._counts(p))
        vouches += [v for v in from_dht if v is not None]
        target = pick_target(vouches, self.run_id)
        if target is None:
            return None
        heard = [
            a.received_at
            for a in self.announced.values()
            if (a.round, a.state_hash) == (target.round, target.state_hash)
        ]
        return target, max(heard, default=0.0)

    async def _catch_up(self) -> None:
        """Sync from peers when they are at a later round than ours (newcomer, laggard, failed round).

        How far the run is and which state to fetch come from gossip checkpoint announcements and the DHT
        membership records (the source of truth) together. Others start their next round right after
        announcing, so to join that round in step we sync a state announced just now (within half the
        matchmaking window), else wait (bounded) for their next announcement.
        """
        await self._refresh_members()
        ahead = max(self._peer_rounds().values(), default=0)
        found = self._target()
        if found is not None:
            ahead = max(ahead, found[0].round)
        if ahead <= self.round:
            return
        fresh_s = max(1.0, self.manifest.averaging.matchmaking_s / 2)
        if found is None or found[0].round < ahead or time.time() - found[1] > fresh_s:
            self.status.phase = "waiting-for-round"
            logger.info(
                "peers are at round %d, we are at %d: waiting for their next announcement", ahead, self.round
            )
            self._new_announcement.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._catch_up_wait_s()):
                    while True:
                        await self._new_announcement.wait()
                        self._new_announcement.clear()
                        newer = self._target()
                        if newer is not None and newer[0].round >= ahead and time.time() - newer[1] < 1:
                            break
            await self._refresh_members()
            found = self._target()
            if found is None or found[0].round <= self.round:
                logger.warning("no usable state announcement from peers ahead of us; training on")
                return
        await self._sync(found[0])

    def _counts(self, peer: str) -> bool:
        """Whether `peer`'s claims about the state it holds count (not us, not distrusted, not gone)."""
        return peer != self.identity.peer_id and peer not in self.distrusted and peer not in self.departed

    def _peer_rounds(self) -> dict[str, int]:
        """The latest round each other live peer claims to hold, from gossip and the DHT together."""
        out = {p: rec.round for p, rec in self.member_records.items() if self._counts(p)}
        for p, a in self.announced.items():
            if self._counts(p):
                out[p] = max(out.get(p, 0), a.round)
        return out

    def _catch_up_wait_s(self) -> float:
        """How long to wait for a fresh announcement before syncing a stale one: about two of the others'
        rounds when we have seen how long theirs take (if none comes by then they have probably stopped,
        and a stale state is still better than ours), else the round deadline."""
        a = self.manifest.averaging
        bound = a.round_deadline_s + 30.0
        period = self._round_period
        if period is None:
            # Not seen yet (we just started): estimate a round from the throughput peers put in their
            # signed membership records: H × batch × sequence tokens, plus matchmaking.
            rates = sorted(
                rec.throughput
                for p, rec in self.member_records.items()
                if rec.throughput > 0 and self._counts(p)
            )
            if not rates:
                return bound
            period = self.manifest.max_tokens_per_round() / rates[len(rates) // 2] + a.matchmaking_s
        return min(bound, 2.0 * period + a.matchmaking_s)

    async def _sync(self, st: SyncTarget) -> None:
        from intellect.node.net.statesync import SyncReport

        report = SyncReport()
        await self._fetch_and_adopt(st, report)
        if report.evidence:  # signed proof that a server lied: tell the run, whether or not we synced
            await self._report_misbehaviour(report.evidence, st.round)

    async def _fetch_and_adopt(self, st: SyncTarget, report: Any) -> None:
        from intellect.node.engine.outer import STEP_KEY
        from intellect.node.net.statesync import StateSyncError, fetch_state

        self.status.phase = "syncing"
        peers = st.peers
        target = st
        t0 = time.monotonic()
        try:
            snap = await fetch_state(
                self.dht.p2p,
                (),
                self.run_id,
                target=st,
                exclude=(self.identity.peer_id, *sorted(self.distrusted)),
                report=report,
                timeout=self.manifest.averaging.round_deadline_s + 60,
            )
        except StateSyncError as e:
            logger.warning("state sync of round %d failed: %s", target.round, e)
            await asyncio.sleep(1.0)
            return
        finally:
            self.status.bytes_received += sum(report.bytes_from.values())
            # Unreachable holders count as gone until they announce again (their DHT records linger).
            self.departed.update(p for p in report.unavailable if p in st.peers)
            for bad in report.bad_peers:
                logger.warning("peer %s served state that does not match its hash; no longer trusted", bad)
                self.status.rejected["bad_state_chunk"] += 1
                self.distrusted.add(bad)
        step = snap.tensors.get(STEP_KEY)
        if step is None or step.numel() != 1 or int(step) != snap.round:
            # The bytes match the announced hash, but the state is not of the announced round: whoever
            # vouched for (round, hash) misstated it. Do not adopt it, and stop believing them.
            logger.warning(
                "state announced as round %d holds %s outer steps; not used, its %d vouchers distrusted",
                snap.round,
                None if step is None or step.numel() != 1 else int(step),
                len(st.peers),
            )
            self.status.rejected["state_round_mismatch"] += 1
            self.distrusted.update(st.peers)
            return
        await asyncio.to_thread(self._load_synced, snap.tensors)
        self.round, self.state_hash = snap.round, snap.state_hash
        self._publish_status_state()
        seconds = time.monotonic() - t0
        self.status.last_sync = SyncOutcome(
            self.round, f"{len(peers)} peers", self.state_hash, seconds, time.time()
        )
        logger.info("synced state of round %d (%s) in %.2f s", self.round, self.state_hash[:12], seconds)
        await asyncio.to_thread(self._checkpoint_or_log)
        append_round_log(
            self.config.data_dir,
            {
                "round": self.round,
                "state_hash": self.state_hash,
                "loss": None,
                "synced": True,
                "bytes_sent": self.status.bytes_sent,
                "bytes_received": self.status.bytes_received,
                "ts": time.time(),
            },
        )
        await self._announce_state()

    def _load_synced(self, tensors: Any) -> None:
        # A new global state from peers: what compression owed our old trajectory no longer applies.
        self.residual = None
        self.outer.load_state_dict(tensors)
        self.outer.copy_to(self.model)

    async def _train(self, steps: int) -> Any:
        """Run `steps` inner steps in chunks of about TRAIN_CHUNK_S (a stop never waits for a whole round)."""
        from intellect.node.engine.trainer import InnerStats

        done, tokens, loss_sum, seconds, last = 0, 0, 0.0, 0.0, None
        while done < steps:
            n = min(self._chunk_steps, steps - done)
            t0 = time.monotonic()
            if self.local is not None:
                stats = await asyncio.to_thread(self.local.steps, n)
            else:
                stats = await self.trainer.run_inner(n)
            dt = time.monotonic() - t0
            self._chunk_steps = max(1, int(TRAIN_CHUNK_S * n / max(dt, 1e-6)))
            done += n
            tokens += stats.tokens
            loss_sum += stats.mean_loss * n
            seconds += dt
            last = stats
            self.status.tokens_per_s = tokens / seconds if seconds > 0 else 0.0
        assert last is not None
        return InnerStats(
            steps=done,
            tokens=tokens,
            mean_loss=loss_sum / max(1, done),
            last_loss=last.last_loss,
            tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
            lr=last.lr,
        )

    async def _round(self) -> None:
        r = self.round + 1
        m = self.manifest
        mine, seed = self._round_data(r)
        stream = self._rank0_stream(mine, seed)
        if self.local is not None:
            # Our local ranks start the round from our weights and optimizer, on their share of the shards.
            await asyncio.to_thread(self.local.begin_round, mine, seed, stream)
        else:
            self.trainer.stream = stream
        self.status.phase = "training"
        stats = await self._train(m.diloco.inner_steps)
        self.status.tokens += stats.tokens
        self.status.loss = stats.mean_loss
        self._last_stats = stats
        delta = await asyncio.to_thread(self._pseudo_gradient_with_feedback)
        self.status.phase = "averaging"
        t0 = time.monotonic()

        def overtaken() -> bool:
            # Someone still here holds a state past round r - 1: round r was averaged without us.
            return any(rr >= r for rr in self._peer_rounds().values())

        result = await self.averager.average(
            r,
            delta,
            weight=float(stats.tokens),
            deadline=time.time() + m.averaging.round_deadline_s,
            overtaken=overtaken,
        )
        seconds = time.monotonic() - t0
        self.status.bytes_sent += result.bytes_sent
        self.status.bytes_received += result.bytes_received
        self.status.last_allreduce = AllReduceOutcome(
            r, result.ok, seconds, len(result.group), result.reason or "", time.time()
        )
        if not result.ok or result.tensors is None:
            # STYLE 11: never step on a failed average. Keep θ, reset the local copy, catch up next round.
            self.status.rounds_failed += 1
            logger.warning("round %d: average failed (%s); keeping the global weights", r, result.reason)
            await asyncio.to_thread(self.outer.copy_to, self.model)
            return
        await asyncio.to_thread(self._keep_residual, delta, result.group)
        self.status.phase = "checkpointing"
        # The commit (outer step, hash, checkpoint) runs to completion even if we are stopped meanwhile:
        # a half-applied step must never be announced or checkpointed under the wrong round.
        self._pending_commit = asyncio.ensure_future(
            asyncio.to_thread(self._commit, r, result.tensors, stats)
        )
        await asyncio.shield(self._pending_commit)
        self._pending_commit = None
        self.round = r
        self._publish_status_state()
        self.status.rounds_ok += 1
        self.status.loss_history.append((r, stats.mean_loss))
        logger.info(
            "round %d done: loss %.4f, %d tokens, %.0f tok/s, group %d, all-reduce %.2f s, state %s",
            r,
            stats.mean_loss,
            stats.tokens,
            stats.tokens_per_s,
            len(result.group),
            seconds,
            self.state_hash[:12],
            extra={"event": "round", "round": r, "loss": stats.mean_loss, "state_hash": self.state_hash},
        )
        append_round_log(
            self.config.data_dir,
            {
                "round": r,
                "loss": stats.mean_loss,
                "state_hash": self.state_hash,
                "tokens": stats.tokens,
                "group_size": len(result.group),
                "allreduce_s": round(seconds, 3),
                "synced": False,
                "bytes_sent": self.status.bytes_sent,
                "bytes_received": self.status.bytes_received,
                "ts": time.time(),
            },
        )
        await self._announce_state()
        await self._publish_progress()

    def _commit(self, r: int, avg: Any, stats: Any) -> None:
        self.outer.step(avg)
        self.outer.copy_to(self.model)
        self.state_hash = self._hash_now()
        self._checkpoint_or_log(r)

    def _checkpoint_or_log(self, r: int | None = None) -> bool:
        """Write the checkpoint; on a full or failing disk log it, count it and train on. The state is
        still in memory (and served to peers), the previous checkpoint on disk is intact (writes are atomic),
        and the next round's checkpoint tries again; crashing here would lose the round for nothing."""
        from intellect.node.engine.checkpoint import CheckpointError

        try:
            self._checkpoint(r)
            return True
        except (OSError, CheckpointError) as e:
            self.status.checkpoint_errors += 1
            logger.error(
                "could not write the checkpoint of round %d (%s); training on with the state in memory, "
                "the next round retries",
                self.round if r is None else r,
                e,
            )
            return False

    def _pseudo_gradient_with_feedback(self) -> dict[str, Any]:
        """Δ = θ_global − θ_local, plus what compression lost of earlier rounds' Δ (error feedback)."""
        from intellect.node.net.allreduce import flatten, unflatten

        delta = self.outer.pseudo_gradient(self.model)
        if self.residual is None:
            return delta
        flat = flatten(delta)
        if flat.numel() != self.residual.numel():
            logger.warning("dropping an error-feedback residual of the wrong size")
            self.residual = None
            return delta
        flat.add_(self.residual)
        return unflatten(flat, delta)

    def _keep_residual(self, sent: dict[str, Any], group: list[str]) -> None:
        """After a completed all-reduce: remember what it lost of our contribution, for the next round."""
        from intellect.node.net.allreduce import flatten
        from intellect.node.net.averaging import contribution_error

        me = self.identity.peer_id
        if self.manifest.averaging.compression == "none" or me not in group:
            self.residual = None
            return
        err = contribution_error(flatten(sent), len(group), sorted(group).index(me), self.averager.codec)
        self.residual = err if bool(err.any()) else None

    def _checkpoint(self, r: int | None = None) -> None:
        r = self.round if r is None else r
        meta = {"round": r, "run_id": self.run_id, "state_hash": self.state_hash}
        self.global_store.save(self.outer.state_dict(), meta)
        tensors, tmeta = self.trainer.export_state()
        if self.residual is not None:
            tensors = {**tensors, RESIDUAL_TENSOR: self.residual}
        self.trainer_store.save(tensors, {"round": r, "trainer": tmeta})

    # ---- announcements -------------------------------------------------------------------------------

    async def _announce_state(self) -> None:
        """Make the current state servable and tell others: gossip CHECKPOINT, then DHT membership."""
        from intellect.node.net.statesync import StateSnapshot
        from intellect.protocol.gossip_messages import CheckpointAnnounce, TopicKind

        ann = await self.server.publish(StateSnapshot(self.round, self.state_hash, self.outer.state_dict()))
        msg = CheckpointAnnounce(self.round, self.state_hash, ann.total_bytes, ann.chunk_size)
        await self._gossip(TopicKind.CHECKPOINT, msg)
        await self._store_membership()

    async def _publish_progress(self) -> None:
        from intellect.protocol.gossip_messages import Progress, TopicKind

        s = self._last_stats
        await self._gossip(
            TopicKind.PROGRESS,
            Progress(
                self.round,
                self.trainer.step,
                self.status.tokens,
                float(s.mean_loss),
                float(s.tokens_per_s),
                self.state_hash,
            ),
        )

    async def _gossip(self, kind: Any, msg: Any) -> None:
        from intellect.node.net.gossip import GossipError

        try:
            await self.gossip.publish(kind, msg)
        except GossipError as e:
            # Gossip is the fast path; the DHT record carries the same facts, so a lost message is repaired.
            logger.warning("could not gossip %s: %s", type(msg).__name__, e)

    async def _store_membership(self) -> None:
        from intellect.protocol.records import MembershipRecord, seal_membership

        now_ = time.time()
        maddrs = tuple(
            m if "/p2p/" in m else f"{m}/p2p/{self.identity.peer_id}" for m in self.dht.visible_maddrs
        )[:16]
        # The gossip child reports what it bound (0.0.0.0 when listening everywhere): others must be
        # told an address they can dial.
        public = self._hosts()[1]
        gossip_addr = next(iter(self.gossip.listen_maddrs), "").replace("/ip4/0.0.0.0/", f"/ip4/{public}/")
        rec = MembershipRecord(
            self.run_id,
            self.identity.peer_id,
            maddrs,
            gossip_addr,
            self.round,
            float(self.status.tokens_per_s),
            "trainer",
            self.state_hash,
            now_,
            now_ + MEMBER_TTL_S,
            self.ticket,
        )
        try:
            ok = await self.dht.store_membership(seal_membership(self.identity, rec))
        except (TimeoutError, OSError) as e:
            logger.warning("could not store our membership record: %s", e)
            return
        if not ok:
            logger.debug("no DHT replica accepted our membership record (alone?)")

    async def _refresh_members(self) -> None:
        records = await self.dht.get_members(self.run_id)
        members = []
        addrs = []
        for rec in records:
            if not is_admitted(self.manifest, self.signed.researcher, rec.peer_id, rec.ticket):
                continue
            members.append(rec.peer_id)
            self.member_records[rec.peer_id] = rec
            if rec.ticket:
                self.members_tickets[rec.peer_id] = rec.ticket
            if rec.gossip_addr and rec.peer_id != self.identity.peer_id:
                addrs.append(rec.gossip_addr)
        if self.identity.peer_id not in members:
            members.append(self.identity.peer_id)
        self.members = sorted(members)
        self.status.peers = len(self.members)
        self.status.peer_ids = self.members
        self.gossip.add_peers(addrs)

    async def _membership_loop(self) -> None:
        while True:
            await self._store_membership()
            await self._refresh_members()
            self.status.rejected.clear()
            self.status.rejected.update(self.gossip.rejections)
            self.status.bytes_sent = max(self.status.bytes_sent, self.server.stats.bytes_sent)
            await asyncio.sleep(MEMBER_REFRESH_S if self.members[1:] else 2.0)

    async def _listen_checkpoints(self) -> None:
        from intellect.node.net.statesync import Vouch
        from intellect.protocol.gossip_messages import TopicKind

        with self.gossip.subscribe(TopicKind.CHECKPOINT) as sub:
            async for sender, msg in sub:
                if sender == self.identity.peer_id:
                    continue
                vouch = Vouch.from_checkpoint(sender, msg)  # a malformed hash is no claim; bad sizes no hint
                if vouch is None:
                    self.status.rejected["bad_checkpoint_announce"] += 1
                    continue
                now_ = time.time()
                self.departed.discard(sender)
                prev = self.announced.get(sender)
                if prev is not None and msg.round == prev.round + 1:
                    gap = now_ - prev.received_at
                    p = self._round_period
                    self._round_period = gap if p is None else 0.7 * p + 0.3 * gap
                self.announced[sender] = _Announced(
                    vouch.round, vouch.state_hash, vouch.total_bytes, vouch.chunk_size, now_
                )
                self._new_announcement.set()

    async def _listen_progress(self) -> None:
        from intellect.protocol.gossip_messages import TopicKind

        with self.gossip.subscribe(TopicKind.PROGRESS) as sub:
            async for sender, msg in sub:
                logger.debug("progress of %s: round %d loss %.4f", sender, msg.round, msg.loss)

    async def _listen_leaving(self) -> None:
        from intellect.protocol.gossip_messages import TopicKind

        with self.gossip.subscribe(TopicKind.LEAVING) as sub:
            async for sender, _msg in sub:
                logger.info("peer %s is leaving", sender)
                self.announced.pop(sender, None)
                self.departed.add(sender)
                self.members = [p for p in self.members if p != sender]
                self.status.peers = len(self.members)

    async def _listen_misbehaviour(self) -> None:
        from intellect.protocol.gossip_messages import TopicKind

        with self.gossip.subscribe(TopicKind.MISBEHAVIOUR) as sub:
            async for sender, msg in sub:
                self._on_misbehaviour(sender, msg)

    def _on_misbehaviour(self, sender: str, msg: Any) -> None:
        """Act on a gossiped misbehaviour report only if its evidence proves it against a state we hold."""
        from intellect.node.net.statesync import judge_report

        verdict = judge_report(msg, self.run_id, self.server.chunk_list)
        accused = msg.accused
        if verdict is None:
            logger.debug("report on %s from %s: we hold no copy of that state to check", accused, sender)
        elif not verdict:
            logger.warning("peer %s reported %s with evidence that does not hold; dropped", sender, accused)
            self.status.rejected["false_misbehaviour_report"] += 1
        elif accused != self.identity.peer_id and accused not in self.distrusted:
            logger.warning("peer %s proved that %s served a wrong chunk; no longer trusted", sender, accused)
            self.status.rejected["bad_state_chunk_reported"] += 1
            self.distrusted.add(accused)

    async def _report_misbehaviour(self, evidence: list[Any], round_: int) -> None:
        """Gossip each piece of transferable evidence a sync collected, so others stop trusting the server."""
        from intellect.node.net.gossip import GossipError
        from intellect.node.net.statesync import bad_chunk_report
        from intellect.protocol.gossip_messages import TopicKind

        # One proof per liar is enough, and a liar that corrupted every chunk must not make us flood.
        first = {ev.server: ev for ev in reversed(evidence)}
        for ev in first.values():
            try:
                await self.gossip.publish(TopicKind.MISBEHAVIOUR, bad_chunk_report(ev, round_))
            except GossipError as e:
                logger.warning("could not gossip the evidence against %s: %s", ev.server, e)

    async def _leave(self) -> None:
        """Shutdown path: finish a commit in flight, flush the checkpoint, gossip a leaving notice."""
        from intellect.protocol.gossip_messages import Leaving, TopicKind

        self.status.phase = "stopping"
        pending = self._pending_commit
        if pending is not None and not pending.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pending), 10.0)
            if pending.done() and pending.exception() is None:
                self.round += 1  # the commit finished after we were told to stop: it is the new state
                self._publish_status_state()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3.0):
                await self._gossip(TopicKind.LEAVING, Leaving(self.round, "shutdown"))


# ------------------------------------------------------------------------------------------------------
# Entry point with signal handling (the only place that touches signals).


def run_daemon(config: NodeConfig, options: DaemonOptions | None = None) -> int:
    """Run a daemon in a fresh event loop until it finishes or is signalled; return the exit code."""
    # Import the heavy stacks (torch, hivemind) before the loop starts: importing them takes seconds and
    # would otherwise stall the running loop (and trip the lag canary) on first use.

    code = asyncio.run(_main(config, options or DaemonOptions()))
    logger.info("daemon exited with code %d", code)
    return code


async def _main(config: NodeConfig, options: DaemonOptions) -> int:
    loop = asyncio.get_running_loop()
    daemon = NodeDaemon(config, options)
    signals_seen = 0

    def force_exit(why: str) -> None:
        # Last resort: no orderly path left. Kill what we started by PID so nothing outlives us.
        logger.error("%s: killing child processes and exiting now", why)
        daemon.children.kill_all()
        logging.shutdown()
        os._exit(EXIT_FORCED)

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

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await daemon.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            # The loop is closing but the process is not gone yet: a signal now (the "second Ctrl-C" of
            # someone whose first one just finished the shutdown) must still exit at once and quietly,
            # not raise KeyboardInterrupt in the interpreter's teardown (exit status -2).
            signal.signal(sig, _late_signal)


def _late_signal(signum: int, frame: object) -> None:
    logging.shutdown()
    os._exit(EXIT_FORCED)


def append_round_log(data_dir: Path, entry: dict[str, Any]) -> None:
    """Append one completed round to `<data dir>/rounds.jsonl` (flushed, so a reader sees whole lines).

    The log is for people and the swarm's summary, not state: on a full disk the line is dropped (logged),
    training goes on."""
    try:
        with open(Path(data_dir) / ROUNDS_LOG, "a") as f:
            f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            f.flush()
    except OSError as e:
        logger.error("could not append round %s to %s: %s", entry.get("round"), ROUNDS_LOG, e)


def load_identity(config: NodeConfig) -> Identity:
    """The node's identity, created on first start (as `intellect-node init` would)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    return Identity.load_or_create(config.identity_path)


def now() -> float:
    return time.time()


__all__ = [
    "EXIT_ERROR",
    "EXIT_FORCED",
    "EXIT_OK",
    "ROUNDS_LOG",
    "AllReduceOutcome",
    "DaemonOptions",
    "NodeDaemon",
    "SyncOutcome",
    "append_round_log",
    "load_identity",
    "run_daemon",
]
