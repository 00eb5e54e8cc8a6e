"""Supervised warm-up of an RL run's initial policy on the environment's own demonstrations.

GRPO learns only from groups whose rewards differ: a policy that never succeeds gets all-zero rewards,
zero advantages and no gradient. So an RL run starts from a policy that sometimes succeeds, made here by
a few hundred steps of next-token cross-entropy on the completion tokens of `demonstrations`, then
packed into the run's round-0 state (`intellect-node data init-state --warmup-steps`; the manifest's
`init.sha256` pins it as for any initial state).

Everything is seeded: the weights start from the manifest's `init.seed`, demonstrations come from seeds
0, 1, 2, … (one per step), and AdamW on the CPU in one thread is deterministic, so the same manifest and
settings give the same state hash on the same torch build. The held-out accuracy is measured on prompts of
seed `HELDOUT_SEED`, which the warm-up never trains on (a short prompt can still coincide with a
training one: the `reverse` task has only 26 one-letter words).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from intellect.node.engine.grpo import completion_logprobs, pack
from intellect.node.engine.model import Llama
from intellect.node.engine.rlenv import Environment
from intellect.node.engine.rollout import Accuracy, evaluate, prompt_tokens
from intellect.node.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

#: Seed of the held-out evaluation prompts (demonstrations use seeds 0 … steps − 1).
HELDOUT_SEED = 2**62


@dataclass(frozen=True)
class WarmupConfig:
    """How long and how hard the warm-up trains."""

    #: Optimizer steps (0: no training, only the evaluation).
    steps: int
    #: Demonstrations per step.
    batch_size: int = 64
    #: AdamW learning rate (constant after a linear warm-up over the first tenth of the steps).
    lr: float = 2e-3
    #: Held-out prompts the accuracy is measured on.
    eval_prompts: int = 200

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.eval_prompts < 1 or not self.lr > 0:
            raise ValueError("need steps >= 0, batch_size >= 1, eval_prompts >= 1 and lr > 0")


@dataclass(frozen=True)
class WarmupReport:
    """Held-out accuracy before and after, the last training loss and how long it took."""

    before: Accuracy
    after: Accuracy
    final_loss: float
    seconds: float


def demonstration_loss(
    model: Llama, env: Environment, tokenizer: Tokenizer, seed: int, n: int
) -> torch.Tensor:
    """Mean negative log-likelihood of the ideal completions' tokens of `n` demonstrations of `seed`."""
    demos = env.demonstrations(seed, n)
    prompts = [prompt_tokens(tokenizer, p.text) for p, _ in demos]
    completions = [tokenizer.encode(c) for _, c in demos]
    pad_id = getattr(tokenizer, "pad_id", 0)
    batch = pack(prompts, completions, pad_id)
    device = next(model.parameters()).device
    batch = type(batch)(batch.tokens.to(device), batch.mask.to(device))
    return -completion_logprobs(model, batch).sum() / batch.mask.sum()


def warmup(
    model: Llama,
    env: Environment,
    tokenizer: Tokenizer,
    cfg: WarmupConfig,
    max_new_tokens: int,
    temperature: float,
) -> WarmupReport:
    """Train `model` in place on demonstrations; report held-out accuracy (sampled at `temperature`,
    and greedy) before and after."""
    start = time.monotonic()
    heldout = env.prompts(HELDOUT_SEED, cfg.eval_prompts)
    before = evaluate(model, env, tokenizer, heldout, max_new_tokens, temperature)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ramp = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / ramp))
    model.train()
    loss = torch.zeros(())
    for step in range(cfg.steps):
        loss = demonstration_loss(model, env, tokenizer, step, cfg.batch_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log.info("warm-up step %d/%d: loss %.4f", step, cfg.steps, float(loss.detach()))
    model.eval()
    after = evaluate(model, env, tokenizer, heldout, max_new_tokens, temperature)
    return WarmupReport(before, after, float(loss.detach()), time.monotonic() - start)
