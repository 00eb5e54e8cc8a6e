"""Inner-step throughput of one node with W local ranks against the same node training alone.

Same model, same per-step batch (the run's `batch`), same steps. The baseline is one `InnerTrainer`
with the whole batch: the faster of one torch thread and one per core, best of three. The other is
`engine.localgroup` with W ranks taking `batch / W` each (W processes with gloo on CPU, or W GPUs
with NCCL), torch threads split evenly between them on CPU. Prints tokens per second for both and the
ratio; the last line is JSON.

On a machine with W GPUs this is the figure that matters; on CPU it shows what the gradient all-reduce
and the process split cost against one process that already uses every core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from intellect.node.engine.data import ShardResolver, builtin_shards
from intellect.node.engine.localgroup import LocalGroup, local_batch, rank_stream
from intellect.node.engine.model import CONFIGS, Llama
from intellect.node.engine.tokenizer import ByteTokenizer
from intellect.node.engine.trainer import InnerTrainer, TrainerConfig


def _trainer(model: str, batch: int, seq_len: int, steps: int, device: str) -> InnerTrainer:
    cfg = TrainerConfig(
        lr=1e-3, warmup_steps=1, total_steps=steps + 1, batch=batch, seq_len=seq_len, device=device
    )
    return InnerTrainer(Llama(CONFIGS[model], seed=0), cfg, None, device)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = ap.parse_args(argv)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    tok = ByteTokenizer()
    resolver, shards = ShardResolver(tok), builtin_shards(tok)
    cores = os.cpu_count() or 1

    # The baseline is the best single process we can find: torch's intra-op threads do not always pay on
    # small models, so one thread and every core are both measured, three times each, and the best kept.
    solo_runs: dict[int, list[float]] = {}
    for _ in range(3):
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            solo = _trainer(args.model, args.batch, args.seq_len, args.steps, args.device)
            solo.stream = rank_stream(resolver, shards, 0, 1, args.batch, args.seq_len, seed=1)
            solo.run_steps(2)  # warm-up: allocator, kernels
            t0 = time.perf_counter()
            stats = solo.run_steps(args.steps)
            solo_runs.setdefault(threads, []).append(stats.tokens / (time.perf_counter() - t0))
    best_threads = max(solo_runs, key=lambda t: max(solo_runs[t]))
    solo_tps = max(solo_runs[best_threads])
    for threads, runs in sorted(solo_runs.items()):
        say(
            f"1 rank, batch {args.batch}, {threads} threads: "
            + ", ".join(f"{r:.0f}" for r in runs)
            + " tokens/s"
        )

    # Each of W CPU ranks gets its share of the cores (the workers inherit OMP_NUM_THREADS).
    threads = max(1, cores // args.ranks)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    half = local_batch(args.batch, args.ranks)
    trainer = _trainer(args.model, half, args.seq_len, args.steps, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        group = LocalGroup(
            trainer,
            world=args.ranks,
            model=CONFIGS[args.model].to_dict(),
            tokenizer="byte",
            tokenizer_sha256=None,
            shards=shards,
            shards_dir=Path(tmp),
        )
        try:
            group.begin_round(shards, 1, rank_stream(resolver, shards, 0, args.ranks, half, args.seq_len, 1))
            group.steps(2)
            t0 = time.perf_counter()
            stats = group.steps(args.steps)
            group_tps = stats.tokens / (time.perf_counter() - t0)
        finally:
            group.close()
    say(f"{args.ranks} ranks, batch {half} each: {group_tps:.0f} tokens/s ({group_tps / solo_tps:.2f}x)")
    out = {
        "model": args.model,
        "device": args.device,
        "cores": cores,
        "ranks": args.ranks,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "solo_tokens_per_s": solo_tps,
        "solo_threads": best_threads,
        "solo_runs": solo_runs,
        "local_ranks_tokens_per_s": group_tps,
        "speedup": group_tps / solo_tps,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
