"""The `rollout` role of an RL run: follow the committed policy, generate, sign and stream batches.

A rollout worker is not a member of the run: it publishes no membership record, so no trainer ever
waits for it in a lobby or counts it in a group, and it can come and go at any time. It reads the
trainers' signed membership records from the DHT (every `REFRESH_S`, and at once when a trainer's reply
says the policy moved on); the state most of them vouch for (`PeerBook.target`, the same rule a member
uses) is the newest policy, fetched with the verified state sync (`net.statesync`: every chunk checked
against the Merkle root the vouchers signed) and loaded only when the model accepts its tensors.

With policy version v it generates batch `seq` = 0, 1, … of v (`engine.rollout.rollout_batch`: the
prompts of `prompt_seed(run, v, worker, seq)`, `samples_per_prompt` completions each, scored, signed) in
a worker thread, and sends it over one rollout stream (`net.rolloutlink`) to a trainer that holds v,
picked by rendezvous hashing of (run, v, worker, seq) over the trainers, so that batches spread over
trainers without coordination; a trainer whose inbox is full answers "full" and the next one is tried,
and when all are full the worker waits (back-pressure). A batch that has become older than
`max_async_level` versions is dropped rather than sent.

Every batch appends one JSON line to `<data dir>/rollouts.jsonl` (version, seq, trainer, outcome, mean
reward, thread CPU seconds of making it): what `intellect-node swarm --rl` and the tests read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from intellect.crypto.identity import Identity
from intellect.node.engine.model import Llama, ModelConfig
from intellect.node.engine.outer import OuterError, OuterOptimizer
from intellect.node.engine.rlenv import load_environment
from intellect.node.engine.rollout import Policy, rollout_batch
from intellect.node.engine.tokenizer import load_tokenizer
from intellect.node.net.dht import DhtService
from intellect.node.net.membership import MembershipService
from intellect.node.net.rolloutlink import SendFailed, send_batch
from intellect.node.net.statesync import StateSyncError, SyncReport, fetch_state
from intellect.node.run.events import EventSink, StateChanged
from intellect.node.run.peerbook import PeerBook
from intellect.protocol.manifest import RlSpec, SignedManifest
from intellect.protocol.rollouts import MAX_SEQ, RolloutBatch, RolloutReply, encode_batch

logger = logging.getLogger(__name__)

#: Seconds between two reads of the trainers' membership records.
REFRESH_S = 2.0
#: Wait when every trainer's inbox is full, or no trainer holds our version yet.
BACKOFF_S = 0.5
#: The per-batch log of a worker, in its data directory.
ROLLOUT_LOG = "rollouts.jsonl"


@dataclass
class WorkerStats:
    """What a worker did (exposed for status and tests)."""

    batches: int = 0
    accepted: int = 0
    refused: int = 0
    dropped_stale: int = 0
    syncs: int = 0
    #: Thread CPU seconds of making batches.
    generation_s: float = 0.0


def rank_trainers(run_id: str, version: int, worker: str, seq: int, trainers: list[str]) -> list[str]:
    """Trainers in rendezvous order for one batch: each batch prefers another trainer, nobody assigns."""

    def weight(t: str) -> bytes:
        return hashlib.sha256(f"{run_id}|{version}|{worker}|{seq}|{t}".encode()).digest()

    return sorted(trainers, key=weight)


class RolloutWorker:
    """One rollout worker of an RL run (see the module docstring). `run()` until cancelled."""

    def __init__(
        self,
        identity: Identity,
        signed: SignedManifest,
        net: tuple[DhtService, MembershipService],
        data_dir: Path,
        emit: EventSink,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        if signed.manifest.rl is None:
            raise ValueError(f"run {signed.run_id[:16]} is not an RL run (kind = {signed.manifest.kind!r})")
        self.identity, self.signed = identity, signed
        self.run_id, self.manifest = signed.run_id, signed.manifest
        self.rl: RlSpec = signed.manifest.rl
        self.dht, self.membership = net
        self._emit, self._paused = emit, paused
        self.book = PeerBook(identity.peer_id, self.run_id, emit)
        m = self.manifest
        self.tokenizer = load_tokenizer(
            "byte" if m.tokenizer.kind == "byte" else m.tokenizer.uri, m.tokenizer.sha256 or None
        )
        self.env = load_environment(self.rl.env)
        self.model = Llama(ModelConfig.from_dict(m.model.to_dict()), seed=m.init.seed).eval()
        d = m.diloco
        self.outer = OuterOptimizer.from_model(
            self.model, lr=d.outer_lr, momentum=d.outer_momentum, nesterov=d.nesterov
        )
        self.policy: Policy | None = None
        self.seq = 0
        self.stats = WorkerStats()
        self._generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)
        self._log = data_dir / ROLLOUT_LOG
        self._refreshed = 0.0
        self._newer = False
        #: Called once, when the first policy version is loaded (the daemon's phase: generating).
        self.on_first_policy: Callable[[], None] = lambda: None

    async def run(self, until_version: int | None = None) -> None:
        """Generate and stream batches until cancelled, or until the policy reaches `until_version`."""
        while True:
            if until_version is not None and self.policy is not None and self.policy.version >= until_version:
                logger.info("policy version %d reached; the worker stops", self.policy.version)
                return
            if self._paused():
                await asyncio.sleep(BACKOFF_S)
                continue
            await self._follow()
            if self.policy is None or self.seq >= MAX_SEQ:
                await asyncio.sleep(BACKOFF_S)
                continue
            await self._one_batch(self.policy)

    # ---- following the policy -----------------------------------------------------------------------

    async def _follow(self) -> None:
        """Read the trainers' records when due, and sync when most of them vouch for a newer state."""
        if not self._newer and time.monotonic() - self._refreshed < REFRESH_S and self.policy is not None:
            return
        self._newer = False
        self._refreshed = time.monotonic()
        try:
            self.book.on_members(await self.membership.members())
        except (TimeoutError, OSError) as e:
            logger.warning("could not read the run's members: %s", e)
            return
        found = self.book.target()
        if found is None:
            return
        target, _ = found
        have = self.policy
        if have is not None and (target.round, target.state_hash) == (have.version, have.state_hash):
            return
        if have is not None and target.round < have.version:
            return
        report = SyncReport()
        try:
            snap = await fetch_state(
                self.dht.p2p,
                (),
                self.run_id,
                target=target,
                exclude=(self.identity.peer_id, *sorted(self.book.distrusted)),
                report=report,
                timeout=self.manifest.averaging.round_deadline_s + 60,
            )
        except StateSyncError as e:
            logger.warning("could not sync policy version %d: %s", target.round, e)
            self.book.caught_serving_bad_chunks(report.bad_peers)
            return
        self.book.caught_serving_bad_chunks(report.bad_peers)
        try:
            await asyncio.to_thread(self._load, snap.tensors)
        except OuterError as e:
            logger.warning("policy version %d is unusable (%s); its vouchers distrusted", snap.round, e)
            self.book.vouched_unusable_state(target.peers)
            return
        if self.policy is None:
            self.on_first_policy()
        self.policy = Policy(snap.round, snap.state_hash, self.model)
        self.seq = 0
        self.stats.syncs += 1
        self._emit(StateChanged(snap.round, snap.state_hash))
        logger.info(
            "policy version %d (%s) synced in %.2f s", snap.round, snap.state_hash[:12], report.seconds
        )

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.outer.check_state_dict(tensors)  # names, shapes, dtypes, finiteness: before anything changes
        self.outer.load_state_dict(tensors)
        self.outer.copy_to(self.model)

    # ---- one batch ----------------------------------------------------------------------------------

    async def _one_batch(self, policy: Policy) -> None:
        seq = self.seq
        self.seq += 1
        batch, cpu_s = await asyncio.to_thread(self._timed_generate, policy, seq)
        self.stats.generation_s += cpu_s
        self.stats.batches += 1
        data = encode_batch(batch)
        reply, trainer = await self._deliver(batch, data)
        self._record(batch, trainer, reply, cpu_s)

    def _timed_generate(self, policy: Policy, seq: int) -> tuple[RolloutBatch, float]:
        """The batch and the thread CPU seconds it took (generation, scoring, signing)."""
        t0 = time.thread_time()
        batch = self._generate(policy, seq)
        return batch, time.thread_time() - t0

    def _generate(self, policy: Policy, seq: int) -> RolloutBatch:
        """Make batch `seq` of `policy` (a seam for the fault-injection tests: a cheating worker)."""
        return rollout_batch(
            self.identity,
            self.run_id,
            self.rl,
            self.env,
            self.tokenizer,
            policy,
            seq,
            self._generator,
            time.time(),
        )

    async def _deliver(self, batch: RolloutBatch, data: bytes) -> tuple[RolloutReply | None, str]:
        """Send to the first trainer in rendezvous order that takes it; wait while all are full."""
        while True:
            rounds = self.book.peer_rounds()
            holders = [t for t, r in rounds.items() if r >= batch.version]
            order = rank_trainers(self.run_id, batch.version, self.identity.peer_id, batch.seq, holders)
            for trainer in order:
                try:
                    reply = await send_batch(self.dht.p2p, trainer, data)
                except SendFailed as e:
                    logger.debug("batch %d/%d to %s: %s", batch.version, batch.seq, trainer, e)
                    continue
                if reply.version > batch.version:
                    self._newer = True  # the policy moved on: read the records before the next batch
                if reply.outcome in ("full", "busy"):
                    continue
                return reply, trainer
            newest = max(rounds.values(), default=batch.version)
            if newest - batch.version > self.rl.max_async_level:
                self.stats.dropped_stale += 1
                return None, ""
            await asyncio.sleep(BACKOFF_S)
            try:
                self.book.on_members(await self.membership.members())
            except (TimeoutError, OSError) as e:
                logger.debug("could not read the run's members: %s", e)

    def _record(self, batch: RolloutBatch, trainer: str, reply: RolloutReply | None, gen_s: float) -> None:
        """One line of rollouts.jsonl (`gen_s`: thread CPU seconds of making the batch)."""
        outcome = "dropped-stale" if reply is None else reply.outcome
        if outcome == "accepted":
            self.stats.accepted += 1
        elif reply is not None:
            self.stats.refused += 1
            logger.warning(
                "trainer %s refused batch %d/%d: %s", trainer, batch.version, batch.seq, reply.reason
            )
        rewards = batch.reward_values()
        line = {
            "t": time.time(),
            "version": batch.version,
            "seq": batch.seq,
            "trainer": trainer,
            "outcome": outcome,
            "reason": "" if reply is None else reply.reason,
            "mean_reward": sum(rewards) / max(1, len(rewards)),
            "completions": len(rewards),
            "generation_cpu_s": round(gen_s, 4),
        }
        try:
            with self._log.open("a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:  # a full disk loses a log line, not the worker
            logger.debug("could not append to %s: %s", self._log, e)
