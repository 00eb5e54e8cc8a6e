"""Generation and a trainer's checks of rollout batches, with real models, environments and signatures.

The policy is the tiny model; cheaters are honest code with one thing changed: the rewards they claim,
the model they sample from, the batch they send twice. Nothing under test is mocked.
"""

from __future__ import annotations

import copy
import struct
from dataclasses import replace

import pytest
import torch
from intellect.crypto.identity import Identity
from intellect.node.engine.grpo import completion_logprobs, pack
from intellect.node.engine.model import CONFIGS, Llama
from intellect.node.engine.rlenv import ReverseEnv
from intellect.node.engine.rlverify import (
    LOGPROB_TOLERANCE,
    RolloutVerifier,
    check_evidence,
    selected_for_logprob_check,
)
from intellect.node.engine.rollout import (
    Policy,
    prompt_tokens,
    rollout_batch,
    sample_group,
    stop_ids,
)
from intellect.node.engine.tokenizer import ByteTokenizer
from intellect.protocol import codec
from intellect.protocol.manifest import RlSpec
from intellect.protocol.rollouts import (
    RolloutBatch,
    RolloutEvidence,
    RolloutRefusal,
    decode_batch,
    encode_batch,
    make_batch,
)

RUN = "ab" * 32
RL = RlSpec(
    env="reverse",
    prompts_per_step=4,
    samples_per_prompt=4,
    max_new_tokens=8,
    temperature=1.0,
    max_async_level=2,
    verify_rate=1.0,
)
TOK = ByteTokenizer()
ENV = ReverseEnv()
WORKER = Identity.from_seed(b"w" * 32)
CHEATER = Identity.from_seed(b"c" * 32)


def _hash(v: int) -> str:
    return f"{v:064x}"


@pytest.fixture(scope="module")
def policies() -> dict[int, Policy]:
    """Versions 0..4 of a policy: each a small AdamW step on demonstrations away from the one before."""
    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"], seed=0)
    out = {}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for v in range(5):
        out[v] = Policy(v, _hash(v), copy.deepcopy(model).eval())
        demos = ENV.demonstrations(100 + v, 16)
        b = pack(
            [prompt_tokens(TOK, p.text) for p, _ in demos], [TOK.encode(c) for _, c in demos], TOK.pad_id
        )
        loss = -completion_logprobs(model, b).sum() / b.mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def lookup(policies: dict[int, Policy]):  # type: ignore[no-untyped-def]
    return lambda v: (policies[v].state_hash, policies[v].model) if v in policies else None


def verifier(rate: float = 1.0, secret: bytes = b"trainer-1") -> RolloutVerifier:
    return RolloutVerifier(RUN, replace(RL, verify_rate=rate), ENV, TOK, secret)


def honest(policy: Policy, seq: int, who: Identity = WORKER, fmt: str = "f32") -> RolloutBatch:
    gen = torch.Generator().manual_seed(1000 * policy.version + seq)
    b = rollout_batch(who, RUN, RL, ENV, TOK, policy, seq, gen, 1.7e9, fmt)
    return decode_batch(encode_batch(b), RUN)  # what a trainer receives


def test_sampling_records_the_logprobs_a_prefill_recomputes(policies: dict[int, Policy]) -> None:
    """The measurement behind LOGPROB_TOLERANCE: generation vs one padded prefill, same CPU."""
    model = policies[0].model
    prompts = [prompt_tokens(TOK, p.text) for p in ENV.prompts(7, 12)]
    group = sample_group(model, prompts, 8, 8, 1.0, stop_ids(TOK), torch.Generator().manual_seed(0))
    assert len(group.completions) == 96 and all(1 <= len(c) <= 8 for c in group.completions)
    assert all(len(c) == len(lp) for c, lp in zip(group.completions, group.logprobs, strict=True))
    rows = [group.prompts[i // 8] for i in range(96)]
    b = pack(rows, group.completions, TOK.pad_id)
    with torch.no_grad():
        again = completion_logprobs(model, b)
    worst = 0.0
    for i, lp in enumerate(group.logprobs):
        start = len(rows[i]) - 1
        worst = max(worst, float((again[i, start : start + len(lp)] - torch.tensor(lp)).abs().max()))
    assert worst < LOGPROB_TOLERANCE / 100


def test_a_completion_stops_at_its_first_newline(policies: dict[int, Policy]) -> None:
    group = sample_group(
        policies[0].model,
        [prompt_tokens(TOK, "reverse: ab=")],
        64,
        8,
        1.0,
        stop_ids(TOK),
        torch.Generator().manual_seed(1),
    )
    for c in group.completions:
        stops = [i for i, t in enumerate(c) if t in stop_ids(TOK)]
        assert stops in ([], [len(c) - 1])
        assert stops or len(c) == 8


def test_honest_batches_pass_with_no_false_positives(policies: dict[int, Policy]) -> None:
    v = verifier()
    verdicts = [
        v.check(honest(policies[ver], seq), 4, lookup(policies)) for ver in (2, 3, 4) for seq in range(6)
    ]
    assert all(x.accepted and x.logprobs_checked for x in verdicts), [
        x.detail for x in verdicts if not x.accepted
    ]
    worst = max(x.max_logprob_dev for x in verdicts)
    assert worst < LOGPROB_TOLERANCE / 100
    assert v.counts["accepted"] == 18 and not v.excluded


def test_honest_float16_batches_pass(policies: dict[int, Policy]) -> None:
    v = verifier()
    assert all(v.check(honest(policies[4], s, fmt="f16"), 4, lookup(policies)).accepted for s in range(6))


def test_fabricated_rewards_are_caught_and_the_evidence_convinces_others(policies: dict[int, Policy]) -> None:
    b = honest(policies[4], 0, CHEATER)
    rewards = b.reward_values()
    assert 0.0 in rewards  # an untrained-ish policy fails somewhere: there is something to inflate
    lie = replace(b, rewards=struct.pack(f"<{len(rewards)}f", *[1.0] * len(rewards))).signed(CHEATER)
    v = verifier(rate=0.0)  # no log-prob check needed: every reward is recomputed
    verdict = v.check(decode_batch(encode_batch(lie), RUN), 4, lookup(policies))
    assert verdict.reason is RolloutRefusal.FABRICATED_REWARD and verdict.evidence is not None
    assert CHEATER.peer_id in v.excluded
    # Excluded: even its honest batches are refused from now on.
    assert v.check(honest(policies[4], 1, CHEATER), 4, lookup(policies)).reason is RolloutRefusal.EXCLUDED
    # Another peer checks the evidence with the environment alone (decoded from the wire).
    ev = codec.decode(codec.encode(verdict.evidence), RolloutEvidence)
    assert check_evidence(ev, RUN, RL, ENV, TOK, lambda h: None) is None
    # The same accusation against an honest batch is not believed.
    framed = RolloutEvidence(reason="fabricated-reward", batch=honest(policies[4], 0))
    assert check_evidence(framed, RUN, RL, ENV, TOK, lambda h: None) == "every reward is right"


def test_sampling_from_another_model_is_caught(policies: dict[int, Policy]) -> None:
    """The cheater generates with the previous version (one small AdamW step older) but claims the
    current one: rewards are honest for what it sampled, the log-probs are the other model's."""
    claimed, used = policies[4], policies[3]
    gen = torch.Generator().manual_seed(5)
    fake = rollout_batch(
        CHEATER, RUN, RL, ENV, TOK, replace(used, version=4, state_hash=claimed.state_hash), 0, gen, 1.7e9
    )
    v = verifier()
    verdict = v.check(decode_batch(encode_batch(fake), RUN), 4, lookup(policies))
    assert verdict.reason is RolloutRefusal.LOGPROB_MISMATCH and verdict.logprobs_checked
    assert verdict.max_logprob_dev > 5 * LOGPROB_TOLERANCE
    ev = verdict.evidence
    assert ev is not None and ev.accused == CHEATER.peer_id
    by_hash = {p.state_hash: p.model for p in policies.values()}
    assert check_evidence(ev, RUN, RL, ENV, TOK, by_hash.get) is None
    # A peer that does not hold the policy cannot judge; one given the cheater's model would not agree.
    assert check_evidence(ev, RUN, RL, ENV, TOK, lambda h: None) is not None
    assert check_evidence(ev, RUN, RL, ENV, TOK, lambda h: used.model) is not None
    # An accusation of an honest batch is not believed.
    framed = RolloutEvidence(reason="logprob-mismatch", batch=honest(claimed, 3))
    assert check_evidence(framed, RUN, RL, ENV, TOK, by_hash.get) is not None


def test_a_randomly_initialised_model_is_caught_too(policies: dict[int, Policy]) -> None:
    other = Policy(4, policies[4].state_hash, Llama(CONFIGS["tiny"], seed=99).eval())
    fake = rollout_batch(CHEATER, RUN, RL, ENV, TOK, other, 0, torch.Generator().manual_seed(0), 1.7e9)
    verdict = verifier().check(fake, 4, lookup(policies))
    assert verdict.reason is RolloutRefusal.LOGPROB_MISMATCH and verdict.max_logprob_dev > 0.3


def test_replay_is_dropped_and_equivocation_is_evidence(policies: dict[int, Policy]) -> None:
    v = verifier(rate=0.0)
    b = honest(policies[4], 0)
    assert v.check(b, 4, lookup(policies)).accepted
    again = v.check(b, 4, lookup(policies))
    assert again.reason is RolloutRefusal.REPLAY and again.evidence is None
    # Same (worker, version, seq), other completions: two signed batches contradict each other.
    other = rollout_batch(WORKER, RUN, RL, ENV, TOK, policies[4], 0, torch.Generator().manual_seed(77), 1.7e9)
    verdict = v.check(other, 4, lookup(policies))
    assert verdict.reason is RolloutRefusal.EQUIVOCATION and verdict.evidence is not None
    assert check_evidence(verdict.evidence, RUN, RL, ENV, TOK, lambda h: None) is None
    assert WORKER.peer_id in v.excluded


def test_a_batch_older_than_max_async_level_is_refused(policies: dict[int, Policy]) -> None:
    v = verifier(rate=0.0)
    assert v.check(honest(policies[2], 0), 4, lookup(policies)).accepted  # two behind: allowed
    late = v.check(honest(policies[1], 0), 4, lookup(policies))
    assert late.reason is RolloutRefusal.STALE and late.evidence is None
    ahead = v.check(honest(policies[4], 1), 3, lookup(policies))
    assert ahead.reason is RolloutRefusal.UNKNOWN_POLICY
    wrong_hash = make_batch(WORKER, **{**_fields(honest(policies[4], 2)), "policy_hash": _hash(77)})
    assert v.check(wrong_hash, 4, lookup(policies)).reason is RolloutRefusal.UNKNOWN_POLICY


def _fields(b: RolloutBatch) -> dict:
    return dict(
        run_id=b.run_id,
        version=b.version,
        policy_hash=b.policy_hash,
        seq=b.seq,
        samples_per_prompt=b.samples_per_prompt,
        prompts=b.prompts(),
        completions=b.completions(),
        rewards=b.reward_values(),
        logprobs=b.logprob_values(),
        created_at=b.created_at,
    )


def test_own_prompts_and_wrong_shapes_are_refused(policies: dict[int, Policy]) -> None:
    v = verifier(rate=0.0)
    b = honest(policies[4], 0)
    easy = [prompt_tokens(TOK, "reverse: a=")] * 4
    mine = make_batch(WORKER, **{**_fields(b), "prompts": easy, "seq": 5})
    assert v.check(mine, 4, lookup(policies)).reason is RolloutRefusal.WRONG_PROMPTS
    v = verifier(rate=0.0)  # (own prompts are evidence: that worker is now excluded by `v`)
    long = make_batch(
        WORKER,
        **{**_fields(b), "seq": 6, "completions": [[97] * 9] * 16, "logprobs": [[-1.0] * 9] * 16},
    )
    assert v.check(long, 4, lookup(policies)).reason is RolloutRefusal.WRONG_SHAPE
    other_run = make_batch(WORKER, **{**_fields(b), "run_id": "cd" * 32})
    assert v.check(other_run, 4, lookup(policies)).reason is RolloutRefusal.WRONG_RUN


def test_the_logprob_sample_has_the_rate_and_depends_on_the_trainer_secret() -> None:
    hashes = [bytes([i % 256, i // 256]) * 16 for i in range(4000)]
    a = [selected_for_logprob_check(b"alice", h, 0.1) for h in hashes]
    b = [selected_for_logprob_check(b"bob", h, 0.1) for h in hashes]
    assert 0.08 < sum(a) / 4000 < 0.12 and 0.08 < sum(b) / 4000 < 0.12
    assert a != b  # a worker that knows one trainer's choices knows nothing of another's
    assert all(selected_for_logprob_check(b"x", h, 1.0) for h in hashes[:10])
    assert not any(selected_for_logprob_check(b"x", h, 0.0) for h in hashes[:100])


def test_only_accepted_batches_enter_the_ledger(policies: dict[int, Policy]) -> None:
    """A batch refused without evidence (completions too long) leaves no trace: the worker's honest batch
    under the same seq is accepted, not taken for an equivocation."""
    v = verifier(rate=0.0)
    b = honest(policies[4], 0)
    long = make_batch(WORKER, **{**_fields(b), "completions": [[97] * 9] * 16, "logprobs": [[-1.0] * 9] * 16})
    assert v.check(long, 4, lookup(policies)).reason is RolloutRefusal.WRONG_SHAPE
    assert v.check(b, 4, lookup(policies)).accepted
    assert WORKER.peer_id not in v.excluded


def test_own_prompts_are_evidence_any_peer_rechecks(policies: dict[int, Policy]) -> None:
    """Prompts that are not the environment's for the batch's seed (a worker choosing easy prompts, or
    re-signing old completions under a new seq) exclude the worker, and the evidence convinces others;
    the honest batch of the same seq, presented as such evidence, does not."""
    v = verifier(rate=0.0)
    b = honest(policies[4], 0)
    easy = [prompt_tokens(TOK, "reverse: a=")] * 4
    mine = make_batch(WORKER, **{**_fields(b), "prompts": easy})
    verdict = v.check(mine, 4, lookup(policies))
    assert verdict.reason is RolloutRefusal.WRONG_PROMPTS and verdict.evidence is not None
    assert WORKER.peer_id in v.excluded
    by_hash = {p.state_hash: p.model for p in policies.values()}.get
    assert check_evidence(verdict.evidence, RUN, RL, ENV, TOK, by_hash) is None
    forged = RolloutEvidence(RolloutRefusal.WRONG_PROMPTS.value, b)
    assert check_evidence(forged, RUN, RL, ENV, TOK, by_hash) == "the prompts are the environment's"


def test_more_prompts_than_a_step_are_refused(policies: dict[int, Policy]) -> None:
    b = honest(policies[4], 0)
    f = _fields(b)
    k = b.samples_per_prompt
    big = make_batch(
        WORKER,
        **{
            **f,
            "prompts": f["prompts"] * 2,
            "completions": f["completions"] * 2,
            "rewards": f["rewards"] * 2,
            "logprobs": f["logprobs"] * 2,
        },
    )
    assert len(big.completions()) == 2 * RL.prompts_per_step * k
    verdict = verifier(rate=0.0).check(big, 4, lookup(policies))
    assert verdict.reason is RolloutRefusal.WRONG_SHAPE and "prompts" in verdict.detail
