"""GRPO math for RL runs, pure torch: group advantages, the clipped loss with a KL penalty, log-probs.

GRPO (DeepSeekMath; INTELLECT-2 trains with it asynchronously) has no value network: each prompt is
sampled `samples_per_prompt` times, and a completion's advantage is its reward relative to its group,
`(r − mean(group)) / (std(group) + eps)` with the population std. A group whose rewards are all equal
teaches nothing, so its advantages are exactly zero (not 0 / eps noise).

The loss is PPO's clipped objective per completion token, with the importance ratio
`exp(logp_new − logp_old)` between the policy being trained and the (possibly older, up to
`max_async_level` versions) policy that generated the rollout, plus `kl_coef` times the k3 estimator of
KL(new ‖ ref), `exp(ref − new) − (ref − new) − 1` (non-negative, unbiased). Both terms are averaged over
all unmasked completion tokens of the batch (token-level normalisation, as DAPO and prime-rl do), so long
completions are not down-weighted.

`completion_logprobs` computes what trainers recompute to check a rollout and what the loss needs: the
log-probability of each completion token given everything before it, under a `Llama`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Added to the group std so that tiny but non-zero spreads do not blow up.
ADV_EPS = 1e-6


def group_advantages(rewards: torch.Tensor, eps: float = ADV_EPS) -> torch.Tensor:
    """Advantages of `rewards[groups, samples]`: group-normalised, zero for a zero-variance group."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, samples >= 2], got shape {tuple(rewards.shape)}")
    r = rewards.float()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    adv = (r - mean) / (std + eps)
    flat = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)).expand_as(r)
    return torch.where(flat, torch.zeros_like(adv), adv)


@dataclass(frozen=True)
class GrpoLoss:
    """The loss to minimise and its parts (the parts detached, for logging)."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    #: Share of unmasked tokens whose ratio was clipped (the clip was active for the objective).
    clip_fraction: torch.Tensor


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    kl_coef: float = 0.0,
    logp_ref: torch.Tensor | None = None,
) -> GrpoLoss:
    """Clipped policy-gradient loss over completion tokens, plus `kl_coef` × k3 KL to `logp_ref`.

    `logp_*` and `mask` are [N, T] (one row per completion, 1 on its tokens); `advantages` is [N], one
    per completion (flatten `group_advantages`). Gradients flow through `logp_new` only.
    """
    if logp_new.shape != logp_old.shape or logp_new.shape != mask.shape:
        raise ValueError(
            f"shapes differ: {tuple(logp_new.shape)}, {tuple(logp_old.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logp_new.shape[:1]:
        raise ValueError(f"advantages must be [{logp_new.shape[0]}], got {tuple(advantages.shape)}")
    if kl_coef > 0 and logp_ref is None:
        raise ValueError("kl_coef > 0 needs logp_ref")
    m = mask.to(logp_new.dtype)
    adv = advantages.to(logp_new.dtype).unsqueeze(1)
    ratio = torch.exp(logp_new - logp_old.detach())
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    unclipped_obj, clipped_obj = ratio * adv, clipped * adv
    policy_loss = -_masked_mean(torch.minimum(unclipped_obj, clipped_obj), m)
    if logp_ref is not None and kl_coef > 0:
        delta = logp_ref.detach() - logp_new
        kl = _masked_mean(torch.exp(delta) - delta - 1.0, m)
    else:
        kl = torch.zeros((), dtype=logp_new.dtype, device=logp_new.device)
    clip_fraction = _masked_mean((clipped_obj < unclipped_obj).to(m.dtype), m)
    return GrpoLoss(
        loss=policy_loss + kl_coef * kl,
        policy_loss=policy_loss.detach(),
        kl=kl.detach(),
        clip_fraction=clip_fraction.detach(),
    )


@dataclass(frozen=True)
class PackedBatch:
    """Prompt + completion token ids, right-padded: `tokens[B, T]`, and `mask[B, T − 1]` aligned with the
    targets `tokens[:, 1:]`, 1 where the target is a completion token."""

    tokens: torch.Tensor
    mask: torch.Tensor


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> PackedBatch:
    """Concatenate each prompt with its completion, right-pad with `pad_id`, and mark the completions."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need as many prompts as completions (>0), got {len(prompts)}, {len(completions)}")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        tokens[i, : len(p) + len(c)] = torch.tensor([*p, *c], dtype=torch.long)
        # Target j is token j + 1: completion tokens are targets len(p) − 1 … len(p) + len(c) − 2.
        mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1.0
    return PackedBatch(tokens, mask)


def completion_logprobs(model: nn.Module, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """log p(token t | tokens < t) of every target in `batch` under `model` at `temperature`, as [B, T − 1]
    in fp32, zero where `batch.mask` is 0. Differentiable; wrap in `torch.no_grad()` to only evaluate."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = model(batch.tokens[:, :-1]).float() / temperature
    logp = F.log_softmax(logits, dim=-1).gather(-1, batch.tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logp * batch.mask.to(logp.device)
