"""A commit's checkpoint is written behind the next round's training (`run.checkpointing`), from the state
the commit serialised and hashed once (which the state server publishes too).

The real engine and global state of the built-in run (no network); a store's `save` is held open by an
event so that the write is provably still running while the next inner steps change the trainer's
moments in memory, and while the next commit comes."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from intellect.node.app.config import NodeConfig
from intellect.node.engine.checkpoint import CheckpointError, CheckpointStore
from intellect.node.engine.statehash import serialize_and_hash, state_hash
from intellect.node.net.allreduce import get_payload_codec
from intellect.node.net.statesync import StateServer, StateSnapshot
from intellect.node.run.checkpointing import Checkpointer, Snapshot
from intellect.node.run.events import discard
from intellect.node.run.state import RESIDUAL_TENSOR
from intellect.node.run.training import plan_round

if TYPE_CHECKING:  # the fixture's types; conftest is pytest's to import, not ours
    from conftest import MakeOfflineRun, OfflineRun

pytestmark = pytest.mark.timeout(300)


def _config(tmp_path: Path) -> NodeConfig:
    return NodeConfig(data_dir=tmp_path / "node", listen=("/ip4/127.0.0.1/tcp/0",))


def _hold(store: CheckpointStore) -> tuple[threading.Event, threading.Event]:
    """Make `store.save` wait for `release` (set `writing` when it starts); returns (writing, release)."""
    writing, release = threading.Event(), threading.Event()
    real_save = store.save

    def held_save(*args: Any, **kw: Any) -> Any:
        writing.set()
        if not release.wait(60):
            raise AssertionError("the test never released the checkpoint write")
        return real_save(*args, **kw)

    store.save = held_save  # type: ignore[method-assign]
    return writing, release


async def _train_and_commit(run: OfflineRun, r: int, steps: int) -> None:
    """Train round `r` alone and commit our own pseudo-gradient (what a one-member group does); the
    commit's checkpoint is not awaited."""
    me, engine = run.identity.peer_id, run.engine
    await engine.trainer.begin_round(plan_round(run.run_id, r, me, [me], engine.shards))
    await engine.trainer.steps(steps)
    delta = await run.state.pseudo_gradient()
    codec = get_payload_codec("none")
    await run.state.commit(r, {k: v.clone() for k, v in delta.items()}, delta, [me], me, codec)


def test_the_checkpoint_is_written_behind_the_next_inner_steps_and_holds_the_commits_state(
    tmp_path: Path, offline_run: MakeOfflineRun
) -> None:
    run = offline_run(_config(tmp_path))
    state, trainer = run.state, run.engine.trainer.trainer
    writing, release = _hold(state.trainer_store)
    at_commit: dict[str, torch.Tensor] = {}
    held: dict[str, Any] = {}

    async def go() -> None:
        await _train_and_commit(run, 1, steps=2)
        # The commit returned with its checkpoint still to be written.
        assert state.round == 1 and state.checkpoints.pending
        at_commit.update({k: v.clone() for k, v in trainer.export_state()[0].items() if k != "rng.cpu"})
        held["hash1"] = state.state_hash
        assert await asyncio.to_thread(writing.wait, 30)
        # The next round trains while the write is held open: the moments move on in memory.
        await run.engine.trainer.begin_round(
            plan_round(run.run_id, 2, run.identity.peer_id, [run.identity.peer_id], run.engine.shards)
        )
        await run.engine.trainer.steps(2)
        moved = trainer.export_state()[0]
        assert any(not torch.equal(moved[k], at_commit[k]) for k in at_commit)
        # The next commit waits for the write behind (its outer step would change what is being written).
        delta = await state.pseudo_gradient()
        me = run.identity.peer_id
        nxt = asyncio.create_task(
            state.commit(
                2, {k: v.clone() for k, v in delta.items()}, delta, [me], me, get_payload_codec("none")
            )
        )
        await asyncio.sleep(0.5)
        assert not nxt.done() and state.round == 1
        release.set()
        await nxt
        assert state.round == 2
        await state.flushed()
        assert not state.checkpoints.pending

    asyncio.run(go())
    # Round 1's checkpoints hold round 1's state: the trainer's moments as they were at its commit (not the
    # later steps'), the global state under round 1's hash.
    saved = state.trainer_store.load(1)
    assert saved.meta["round"] == 1
    for name, value in at_commit.items():
        assert torch.equal(saved.tensors[name], value), name
    assert RESIDUAL_TENSOR not in saved.tensors  # uncompressed: nothing owed
    assert state.global_store.load(1).state_hash == held["hash1"]
    latest = state.global_store.load_latest()
    assert latest is not None and latest.round == 2 and latest.state_hash == state.state_hash
    assert state.checkpoints.written_behind == 2


def test_settle_waits_for_the_write_behind_within_its_bound(
    tmp_path: Path, offline_run: MakeOfflineRun
) -> None:
    run = offline_run(_config(tmp_path))
    state = run.state
    writing, release = _hold(state.trainer_store)  # (written after the global checkpoint)

    async def go() -> None:
        await _train_and_commit(run, 1, steps=1)
        assert await asyncio.to_thread(writing.wait, 30)
        # Held longer than the bound: settle returns after it, the write still pending (and atomic).
        await state.settle(0.3)
        assert state.checkpoints.pending
        assert state.trainer_store.load_latest() is None
        # Released: settle returns once it is on disk.
        release.set()
        await state.settle(30)
        assert not state.checkpoints.pending

    asyncio.run(go())
    latest = state.global_store.load_latest()
    assert latest is not None and latest.round == 1 and latest.state_hash == state.state_hash
    trainer = state.trainer_store.load_latest()
    assert trainer is not None and trainer.meta["round"] == 1


def test_a_failing_write_behind_is_counted_and_the_node_trains_on(
    tmp_path: Path, offline_run: MakeOfflineRun
) -> None:
    run = offline_run(_config(tmp_path))
    state, status = run.state, run.status
    real_save = state.global_store.save_serialized
    calls = {"n": 0}

    def failing_save(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise CheckpointError("cannot write checkpoint: Input/output error")
        return real_save(*args, **kw)

    state.global_store.save_serialized = failing_save  # type: ignore[method-assign]

    async def go() -> None:
        for r in (1, 2, 3):
            await _train_and_commit(run, r, steps=1)
        await state.flushed()

    asyncio.run(go())
    assert calls["n"] == 3  # every commit's global checkpoint went as its serialization
    assert status.checkpoint_errors == 1
    assert state.global_store.rounds() == [1, 3]
    latest = state.global_store.load_latest()
    assert latest is not None and latest.round == 3 and latest.state_hash == state.state_hash


def test_the_commit_serialises_once_for_the_hash_the_server_and_the_checkpoint(
    tmp_path: Path, offline_run: MakeOfflineRun
) -> None:
    run = offline_run(_config(tmp_path))
    state = run.state
    assert state.serialized() is None  # round 0: nothing serialised yet (the server does it when asked)
    server = StateServer(None, run.identity, run.run_id)  # type: ignore[arg-type]

    async def go() -> None:
        await _train_and_commit(run, 1, steps=1)
        ser = state.serialized()
        assert ser is not None and ser.root == state.state_hash == state_hash(state.outer_state())
        await server.publish(StateSnapshot(1, state.state_hash, state.outer_state(), ser))
        prepared = server._states[state.state_hash]
        assert prepared.blob is ser.blob and prepared.hashes == ser.hashes  # the same bytes, not a copy
        # A serialization that is not the announced state's is refused, not served.
        other = serialize_and_hash({"x": torch.zeros(3)})
        with pytest.raises(ValueError, match="claims hash"):
            await server.publish(StateSnapshot(2, "ab" * 32, state.outer_state(), other))
        await state.flushed()

    asyncio.run(go())
    ser = state.serialized()
    assert ser is not None
    assert (state.global_store.directory / "ckpt-00000001.safetensors").read_bytes() == ser.blob


def test_a_write_behind_is_not_lost_when_its_event_loop_ends(tmp_path: Path) -> None:
    """A node (or a test) whose loop ends right after a commit still gets that commit's checkpoint: the
    write is in the executor's queue from `write_behind` on, and asyncio.run waits for those jobs after it
    has cancelled the loop's tasks. Before, the job was submitted by the task, which the end of the loop
    cancelled before it ran (or cancelled the job while it was still queued): the checkpoint was lost."""
    cp = Checkpointer("run", tmp_path, discard)
    weights = {"w": torch.arange(6, dtype=torch.float32)}
    snap = Snapshot(1, state_hash(weights), weights, {"m": torch.zeros(2)}, {}, None)
    gate = threading.Event()

    async def go() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        blocker = loop.run_in_executor(None, gate.wait, 30)  # the only worker is busy: the write queues
        cp.write_behind(snap)
        threading.Timer(0.5, gate.set).start()
        assert not blocker.done() and cp.pending

    asyncio.run(go())  # returns at once: its tasks are cancelled, then the executor's jobs run out
    got = cp.global_store.load_latest()
    assert got is not None and got.meta["round"] == 1 and got.state_hash == snap.state_hash
    tr = cp.trainer_store.load_latest()
    assert tr is not None and tr.meta["round"] == 1


def test_a_write_behind_that_fails_after_its_loop_ends_is_still_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same end of the loop, with a full disk: the waiter is gone, so the write's own failure is logged
    when the job ends rather than lost (or left to asyncio's 'exception never retrieved')."""
    cp = Checkpointer("run", tmp_path, discard)
    weights = {"w": torch.arange(6, dtype=torch.float32)}
    snap = Snapshot(3, state_hash(weights), weights, {"m": torch.zeros(2)}, {}, None)

    def full(_: Snapshot) -> None:
        raise OSError(28, "No space left on device")

    cp._save = full  # type: ignore[method-assign]
    gate = threading.Event()

    async def go() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        loop.run_in_executor(None, gate.wait, 30)
        cp.write_behind(snap)
        threading.Timer(0.5, gate.set).start()

    with caplog.at_level(logging.ERROR, logger="intellect.node.run.checkpointing"):
        asyncio.run(go())
    assert any("round 3" in r.getMessage() and "No space left" in r.getMessage() for r in caplog.records)
    assert cp.global_store.load_latest() is None
