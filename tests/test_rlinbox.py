"""A trainer's inbox of rollout batches (node/run/rlinbox.py): real batches, real verifier, asyncio."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import replace

import pytest
import torch
from intellect.crypto.identity import Identity
from intellect.node.engine.model import CONFIGS, Llama
from intellect.node.engine.rlenv import ReverseEnv
from intellect.node.engine.rlverify import RolloutVerifier
from intellect.node.engine.rollout import Policy, rollout_batch
from intellect.node.engine.tokenizer import ByteTokenizer
from intellect.node.run.rlinbox import RolloutInbox
from intellect.protocol.manifest import RlSpec
from intellect.protocol.rollouts import RolloutEvidence, RolloutRefusal, encode_batch

RUN = "ab" * 32
RL = RlSpec(env="reverse", prompts_per_step=2, samples_per_prompt=4, max_new_tokens=6, temperature=1.0)
TOK = ByteTokenizer()
ENV = ReverseEnv()
WORKER = Identity.from_seed(b"w" * 32)
CHEATER = Identity.from_seed(b"c" * 32)


@pytest.fixture(scope="module")
def policies() -> dict[int, Policy]:
    model = Llama(CONFIGS["tiny"], seed=0).eval()
    return {v: Policy(v, f"{v:064x}", model) for v in range(6)}


def lookup(policies: dict[int, Policy]):  # type: ignore[no-untyped-def]
    return lambda v: (policies[v].state_hash, policies[v].model) if v in policies else None


def data(policy: Policy, seq: int, who: Identity = WORKER) -> bytes:
    gen = torch.Generator().manual_seed(seq)
    return encode_batch(rollout_batch(who, RUN, RL, ENV, TOK, policy, seq, gen, 0.0))


def inbox(max_completions: int = 64, evidence: list | None = None) -> RolloutInbox:
    sink = evidence if evidence is not None else []
    return RolloutInbox(RolloutVerifier(RUN, RL, ENV, TOK, b"secret"), max_completions, sink.append)


async def test_accepted_batches_are_taken_and_bad_ones_are_not(policies: dict[int, Policy]) -> None:
    evidence: list[RolloutEvidence] = []
    box = inbox(evidence=evidence)
    assert (await box.offer(data(policies[3], 0), 3, lookup(policies))).accepted  # type: ignore[union-attr]
    assert await box.offer(b"\x93garbage", 3, lookup(policies)) is None
    honest = rollout_batch(CHEATER, RUN, RL, ENV, TOK, policies[3], 0, torch.Generator(), 0.0)
    lie = replace(honest, rewards=struct.pack("<8f", *[1.0] * 8)).signed(CHEATER)
    assert lie.reward_values() != honest.reward_values()  # a random policy never answers right
    verdict = await box.offer(encode_batch(lie), 3, lookup(policies))
    assert verdict is not None and verdict.reason is RolloutRefusal.FABRICATED_REWARD
    assert [e.accused for e in evidence] == [CHEATER.peer_id]
    assert box.counts["undecodable"] == 1
    taken = await box.take(8, 3)
    assert [b.worker for b in taken] == [WORKER.peer_id]
    assert box.queued_completions == 0


async def test_a_full_inbox_refuses_before_checking(policies: dict[int, Policy]) -> None:
    box = inbox(max_completions=8)
    assert (await box.offer(data(policies[3], 0), 3, lookup(policies))).accepted  # type: ignore[union-attr]
    assert await box.offer(data(policies[3], 1), 3, lookup(policies)) is None
    assert box.counts["full"] == 1 and box.verifier.counts["accepted"] == 1


async def test_take_waits_for_batches_and_counts_the_wait_as_idle(policies: dict[int, Policy]) -> None:
    box = inbox()
    waiting = asyncio.create_task(box.take(16, 3))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await box.offer(data(policies[3], 0), 3, lookup(policies))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # 8 of 16 completions
    await box.offer(data(policies[3], 1), 3, lookup(policies))
    taken = await asyncio.wait_for(waiting, 30)
    assert len(taken) == 2
    assert 0.0 < box.idle_fraction() <= 1.0


async def test_batches_that_went_stale_in_the_queue_are_dropped(policies: dict[int, Policy]) -> None:
    box = inbox()
    await box.offer(data(policies[1], 0), 3, lookup(policies))  # two versions behind: accepted
    await box.offer(data(policies[3], 1), 3, lookup(policies))
    taken = await box.take(8, 4)  # the trainer moved on: version 1 is now three behind
    assert [b.version for b in taken] == [3]
    assert box.counts["stale_in_queue"] == 1
