"""The round machine: catch up, train, average, commit, announce; one explicit phase at a time.

A round r = (rounds held) + 1 passes frozen values from phase to phase (docs/architecture.md):

    decide (pure) ─> RoundPlan ─> train H inner steps ─> Δ with error feedback
      ─> all-reduce Δ weighted by tokens ─ failed ─> keep θ, reset the local copy (never step on it)
                                         ─ ok ─────> outer step, round and hash together, checkpoint, announce

Rounds need no coordinator: the round number is the global state's step count, which every member
announces (gossip, and the DHT records that repair lost gossip); a peer that sees others ahead waits a
bounded time for a fresh announcement, syncs the state most live peers vouch for and joins the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from intellect.node.engine.losscheck import LossCheckError
from intellect.node.engine.outer import OuterError
from intellect.node.engine.statehash import SerializedState
from intellect.node.engine.trainer import InnerStats
from intellect.node.net.allreduce import PayloadCodec
from intellect.node.net.averaging import AverageResult
from intellect.node.net.statesync import StateSnapshot, StateSyncError, SyncReport
from intellect.node.run import decide as rules
from intellect.node.run.events import Averaged, Committed, EventSink, RunReject, SyncFailed, Trained
from intellect.node.run.lifecycle import RunLifecycle, finish
from intellect.node.run.overlap import (
    abandon,
    announcement_wait_s,
    heal_fork,
    overlapped_round,
    start_landing,
    stop_landing,
)
from intellect.node.run.pause import PauseGate, hold
from intellect.node.run.peerbook import PeerBook
from intellect.node.run.phase import Phase, PhaseTracker
from intellect.node.run.state import GlobalState, Lost, StateView
from intellect.node.run.training import Pacer, RoundAbandoned, RoundTrainer, plan_round, train_round
from intellect.protocol.averaging_messages import Equivocation
from intellect.protocol.manifest import Manifest, ShardSpec
from intellect.protocol.matchmaking import bucket_count
from intellect.protocol.sync_messages import BadChunkEvidence
from intellect.protocol.vouching import SyncTarget

logger = logging.getLogger(__name__)

#: How often an intent is renewed while we train (it counts for twice that: a frozen node's lapses).
INTENT_S = 5.0
#: A node more than this share of a round behind the run (it committed the last round, or synced it, that
#: long after others announced it) trains a shorter round to meet the others in the next lobby in phase;
#: never shorter than MIN_ROUND_FRACTION of the manifest's inner steps. Its weight is the tokens it trained.
#: bench/matchmaking.py measures the effect (docs/decisions.md, "Stragglers").
CATCH_UP_AFTER, MIN_ROUND_FRACTION = 0.25, 0.25


@dataclass(frozen=True)
class TrainedRound:
    """The inner steps of round `round` are done; `delta` is what we contribute to its average."""

    round: int
    stats: InnerStats
    delta: dict[str, torch.Tensor]


@dataclass(frozen=True)
class AveragedRound:
    """A completed average of round `round`, ready to commit."""

    trained: TrainedRound
    result: AverageResult
    seconds: float
    #: What compression lost of our Δ, worked out in the background (`overlap.average_ahead`); None: by
    #: the commit.
    lost: Lost | None = None


class Averaging(Protocol):
    """The averager as the machine uses it (`net.averaging.Averager`)."""

    codec: PayloadCodec

    async def average(
        self,
        round: int,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        deadline: float,
        overtaken: Callable[[], bool] | None = None,
        expected: Collection[str] | None = None,
        holders: Callable[[], Collection[str]] | None = None,
    ) -> AverageResult: ...

    async def intend(self, round: int, eta: float, expected: Collection[str] | None, ttl: float) -> None: ...

    def ban(self, peers: Collection[str]) -> None:
        """Leave these peers out of every later group."""


class Publishing(Protocol):
    """What the machine announces (`run.announcer.Announcer`)."""

    async def state(
        self,
        view: StateView,
        tensors: Mapping[str, torch.Tensor],
        throughput: float,
        serialized: SerializedState | None = None,
    ) -> None: ...

    async def progress(
        self, view: StateView, step: int, tokens: int, loss: float, tokens_per_s: float
    ) -> None: ...

    async def misbehaviour(self, evidence: Sequence[BadChunkEvidence], round_: int) -> None: ...

    async def equivocation(self, evidence: Sequence[Equivocation], round_: int) -> None: ...

    async def leaving(self, round_: int, reason: str = "shutdown") -> None: ...


class Network(Protocol):
    """What the machine needs from the run's networking (implemented by `RunService`)."""

    shards: tuple[ShardSpec, ...]

    async def refresh_members(self) -> None:
        """Read the run's member records from the DHT into the peer book."""

    async def state(
        self, target: SyncTarget, distrusted: frozenset[str], report: SyncReport
    ) -> StateSnapshot:
        """Download and verify `target` from the peers that vouch for it (not from `distrusted`)."""
        ...


@dataclass(frozen=True)
class Limits:
    """When the machine stops, when it pauses, and how long it waits for company before round 1."""

    #: Stop after this many rounds completed by this machine (trained, averaged and committed here: a
    #: resumed or synced node counts from zero, and a failed round does not count).
    max_rounds: int | None = None
    min_peers: int = 1
    min_peers_timeout_s: float = 60.0
    #: Stop once the global state we hold has reached this round (however it got there: our own
    #: rounds, a checkpoint or a sync from peers).
    until_round: int | None = None
    #: Paused while closed (`run.pause`): the volunteer's `pause`, or a volunteer limit.
    pause: PauseGate = field(default_factory=PauseGate, compare=False)

    def reached(self, completed: int, round_: int) -> bool:
        """Whether a machine that completed `completed` rounds and holds the state of `round_` is done."""
        if self.max_rounds is not None and completed >= self.max_rounds:
            return True
        return self.until_round is not None and round_ >= self.until_round


class RoundMachine:
    """Drives rounds until `limits` says it is done (or forever); every collaborator is injected."""

    def __init__(
        self,
        me: str,
        run_id: str,
        manifest: Manifest,
        parts: tuple[PeerBook, GlobalState, RoundTrainer, Averaging, Publishing],
        net: Network,
        phases: PhaseTracker,
        emit: EventSink,
        limits: Limits,
    ) -> None:
        self.me, self.run_id, self.manifest = me, run_id, manifest
        self.book, self.state, self.trainer, self.averager, self.announcer = parts
        self.net = net
        self.phases = phases
        self._emit = emit
        self.limits = limits
        #: The run's final round (token budget, the researcher's end) and the researcher's orders.
        self.lifecycle = RunLifecycle(manifest, run_id, limits.pause, emit)
        self._pacer = Pacer()
        #: How long our last round's training took (our ETA in the next round's intents).
        self._train_s: float | None = None
        #: Seconds per inner step in our last round (what a catch-up round is cut by).
        self._step_s: float | None = None
        #: Throughput of our last round (what our membership record says).
        self.tokens_per_s = 0.0
        self.tokens = 0
        #: Rounds this machine trained, averaged and committed (what `Limits.max_rounds` counts).
        self.completed = 0
        #: Overlapped runs (`run.overlap`): the round whose average is in flight, and its task.
        self.overlapped = manifest.diloco.outer_update == "overlapped"
        self.inflight: tuple[int, asyncio.Task[AveragedRound | None]] | None = None
        #: Overlapped runs: nobody held the state our last round needed; train held + 1 next.
        self.lost_phase = False

    def done(self) -> bool:
        return self.limits.reached(self.completed, self.state.round) or self.lifecycle.ended(self.state.round)

    async def run(self) -> None:
        lim = self.limits
        if self.state.round == 0 and lim.min_peers > 1:
            await self.wait_for_peers(lim.min_peers, lim.min_peers_timeout_s)
        try:
            while not self.done():
                await hold(lim.pause, self.phases, self.announcer, self.state.round)
                if self.inflight is None:  # (mid-pipeline, the state we need comes with the average)
                    await self.catch_up()
                else:
                    await heal_fork(self)
                if self.done():
                    break
                if self.state.round == 0 and self.state.init_error is not None:
                    raise self.state.init_error  # training from another origin would poison every average
                await self.round()
        finally:
            await abandon(self)  # (only when stopped or failed mid-pipeline: nothing of it is applied)
        await self.state.flushed()  # the last commit's checkpoint, written behind, is on disk
        if self.lifecycle.ended(self.state.round):
            await finish(
                self.lifecycle, self.state.round, self.state.view().state_hash, self.book.peer_rounds
            )
        logger.info("completed %d rounds here, holding round %d: done", self.completed, self.state.round)

    async def wait_for_peers(self, n: int, timeout_s: float) -> None:
        self.phases.enter(Phase.WAITING_FOR_PEERS)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await self.net.refresh_members()
            if len(self.book.members) >= n:
                logger.info("%d members present; starting", len(self.book.members))
                return
            await asyncio.sleep(0.5)
        logger.warning(
            "only %d of %d peers after %.0f s; starting anyway", len(self.book.members), n, timeout_s
        )

    # ---- catching up ---------------------------------------------------------------------------------

    def _view(self) -> rules.View:
        found = self.book.target()
        target, heard = found if found is not None else (None, 0.0)
        ahead = max(self.book.peer_rounds().values(), default=0)
        ours = self.state.view()
        side = self.book.vouchers(ours.round, ours.state_hash)
        one = bucket_count(len(self.book.members), self.manifest.averaging.group_size) < 2
        return rules.View(self.state.round, ahead, target, heard, time.time(), ours.state_hash, side, one)

    async def catch_up(self) -> None:
        """Sync from peers when they are at a later round than ours (newcomer, laggard, failed round)."""
        await self.net.refresh_members()
        fresh_s = rules.fresh_window_s(self.manifest.averaging.matchmaking_s)
        decision = rules.decide(self._view(), fresh_s)
        if decision.action is rules.Action.WAIT:
            await wait_for_announcement(self, decision.ahead)
            await self.net.refresh_members()
            decision = rules.decide(self._view(), fresh_s, waited=True)
            if decision.action is rules.Action.TRAIN:
                logger.warning("no usable state announcement from peers ahead of us; training on")
        if decision.action is rules.Action.SYNC and decision.target is not None:
            await self.sync(decision.target)

    async def sync(self, target: SyncTarget) -> None:
        """Fetch, verify and adopt `target`; gossip any proof that a server lied, whether or not it worked."""
        self.phases.enter(Phase.SYNCING)
        report = SyncReport()
        await self._fetch_and_adopt(target, report)
        if report.evidence:
            await self.announcer.misbehaviour(report.evidence, target.round)

    async def _fetch_and_adopt(self, target: SyncTarget, report: SyncReport) -> None:
        t0 = time.monotonic()
        try:
            snap = await self.net.state(target, self.book.distrusted, report)
        except StateSyncError as e:
            logger.warning("state sync of round %d failed: %s", target.round, e)
            self._emit(SyncFailed(target.round, str(e), sum(report.bytes_from.values())))
            await asyncio.sleep(1.0)
            return
        finally:
            self.book.unreachable(p for p in report.unavailable if p in target.peers)
            self.book.caught_serving_bad_chunks(report.bad_peers)
        steps = self.state.step_count(snap.tensors)
        if steps != snap.round:
            # The bytes match the announced hash, but the state is not of the announced round: whoever
            # vouched for (round, hash) misstated it. Do not adopt it, and stop believing them.
            logger.warning(
                "state announced as round %d holds %s outer steps; not used, its %d vouchers distrusted",
                snap.round,
                steps,
                len(target.peers),
            )
            self._emit(SyncFailed(target.round, "round mismatch", sum(report.bytes_from.values())))
            self.book.misstated_round(target.peers)
            return
        seconds = time.monotonic() - t0
        got = sum(report.bytes_from.values())
        try:
            await self.state.adopt(
                snap.round, snap.state_hash, snap.tensors, f"{len(target.peers)} peers", seconds, got
            )
        except OuterError as e:
            # The bytes match the hash its vouchers announced, but our model cannot use the state, or its
            # held-out loss says it is no trained state of this run (scaled, noise, reset): either way
            # whoever vouched for it is not to be believed again. Our state and model are unchanged. A
            # trained state only worse than ours (`soft`) is refused for now, its vouchers still trusted.
            failed_loss = isinstance(e, LossCheckError)
            soft = isinstance(e, LossCheckError) and e.soft
            outcome = "refused for now" if soft else f"its {len(target.peers)} vouchers distrusted"
            logger.warning("state of round %d not adopted (%s); %s", snap.round, e, outcome)
            self._emit(SyncFailed(target.round, str(e) if failed_loss else f"unusable state: {e}", got))
            reason = RunReject.FAILED_LOSS_CHECK if failed_loss else RunReject.UNUSABLE_STATE
            if not soft:
                self.book.vouched_unusable_state(target.peers, reason)
            return
        logger.info("synced state of round %d (%s) in %.2f s", snap.round, snap.state_hash[:12], seconds)
        await self.announcer.state(self.state.view(), self.state.outer_state(), self.tokens_per_s)

    # ---- a round -------------------------------------------------------------------------------------

    async def round(self) -> None:
        if self.overlapped:
            return await overlapped_round(self)
        try:
            trained = await self.train(self.state.round + 1)
        except RoundAbandoned as e:  # paused: like a failed average, θ kept and the local copy reset
            return await self.state.discard_local(f"round {self.state.round + 1} abandoned: {e}")
        averaged = await self.average(trained)
        if averaged is not None:
            await self.commit(averaged)

    async def train(self, r: int) -> TrainedRound:
        plan = plan_round(self.run_id, r, self.me, self.book.members, self.net.shards)
        await self.trainer.begin_round(plan)
        self.phases.enter(Phase.TRAINING)
        # While we train, our intent in round r's lobby lets its leader wait for us (and tells a frozen us
        # apart from a slow one: the intent stops being renewed).
        t0 = time.monotonic()
        intent = asyncio.create_task(self._intend(r, t0), name="intent")
        landing = start_landing(self)  # (overlapped: the average in flight commits as soon as it completes)
        try:
            steps, paused, idle = self._steps_for(r), self.limits.pause.closed, self.state.model_idle
            stats = await train_round(self.trainer, steps, self._emit, self._pacer, paused, idle)
        finally:
            await stop_landing(self, landing)
            intent.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await intent
        self._train_s = time.monotonic() - t0
        self._step_s = self._train_s / max(1, stats.steps)
        self.tokens += stats.tokens
        self.tokens_per_s = stats.tokens_per_s
        self._emit(Trained(r, stats.steps, stats.tokens, stats.mean_loss, stats.tokens_per_s))
        return TrainedRound(r, stats, await self.state.pseudo_gradient(consume=self.overlapped))

    def _steps_for(self, r: int) -> int:
        """Inner steps of round r: the manifest's, fewer when we are far behind the run (CATCH_UP_AFTER)."""
        return catch_up_steps(self, r)

    def _expected(self, r: int) -> list[str]:
        """Who we expect in round r's lobbies: every counted member of the run, not only who finished
        round r - 1 (the bucket count follows their number; a leader gives one behind only a moment)."""
        return [p for p in self.book.members if p == self.me or self.book.counts(p)]

    async def _intend(self, r: int, started: float) -> None:
        while True:
            eta = max(0.0, (self._train_s or 0.0) - (time.monotonic() - started))
            try:
                await self.averager.intend(r, eta, self._expected(r), ttl=2 * INTENT_S)
            except Exception as e:  # the DHT is best effort here; the heartbeat after training is what counts
                logger.debug("could not store our intent for round %d: %s", r, e)
            await asyncio.sleep(INTENT_S)

    async def average(self, trained: TrainedRound, background: bool = False) -> AveragedRound | None:
        """All-reduce our Δ; None (θ kept, local copy reset) unless the average completed. `background`:
        an overlapped run's average, while the next round trains (no phase, the local copy left alone)."""
        if not background:
            self.phases.enter(Phase.AVERAGING)
        r = trained.round
        t0 = time.monotonic()

        def holders() -> list[str]:
            # Counted peers still here that hold a state past round r - 1.
            return [p for p, rr in self.book.peer_rounds().items() if rr >= r]

        def overtaken() -> bool:
            # Someone still here holds a state past round r - 1: round r was averaged without us.
            return bool(holders())

        # A peer we no longer trust (it lied about a state, or signed two different averages) is left out of
        # our groups as well: what it contributes or reduces would not be checked any better next time.
        self.averager.ban(self.book.distrusted)
        result = await self.averager.average(
            r,
            trained.delta,
            weight=float(trained.stats.tokens),
            deadline=time.time() + self.manifest.averaging.round_deadline_s,
            overtaken=overtaken,
            expected=self._expected(r),
            holders=holders,
        )
        seconds = time.monotonic() - t0
        if result.evidence:
            self.book.caught_equivocating(ev.owner for ev in result.evidence)
            await self.announcer.equivocation(result.evidence, r)
        self._emit(
            Averaged(
                r,
                result.ok,
                seconds,
                len(result.group),
                result.reason or "",
                result.bytes_sent,
                result.bytes_received,
            )
        )
        if not result.ok or result.tensors is None:
            # STYLE 11: never step on a failed average. Keep θ, reset the local copy, catch up next round.
            logger.warning("round %d: average failed (%s); keeping the global weights", r, result.reason)
            if not background:
                await self.state.discard_local()
            return None
        return AveragedRound(trained, result, seconds)

    async def commit(self, averaged: AveragedRound, mid_round: bool = False) -> None:
        """Apply a completed average (`mid_round`: while the next round trains, `overlap.start_landing`)."""
        if not mid_round:
            self.phases.enter(Phase.CHECKPOINTING)
        t, res = averaged.trained, averaged.result
        assert res.tensors is not None
        group, codec, sizes, lost = list(res.group), self.averager.codec, res.part_sizes, averaged.lost
        await self.state.commit(t.round, res.tensors, t.delta, group, self.me, codec, sizes, mid_round, lost)
        self.completed += 1
        view = self.state.view()
        stats = t.stats
        logger.info(
            "round %d done: loss %.4f, %d tokens, %.0f tok/s, group %d, all-reduce %.2f s, state %s",
            t.round,
            stats.mean_loss,
            stats.tokens,
            stats.tokens_per_s,
            len(res.group),
            averaged.seconds,
            view.state_hash[:12],
            extra={
                "event": "round",
                "round": t.round,
                "loss": stats.mean_loss,
                "state_hash": view.state_hash,
            },
        )
        n, secs = len(res.group), averaged.seconds
        self._emit(Committed(t.round, view.state_hash, stats.mean_loss, stats.tokens, n, secs, mid_round))
        await self.announcer.state(view, self.state.outer_state(), self.tokens_per_s, self.state.serialized())
        await self.announcer.progress(
            view, self.trainer.trainer.step, self.tokens, stats.mean_loss, stats.tokens_per_s
        )


def catch_up_steps(m: RoundMachine, r: int) -> int:
    """`RoundMachine._steps_for`: the manifest's inner steps, or fewer far behind a multi-lobby run."""
    full = m.manifest.diloco.inner_steps
    reached = m.book.round_reached_at(r - 1)
    if reached is None or not m._step_s:
        return full
    if bucket_count(len(m._expected(r)) + 1, m.manifest.averaging.group_size) < 2:
        # One lobby for the whole run: its leader waits for every expected peer by its intent, and a
        # peer arriving early only changes who leads (the 4-daemon freeze test split such a round).
        return full
    behind = m.book.now() - reached
    if behind <= CATCH_UP_AFTER * full * m._step_s:
        return full
    steps = max(math.ceil(full * MIN_ROUND_FRACTION), full - int(behind / m._step_s))
    logger.info("round %d: %.1f s behind the run; training %d of %d inner steps", r, behind, steps, full)
    return steps


async def wait_for_announcement(m: RoundMachine, ahead: int) -> None:
    """`RoundMachine.catch_up`: wait (bounded) for a fresh announcement of the state peers ahead hold."""
    m.phases.enter(Phase.WAITING_FOR_ROUND)
    logger.info(
        "peers are at round %d, we are at %d: waiting for their next announcement",
        ahead,
        m.state.round,
    )
    wait_s = announcement_wait_s(m)
    m.book.new_announcement.clear()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            while True:
                await m.book.new_announcement.wait()
                m.book.new_announcement.clear()
                found = m.book.target()
                if found is not None and rules.wait_is_over(found[0], found[1], ahead, time.time()):
                    return
