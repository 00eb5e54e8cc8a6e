"""The `trainer` role of an RL run: GRPO steps on verified rollouts inside the ordinary DiLoCo rounds.

An RL run (`kind = "rl"`) has two roles. Rollout workers (`intellect.node.run.rolloutworker`) sample with
a committed policy and stream signed batches here; trainers are the run's members: they match, average
and commit exactly as in pretraining, but each inner step of a round is one GRPO step on the batches the
inbox holds instead of an LM step on data shards. A **policy version is a committed global round**: the
round-r inner steps train on top of version r − 1, and workers sample with whatever version they synced.

`RlRoundTrainer` is the round machine's `RoundTrainer` for such a run:

- `begin_round` files the committed state the round starts from in the `PolicyArchive` (its hash, and a
  model holding its weights, for the sampled log-prob checks); the archive keeps the newest
  `max_async_level + 1` versions, what a batch may lag;
- `steps(n)` takes n GRPO steps, each on what the inbox holds once it holds one step's worth of
  completions (`RolloutInbox.take`); the wait is the idle time, and the optimizer is the node's
  `InnerTrainer`'s AdamW, so its moments are checkpointed, resumed and synced like a pretraining run's;
- `offer` is the rollout stream's callback (`net.rolloutlink`): decode, check (`engine.rlverify`), queue;
- evidence against a worker is gossiped (a `Misbehaviour` of kind "rollout" carrying the encoded
  `RolloutEvidence`); evidence gossiped by another trainer is re-checked (`check_evidence`) before its
  accused is excluded here too.

Every GRPO step appends one JSON line to `<data dir>/rl.jsonl` (version, mean reward, completions, what
the verifier and the inbox counted), what `intellect-node swarm --rl` and the tests read.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from intellect.node.engine.rlenv import Environment
from intellect.node.engine.rltrain import GrpoStats, GrpoTrainer
from intellect.node.engine.rlverify import RolloutVerifier, check_evidence
from intellect.node.engine.tokenizer import Tokenizer
from intellect.node.engine.trainer import InnerStats, InnerTrainer
from intellect.node.run.rlinbox import RolloutInbox
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.gossip_messages import Misbehaviour
from intellect.protocol.manifest import RlSpec
from intellect.protocol.rollouts import RolloutBatch, RolloutEvidence, RolloutRefusal, RolloutReply
from torch import nn

if TYPE_CHECKING:
    from intellect.node.run.training import RoundPlan

logger = logging.getLogger(__name__)

#: `Misbehaviour.kind` of gossiped rollout evidence.
ROLLOUT_EVIDENCE = "rollout"
#: Largest evidence that fits a gossip message (`Misbehaviour` is capped at 64 KiB); bigger evidence is
#: acted on locally and counted, not gossiped.
MAX_GOSSIP_EVIDENCE = 60 * 1024
#: The per-step log of a trainer, in its data directory.
RL_LOG = "rl.jsonl"
#: Batches the inbox may hold, in GRPO steps' worth of completions.
INBOX_STEPS = 2


class _Weights(Protocol):
    @property
    def global_params(self) -> Mapping[str, torch.Tensor]: ...


class CommittedState(Protocol):
    """What the trainer needs of the node's global state (`run.state.GlobalState`): the committed round,
    its hash, and θ of that round (`outer.global_params`, not the local copy being trained)."""

    @property
    def round(self) -> int: ...

    @property
    def state_hash(self) -> str: ...

    @property
    def outer(self) -> _Weights: ...


class PolicyArchive:
    """The newest `keep` committed versions: version -> (state hash, a model holding that state)."""

    def __init__(self, template: nn.Module, keep: int) -> None:
        self._template = template
        self._keep = max(1, keep)
        self._versions: dict[int, tuple[str, nn.Module]] = {}

    def add(self, version: int, state_hash: str, params: Mapping[str, torch.Tensor]) -> None:
        held = self._versions.get(version)
        if held is not None and held[0] == state_hash:
            return
        model = copy.deepcopy(self._template).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
            for p in model.parameters():
                p.requires_grad_(False)
        self._versions[version] = (state_hash, model)
        for old in sorted(self._versions)[: -self._keep]:
            del self._versions[old]

    def lookup(self, version: int) -> tuple[str, nn.Module] | None:
        return self._versions.get(version)

    def by_hash(self, state_hash: str) -> nn.Module | None:
        return next((m for h, m in self._versions.values() if h == state_hash), None)

    @property
    def versions(self) -> list[int]:
        return sorted(self._versions)


class RlRoundTrainer:
    """The round machine's trainer in an RL run (see the module docstring)."""

    def __init__(
        self,
        trainer: InnerTrainer,
        run_id: str,
        rl: RlSpec,
        env: Environment,
        tokenizer: Tokenizer,
        log_dir: Path | None = None,
    ) -> None:
        self.trainer = trainer
        self.run_id, self.rl = run_id, rl
        self.env, self.tokenizer = env, tokenizer
        pad_id = getattr(tokenizer, "pad_id", 0)
        # A secret of this trainer's own: which batches get their log-probs recomputed must be unknowable
        # to the workers (`rlverify`), and other trainers need not agree on it.
        self.verifier = RolloutVerifier(run_id, rl, env, tokenizer, secret=os.urandom(32))
        self.per_step = rl.prompts_per_step * rl.samples_per_prompt
        self.inbox = RolloutInbox(self.verifier, INBOX_STEPS * self.per_step, on_evidence=self._evidence)
        self.grpo = GrpoTrainer(trainer.model, rl, trainer.config.lr, pad_id, optimizer=trainer.optimizer)
        self.archive = PolicyArchive(trainer.model, rl.max_async_level + 1)
        self.version = 0
        self._state: CommittedState | None = None
        # The verifier is not thread-safe, and its checks run in worker threads: one batch at a time.
        self._checking = asyncio.Lock()
        self._log = None if log_dir is None else log_dir / RL_LOG
        #: Gossip publisher of evidence (set by the run service; None: evidence stays local).
        self.publish: Callable[[Misbehaviour], None] | None = None

    def attach(self, state: CommittedState) -> None:
        """The global state whose committed versions are the policies (before the first round)."""
        self._state = state
        self._file_version()

    def _file_version(self) -> None:
        if self._state is None:
            return
        self.version = self._state.round
        self.archive.add(self.version, self._state.state_hash, self._state.outer.global_params)

    # ---- RoundTrainer -------------------------------------------------------------------------------

    async def begin_round(self, plan: RoundPlan) -> None:
        await asyncio.to_thread(self._file_version)

    async def steps(self, n: int) -> InnerStats:
        tokens, losses, t0 = 0, [], time.monotonic()
        lr = self.trainer.config.lr_at(self.trainer.step)
        for _ in range(n):
            batches = await self.inbox.take(self.per_step, self.version)
            lr = self.trainer.config.lr_at(self.trainer.step)
            stats = await asyncio.to_thread(self._step, batches, lr)
            tokens += stats.tokens
            losses.append(stats.loss)
            self._record(stats, [b.version for b in batches])
        dt = time.monotonic() - t0
        return InnerStats(
            steps=n,
            tokens=tokens,
            mean_loss=sum(losses) / len(losses),
            last_loss=losses[-1],
            tokens_per_s=tokens / dt if dt > 0 else 0.0,
            lr=lr,
        )

    def _step(self, batches: list[RolloutBatch], lr: float) -> GrpoStats:
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = lr
        stats = self.grpo.step(batches)
        self.trainer.step += 1
        return stats

    async def close(self) -> None:
        return None

    # ---- the rollout stream and the evidence ----------------------------------------------------------

    async def offer(self, sender: str, data: bytes) -> RolloutReply:
        """One batch from the rollout stream: checked, queued when accepted; the reply says what happened."""
        async with self._checking:
            full = self.inbox.counts["full"]
            verdict = await self.inbox.offer(data, self.version, self.archive.lookup)
        if verdict is None:
            outcome = "full" if self.inbox.counts["full"] > full else "undecodable"
            return RolloutReply(outcome, version=self.version)
        reason = verdict.reason.value if verdict.reason is not None else ""
        return RolloutReply(verdict.outcome.value, reason, self.version)

    def screen(self, sender: str) -> RolloutReply | None:
        """Before a stream's body is read: an excluded worker sending its own batches is refused unread.
        (Its batches relayed by someone else are still decoded, and refused as `excluded` then.)"""
        if sender in self.verifier.excluded:
            self.inbox.counts["refused_unread"] += 1
            return RolloutReply("refused", RolloutRefusal.EXCLUDED.value, self.version)
        return None

    def _evidence(self, ev: RolloutEvidence) -> None:
        data = encode(ev)
        if self.publish is None or len(data) > MAX_GOSSIP_EVIDENCE:
            self.inbox.counts["evidence_not_gossiped"] += 1
            return
        self.publish(Misbehaviour(ev.accused, self.version, ROLLOUT_EVIDENCE, data))
        self.inbox.counts["evidence_gossiped"] += 1

    def on_gossip(self, sender: str, msg: Misbehaviour) -> bool:
        """Evidence another trainer gossiped: re-checked here; its accused excluded when it holds."""
        try:
            ev = decode(msg.evidence, RolloutEvidence)
        except ProtocolError as e:
            logger.warning("rollout evidence from %s does not decode: %s", sender, e)
            return False
        if ev.accused != msg.accused:
            logger.warning(
                "rollout evidence from %s names %s but accuses %s", sender, msg.accused, ev.accused
            )
            return False
        if ev.accused in self.verifier.excluded:
            return True
        why = check_evidence(ev, self.run_id, self.rl, self.env, self.tokenizer, self.archive.by_hash)
        if why is not None:
            logger.warning("rollout evidence from %s against %s not accepted: %s", sender, ev.accused, why)
            self.inbox.counts["evidence_not_accepted"] += 1
            return False
        self.verifier.excluded[ev.accused] = ev
        self.inbox.counts["evidence_accepted"] += 1
        logger.warning("rollout worker %s excluded on evidence from %s: %s", ev.accused, sender, ev.reason)
        return True

    def _record(self, stats: GrpoStats, versions: list[int]) -> None:
        if self._log is None:
            return
        line = {
            "t": time.time(),
            "version": self.version,
            "step": self.trainer.step,
            "batch_versions": versions,
            "mean_reward": stats.mean_reward,
            "loss": stats.loss,
            "completions": stats.completions,
            "idle_fraction": self.inbox.idle_fraction(),
            "check_cpu_s": round(self.inbox.check_cpu_s, 4),
            "inbox": dict(self.inbox.counts),
            "verifier": dict(self.verifier.counts),
            "excluded": sorted(self.verifier.excluded),
        }
        try:
            with self._log.open("a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:  # a full disk loses a log line, never a step
            logger.debug("could not append to %s: %s", self._log, e)
