"""Data parallelism inside a node: 2 real local ranks (processes, gloo on loopback) against one process.

Two ranks with half the batch each must take the same steps as one process with the whole batch (the
same rows), round after round, including after rank 0's weights change between rounds (an outer step).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from intellect.node.engine.data import ShardResolver, TokenStream, builtin_shards
from intellect.node.engine.localgroup import LocalGroup, LocalGroupError, local_batch, rank_stream
from intellect.node.engine.model import CONFIGS, Llama
from intellect.node.engine.tokenizer import ByteTokenizer
from intellect.node.engine.trainer import InnerTrainer, TrainerConfig

pytestmark = pytest.mark.timeout(240)

BATCH, SEQ = 4, 32


def _cfg(batch: int) -> TrainerConfig:
    return TrainerConfig(lr=3e-3, warmup_steps=2, total_steps=20, batch=batch, seq_len=SEQ, device="cpu")


class _Joined:
    """One process's view of what two ranks read: rank 0's rows, then rank 1's."""

    def __init__(self, a: TokenStream, b: TokenStream) -> None:
        self.a, self.b = a, b

    def next_batch(self) -> torch.Tensor:
        return torch.cat([self.a.next_batch(), self.b.next_batch()])


def _streams(resolver: ShardResolver, shards: list, seed: int) -> tuple[TokenStream, TokenStream]:
    half = local_batch(BATCH, 2)
    return tuple(rank_stream(resolver, shards, k, 2, half, SEQ, seed) for k in range(2))  # type: ignore[return-value]


def _group(tmp_path: Path) -> tuple[LocalGroup, InnerTrainer, ShardResolver, list]:
    resolver = ShardResolver(ByteTokenizer())
    shards = builtin_shards(ByteTokenizer())
    trainer = InnerTrainer(Llama(CONFIGS["tiny"], seed=0), _cfg(local_batch(BATCH, 2)), None, "cpu")  # type: ignore[arg-type]
    group = LocalGroup(
        trainer,
        world=2,
        model=CONFIGS["tiny"].to_dict(),
        tokenizer="byte",
        tokenizer_sha256=None,
        shards=shards,
        shards_dir=tmp_path,
        timeout_s=60,
    )
    return group, trainer, resolver, shards


def test_two_local_ranks_take_the_steps_of_one_process_with_the_whole_batch(tmp_path: Path) -> None:
    group, trainer, resolver, shards = _group(tmp_path)
    try:
        ref = InnerTrainer(Llama(CONFIGS["tiny"], seed=0), _cfg(BATCH), None, "cpu")  # type: ignore[arg-type]
        mine = shards[:5]  # this round's shards of the node: rank 0 reads 3 of them, rank 1 the other 2
        for rnd, seed in enumerate((11, 12)):
            if rnd == 1:
                # Between rounds rank 0's weights change (an outer step); the workers must pick that up.
                with torch.no_grad():
                    for t in (trainer, ref):
                        next(t.model.parameters()).add_(0.01)
            s0, _ = _streams(resolver, mine, seed)
            group.begin_round(mine, seed, s0)
            stats = group.steps(3)
            r0, r1 = _streams(resolver, mine, seed)
            ref.stream = _Joined(r0, r1)  # type: ignore[assignment]
            ref_stats = ref.run_steps(3)
            assert stats.tokens == ref_stats.tokens == 3 * BATCH * SEQ
            assert stats.mean_loss == pytest.approx(ref_stats.mean_loss, rel=1e-4)
            for (name, p), q in zip(trainer.model.named_parameters(), ref.model.parameters(), strict=True):
                assert torch.allclose(p, q, atol=2e-5, rtol=1e-4), (rnd, name, float((p - q).abs().max()))
        assert trainer.step == ref.step == 6
    finally:
        group.close()
    assert all(not p.is_alive() for p in group.procs)


def test_a_dead_local_rank_is_a_clear_error_and_nothing_is_left(tmp_path: Path) -> None:
    group, _, resolver, shards = _group(tmp_path)
    try:
        s0, _ = _streams(resolver, shards, 1)
        group.begin_round(shards, 1, s0)
        group.steps(1)
        os.kill(group.pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group.procs[0].exitcode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LocalGroupError, match="local rank"):
            group.steps(1)
    finally:
        group.close()
    assert all(not p.is_alive() for p in group.procs)


def test_a_batch_that_does_not_split_is_refused() -> None:
    assert local_batch(8, 4) == 2
    with pytest.raises(LocalGroupError, match="does not split"):
        local_batch(6, 4)


def test_automatic_ranks_use_the_gpus_that_split_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from intellect.node.app.body import load_run_manifest
    from intellect.node.run.training import EngineSettings, local_ranks

    manifest = load_run_manifest()

    def ranks(device: str, ranks: int, gpus: int) -> int:  # the tiny run's batch_size is 8
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)  # no GPU here: only the count matters
        return local_ranks(manifest, EngineSettings(tmp_path, device, ranks))

    assert ranks("cuda", 0, 4) == 4
    assert ranks("cuda", 0, 3) == 2  # 3 does not divide 8: two of the three GPUs
    assert ranks("cuda", 0, 0) == 1
    assert ranks("cpu", 0, 4) == 1  # GPUs present, but the node trains on CPU
    assert ranks("cpu", 2, 0) == 2  # explicit
