"""Convergence benchmark: DiLoCo (H = 10 and 50; int8, int4, int2 Δ; sequential or overlapped outer update)
against data-parallel training and one worker.

The `tiny` model on the built-in corpus, the same total number of training tokens for every method
(``peers × steps × batch × seq_len``), every method a set of real OS processes started here:

* ``single``: one process, batch `b`, ``peers × steps`` AdamW steps over all training shards.
* ``ddp``: `peers` processes with torch.distributed (gloo, bound to the loopback interface), each with
  batch `b` on its own share of the shards; after every backward the gradients are flattened into one
  bucket and all-reduced (sum, then ÷ peers) before clipping and the AdamW step, i.e. what DDP does, with
  one bucket (`intellect.node.engine.localgroup.gradient_allreduce`, what a node's local ranks run). `steps`
  steps. All replicas are checked bit-identical at the end.
* DiLoCo, one method per H (``--h``), codec (``--compressions``, default ``int8,int4,int2``) and outer
  update (``--modes``, default ``sequential,overlapped``): `peers` processes, each with its own model,
  AdamW state and the same shards as the DDP rank of that index. Every round: H inner steps, the
  pseudo-gradient Δ, then the **real data plane of the node** (`intellect.node.net.allreduce.
  butterfly_allreduce` over TCP on 127.0.0.1, signed hellos, blockwise payloads in the codec: each peer
  sends its Δ's parts, each partition owner averages them (weighted by tokens) and sends the re-encoded
  mean to everyone), then the Nesterov outer step of `OuterOptimizer`. This is the path the daemon runs,
  without DHT matchmaking: the group is fixed, and a barrier lines up every round's all-reduce.

  - ``diloco_h{H}`` (sequential, int8: the benchmark's old name), ``diloco_h{H}_int4``,
    ``diloco_h{H}_int2``: **sequential** outer update. Δ = θ_global − θ_local; the round waits for the
    all-reduce, steps the global weights with the average and copies them into the model.
  - ``overlap_h{H}_int8``, ``overlap_h{H}_int4``, ``overlap_h{H}_int2`` (JSON aliases ``overlap_2bit_h{H}_*``
    for int2, ``*_4bit_*`` for int4): **overlapped** outer update, one round late with the "eager" local start
    (Kale et al. 2025), the algorithm of the manifest's ``diloco.outer_update: overlapped``. Each peer keeps
    `start` (at first the global weights); after H inner steps, progress = start − θ_local; it then awaits the
    previous round's all-reduce (which ran on the event loop while these H steps trained in a thread) and
    applies its average with `OuterOptimizer.step`, starts this round's all-reduce of its progress as a task,
    and sets start = `OuterOptimizer.preview(progress)` (the step the global weights would take if the average
    equalled our own progress), copied into the model (the inner optimizer state is kept). After the last
    round its average is awaited and applied; the global weights are what is evaluated. The global weights
    only ever take real averages, so every replica's global digest is checked identical, as in the sequential
    mode.
    By default (``--land-after -1``, as the daemon does) a previous round's average that completes while
    this round trains lands after the first inner step at which it has completed, and the local model is
    moved by what the eager start missed; ``--land-after K`` lands it after K steps (deterministic), and
    K >= H at the round's end, as described above.

  **Error feedback** (``--no-error-feedback`` turns it off), for every codec but ``none``, as the daemon
  keeps it (`intellect.node.run.state.GlobalState`): after a completed all-reduce each peer keeps the
  residual = what the all-reduce lost of its contribution, `intellect.node.net.averaging.
  contribution_error(sent, peers, its index among the sorted members, codec, partition sizes)`, and adds
  it to the flat Δ (or progress) it sends next. In the overlapped mode the residual of round r is known
  only when round r's average is awaited, after round r+1's progress was computed, so it enters round
  r+2's contribution.

Warm start (``--warm-start-steps W``, default 1000; 0 starts every method from the random init): before
the methods, one process runs W single-worker AdamW steps (batch `b`, all training shards, its own
warm-up and cosine) and saves the weights; every method, every replica and DiLoCo's global weights then
start from that checkpoint, with fresh optimizer state and their own schedule. This is the main protocol of
the DiLoCo paper (Douillard et al. 2023), whose runs start from a checkpoint pretrained for 24k steps. Those
tokens are identical for every method and are reported apart (``warm_start_tokens``); ``tokens`` counts
what each method trained itself. From the random init, ten outer rounds are too few for DiLoCo: see
docs/decisions.md, "Convergence", for both figures.

Bytes each peer sends: DiLoCo = what `butterfly_allreduce` counted on its sockets (payloads in the codec,
the agreement phase's digests and witness copy, frame headers), mean over the peers; DDP = fp32 gradient
bytes × 2(N−1)/N per step, the lower bound of any all-reduce (gloo sends at least this), so the ratio DDP /
DiLoCo (``{method}_bytes_reduction_vs_ddp``) is conservative. Held-out loss: mean next-token
cross-entropy (nats per byte-token) over every batch of the corpus's held-out tail, which no method trains
on, on the final weights (DiLoCo: the global weights). Curves: [tokens so far, held-out loss on its first
4 batches], every `curve_every` steps per peer (overlapped: of the global weights once a round's average
is applied). Times: ``seconds`` is the wall clock of a method's training loop (slowest peer),
``allreduce_seconds`` the sum of its all-reduces' own durations (overlapped: they run beside training, so
this is not time lost), ``train_seconds`` the time spent in inner steps.

The last line of output is one JSON object (``--json``) with the figures and the settings used: for every
method ``{method}_loss``, ``_bytes_per_peer``, ``_bytes_reduction_vs_ddp``, ``_loss_vs_ddp``, ``_seconds``,
``_allreduce_seconds`` (and ``_loss_vs_diloco_h{H}``, against sequential int8 at the same H), and
``at_1000x`` / ``best_at_1000x``: the methods that send at least 1000× fewer bytes per peer than DDP.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from intellect.node.engine.data import (
    ShardResolver,
    TokenStream,
    builtin_heldout,
    builtin_shards,
    heldout_batches,
)
from intellect.node.engine.localgroup import gradient_allreduce
from intellect.node.engine.model import CONFIGS, Llama
from intellect.node.engine.tokenizer import ByteTokenizer
from intellect.node.engine.trainer import InnerTrainer, TrainerConfig

#: Held-out batches evaluated for the curves (the final figure uses all of them).
_CURVE_BATCHES = 4


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a method needs; the same object for all methods (picklable for child processes)."""

    model: str = "tiny"
    peers: int = 4
    #: Inner steps per peer (DDP steps); the single worker runs peers × steps.
    steps: int = 500
    #: Single-worker steps that make the checkpoint every method starts from (0: the random init).
    warm_start_steps: int = 1000
    batch: int = 8
    seq_len: int = 64
    #: Peak AdamW learning rate of every method (DDP, single and DiLoCo's inner steps alike).
    inner_lr: float = 3e-3
    warmup_frac: float = 0.1
    #: DiLoCo outer SGD (Nesterov when the momentum is non-zero; 1.0 and 0 is plain parameter averaging).
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    #: DiLoCo payload compression of the data plane ("int8", "int4", "int2", "fp16" or "none"); set per
    #: method from ``--compressions`` (not an option of its own).
    compression: str = "int8"
    #: Keep an error-feedback residual per peer, as the daemon does (``--no-error-feedback``: none).
    error_feedback: bool = True
    #: How each partition's owner combines the contributions ("mean" or "centered_clip").
    reducer: str = "mean"
    #: Overlapped mode only: what stands in for the average still in flight when the next round's start
    #: is computed. "own": our own progress (the eager start of Kale et al., the daemon's); "last": the
    #: average applied last, the same on every peer (none in the first round: own); "mix": our own
    #: progress / peers + the last average × (peers − 1) / peers.
    eager: str = "own"
    #: Overlapped mode only: after how many of round r + 1's inner steps round r's average is applied
    #: (0 ≤ K < H), and the local model moved by what the guess missed (θ_global − the eager start), so
    #: that the rest of the round trains from the true global weights; H or more: at the round's end (the
    #: one-round-late update). The all-reduce lands after K steps: a deterministic stand-in for "as soon
    #: as it arrives", which on a real link is a time, not a step count. -1: as soon as it has completed,
    #: checked after every inner step, as the daemon does (`overlap.start_landing`; not deterministic; at
    #: the latest before the round's last step). The default is -1, the daemon's rule, so that the JSON's
    #: `overlap_*` keys measure what a run with `outer_update = "overlapped"` does on this loopback.
    land_after: int = -1
    eval_batch: int = 16
    #: Record a held-out point every this many steps per peer (0: no curve).
    curve_every: int = 50
    seed: int = 0

    def trainer_config(self, steps: int) -> TrainerConfig:
        return TrainerConfig(
            lr=self.inner_lr,
            min_lr=self.inner_lr / 10,
            warmup_steps=max(1, int(steps * self.warmup_frac)),
            total_steps=steps,
            batch=self.batch,
            seq_len=self.seq_len,
            device="cpu",
        )


def _init_process() -> None:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def _data(s: Settings) -> tuple[list[Any], list[torch.Tensor], ShardResolver]:
    tok = ByteTokenizer()
    resolver = ShardResolver(tok)
    infos = builtin_shards(tok)
    held = resolver.load(builtin_heldout(tok))
    return infos, heldout_batches(held, s.eval_batch, s.seq_len), resolver


def _peer_stream(s: Settings, resolver: ShardResolver, infos: list[Any], k: int) -> TokenStream:
    # Round-robin split: every peer gets the same number of shards (rendezvous hashing could be uneven).
    shards = [resolver.load(i) for i in infos[k :: s.peers]]
    return TokenStream(shards, s.batch, s.seq_len, seed=s.seed + k + 1)


def _initial_model(s: Settings, warm: Path | None) -> Llama:
    """The weights every method starts from: the warm-start checkpoint, or the seeded random init."""
    model = Llama(CONFIGS[s.model], seed=s.seed)
    if warm is not None:
        model.load_state_dict(torch.load(warm, weights_only=True))
    return model


def _eval(model: Llama, batches: list[torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = sum(float(model.loss(b)) for b in batches) / len(batches)
    model.train(was_training)
    return loss


def _digest(params: Any) -> str:
    return hashlib.sha256(b"".join(p.detach().contiguous().numpy().tobytes() for p in params)).hexdigest()


def _write(out: Path, result: dict[str, Any]) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)


# --- single worker ------------------------------------------------------------------------------------


def _warm_start_worker(s: Settings, out: Path, checkpoint: Path) -> None:
    _init_process()
    infos, held, resolver = _data(s)
    model = Llama(CONFIGS[s.model], seed=s.seed)
    # Its own stream seed: the pretraining order is none of the methods' orders.
    stream = TokenStream([resolver.load(i) for i in infos], s.batch, s.seq_len, seed=s.seed + s.peers + 1)
    trainer = InnerTrainer(model, s.trainer_config(s.warm_start_steps), stream, "cpu")
    t0 = time.perf_counter()
    stats = trainer.run_steps(s.warm_start_steps)
    seconds = time.perf_counter() - t0
    torch.save(model.state_dict(), checkpoint)
    _write(
        out,
        {
            "method": "warm_start",
            "loss": _eval(model, held),
            "bytes_per_peer": 0,
            "tokens": stats.tokens,
            "seconds": seconds,
        },
    )


def _single_worker(s: Settings, out: Path, warm: Path | None) -> None:
    _init_process()
    infos, held, resolver = _data(s)
    steps = s.peers * s.steps
    chunk = s.peers * s.curve_every if s.curve_every else steps
    model = _initial_model(s, warm)
    stream = TokenStream([resolver.load(i) for i in infos], s.batch, s.seq_len, seed=s.seed)
    trainer = InnerTrainer(model, s.trainer_config(steps), stream, "cpu")
    tokens, curve = 0, []
    t0 = time.perf_counter()
    while trainer.step < steps:
        stats = trainer.run_steps(min(chunk, steps - trainer.step))
        tokens += stats.tokens
        if s.curve_every:
            curve.append([tokens, round(_eval(model, held[:_CURVE_BATCHES]), 4)])
    seconds = time.perf_counter() - t0
    _write(
        out,
        {
            "method": "single",
            "loss": _eval(model, held),
            "bytes_per_peer": 0,
            "tokens": tokens,
            "seconds": seconds,
            "curve": curve,
        },
    )


# --- data-parallel ------------------------------------------------------------------------------------


def _ddp_worker(rank: int, s: Settings, out_dir: Path, warm: Path | None) -> None:
    _init_process()
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on loopback too, not the host's address
    import torch.distributed as dist

    # A file rendezvous in the method's own directory, not a TCP port picked when the methods were built:
    # minutes later another process (a data plane, a second invocation's DDP) could hold that port, and
    # gloo then aborted the whole method (seen with two invocations at once).
    store = f"file://{out_dir / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=s.peers)
    try:
        infos, held, resolver = _data(s)
        model = _initial_model(s, warm)
        stream = _peer_stream(s, resolver, infos, rank)
        trainer = InnerTrainer(model, s.trainer_config(s.steps), stream, "cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        # The node's own gradient all-reduce between local ranks (one flat bucket, as DDP with one bucket).
        sync = gradient_allreduce(params, s.peers)
        allreduces = [0]

        def counted_sync() -> None:
            sync()
            allreduces[0] += 1

        trainer.grad_sync = counted_sync
        chunk = s.curve_every or s.steps
        tokens, curve = 0, []
        t0 = time.perf_counter()
        while trainer.step < s.steps:
            stats = trainer.run_steps(min(chunk, s.steps - trainer.step))
            tokens += stats.tokens
            if s.curve_every and rank == 0:
                curve.append([tokens * s.peers, round(_eval(model, held[:_CURVE_BATCHES]), 4)])
        seconds = time.perf_counter() - t0
        digests: list[Any] = [None] * s.peers
        dist.all_gather_object(digests, _digest(params))
        total = torch.tensor([tokens], dtype=torch.int64)
        dist.all_reduce(total)
        if rank == 0:
            grad_bytes = sum(p.numel() * 4 for p in params)
            _write(
                out_dir / "ddp.json",
                {
                    "method": "ddp",
                    "loss": _eval(model, held),
                    "bytes_per_peer": grad_bytes * 2 * (s.peers - 1) / s.peers * allreduces[0],
                    "allreduces": allreduces[0],
                    "tokens": int(total.item()),
                    "seconds": seconds,
                    "replicas_identical": len(set(digests)) == 1,
                    "curve": curve,
                },
            )
    finally:
        dist.destroy_process_group()


# --- DiLoCo -------------------------------------------------------------------------------------------

#: How the outer update is applied: after each round's all-reduce, or one round late with the eager start.
MODES = ("sequential", "overlapped")


def _diloco_name(h: int, compression: str, mode: str) -> str:
    """`diloco_h{H}` (sequential int8, the benchmark's old name), `diloco_h{H}_{c}`, `overlap_h{H}_{c}`."""
    if mode == "overlapped":
        return f"overlap_h{h}_{compression}"
    return f"diloco_h{h}" if compression == "int8" else f"diloco_h{h}_{compression}"


def _bits_alias(name: str) -> str | None:
    """`overlap_h50_int2` → `overlap_2bit_h50` (and int4 → 4bit); None for the other codecs."""
    for codec, bits in (("int2", "2bit"), ("int4", "4bit")):
        head, sep, rest = name.partition("_h")
        h, sep2, tail = rest.partition("_")
        if sep and sep2 and tail == codec:
            return f"{head}_{bits}_h{h}"
    return None


def _eager_guess(
    s: Settings, own: dict[str, torch.Tensor], last: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """What the overlapped start steps the global weights with, standing in for the average in flight."""
    if s.eager == "own" or last is None:
        return own
    if s.eager == "last":
        return last
    w = 1.0 / s.peers
    return {n: own[n] * w + last[n] * (1.0 - w) for n in own}


def _diloco_worker(
    rank: int, s: Settings, h: int, mode: str, name: str, barrier: Any, out_dir: Path, warm: Path | None
) -> None:
    _init_process()
    asyncio.run(_diloco_peer(rank, s, h, mode, name, barrier, out_dir, warm))


async def _diloco_peer(
    rank: int, s: Settings, h: int, mode: str, name: str, barrier: Any, out_dir: Path, warm: Path | None
) -> None:
    from intellect.crypto.identity import Identity
    from intellect.node.engine.outer import OuterOptimizer
    from intellect.node.net.allreduce import (
        DataPlane,
        ReducedVector,
        butterfly_allreduce,
        flatten,
        get_payload_codec,
        schema_hash,
        unflatten,
    )
    from intellect.node.net.averaging import contribution_error
    from intellect.protocol.groups import GroupMember, GroupSpec

    def wait_all() -> None:
        barrier.wait(timeout=600)

    infos, held, resolver = _data(s)
    cfg = CONFIGS[s.model]
    model = _initial_model(s, warm)
    # Momentum 0 means plain averaging (outer lr 1: Local SGD); Nesterov needs a non-zero momentum.
    nesterov = s.outer_momentum > 0
    outer = OuterOptimizer.from_model(model, lr=s.outer_lr, momentum=s.outer_momentum, nesterov=nesterov)
    trainer = InnerTrainer(model, s.trainer_config(s.steps), _peer_stream(s, resolver, infos, rank), "cpu")
    codec = get_payload_codec(s.compression)
    feedback = s.error_feedback and codec.name != "none"
    # The same identities (so the same partition owners) for every variant of one H.
    identity = Identity.from_seed(hashlib.sha256(f"bench-convergence/{h}/{rank}".encode()).digest())
    run_id = f"bench-convergence-{name}"
    params = dict(model.named_parameters())
    evaluated = Llama(cfg, seed=s.seed) if rank == 0 and s.curve_every else None
    async with DataPlane(identity, "127.0.0.1", 0) as plane:
        (out_dir / f"member-{rank}").write_text(json.dumps([identity.peer_id, plane.port]))
        await asyncio.to_thread(wait_all)
        found = [json.loads((out_dir / f"member-{k}").read_text()) for k in range(s.peers)]
        members = tuple(GroupMember(pid, "127.0.0.1", port) for pid, port in sorted(found))
        my_index = [m.peer_id for m in members].index(identity.peer_id)
        sent = received = tokens = 0
        curve: list[list[float]] = []
        allreduce_s = train_s = 0.0
        landed_after: list[int] = []  # `--land-after -1`: after how many inner steps each average landed
        #: Error feedback as the daemon keeps it (`GlobalState`): what the last completed all-reduce lost of
        #: our contribution (flat fp32), added to the next pseudo-gradient we send.
        residual: torch.Tensor | None = None

        def contribution(delta: dict[str, torch.Tensor]) -> torch.Tensor:
            flat = flatten(delta)
            if residual is not None:
                flat.add_(residual)
            return flat

        async def allreduce(r: int, flat: torch.Tensor, weight: float, like: Any) -> ReducedVector:
            spec = GroupSpec(run_id, r, 0, schema_hash(like), members)
            return await butterfly_allreduce(
                plane, spec, flat, weight, codec, stall_timeout=120.0, reducer=s.reducer
            )

        def completed(outcome: ReducedVector, flat: torch.Tensor) -> torch.Tensor | None:
            """Count a completed all-reduce; the residual it leaves (`GlobalState._apply_step`)."""
            nonlocal sent, received, allreduce_s
            sent += outcome.bytes_sent
            received += outcome.bytes_received
            allreduce_s += outcome.seconds
            if not feedback:
                return None
            err = contribution_error(flat, s.peers, my_index, codec, outcome.part_sizes)
            return err if bool(err.any()) else None

        def curve_point(done_tokens: int) -> None:
            if evaluated is not None and trainer.step % s.curve_every < h:
                outer.copy_to(evaluated)
                curve.append([done_tokens * s.peers, round(_eval(evaluated, held[:_CURVE_BATCHES]), 4)])

        async def train(n: int = h) -> Any:
            nonlocal tokens, train_s
            t = time.perf_counter()
            stats = await asyncio.to_thread(trainer.run_steps, n)
            train_s += time.perf_counter() - t
            tokens += stats.tokens
            return stats

        async def train_until_landing(task: asyncio.Task[ReducedVector]) -> tuple[int, int]:
            """The inner steps of a round before its average in flight lands (`Settings.land_after`)."""
            if s.land_after >= 0:
                return s.land_after, (await train(s.land_after)).tokens if s.land_after else 0
            k = done_tokens = 0
            while k < h - 1 and not task.done():
                done_tokens += (await train(1)).tokens
                k += 1
            landed_after.append(k)
            return k, done_tokens

        rounds = s.steps // h
        t0 = time.perf_counter()
        if mode == "sequential":
            for r in range(rounds):
                stats = await train()
                delta = outer.pseudo_gradient(model)
                flat = contribution(delta)
                await asyncio.to_thread(wait_all)  # every member starts the round's all-reduce together
                # A failed all-reduce raises: no outer step without it.
                outcome = await allreduce(r, flat, float(stats.tokens), delta)
                residual = completed(outcome, flat)
                outer.step(unflatten(outcome.flat, delta))
                outer.copy_to(model)
                curve_point(tokens)
        else:
            # One-step-delayed outer update with the eager start: round r's all-reduce runs on this event
            # loop while round r+1 trains in a thread; round r+1 starts from the step the global weights
            # would take if the average equalled our own progress (`OuterOptimizer.preview`), and the real
            # average is applied to the global weights when it arrives, one round later.
            start = {n: t.clone() for n, t in outer.global_params.items()}
            inflight: tuple[asyncio.Task[ReducedVector], torch.Tensor, dict[str, torch.Tensor]] | None = None
            last: dict[str, torch.Tensor] | None = None  # the average applied last (`Settings.eager`)
            for r in range(rounds):
                if inflight is not None and s.land_after < h:
                    # Round r − 1's average lands after K inner steps of round r: applied to θ_global,
                    # and the local model moved by what the eager start missed (its progress is kept).
                    k, first_tokens = await train_until_landing(inflight[0])
                    task, prev_flat, prev_like = inflight
                    outcome = await task
                    inflight = None
                    residual = completed(outcome, prev_flat)
                    last = unflatten(outcome.flat, prev_like)
                    outer.step(last)
                    with torch.no_grad():
                        for n, g in outer.global_params.items():
                            params[n].add_((g - start[n]).to(params[n].dtype))
                    start = {n: t.clone() for n, t in outer.global_params.items()}
                    curve_point(tokens)
                    stats = await train(h - k)
                    stats = dataclasses.replace(stats, tokens=stats.tokens + first_tokens)
                else:
                    stats = await train()
                with torch.no_grad():
                    progress = {n: start[n] - params[n].detach().float() for n in outer.global_params}
                flat = contribution(progress)
                if inflight is not None:
                    task, prev_flat, prev_like = inflight
                    outcome = await task
                    residual = completed(outcome, prev_flat)
                    last = unflatten(outcome.flat, prev_like)
                    outer.step(last)
                    curve_point(tokens - stats.tokens)
                # The barrier only lines up the hellos; round r's all-reduce starts before round r+1 trains.
                await asyncio.to_thread(wait_all)
                task = asyncio.create_task(allreduce(r, flat, float(stats.tokens), progress))
                inflight = (task, flat, progress)
                await asyncio.sleep(0)  # let it send its hellos before the preview's torch work
                start = outer.preview(_eager_guess(s, unflatten(flat, progress), last))
                outer.copy_to(model, start)  # the inner optimizer's state is kept
            if inflight is not None:
                task, prev_flat, prev_like = inflight
                outcome = await task
                residual = completed(outcome, prev_flat)
                outer.step(unflatten(outcome.flat, prev_like))
                curve_point(tokens)
        seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "rank": rank,
        "bytes_sent": sent,
        "bytes_received": received,
        "tokens": tokens,
        "seconds": seconds,
        "allreduce_seconds": allreduce_s,
        "train_seconds": train_s,
        "landed_after": landed_after,
        "rounds": rounds,
        "digest": _digest(outer.global_params.values()),
    }
    if rank == 0:
        final = Llama(cfg, seed=s.seed)
        outer.copy_to(final)
        result |= {"loss": _eval(final, held), "curve": curve}
    _write(out_dir / f"rank-{rank}.json", result)


def _diloco_result(s: Settings, h: int, name: str, out_dir: Path) -> dict[str, Any]:
    ranks = [json.loads((out_dir / f"rank-{k}.json").read_text()) for k in range(s.peers)]
    return {
        "method": name,
        "h": h,
        "loss": ranks[0]["loss"],
        "bytes_per_peer": sum(r["bytes_sent"] for r in ranks) / s.peers,
        "bytes_per_peer_max": max(r["bytes_sent"] for r in ranks),
        "tokens": sum(r["tokens"] for r in ranks),
        "seconds": max(r["seconds"] for r in ranks),
        "allreduce_seconds": max(r["allreduce_seconds"] for r in ranks),
        "train_seconds": max(r["train_seconds"] for r in ranks),
        "rounds": ranks[0]["rounds"],
        "landed_after": [r.get("landed_after", []) for r in ranks],
        "replicas_identical": len({r["digest"] for r in ranks}) == 1,
        "digest": ranks[0]["digest"],
        "curve": ranks[0]["curve"],
    }


# --- orchestration ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Method:
    name: str
    procs: list[Any]
    collect: Callable[[], dict[str, Any]]
    #: Shared objects the children unpickle after start (Process.start drops its own reference to its args).
    keep: Any = None


def _warm_start_method(s: Settings, tmp: Path) -> tuple[_Method, Path]:
    ctx = mp.get_context("spawn")
    d, checkpoint = tmp / "warm_start", tmp / "warm_start" / "model.pt"
    d.mkdir()
    procs = [ctx.Process(target=_warm_start_worker, args=(s, d / "warm.json", checkpoint))]
    return _Method("warm_start", procs, lambda: json.loads((d / "warm.json").read_text())), checkpoint


def _methods(
    s: Settings,
    hs: list[int],
    compressions: list[str],
    modes: list[str],
    tmp: Path,
    warm: Path | None,
    also: str | None = None,
) -> list[_Method]:
    ctx = mp.get_context("spawn")
    methods = []
    for h in hs:
        for mode in modes:
            for c in compressions:
                base = dataclasses.replace(s, compression=c)
                variants = [("", base)] + (
                    [(f"_{also}", dataclasses.replace(base, reducer=also))] if also else []
                )
                for suffix, v in variants:
                    name = _diloco_name(h, c, mode) + suffix
                    d = tmp / name
                    d.mkdir()
                    barrier = ctx.Barrier(v.peers)
                    procs = [
                        ctx.Process(target=_diloco_worker, args=(k, v, h, mode, name, barrier, d, warm))
                        for k in range(v.peers)
                    ]
                    collect = lambda v=v, h=h, name=name, d=d: _diloco_result(v, h, name, d)  # noqa: E731
                    methods.append(_Method(name, procs, collect, barrier))
    d = tmp / "ddp"
    d.mkdir()
    procs = [ctx.Process(target=_ddp_worker, args=(k, s, d, warm)) for k in range(s.peers)]
    methods.append(_Method("ddp", procs, lambda d=d: json.loads((d / "ddp.json").read_text())))
    d = tmp / "single"
    d.mkdir()
    procs = [ctx.Process(target=_single_worker, args=(s, d / "single.json", warm))]
    methods.append(_Method("single", procs, lambda d=d: json.loads((d / "single.json").read_text())))
    return methods


def _run_all(
    methods: list[_Method], sequential: bool, timeout: float, say: Callable[..., None]
) -> dict[str, dict[str, Any]]:
    """Start the methods' processes (all at once, or one method after another), wait, collect, reap.

    Any process that exits non-zero (or the timeout) stops the whole benchmark: the others are killed."""
    results: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    started: list[Any] = []
    try:
        for batch in [[m] for m in methods] if sequential else [methods]:
            for m in batch:
                for p in m.procs:
                    p.start()
                    started.append(p)
            pending = list(batch)
            while pending:
                live = [p.sentinel for m in pending for p in m.procs if p.exitcode is None]
                if live:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"still running after {timeout:.0f}s: {[m.name for m in pending]}")
                    mp.connection.wait(live, timeout=min(10.0, max(0.1, deadline - time.monotonic())))
                for m in list(pending):
                    codes = [p.exitcode for p in m.procs]
                    if any(c not in (None, 0) for c in codes):
                        raise RuntimeError(f"{m.name}: a process failed (exit codes {codes})")
                    if all(c == 0 for c in codes):
                        pending.remove(m)
                        r = results[m.name] = m.collect()
                        say(
                            f"{m.name}: held-out loss {r['loss']:.4f}, {r['bytes_per_peer']:.4g} B/peer, "
                            f"{r['seconds']:.0f}s"
                            + ("" if r.get("replicas_identical", True) else ", REPLICAS DIFFER")
                        )
    finally:
        for p in started:
            if p.is_alive():
                p.kill()
            p.join(5)
    return results


def _csv(choices: tuple[str, ...] | None = None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {choices}, got {text!r}")
        return list(dict.fromkeys(items))

    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        if f.name == "compression":
            continue  # --compressions
        default = getattr(defaults, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            ap.add_argument(flag, type=type(default), default=default)
    ap.add_argument("--h", type=int, nargs="+", default=[10, 50], help="DiLoCo inner steps per round")
    ap.add_argument(
        "--compressions",
        type=_csv(),
        default=["int8", "int4", "int2"],
        help="DiLoCo payload codecs, comma-separated (int8, int4, int2, fp16, none)",
    )
    ap.add_argument(
        "--modes",
        type=_csv(MODES),
        default=list(MODES),
        help="DiLoCo outer updates, comma-separated: sequential, overlapped (one round late, eager start)",
    )
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="run one method after another (default: all methods' processes at once)",
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before every process is killed")
    ap.add_argument(
        "--also-reducer",
        default=None,
        help="also run every DiLoCo variant with this reducer (methods <name>_{reducer}), e.g. centered_clip",
    )
    ap.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = ap.parse_args(argv)
    s = Settings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)}
    )
    if s.eager not in ("own", "last", "mix"):
        ap.error(f"--eager must be own, last or mix (got {s.eager!r})")
    if s.land_after < -1:
        ap.error("--land-after must be >= 0, or -1 (as soon as the average has completed)")
    for h in args.h:
        if h <= 0 or s.steps % h:
            ap.error(f"--steps ({s.steps}) must be a positive multiple of every H (got {h})")
    if s.peers < 2:
        ap.error("--peers must be at least 2")
    if s.warm_start_steps < 0:
        ap.error("--warm-start-steps must be >= 0")
    from intellect.node.net.allreduce import get_payload_codec

    for c in args.compressions:
        try:
            get_payload_codec(c)
        except (KeyError, ValueError) as e:
            ap.error(f"--compressions: unknown codec {c!r} ({e})")
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-convergence-") as tmp:
        warm: Path | None = None
        warm_result: dict[str, Any] = {"tokens": 0, "loss": None, "seconds": 0.0}
        if s.warm_start_steps:
            method, warm = _warm_start_method(s, Path(tmp))
            warm_result = _run_all([method], True, args.timeout, say)["warm_start"]
        remaining = args.timeout - (time.perf_counter() - t0)
        methods = _methods(s, args.h, args.compressions, args.modes, Path(tmp), warm, args.also_reducer)
        results = _run_all(methods, args.sequential, remaining, say)

    ddp, single = results["ddp"], results["single"]
    ddp_loss, ddp_bytes = ddp["loss"], ddp["bytes_per_peer"]
    out: dict[str, Any] = {
        "ddp_loss": ddp_loss,
        "single_loss": single["loss"],
        "ddp_bytes_per_peer": ddp_bytes,
        "tokens": ddp["tokens"],
    }
    diloco = {name: r for name, r in results.items() if name not in ("ddp", "single")}
    for name, d in diloco.items():
        out[f"{name}_loss"] = d["loss"]
        out[f"{name}_bytes_per_peer"] = d["bytes_per_peer"]
        alias = _bits_alias(name)
        if alias:  # overlap_2bit_h50_* for overlap_h50_int2_*, diloco_4bit_h50_* for diloco_h50_int4_*
            out[f"{alias}_loss"] = d["loss"]
            out[f"{alias}_bytes_per_peer"] = d["bytes_per_peer"]
            out[f"{alias}_bytes_reduction_vs_ddp"] = ddp_bytes / d["bytes_per_peer"]
    at_1000x: dict[str, dict[str, float]] = {}
    for name, d in diloco.items():
        ratio = ddp_bytes / d["bytes_per_peer"]
        out[f"{name}_loss_vs_ddp"] = d["loss"] / ddp_loss
        out[f"{name}_bytes_reduction_vs_ddp"] = ratio
        # Issue #6's bar: within 5% of DDP's held-out loss while sending at least 100x fewer bytes per peer.
        out[f"{name}_meets_bar"] = d["loss"] <= 1.05 * ddp_loss and ratio >= 100
        out[f"{name}_rounds"] = d["rounds"]
        out[f"{name}_tokens"] = d["tokens"]
        out[f"{name}_replicas_identical"] = d["replicas_identical"]
        out[f"{name}_bytes_per_peer_max"] = d["bytes_per_peer_max"]
        out[f"{name}_seconds"] = d["seconds"]
        out[f"{name}_allreduce_seconds"] = d["allreduce_seconds"]
        out[f"{name}_train_seconds"] = d["train_seconds"]
        if any(d["landed_after"]):
            out[f"{name}_landed_after"] = d["landed_after"]
        h = d["h"]
        base = results.get(f"diloco_h{h}")
        if base is not None and name != f"diloco_h{h}":
            out[f"{name}_loss_vs_diloco_h{h}"] = d["loss"] / base["loss"]
        if ratio >= 1000:
            at_1000x[name] = {"bytes_reduction_vs_ddp": ratio, "loss_vs_ddp": d["loss"] / ddp_loss}
    if args.also_reducer:
        for name, d in diloco.items():
            v = results.get(f"{name}_{args.also_reducer}")
            if v is not None:
                out[f"{name}_{args.also_reducer}_loss_vs_{s.reducer}"] = v["loss"] / d["loss"]
    # Issue #17: a setting that sends at least 1000x fewer bytes per peer than DDP, within 5% of its loss.
    out["at_1000x"] = at_1000x
    best = min(at_1000x, key=lambda n: at_1000x[n]["loss_vs_ddp"], default=None)
    out["best_at_1000x"] = best
    out["best_at_1000x_loss_vs_ddp"] = at_1000x[best]["loss_vs_ddp"] if best else None
    out["best_at_1000x_within_5pct"] = bool(best) and at_1000x[str(best)]["loss_vs_ddp"] <= 1.05
    out["warm_start_tokens"] = warm_result["tokens"]
    out["warm_start_loss"] = warm_result["loss"]
    out["single_loss_vs_ddp"] = single["loss"] / ddp_loss
    out["single_tokens"] = single["tokens"]
    out["ddp_replicas_identical"] = ddp["replicas_identical"]
    out["ddp_allreduces"] = ddp["allreduces"]
    out["curves"] = {name: r["curve"] for name, r in results.items()}
    out["seconds"] = {name: round(r["seconds"], 1) for name, r in results.items()}
    out["seconds"]["warm_start"] = round(warm_result["seconds"], 1)
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    feedback = "error feedback per peer" if s.error_feedback else "no error feedback"
    out["diloco_transport"] = (
        f"{s.peers} processes, intellect.node.net.allreduce butterfly over loopback TCP, "
        f"{'/'.join(args.compressions)} parts, tokens-weighted {s.reducer}, {feedback}"
    )
    out["ddp_bytes_note"] = "fp32 gradient bytes x 2(N-1)/N per step: the all-reduce lower bound"
    settings = dataclasses.asdict(s)
    del settings["compression"]
    out["settings"] = settings | {
        "h": args.h,
        "compressions": args.compressions,
        "modes": args.modes,
        "sequential": args.sequential,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
