"""Generation for RL runs: a GRPO group of completions sampled from the policy, with their log-probs.

A rollout worker samples `samples_per_prompt` completions for each of its prompts at the manifest's
temperature and records, for every completion token, log p(token | everything before) at that
temperature: what the GRPO loss needs as `logp_old` and what a trainer recomputes with one prefill to
check the batch (`intellect.node.engine.rlverify`).

Sampling is vectorised over all completions of prompts of one length (every row of a bucket then has the
same positions, and the model needs no attention mask or position ids). The model has no KV cache, so
each new token re-runs the whole (short) sequence: for the built-in tasks (prompts of about 15 tokens,
completions of at most 8) that costs less than the Python around it would save.

A completion ends with its first stop token, which it includes (the environment's END, "\\n", and the
tokenizer's EOS), or after `max_new_tokens`. Prompts are the environment's text with the tokenizer's BOS
in front (`prompt_tokens`): workers, trainers and the warm-up all tokenize through that one function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from intellect.crypto.identity import Identity
from intellect.node.engine.model import Llama
from intellect.node.engine.rlenv import END, Environment, Prompt
from intellect.node.engine.tokenizer import Tokenizer
from intellect.protocol.manifest import RlSpec
from intellect.protocol.rollouts import RolloutBatch, make_batch, prompt_seed


def prompt_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """The token ids of a prompt: BOS (when the tokenizer has one) and the text."""
    ids = tokenizer.encode(text)
    return [tokenizer.bos_id, *ids] if tokenizer.bos_id is not None else ids


def stop_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Tokens that end a completion: END's single token (when it is one) and EOS."""
    stops = set()
    end = tokenizer.encode(END)
    if len(end) == 1:
        stops.add(end[0])
    if tokenizer.eos_id is not None:
        stops.add(tokenizer.eos_id)
    return frozenset(stops)


@dataclass(frozen=True)
class Group:
    """Sampled completions: completion i answers prompt i // samples_per_prompt."""

    prompts: list[list[int]]
    completions: list[list[int]]
    #: Log-prob of every completion token at the sampling temperature (fp32 values).
    logprobs: list[list[float]]
    samples_per_prompt: int


@torch.no_grad()
def _sample_bucket(
    model: Llama,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    stops: frozenset[int],
    generator: torch.Generator,
    greedy: bool = False,
) -> tuple[list[list[int]], list[list[float]]]:
    """Sample every row of `prompt[B, L]` (rows of one length) until a stop token or the length limit."""
    rows = prompt.shape[0]
    seq = prompt
    done = torch.zeros(rows, dtype=torch.bool)
    stop = torch.tensor(sorted(stops), dtype=torch.long)
    out_tokens, out_logp = [], []
    for _ in range(max_new_tokens):
        logits = model(seq)[:, -1].float() / temperature
        logp = F.log_softmax(logits, dim=-1)
        if greedy:
            nxt = logp.argmax(dim=-1)
        else:
            nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        out_tokens.append(nxt)
        out_logp.append(logp.gather(1, nxt.unsqueeze(1)).squeeze(1))
        done = done | torch.isin(nxt, stop)
        if bool(done.all()):
            break
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
    tokens = torch.stack(out_tokens, dim=1).tolist()
    logps = torch.stack(out_logp, dim=1).tolist()
    completions, values = [], []
    for toks, lps in zip(tokens, logps, strict=True):
        end = next((i + 1 for i, t in enumerate(toks) if t in stops), len(toks))
        completions.append(toks[:end])
        values.append(lps[:end])
    return completions, values


def sample_group(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    stops: frozenset[int],
    generator: torch.Generator,
    greedy: bool = False,
) -> Group:
    """Sample `samples_per_prompt` completions of every prompt (on the model's device, in eval mode;
    `generator` on that device too). `greedy` takes the most likely token instead (log-probs still at
    `temperature`)."""
    if samples_per_prompt < 1 or max_new_tokens < 1 or temperature <= 0:
        raise ValueError("need samples_per_prompt >= 1, max_new_tokens >= 1 and temperature > 0")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt + completion of {longest} tokens exceeds max_seq_len {model.cfg.max_seq_len}"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions: list[list[int]] = [[] for _ in range(len(prompts) * samples_per_prompt)]
    logprobs: list[list[float]] = [[] for _ in completions]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    try:
        for length in sorted(by_len):
            idx = by_len[length]
            rows = [i * samples_per_prompt + s for i in idx for s in range(samples_per_prompt)]
            x = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)
            x = x.repeat_interleave(samples_per_prompt, dim=0)
            toks, lps = _sample_bucket(model, x, max_new_tokens, temperature, stops, generator, greedy)
            for row, t, lp in zip(rows, toks, lps, strict=True):
                completions[row], logprobs[row] = t, lp
    finally:
        model.train(was_training)
    return Group([list(p) for p in prompts], completions, logprobs, samples_per_prompt)


def score(env: Environment, tokenizer: Tokenizer, prompts: Sequence[Prompt], group: Group) -> list[float]:
    """The environment's reward of every completion of `group` (whose prompts are `prompts`)."""
    k = group.samples_per_prompt
    return [env.reward(prompts[i // k], tokenizer.decode(c)) for i, c in enumerate(group.completions)]


@dataclass(frozen=True)
class Policy:
    """The policy a worker samples from: a committed version, its state hash and the model holding it."""

    version: int
    state_hash: str
    model: Llama


def rollout_batch(
    identity: Identity,
    run_id: str,
    rl: RlSpec,
    env: Environment,
    tokenizer: Tokenizer,
    policy: Policy,
    seq: int,
    generator: torch.Generator,
    created_at: float,
    logprob_format: str = "f32",
) -> RolloutBatch:
    """A worker's signed batch number `seq` at `policy`: `rl.prompts_per_step` prompts of the assigned
    seed, `rl.samples_per_prompt` completions each, scored by `env`."""
    seed = prompt_seed(run_id, policy.version, identity.peer_id, seq)
    prompts = env.prompts(seed, rl.prompts_per_step)
    ids = [prompt_tokens(tokenizer, p.text) for p in prompts]
    group = sample_group(
        policy.model,
        ids,
        rl.samples_per_prompt,
        rl.max_new_tokens,
        rl.temperature,
        stop_ids(tokenizer),
        generator,
    )
    return make_batch(
        identity,
        run_id=run_id,
        version=policy.version,
        policy_hash=policy.state_hash,
        seq=seq,
        samples_per_prompt=rl.samples_per_prompt,
        prompts=group.prompts,
        completions=group.completions,
        rewards=score(env, tokenizer, prompts, group),
        logprobs=group.logprobs,
        created_at=created_at,
        logprob_format=logprob_format,
    )


@dataclass(frozen=True)
class Accuracy:
    """Share of exactly right answers on held-out prompts."""

    sampled: float
    greedy: float
    prompts: int


def evaluate(
    model: Llama,
    env: Environment,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    temperature: float,
    seed: int = 0,
) -> Accuracy:
    """Task accuracy on `prompts`: one sample each at `temperature` (seeded), and greedy."""
    ids = [prompt_tokens(tokenizer, p.text) for p in prompts]
    stops = stop_ids(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    sampled = sample_group(model, ids, 1, max_new_tokens, temperature, stops, gen)
    greedy = sample_group(model, ids, 1, max_new_tokens, temperature, stops, gen, greedy=True)
    n = max(1, len(prompts))
    return Accuracy(
        sampled=sum(score(env, tokenizer, prompts, sampled)) / n,
        greedy=sum(score(env, tokenizer, prompts, greedy)) / n,
        prompts=len(prompts),
    )
