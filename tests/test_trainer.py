"""Inner trainer: schedule, tiny training on built-in data, exact restart from a checkpoint, the loop."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from pathlib import Path

import pytest
import torch
from intellect.node.app.logs import LoopLagCanary
from intellect.node.engine.checkpoint import CheckpointStore
from intellect.node.engine.compression import Int8Blockwise, decompress
from intellect.node.engine.data import (
    DataError,
    ShardResolver,
    TokenStream,
    builtin_heldout,
    builtin_shards,
    heldout_batches,
)
from intellect.node.engine.model import CONFIGS, Llama, ModelConfig
from intellect.node.engine.outer import OuterOptimizer
from intellect.node.engine.tokenizer import ByteTokenizer
from intellect.node.engine.trainer import InnerTrainer, TrainerConfig

torch.set_num_threads(1)

TOK = ByteTokenizer()
RESOLVER = ShardResolver(TOK)
SMALL = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=259, max_seq_len=32)


def _stream(batch: int, seq_len: int, seed: int) -> TokenStream:
    return TokenStream.from_infos(RESOLVER, builtin_shards(TOK), batch=batch, seq_len=seq_len, seed=seed)


def test_config_validation_and_schedule() -> None:
    cfg = TrainerConfig(lr=1e-3, warmup_steps=10, total_steps=110, min_lr=1e-4)
    assert cfg.lr_at(0) == pytest.approx(1e-4)  # linear warm-up from lr/warmup
    assert cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(10) == pytest.approx(1e-3)  # peak, then cosine
    assert cfg.lr_at(60) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert cfg.lr_at(110) == pytest.approx(1e-4) and cfg.lr_at(10_000) == pytest.approx(1e-4)
    lrs = [cfg.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    for bad in ({"lr": 0.0}, {"min_lr": 1.0}, {"batch": 0}, {"device": "tpu"}, {"grad_clip": -1.0}):
        with pytest.raises(ValueError):
            TrainerConfig(**bad)  # type: ignore[arg-type]


def test_tiny_training_lowers_loss_clearly() -> None:
    """`tiny` on the built-in corpus, 300 AdamW steps on one CPU thread (~12 s of CPU time)."""
    cfg = TrainerConfig(
        lr=3e-3, warmup_steps=10, total_steps=300, min_lr=3e-4, batch=4, seq_len=32, device="cpu"
    )
    trainer = InnerTrainer(Llama(CONFIGS["tiny"], seed=0), cfg, _stream(4, 32, seed=1))
    held = heldout_batches(RESOLVER.load(builtin_heldout(TOK)), batch=8, seq_len=32, max_batches=8)
    before = trainer.evaluate(held)
    stats = trainer.run_steps(300)
    after = trainer.evaluate(held)
    assert stats.steps == 300 and stats.tokens == 300 * 4 * 32 and stats.tokens_per_s > 0
    assert stats.lr == pytest.approx(cfg.lr_at(299))
    # Untrained ≈ ln(259) = 5.56 nats; a byte-level model that learned English spelling is well below 3.
    assert before > 5.0
    assert after < 3.0 and after < before - 2.0, (before, after)
    assert stats.last_loss < 3.2
    assert trainer.step == 300


def _run_losses(trainer: InnerTrainer, n: int) -> list[float]:
    return [trainer.run_steps(1).last_loss for _ in range(n)]


def test_restart_from_checkpoint_continues_exactly(tmp_path: Path) -> None:
    cfg = TrainerConfig(
        lr=2e-3, warmup_steps=3, total_steps=20, min_lr=2e-4, batch=4, seq_len=32, device="cpu"
    )

    straight = InnerTrainer(Llama(SMALL, seed=4), cfg, _stream(4, 32, seed=9))
    ref = _run_losses(straight, 12)

    first = InnerTrainer(Llama(SMALL, seed=4), cfg, _stream(4, 32, seed=9))
    assert _run_losses(first, 5) == ref[:5]
    tensors, meta = first.export_state()
    tensors.update({f"model.{k}": v for k, v in first.model.state_dict().items()})
    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    store.save(tensors, {"round": 1, "trainer": meta})

    # A fresh process-like start: different init, fresh stream, state only from the checkpoint on disk.
    ckpt = store.load_latest()
    assert ckpt is not None
    resumed = InnerTrainer(Llama(SMALL, seed=1234), cfg, _stream(4, 32, seed=9))
    resumed.model.load_state_dict({k[6:]: v for k, v in ckpt.tensors.items() if k.startswith("model.")})
    resumed.import_state(
        {k: v for k, v in ckpt.tensors.items() if not k.startswith("model.")}, ckpt.meta["trainer"]
    )
    assert resumed.step == 5 and resumed.stream.cursor == first.stream.cursor
    assert _run_losses(resumed, 7) == ref[5:]  # bit-identical loss curve
    assert resumed.stream.cursor == straight.stream.cursor
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


class _Node:
    """One peer's training state: model + inner trainer, outer optimizer, int8 compressor with feedback."""

    def __init__(self, cfg: TrainerConfig, init_seed: int) -> None:
        self.trainer = InnerTrainer(Llama(SMALL, seed=init_seed), cfg, _stream(4, 32, seed=9))
        self.outer = OuterOptimizer.from_model(self.trainer.model)
        self.comp = Int8Blockwise(block=64, error_feedback=True)

    def round(self, h: int) -> list[float]:
        """H inner steps, Δ, int8 with error feedback, (a one-peer "average"), outer step, reset local."""
        losses = _run_losses(self.trainer, h)
        delta = self.outer.pseudo_gradient(self.trainer.model)
        self.outer.step({k: decompress(self.comp.compress(k, v)) for k, v in delta.items()})
        self.outer.copy_to(self.trainer.model)
        return losses

    def save(self, store: CheckpointStore, round_: int) -> None:
        tensors, tmeta = self.trainer.export_state()
        state = {**self.outer.state_dict(), **{f"ef.{k}": v for k, v in self.comp.state_dict().items()}}
        state.update({f"trainer.{k}": v for k, v in tensors.items()})
        meta = {
            "round": round_,
            "run_id": "test-run",
            "trainer": tmeta,
            "cursor": list(self.trainer.stream.cursor),
        }
        store.save(state, meta)

    def load(self, store: CheckpointStore) -> int:
        ckpt = store.load_latest()
        assert ckpt is not None

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}

        self.outer.load_state_dict({k: v for k, v in ckpt.tensors.items() if k.startswith("outer.")})
        self.outer.copy_to(self.trainer.model)
        self.comp.load_state_dict(part("ef."))
        self.trainer.import_state(part("trainer."), ckpt.meta["trainer"])
        assert list(self.trainer.stream.cursor) == ckpt.meta["cursor"]
        return ckpt.round


def test_diloco_rounds_restart_from_checkpoint_exactly(tmp_path: Path) -> None:
    """Rounds of inner steps + compressed outer step, interrupted after round 2 and resumed from disk,
    give the uninterrupted run's loss curve, data position, global weights, momentum and residuals."""
    cfg = TrainerConfig(
        lr=2e-3, warmup_steps=2, total_steps=16, min_lr=2e-4, batch=4, seq_len=32, device="cpu"
    )
    h = 4
    straight = _Node(cfg, init_seed=4)
    ref = [straight.round(h) for _ in range(4)]

    first = _Node(cfg, init_seed=4)
    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    for r in (1, 2):
        assert first.round(h) == ref[r - 1]
        first.save(store, r)

    resumed = _Node(cfg, init_seed=1234)  # a fresh process: other init, fresh stream, empty residuals
    assert resumed.load(store) == 2
    assert resumed.trainer.step == 2 * h and resumed.trainer.stream.cursor == first.trainer.stream.cursor
    assert [resumed.round(h) for _ in range(2)] == ref[2:]  # bit-identical loss curve
    assert resumed.trainer.stream.cursor == straight.trainer.stream.cursor
    for name, value in straight.outer.state_dict().items():
        assert torch.equal(value, resumed.outer.state_dict()[name]), name
    for name, value in straight.comp.state_dict().items():
        assert torch.equal(value, resumed.comp.state_dict()[name]), name


def test_import_state_checks_everything_before_changing_anything() -> None:
    cfg = TrainerConfig(batch=2, seq_len=16, device="cpu")
    source = InnerTrainer(Llama(SMALL, seed=0), cfg, _stream(2, 16, seed=0))
    source.run_steps(3)
    tensors, meta = source.export_state()

    target = InnerTrainer(Llama(SMALL, seed=0), cfg, _stream(2, 16, seed=5))  # another stream (seed)
    target.run_steps(1)
    before = (target.step, target.stream.cursor, {id(p): dict(s) for p, s in target.optimizer.state.items()})
    with pytest.raises(DataError, match="seed"):
        target.import_state(tensors, meta)
    missing = {k: v for k, v in tensors.items() if not k.endswith("exp_avg_sq")}
    with pytest.raises(ValueError, match="missing tensor"):
        target.import_state(missing, meta)
    after = (target.step, target.stream.cursor, {id(p): dict(s) for p, s in target.optimizer.state.items()})
    assert after == before

    # stream=False: a caller that builds a fresh stream per round keeps its own stream and position.
    target.import_state(tensors, meta, stream=False)
    assert target.step == 3 and target.stream.cursor == before[1]
    restored, _ = target.export_state()
    assert {k for k in restored if k.startswith("optim.")} == {k for k in tensors if k.startswith("optim.")}
    for k, v in tensors.items():
        if k.startswith("optim."):
            assert torch.equal(restored[k], v), k


def test_state_is_plain_tensors_and_json() -> None:
    cfg = TrainerConfig(batch=2, seq_len=16, device="cpu")
    trainer = InnerTrainer(Llama(SMALL, seed=0), cfg, _stream(2, 16, seed=0))
    trainer.run_steps(2)
    state = trainer.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in state["tensors"].values())
    json.dumps(state["meta"])  # no pickle needed anywhere
    names = {n for n, _ in trainer.model.named_parameters()}
    assert {k[len("optim.") : -len(".exp_avg")] for k in state["tensors"] if k.endswith(".exp_avg")} == names
    other = InnerTrainer(
        Llama(ModelConfig(**{**SMALL.to_dict(), "dim": 64}), seed=0), cfg, _stream(2, 16, seed=0)
    )
    with pytest.raises(ValueError, match="wrong shape"):
        other.load_state_dict(state)
    assert other.step == 0 and not other.optimizer.state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast is used on CUDA only")
def test_cuda_trains_under_bf16_autocast() -> None:
    cfg = TrainerConfig(lr=3e-3, warmup_steps=2, total_steps=20, batch=4, seq_len=32, device="cuda")
    trainer = InnerTrainer(Llama(SMALL, seed=0), cfg, _stream(4, 32, seed=0))
    with trainer._autocast():
        logits = trainer.model(torch.zeros(1, 8, dtype=torch.int64, device="cuda"))
    assert logits.dtype == torch.bfloat16
    stats = trainer.run_steps(20)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32
    assert stats.last_loss < stats.mean_loss + 1.0 and math.isfinite(stats.mean_loss)


async def test_run_inner_keeps_the_event_loop_running() -> None:
    cfg = TrainerConfig(batch=4, seq_len=32, device="cpu")
    trainer = InnerTrainer(Llama(SMALL, seed=0), cfg, _stream(4, 32, seed=0))
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    # The daemon's canary (what `status` reports as loop lag) watches the loop while the steps run.
    canary = LoopLagCanary(interval_s=0.02, warn_s=0.5)
    tick = asyncio.create_task(ticker())
    watch = asyncio.create_task(canary.run())
    try:
        start = time.perf_counter()
        stats = await asyncio.wait_for(trainer.run_inner(30), timeout=120)
        elapsed = time.perf_counter() - start
    finally:
        done.set()
        watch.cancel()
        await asyncio.wait_for(tick, timeout=5)
        await asyncio.gather(watch, return_exceptions=True)
    assert stats.steps == 30 and stats.tokens_per_s > 0
    # The loop ticked throughout the inner steps rather than once at the end.
    assert len(gaps) >= max(5, int(elapsed / 0.01 * 0.2)), (len(gaps), elapsed)
    assert max(gaps) < 1.0, max(gaps)
    assert canary.ready.is_set() and canary.max_lag_s < 1.0, canary.max_lag_s
