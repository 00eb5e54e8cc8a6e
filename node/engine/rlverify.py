"""A trainer's checks of rollout batches: shape, policy, staleness, replay, rewards, sampled log-probs.

Bytes from a worker first pass `intellect.protocol.rollouts.decode_batch` (size, shape, assigned prompt
seed, signature). `RolloutVerifier.check` then applies what needs the run (docs/protocol.md §13.2):

1. the manifest's GRPO group size, prompts per step and generation length, token ids within the
   vocabulary (`wrong-shape`);
2. the claimed policy: a version the trainer knows, with that version's state hash (`unknown-policy`),
   at most `max_async_level` versions behind the trainer's (`stale`);
3. the ledger of accepted batches: a batch hash accepted before is a `replay` (dropped, not evidence);
   another batch under the key of an accepted batch, (worker, version, seq), is an `equivocation`
   (evidence: the two signed batches);
4. the prompts: the environment's prompts for the assigned seed (`wrong-prompts`);
5. every reward recomputed with the environment (`fabricated-reward`, evidence);
6. for a sampled share `verify_rate`, the completion log-probs recomputed with one prefill under the
   claimed policy and compared token by token within `LOGPROB_TOLERANCE` (`logprob-mismatch`, evidence).

Which batches get step 6 is `sha256(secret || batch hash) < verify_rate`: deterministic for this
trainer (its decisions can be replayed from the secret) but unknowable to the worker, which could
otherwise grind `created_at` until its batch hashes out of the sample. A worker with evidence against it
is excluded: its later batches are refused without being checked.

`check_evidence` is what any other peer runs on a `RolloutEvidence` before it believes it.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from intellect.node.engine.grpo import completion_logprobs, pack
from intellect.node.engine.rlenv import Environment, Prompt
from intellect.node.engine.rollout import prompt_tokens
from intellect.node.engine.tokenizer import Tokenizer
from intellect.protocol.manifest import RlSpec
from intellect.protocol.rollouts import (
    EVIDENCE_REASONS,
    RolloutBatch,
    RolloutEvidence,
    RolloutRefusal,
    equivocation,
)
from torch import nn

log = logging.getLogger(__name__)

#: Largest per-token |claimed − recomputed| log-prob accepted (nats), for float32 claims. An honest CPU
#: worker's generation-time log-probs differ from a trainer's one-prefill recomputation by at most
#: 9.5e-7 (tiny model, 3 seeds × 128 completions, 1 thread, docs/decisions.md); a worker sampling from
#: another model differs by about 1 nat, and the previous policy version by far more than this bound
#: (measured in tests/test_rlverify.py). 1e-2 leaves four orders of magnitude for other hardware
#: (a GPU worker in fp32), which is not measured here.
LOGPROB_TOLERANCE = 1e-2
#: float16 claims add their rounding: half an ulp, 2^-11 relative (plus the smallest subnormal).
_F16_REL = 2.0**-11
_F16_ABS = 2.0**-24


class Outcome(enum.StrEnum):
    """What happened to a batch."""

    ACCEPTED = "accepted"
    REFUSED = "refused"


@dataclass(frozen=True)
class Verdict:
    """The outcome of `RolloutVerifier.check`; `evidence` is set for a refusal that proves misbehaviour."""

    outcome: Outcome
    reason: RolloutRefusal | None = None
    detail: str = ""
    evidence: RolloutEvidence | None = None
    #: Whether the log-probs were recomputed (step 6), and the largest deviation found then.
    logprobs_checked: bool = False
    max_logprob_dev: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPTED


#: policy version -> (its state hash, the model holding that state), or None when unknown.
PolicyLookup = Callable[[int], tuple[str, nn.Module] | None]


def selected_for_logprob_check(secret: bytes, batch_hash: bytes, rate: float) -> bool:
    """Whether this trainer recomputes the log-probs of the batch with this hash (a share `rate`)."""
    if rate >= 1.0:
        return True
    draw = int.from_bytes(
        hashlib.sha256(b"rollout-logprob-check-v1\x00" + secret + batch_hash).digest(), "big"
    )
    return draw < int(rate * 2**256)


def expected_prompts(env: Environment, batch: RolloutBatch) -> list[Prompt]:
    """The environment's prompts for the batch's assigned seed."""
    return env.prompts(batch.prompt_seed, len(batch.prompt_lens) // 2)


def reward_mismatch(env: Environment, tokenizer: Tokenizer, batch: RolloutBatch) -> str | None:
    """Where a claimed reward differs from the environment's (float32 claim vs float32 of the truth)."""
    prompts = expected_prompts(env, batch)
    k = batch.samples_per_prompt
    for i, (claimed, completion) in enumerate(zip(batch.reward_values(), batch.completions(), strict=True)):
        truth = env.reward(prompts[i // k], tokenizer.decode(completion))
        if not math.isclose(claimed, truth, rel_tol=1e-6, abs_tol=1e-6):
            return f"completion {i}: claimed reward {claimed}, environment says {truth}"
    return None


@torch.no_grad()
def logprob_deviation(model: nn.Module, batch: RolloutBatch, temperature: float, pad_id: int) -> list[float]:
    """Per completion, the largest |claimed − recomputed| log-prob minus its encoding slack (≤ 0 when the
    claim is exact up to rounding). One prefill of every prompt + completion under `model`."""
    prompts, completions = batch.prompts(), batch.completions()
    k = batch.samples_per_prompt
    rows = [prompts[i // k] for i in range(len(completions))]
    packed = pack(rows, completions, pad_id)
    device = next(model.parameters()).device
    packed = type(packed)(packed.tokens.to(device), packed.mask.to(device))
    was_training = model.training
    model.eval()
    try:
        recomputed = completion_logprobs(model, packed, temperature).cpu()
    finally:
        model.train(was_training)
    half = batch.logprob_format == "f16"
    out = []
    for i, claimed in enumerate(batch.logprob_values()):
        if not claimed:
            out.append(0.0)
            continue
        start = len(rows[i]) - 1
        truth = recomputed[i, start : start + len(claimed)]
        c = torch.tensor(claimed, dtype=torch.float32)
        slack = (c.abs() * _F16_REL + _F16_ABS) if half else torch.zeros_like(c)
        out.append(float(((c - truth).abs() - slack).max()))
    return out


def prompts_mismatch(env: Environment, tokenizer: Tokenizer, batch: RolloutBatch) -> bool:
    want = [prompt_tokens(tokenizer, p.text) for p in expected_prompts(env, batch)]
    return want != batch.prompts()


@dataclass
class _Ledger:
    """Batches seen per (worker, version, seq) and their hashes, for replays and equivocations."""

    by_key: dict[tuple[str, int, int], RolloutBatch] = field(default_factory=dict)
    hashes: set[bytes] = field(default_factory=set)

    def prune(self, oldest_version: int) -> None:
        """Forget batches older than anything still accepted (they would be refused as stale anyway)."""
        old = [k for k in self.by_key if k[1] < oldest_version]
        for k in old:
            self.hashes.discard(self.by_key.pop(k).batch_hash())


class RolloutVerifier:
    """One trainer's checks of incoming batches, with counters and the set of excluded workers.

    Not thread-safe: one verifier per trainer loop."""

    def __init__(
        self,
        run_id: str,
        rl: RlSpec,
        env: Environment,
        tokenizer: Tokenizer,
        secret: bytes,
        tolerance: float = LOGPROB_TOLERANCE,
    ) -> None:
        if not tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {tolerance}")
        self.run_id, self.rl, self.env, self.tokenizer = run_id, rl, env, tokenizer
        self.secret, self.tolerance = secret, tolerance
        self.pad_id = getattr(tokenizer, "pad_id", 0)
        self.counts: Counter[str] = Counter()
        self.excluded: dict[str, RolloutEvidence] = {}
        self._ledger = _Ledger()

    def check(self, batch: RolloutBatch, current_version: int, policy: PolicyLookup) -> Verdict:
        """Check a batch that `decode_batch` accepted, against the trainer at `current_version`."""
        verdict = self._check(batch, current_version, policy)
        self.counts[verdict.outcome.value if verdict.accepted else f"refused.{verdict.reason}"] += 1
        if verdict.logprobs_checked:
            self.counts["logprobs_checked"] += 1
        if verdict.evidence is not None:
            self.excluded.setdefault(batch.worker, verdict.evidence)
            log.warning("rollout worker %s excluded: %s (%s)", batch.worker, verdict.reason, verdict.detail)
        elif not verdict.accepted:
            log.debug("rollout batch of %s refused: %s (%s)", batch.worker, verdict.reason, verdict.detail)
        return verdict

    def _check(self, batch: RolloutBatch, current: int, policy: PolicyLookup) -> Verdict:
        if batch.worker in self.excluded:
            return _refuse(RolloutRefusal.EXCLUDED, "worker excluded by earlier evidence")
        if batch.run_id != self.run_id:
            return _refuse(RolloutRefusal.WRONG_RUN)
        refused = self._shape(batch) or self._policy(batch, current, policy) or self._seen(batch, current)
        if refused is not None:
            return refused
        verdict = self._content(batch, policy)
        if verdict.accepted:
            # Only accepted batches are kept: memory is then bounded by what the trainer takes anyway,
            # and a refused batch cannot be the first half of an equivocation (its author is excluded
            # when the refusal is evidence, and re-checked from scratch when it is not).
            self._ledger.by_key[batch.key] = batch
            self._ledger.hashes.add(batch.batch_hash())
        return verdict

    def _content(self, batch: RolloutBatch, policy: PolicyLookup) -> Verdict:
        """Prompts, rewards and (for the sampled share) log-probs: the checks that cost work."""
        if prompts_mismatch(self.env, self.tokenizer, batch):
            # An honest worker never signs this (the prompts follow from the seed): evidence, e.g. of
            # old completions re-signed under a new seq to skip generation.
            return _evidence(
                RolloutRefusal.WRONG_PROMPTS, batch, "prompts are not the environment's for the seed"
            )
        bad_reward = reward_mismatch(self.env, self.tokenizer, batch)
        if bad_reward is not None:
            return _evidence(RolloutRefusal.FABRICATED_REWARD, batch, bad_reward)
        if not selected_for_logprob_check(self.secret, batch.batch_hash(), self.rl.verify_rate):
            return Verdict(Outcome.ACCEPTED)
        found = policy(batch.version)
        if found is None:  # dropped since `_policy` looked (a policy cache of a concurrent owner)
            return _refuse(RolloutRefusal.UNKNOWN_POLICY, "policy state no longer held")
        devs = logprob_deviation(found[1], batch, self.rl.temperature, self.pad_id)
        worst = max(devs, default=0.0)
        if worst > self.tolerance:
            i = devs.index(worst)
            detail = f"completion {i}: log-prob off by {worst:.4g} > {self.tolerance:g}"
            ev = _evidence(RolloutRefusal.LOGPROB_MISMATCH, batch, detail)
            return Verdict(ev.outcome, ev.reason, ev.detail, ev.evidence, True, worst)
        return Verdict(Outcome.ACCEPTED, logprobs_checked=True, max_logprob_dev=worst)

    def _shape(self, batch: RolloutBatch) -> Verdict | None:
        if batch.samples_per_prompt != self.rl.samples_per_prompt:
            return _refuse(RolloutRefusal.WRONG_SHAPE, f"{batch.samples_per_prompt} samples per prompt")
        if len(batch.prompt_lens) // 2 > self.rl.prompts_per_step:
            return _refuse(RolloutRefusal.WRONG_SHAPE, f"more prompts than {self.rl.prompts_per_step}")
        if any(len(c) > self.rl.max_new_tokens for c in batch.completions()):
            return _refuse(RolloutRefusal.WRONG_SHAPE, f"a completion over {self.rl.max_new_tokens} tokens")
        vocab = getattr(self.tokenizer, "vocab_size", 2**32)
        if any(t >= vocab for c in batch.completions() for t in c):
            return _refuse(RolloutRefusal.WRONG_SHAPE, "a token id outside the vocabulary")
        return None

    def _policy(self, batch: RolloutBatch, current: int, policy: PolicyLookup) -> Verdict | None:
        if batch.version > current:
            return _refuse(
                RolloutRefusal.UNKNOWN_POLICY, f"version {batch.version} is ahead of ours ({current})"
            )
        if current - batch.version > self.rl.max_async_level:
            lag = current - batch.version
            return _refuse(RolloutRefusal.STALE, f"{lag} versions behind, at most {self.rl.max_async_level}")
        found = policy(batch.version)
        if found is None or found[0] != batch.policy_hash:
            return _refuse(RolloutRefusal.UNKNOWN_POLICY, f"no committed state {batch.policy_hash[:12]}")
        return None

    def _seen(self, batch: RolloutBatch, current: int) -> Verdict | None:
        """A replay of an accepted batch, or another batch under an accepted batch's key."""
        self._ledger.prune(current - self.rl.max_async_level)
        if batch.batch_hash() in self._ledger.hashes:
            return _refuse(RolloutRefusal.REPLAY, "this batch was received before")
        earlier = self._ledger.by_key.get(batch.key)
        if earlier is not None:
            ev = equivocation(earlier, batch)
            return Verdict(Outcome.REFUSED, RolloutRefusal.EQUIVOCATION, "two batches for one seq", ev)
        return None


def _refuse(reason: RolloutRefusal, detail: str = "") -> Verdict:
    return Verdict(Outcome.REFUSED, reason, detail)


def _evidence(reason: RolloutRefusal, batch: RolloutBatch, detail: str) -> Verdict:
    ev = RolloutEvidence(reason=reason.value, batch=batch, detail=detail)
    return Verdict(Outcome.REFUSED, reason, detail, ev)


def check_evidence(
    ev: RolloutEvidence,
    run_id: str,
    rl: RlSpec,
    env: Environment,
    tokenizer: Tokenizer,
    policy_by_hash: Callable[[str], nn.Module | None],
    tolerance: float = LOGPROB_TOLERANCE,
) -> str | None:
    """None when `ev` proves its accusation to us; else why we do not believe it.

    An equivocation needs the signed bytes only; a fabricated reward, the environment; a log-prob
    mismatch, the policy state of the batch's hash (`policy_by_hash`; without it we cannot judge)."""
    if ev.batch.run_id != run_id:
        return "evidence of another run"
    why = ev.check_signed()
    if why is not None or ev.reason == RolloutRefusal.EQUIVOCATION:
        return why
    if RolloutRefusal(ev.reason) not in EVIDENCE_REASONS:
        return f"{ev.reason} is not evidence"
    if ev.reason == RolloutRefusal.WRONG_PROMPTS:
        return None if prompts_mismatch(env, tokenizer, ev.batch) else "the prompts are the environment's"
    if ev.reason == RolloutRefusal.FABRICATED_REWARD:
        return None if reward_mismatch(env, tokenizer, ev.batch) else "every reward is right"
    model = policy_by_hash(ev.batch.policy_hash)
    if model is None:
        return "we do not hold the policy state to judge this"
    pad_id = getattr(tokenizer, "pad_id", 0)
    worst = max(logprob_deviation(model, ev.batch, rl.temperature, pad_id), default=0.0)
    return None if worst > tolerance else f"log-probs agree within {worst:.3g}"
