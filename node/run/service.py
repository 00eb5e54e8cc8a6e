"""One run on this node: builds the engine and the run's services, then hands the rounds to the machine.

`RunService.run()` owns, in order: the engine (model, trainer, local ranks), the global state (resumed or
initial), the state server and the averager, the gossip listeners and the membership refresh, and the
`RoundMachine`; on the way out it lets a commit in flight finish and tells the run it is leaving.
docs/architecture.md shows where it sits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intellect.crypto.identity import Identity
from intellect.node.engine.diskcap import DiskCap
from intellect.node.net.averaging import Averager, AveragerConfig
from intellect.node.net.control import read_controls
from intellect.node.net.dht import DhtService
from intellect.node.net.gossip import GossipService
from intellect.node.net.membership import MembershipService
from intellect.node.net.receiptnet import ReceiptBook, ReceiptLedger
from intellect.node.net.rolloutlink import RolloutReceiver
from intellect.node.net.statesync import StateServer, StateSnapshot, SyncReport, fetch_state
from intellect.node.net.transport import Libp2pTransport
from intellect.node.run.announcer import Announcer
from intellect.node.run.events import EventSink, GossipCounters, StateServed
from intellect.node.run.lifecycle import watch_control
from intellect.node.run.machine import Limits, RoundMachine
from intellect.node.run.peerbook import PeerBook
from intellect.node.run.phase import Phase, PhaseTracker
from intellect.node.run.rltrainer import ROLLOUT_EVIDENCE, RlRoundTrainer
from intellect.node.run.state import GlobalState
from intellect.node.run.training import Engine, EngineSettings, build_engine
from intellect.protocol.gossip_messages import Misbehaviour
from intellect.protocol.keys import TopicKind
from intellect.protocol.manifest import ShardSpec, SignedManifest
from intellect.protocol.vouching import SyncTarget

logger = logging.getLogger(__name__)

#: Membership refresh period while others are present (a third of the record TTL survives lost refreshes);
#: alone, every 2 s, so that a newcomer is noticed quickly.
MEMBER_REFRESH_S = 20.0
ALONE_REFRESH_S = 2.0
#: How long shutdown waits for a commit in flight before leaving.
SETTLE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RunSettings:
    """What the run needs from the node's configuration (built by the app layer)."""

    engine: EngineSettings
    limits: Limits = field(default_factory=Limits)


class RunService:
    """Runs one verified run until the machine's limits or cancellation (see the module docstring)."""

    def __init__(
        self,
        settings: RunSettings,
        identity: Identity,
        signed: SignedManifest,
        net: tuple[DhtService, GossipService, MembershipService],
        phases: PhaseTracker,
        emit: EventSink,
        on_child_pids: Callable[[Sequence[int]], None] = lambda pids: None,
        ledger: ReceiptLedger | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.signed = signed
        self.run_id = signed.run_id
        self.dht, self.gossip, self.membership = net
        self.phases = phases
        self._emit = emit
        self._on_child_pids = on_child_pids
        self.book = PeerBook(identity.peer_id, self.run_id, emit)
        self.shards: tuple[ShardSpec, ...] = tuple(signed.manifest.shards)
        #: The verified receipts this node saw, counted per peer (`/metrics` reads it).
        self.ledger = ledger or ReceiptLedger()
        self._publishing: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        self.phases.enter(Phase.LOADING)
        await asyncio.to_thread(keep_manifest, self.settings.engine.data_dir, self.signed)
        engine = await asyncio.to_thread(build_engine, self.signed.manifest, self.settings.engine)
        self._on_child_pids(engine.pids)
        try:
            state = self.global_state(engine)
            await state.start(self.settings.engine.data_dir, self.signed.manifest.init.sha256)
            await self._serve(engine, state)
        finally:
            await engine.trainer.close()

    def global_state(self, engine: Engine) -> GlobalState:
        return make_global_state(self.run_id, engine, self.settings.engine, self._emit)

    async def _serve(self, engine: Engine, state: GlobalState) -> None:
        admits = self.membership.admits
        rl = engine.trainer if isinstance(engine.trainer, RlRoundTrainer) else None
        async with (
            StateServer(self.dht.p2p, self.identity, self.run_id, admitted=admits) as server,
            self._averager() as averager,
            self._rollouts(rl, state),
        ):
            announcer = Announcer(self.gossip, self.membership, server)
            receipts = self._receipts()
            averager.on_receipt = receipts.ours
            parts = (self.book, state, engine.trainer, averager, announcer)
            machine = RoundMachine(
                self.identity.peer_id,
                self.run_id,
                self.signed.manifest,
                parts,
                self,
                self.phases,
                self._emit,
                self.settings.limits,
            )
            await announcer.state(state.view(), state.outer_state(), 0.0)
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(
                        self._listen(TopicKind.CHECKPOINT, self.book.on_checkpoint), name="checkpoints"
                    ),
                    tg.create_task(self._listen(TopicKind.PROGRESS, self.book.on_progress), name="progress"),
                    tg.create_task(
                        self._listen(TopicKind.LEAVING, lambda s, m: self.book.on_leaving(s)), name="leaving"
                    ),
                    tg.create_task(
                        self._listen(
                            TopicKind.MISBEHAVIOUR,
                            lambda s, m: self._misbehaviour(s, m, server, rl),
                        ),
                        name="misbehaviour",
                    ),
                    tg.create_task(
                        self._membership_loop(announcer, state, machine, server), name="membership"
                    ),
                    tg.create_task(
                        watch_control(machine.lifecycle, lambda: read_controls(self.dht, self.run_id)),
                        name="control",
                    ),
                    tg.create_task(receipts.run(), name="receipts"),
                    tg.create_task(self._listen(TopicKind.RECEIPT, receipts.received), name="receipt-gossip"),
                ]
                try:
                    await machine.run()
                finally:
                    self.phases.enter(Phase.STOPPING)
                    await state.settle(SETTLE_TIMEOUT_S)
                    await announcer.leaving(state.round)
                    for t in tasks:
                        t.cancel()

    def _misbehaviour(
        self, sender: str, msg: Misbehaviour, server: StateServer, rl: RlRoundTrainer | None
    ) -> None:
        if msg.kind == ROLLOUT_EVIDENCE:  # against a rollout worker, which is no member: the trainer's
            if rl is not None:
                rl.on_gossip(sender, msg)
            return
        self.book.on_misbehaviour(sender, msg, server.chunk_list)

    def _rollouts(
        self, rl: RlRoundTrainer | None, state: GlobalState
    ) -> contextlib.AbstractAsyncContextManager[object]:
        """An RL trainer takes rollout streams and gossips its evidence (nothing for a pretraining run)."""
        if rl is None:
            return contextlib.nullcontext()
        rl.attach(state)

        def publish(msg: Misbehaviour) -> None:
            task = asyncio.create_task(
                self.gossip.publish(TopicKind.MISBEHAVIOUR, msg), name="rollout-evidence"
            )
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

        rl.publish = publish
        return RolloutReceiver(self.dht.p2p, rl.offer, rl.screen)

    def _receipts(self) -> ReceiptBook:
        """Publishes our groups' receipts, keeps the valid ones others gossip (`net.receiptnet`)."""
        root = data_root(self.settings.engine.data_dir, self.run_id)
        run = (self.run_id, float(self.signed.manifest.max_tokens_per_round()))
        return ReceiptBook(self.dht, self.gossip, run, root / "receipts", self.ledger)

    def _averager(self) -> Averager:
        m = self.signed.manifest
        a = m.averaging
        cfg = AveragerConfig(
            min_group_size=a.min_group,
            target_group_size=a.group_size,
            matchmaking_time=a.matchmaking_s,
            compression=a.compression,
            max_weight=float(m.max_tokens_per_round()),
            reducer=a.reducer,
            receipts_dir=data_root(self.settings.engine.data_dir, self.run_id) / "receipts",
        )
        # Members reach each other's data plane by peer ID over the node's libp2p connections.
        return Averager(
            self.dht,
            self.identity,
            self.run_id,
            cfg,
            admitted=self.membership.admits,
            transport=Libp2pTransport(self.dht.p2p, connect=self._connect),
            # Behind a NAT nobody can open a connection to us: we contribute and receive, owners reduce.
            owner=not self.dht.private,
        )

    async def _connect(self, peer: str) -> bool:
        """Reach `peer` through the addresses of its membership record (circuit addresses behind a NAT)."""
        return await self.dht.connect(peer, self.book.addresses(peer))

    async def _listen(self, kind: TopicKind, handle: Callable[[str, Any], object]) -> None:
        with self.gossip.subscribe(kind) as sub:
            async for sender, msg in sub:
                handle(sender, msg)
                self._emit(self._gossip_counters())

    def _gossip_counters(self) -> GossipCounters:
        g = self.gossip
        return GossipCounters(dict(g.rejections), sum(g.delivered.values()), len(g.peers), g.authors)

    async def _membership_loop(
        self, announcer: Announcer, state: GlobalState, machine: RoundMachine, server: StateServer
    ) -> None:
        while True:
            if not self.settings.limits.pause.paused:  # a paused node left the run: no record keeps it in
                await announcer.membership_record(state.view(), machine.tokens_per_s)
            await self.refresh_members()
            self._emit(self._gossip_counters())
            self._emit(StateServed(server.stats.bytes_sent))
            await asyncio.sleep(MEMBER_REFRESH_S if len(self.book.members) > 1 else ALONE_REFRESH_S)

    # ---- the machine's `Network` ---------------------------------------------------------------------

    async def refresh_members(self) -> None:
        records = await self.membership.members()
        self.book.on_members(records)
        me = self.identity.peer_id
        self.gossip.set_peers((r.peer_id, r.maddrs) for r in records if r.peer_id != me)

    async def state(
        self, target: SyncTarget, distrusted: frozenset[str], report: SyncReport
    ) -> StateSnapshot:
        return await fetch_state(
            self.dht.p2p,
            (),
            self.run_id,
            target=target,
            exclude=(self.identity.peer_id, *sorted(distrusted)),
            report=report,
            timeout=self.signed.manifest.averaging.round_deadline_s + 60,
        )


def make_global_state(run_id: str, engine: Engine, settings: EngineSettings, emit: EventSink) -> GlobalState:
    """The run's global state over `engine`, its checkpoints under the data directory, under the disk cap."""
    root = data_root(settings.data_dir, run_id)
    trainer, check = engine.trainer.trainer, engine.loss_check
    disk = DiskCap(settings.data_dir, settings.max_disk_bytes) if settings.max_disk_bytes else None
    return GlobalState(run_id, engine.model, engine.outer, trainer, root, emit, check, disk)


def data_root(data_dir: Path, run_id: str) -> Path:
    """Where a run's checkpoints live under the data dir."""
    return data_dir / "runs" / run_id[:16]


#: The signed manifest a node keeps beside the run's checkpoints (`keep_manifest`).
MANIFEST_FILE = "manifest.signed"


def keep_manifest(data_dir: Path, signed: SignedManifest) -> None:
    """Keep the run's signed manifest beside its checkpoints (written whole, then renamed into place), so
    that `export` and `eval` know the model and tokenizer of a run's states without the DHT. Best effort: a
    full disk is logged, not fatal (the manifest is in the DHT and the node needs no local copy)."""
    root = data_root(data_dir, signed.run_id)
    tmp = root / f"{MANIFEST_FILE}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(signed.to_bytes())
        tmp.replace(root / MANIFEST_FILE)
    except OSError as e:
        logger.warning("could not keep the run's manifest in %s: %s", root, e)
        tmp.unlink(missing_ok=True)
