"""A cheating rollout worker for the RL process tests: `python tests/rl_cheater.py CHEAT start …`.

It is the real `intellect-node start --role rollout` daemon (DHT, state sync, the rollout stream, its own
identity), with the batch it makes replaced by a cheat:

- ``fabricate``: generates honestly, then claims reward 1 for the first failed completion and re-signs;
- ``other-model``: samples from another model (the same architecture, another seed) while claiming the
  committed policy's version and hash;
- ``replay``: generates its first batch honestly, then re-signs those same completions under every later
  (version, seq) instead of generating (saving all the generation work);
- ``stale``: never follows the policy past the first version it synced, and keeps sending honest batches
  of it (not misbehaviour a trainer can prove: they are refused as `stale` once the run is more than
  `max_async_level` versions ahead).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import replace
from typing import Any

from intellect.node.engine.model import Llama
from intellect.node.engine.rollout import Policy
from intellect.node.run import rolloutworker
from intellect.protocol.rollouts import RolloutBatch, make_batch

CHEATS = ("fabricate", "other-model", "replay", "stale")


def _fabricate(self: Any, policy: Policy, seq: int) -> RolloutBatch:
    batch = _honest(self, policy, seq)
    rewards = batch.reward_values()
    if 0.0 in rewards:
        rewards[rewards.index(0.0)] = 1.0
    return replace(batch, rewards=struct.pack(f"<{len(rewards)}f", *rewards)).signed(self.identity)


def _other_model(self: Any, policy: Policy, seq: int) -> RolloutBatch:
    if not hasattr(self, "_other"):
        self._other = Llama(self.model.cfg, seed=12345).eval()
    return _honest(self, Policy(policy.version, policy.state_hash, self._other), seq)


def _replay(self: Any, policy: Policy, seq: int) -> RolloutBatch:
    if not hasattr(self, "_first"):
        self._first = _honest(self, policy, seq)
        return self._first
    b: RolloutBatch = self._first
    return make_batch(
        self.identity,
        run_id=b.run_id,
        version=policy.version,
        policy_hash=policy.state_hash,
        seq=seq,
        samples_per_prompt=b.samples_per_prompt,
        prompts=b.prompts(),
        completions=b.completions(),
        rewards=b.reward_values(),
        logprobs=b.logprob_values(),
        created_at=b.created_at,
    )


async def _stay(self: Any) -> None:
    if self.policy is None:
        await _follow(self)


_honest = rolloutworker.RolloutWorker._generate
_follow = rolloutworker.RolloutWorker._follow

if __name__ == "__main__":
    cheat = sys.argv.pop(1)
    if cheat == "stale":
        rolloutworker.RolloutWorker._follow = _stay  # type: ignore[method-assign]
    else:
        fake = {"fabricate": _fabricate, "other-model": _other_model, "replay": _replay}[cheat]
        rolloutworker.RolloutWorker._generate = fake  # type: ignore[method-assign]
    from intellect.node.cli.main import main

    main()
