"""What the round machine trains with: the engine built from a manifest, behind one `RoundTrainer` interface.

A node trains alone (`SoloTrainer`: the inner trainer in a worker thread) or with several local ranks
(`LocalRanksTrainer`: torch.distributed inside the node, `engine.localgroup`); the round loop sees only
`begin_round` and `steps`, and `train_round` runs the steps in chunks of about `TRAIN_CHUNK_S` so a stop
never waits for a whole round (torch cannot be interrupted inside a step).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from intellect.node.engine.data import ShardResolver, TokenStream
from intellect.node.engine.localgroup import LocalGroup, local_batch, rank_stream
from intellect.node.engine.losscheck import LossCheck, build_loss_check, round0_writer
from intellect.node.engine.model import Llama, ModelConfig
from intellect.node.engine.outer import OuterOptimizer
from intellect.node.engine.tokenizer import Tokenizer, load_tokenizer
from intellect.node.engine.trainer import InnerStats, InnerTrainer, TrainerConfig, resolve_device
from intellect.node.run.events import EventSink, TrainingProgress
from intellect.node.run.lifecycle import rounds_total as run_rounds
from intellect.protocol.manifest import Manifest, ShardSpec
from intellect.protocol.shards import assign_shards

logger = logging.getLogger(__name__)

#: Seconds a training chunk should last: the trainer is stopped between chunks, which bounds how long a
#: shutdown waits for the worker thread.
TRAIN_CHUNK_S = 1.0


@dataclass(frozen=True)
class RoundPlan:
    """What round `round` trains on: our shards (rendezvous over run, round and live members) and seed."""

    round: int
    shards: tuple[ShardSpec, ...]
    seed: int


def plan_round(
    run_id: str, round_: int, me: str, members: Sequence[str], shards: Sequence[ShardSpec]
) -> RoundPlan:
    """This round's shards for `me`; with more peers than shards, all of them (duplicates are harmless)."""
    peers = sorted({*members, me})
    mine = assign_shards(run_id, round_, peers, list(shards)).get(me) or list(shards)
    return RoundPlan(round_, tuple(mine), int.from_bytes(me.encode()[-4:], "big") ^ round_)


class RoundTrainer(Protocol):
    """The round loop's view of whatever trains inside this node."""

    trainer: InnerTrainer

    async def begin_round(self, plan: RoundPlan) -> None: ...

    async def steps(self, n: int) -> InnerStats: ...

    async def close(self) -> None: ...


class SoloTrainer:
    """One process trains on the whole batch."""

    def __init__(self, trainer: InnerTrainer, stream_for: Callable[[RoundPlan], TokenStream]) -> None:
        self.trainer = trainer
        self._stream_for = stream_for

    async def begin_round(self, plan: RoundPlan) -> None:
        self.trainer.stream = self._stream_for(plan)

    async def steps(self, n: int) -> InnerStats:
        return await self.trainer.run_inner(n)

    async def close(self) -> None:
        return None


class LocalRanksTrainer:
    """Rank 0 of a local group: its ranks start each round from our weights, on their share of the shards."""

    def __init__(
        self, trainer: InnerTrainer, group: LocalGroup, stream_for: Callable[[RoundPlan], TokenStream]
    ) -> None:
        self.trainer = trainer
        self.group = group
        self._stream_for = stream_for

    async def begin_round(self, plan: RoundPlan) -> None:
        stream = self._stream_for(plan)
        await asyncio.to_thread(self.group.begin_round, list(plan.shards), plan.seed, stream)

    async def steps(self, n: int) -> InnerStats:
        return await asyncio.to_thread(self.group.steps, n)

    async def close(self) -> None:
        await asyncio.to_thread(self.group.close)


@dataclass
class Pacer:
    """Steps per chunk, learned from the last chunk's duration and kept from round to round."""

    chunk_s: float = TRAIN_CHUNK_S
    steps: int = 1


class RoundAbandoned(Exception):
    """The node paused between two chunks of a round's inner steps: the round is given up."""


async def train_round(
    trainer: RoundTrainer,
    steps: int,
    emit: EventSink,
    pacer: Pacer,
    paused: Callable[[], bool] = lambda: False,
    hold: asyncio.Lock | None = None,
) -> InnerStats:
    """Run `steps` inner steps in chunks of about `pacer.chunk_s`, reporting throughput after each chunk;
    RoundAbandoned when `paused()` says so between two chunks. `hold` is held while each chunk computes:
    whoever takes it between two chunks has the model to itself (an overlapped average landing moves the
    local copy there, `GlobalState.model_idle`), and the time waited for it is logged as between chunks."""
    done, tokens, loss_sum, seconds, between_s = 0, 0, 0.0, 0.0, 0.0
    last: InnerStats | None = None
    started = time.monotonic()
    while done < steps:
        if paused():
            raise RoundAbandoned(f"paused after {done} of {steps} inner steps")
        n = min(pacer.steps, steps - done)
        t1 = time.monotonic()
        async with hold if hold is not None else contextlib.nullcontext():
            t0 = time.monotonic()
            between_s += t0 - t1
            last = await trainer.steps(n)
            dt = time.monotonic() - t0
        pacer.steps = max(1, int(pacer.chunk_s * n / max(dt, 1e-6)))
        done += n
        tokens += last.tokens
        loss_sum += last.mean_loss * n
        seconds += dt
        emit(TrainingProgress(tokens / seconds if seconds > 0 else 0.0))
    if last is None:
        raise ValueError("a round needs at least one inner step")
    # Where a round's time goes (bench/utilization.py reads it): the inner steps, what ran between them
    # (an overlapped run's landing), and the rest (scheduling, the progress events).
    logger.info(
        "inner steps: %d in %.2f s, %.2f s of them computing, %.2f s between chunks",
        done,
        time.monotonic() - started,
        seconds,
        between_s,
        extra={"event": "inner_steps", "wall_s": time.monotonic() - started, "compute_s": seconds},
    )
    return InnerStats(
        steps=done,
        tokens=tokens,
        mean_loss=loss_sum / max(1, done),
        last_loss=last.last_loss,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        lr=last.lr,
    )


@dataclass(frozen=True)
class EngineSettings:
    """The node-side settings the engine needs (the rest comes from the manifest)."""

    data_dir: Path
    device: str = "auto"
    #: Ranks inside this node; 0: one per GPU that splits the batch (CUDA), else 1.
    local_ranks: int = 0
    #: The volunteer's cap on the data directory, in bytes (0: none), kept when checkpoints are written.
    max_disk_bytes: int = 0


@dataclass(frozen=True)
class Engine:
    """Everything torch-side a run needs, built once from the manifest."""

    model: Llama
    outer: OuterOptimizer
    trainer: RoundTrainer
    shards: tuple[ShardSpec, ...]
    local_ranks: int
    #: PIDs of local-rank worker processes (to kill on a forced exit).
    pids: tuple[int, ...]
    #: What a state from peers must pass before it is adopted (None: no held-out window to check on).
    loss_check: LossCheck | None = None


def build_engine(manifest: Manifest, settings: EngineSettings) -> Engine:
    """Tokenizer, data, model (from the manifest's seed), outer optimizer and the trainer (blocking)."""
    d = manifest.diloco
    spec = "byte" if manifest.tokenizer.kind == "byte" else manifest.tokenizer.uri
    tok = load_tokenizer(spec, manifest.tokenizer.sha256 or None)
    resolver = ShardResolver(tok, base_dir=settings.data_dir / "shards")
    shards = tuple(manifest.shards)
    model = Llama(ModelConfig.from_dict(manifest.model.to_dict()), seed=manifest.init.seed)
    outer = OuterOptimizer.from_model(model, lr=d.outer_lr, momentum=d.outer_momentum, nesterov=d.nesterov)
    ranks = local_ranks(manifest, settings)
    batch = local_batch(d.batch_size, ranks)  # each local rank takes its share: the node's step is unchanged

    def stream_for(plan: RoundPlan) -> TokenStream:
        return rank_stream(resolver, list(plan.shards), 0, ranks, batch, d.seq_len, plan.seed)

    rounds_total = run_rounds(manifest)  # (every member stops after this round: run.lifecycle)
    tcfg = TrainerConfig(
        lr=d.inner_lr,
        warmup_steps=d.warmup_steps,
        total_steps=max(d.warmup_steps + 1, rounds_total * d.inner_steps),
        min_lr=d.inner_lr * 0.1 if d.schedule != "constant" else d.inner_lr,
        weight_decay=d.weight_decay,
        batch=batch,
        seq_len=d.seq_len,
        device=settings.device,
    )
    first = stream_for(RoundPlan(1, shards, 0))
    inner = InnerTrainer(model, tcfg, first, device=settings.device)
    trainer: RoundTrainer = SoloTrainer(inner, stream_for)
    pids: tuple[int, ...] = ()
    if manifest.rl is not None:
        if ranks > 1:
            raise ValueError("an RL trainer runs one local rank (local_ranks = 1)")
        trainer = rl_trainer(manifest, inner, tok, settings.data_dir)
    elif ranks > 1:
        group = LocalGroup(
            inner,
            world=ranks,
            model=manifest.model.to_dict(),
            tokenizer=spec,
            tokenizer_sha256=manifest.tokenizer.sha256 or None,
            shards=list(shards),
            shards_dir=settings.data_dir / "shards",
        )
        trainer, pids = LocalRanksTrainer(inner, group, stream_for), tuple(group.pids)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()))
    round0 = round0_writer(manifest.init.seed, settings.data_dir, manifest.init.sha256)
    # An RL policy is not trained on the shards' text: their held-out loss says nothing of its states.
    check = (
        None if manifest.rl is not None else build_loss_check(resolver, shards, (batch, d.seq_len), round0)
    )
    return Engine(model, outer, trainer, shards, ranks, pids, check)


def rl_trainer(manifest: Manifest, inner: InnerTrainer, tok: Tokenizer, data_dir: Path) -> RoundTrainer:
    """The `trainer` role of an RL run: GRPO steps on verified rollouts (`run.rltrainer`)."""
    from intellect.node.engine.rlenv import load_environment
    from intellect.node.run.rltrainer import RlRoundTrainer

    assert manifest.rl is not None
    env = load_environment(manifest.rl.env)
    return RlRoundTrainer(inner, manifest.run_id, manifest.rl, env, tok, log_dir=data_dir)


def local_ranks(manifest: Manifest, settings: EngineSettings) -> int:
    """Ranks that train inside this node: the configured number, or (0) one per visible GPU."""
    if settings.local_ranks:
        return settings.local_ranks  # an explicit count that does not divide the batch is an error
    if resolve_device(settings.device).type != "cuda":
        return 1
    gpus = max(1, torch.cuda.device_count())
    batch = manifest.diloco.batch_size
    # Automatic: as many GPUs as split the run's batch evenly (e.g. 2 of 3 GPUs for a batch of 8).
    ranks = max(w for w in range(1, gpus + 1) if batch % w == 0)
    if ranks < gpus:
        logger.warning(
            "using %d of %d GPUs: the run's batch_size %d does not split over more", ranks, gpus, batch
        )
    return ranks
