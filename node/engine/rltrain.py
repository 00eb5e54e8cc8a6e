"""A trainer's inner step for RL runs: one GRPO step on verified rollout batches.

This is what a `trainer` of an RL run does instead of an LM step on data shards
(`intellect.node.run.rltrainer`): the batches have passed `rlverify`, their rewards are the
environment's, and their claimed log-probs are the sampling policy's, which GRPO uses as `logp_old` in
the importance ratio (the sampling policy can be up to `max_async_level` versions older than the model
being trained; the clip keeps the step close to it).

Advantages are normalised within each GRPO group (one prompt's `samples_per_prompt` completions); a batch
whose groups all have equal rewards contributes nothing but still counts its completions. The KL term
needs a reference model (`ref`), e.g. the run's initial policy; with `kl_coef = 0` none is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from intellect.node.engine.grpo import PackedBatch, completion_logprobs, group_advantages, grpo_loss, pack
from intellect.protocol.manifest import RlSpec
from intellect.protocol.rollouts import RolloutBatch
from torch import nn

#: Gradient-norm clip of an RL step (the usual 1.0 of PPO/GRPO implementations).
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class GrpoStats:
    """One step's loss parts and what it trained on."""

    loss: float
    policy_loss: float
    kl: float
    clip_fraction: float
    mean_reward: float
    completions: int
    tokens: int
    #: Share of GRPO groups whose rewards differ (the only ones with a gradient).
    informative_groups: float


@dataclass(frozen=True)
class _Rows:
    packed: PackedBatch
    logp_old: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor
    informative: float


def _rows(batches: Sequence[RolloutBatch], pad_id: int) -> _Rows:
    prompts, completions, claimed, rewards = [], [], [], []
    k = batches[0].samples_per_prompt
    for b in batches:
        if b.samples_per_prompt != k:
            raise ValueError("every batch of a step needs the same samples_per_prompt")
        p = b.prompts()
        prompts += [p[i // k] for i in range(len(p) * k)]
        completions += b.completions()
        claimed += b.logprob_values()
        rewards += b.reward_values()
    packed = pack(prompts, completions, pad_id)
    logp_old = torch.zeros_like(packed.mask)
    for i, (p, lp) in enumerate(zip(prompts, claimed, strict=True)):
        logp_old[i, len(p) - 1 : len(p) - 1 + len(lp)] = torch.tensor(lp, dtype=torch.float32)
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, k)
    informative = float((r.amax(dim=1) != r.amin(dim=1)).float().mean())
    return _Rows(packed, logp_old, group_advantages(r).flatten(), r.flatten(), informative)


class GrpoTrainer:
    """AdamW on `model` with the GRPO loss of `rl` (clip, KL to `ref` when `rl.kl_coef` > 0)."""

    def __init__(
        self,
        model: nn.Module,
        rl: RlSpec,
        lr: float,
        pad_id: int,
        ref: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if rl.kl_coef > 0 and ref is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        self.model, self.rl, self.pad_id, self.ref = model, rl, pad_id, ref
        # A node's trainer role passes its `InnerTrainer`'s AdamW, so that the moments are checkpointed
        # and resumed with the rest of the node's state; the benchmark and the tests make their own.
        self.opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.steps = 0

    def step(self, batches: Sequence[RolloutBatch]) -> GrpoStats:
        """One optimizer step on every completion of `batches` (verified, same group size)."""
        if not batches:
            raise ValueError("a GRPO step needs at least one batch")
        device = next(self.model.parameters()).device
        rows = _rows(batches, self.pad_id)
        packed = PackedBatch(rows.packed.tokens.to(device), rows.packed.mask.to(device))
        self.model.train()
        logp = completion_logprobs(self.model, packed, self.rl.temperature)
        logp_ref = None
        if self.ref is not None and self.rl.kl_coef > 0:
            with torch.no_grad():
                logp_ref = completion_logprobs(self.ref, packed, self.rl.temperature)
        out = grpo_loss(
            logp,
            rows.logp_old.to(device),
            rows.advantages.to(device),
            packed.mask,
            self.rl.clip_eps,
            self.rl.kl_coef,
            logp_ref,
        )
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.opt.step()
        self.steps += 1
        return GrpoStats(
            loss=float(out.loss.detach()),
            policy_loss=float(out.policy_loss),
            kl=float(out.kl),
            clip_fraction=float(out.clip_fraction),
            mean_reward=float(rows.rewards.mean()),
            completions=int(rows.rewards.numel()),
            tokens=int(packed.mask.sum()),
            informative_groups=rows.informative,
        )
