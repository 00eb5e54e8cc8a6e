"""The disk cap (`max_disk_gb`): checkpoints make room by pruning, or are skipped; never pass the cap."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from intellect.node.app.config import NodeConfig
from intellect.node.engine.checkpoint import CORRUPT_DIR, CheckpointStore
from intellect.node.engine.diskcap import DiskCap, tree_bytes
from intellect.node.engine.statehash import serialize_state, serialized_size

if TYPE_CHECKING:  # the fixture's type; conftest is pytest's to import, not ours
    from conftest import MakeOfflineRun


def test_serialized_size_is_the_length_of_the_serialized_state() -> None:
    tensors = {
        "w": torch.randn(7, 5),
        "b": torch.zeros(3, dtype=torch.bfloat16),
        "step": torch.tensor(4),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(11, dtype=torch.int64),
    }
    assert serialized_size(tensors) == len(serialize_state(tensors))
    assert serialized_size({}) == len(serialize_state({}))


def _store_with(directory: Path, rounds: list[int], corrupt: int | None = None) -> CheckpointStore:
    store = CheckpointStore(directory, keep=3)
    for r in rounds:
        store.save({"w": torch.full((25_000,), float(r))}, {"round": r})  # 100 kB each
    if corrupt is not None:
        store.save({"w": torch.full((25_000,), -1.0)}, {"round": corrupt})
        data = directory / f"ckpt-{corrupt:08d}.safetensors"
        blob = bytearray(data.read_bytes())
        blob[-1] ^= 0xFF
        data.write_bytes(bytes(blob))
        store.quarantine(corrupt, "a flipped byte (test)")
    return store


def test_room_comes_from_quarantine_first_then_older_checkpoints_never_the_newest(tmp_path: Path) -> None:
    store = _store_with(tmp_path / "ckpt", [1, 2, 3], corrupt=4)  # saving round 4 pruned round 1
    assert store.rounds() == [2, 3] and any((tmp_path / "ckpt" / CORRUPT_DIR).iterdir())
    used = tree_bytes(tmp_path)
    one = serialized_size({"w": torch.zeros(25_000)})

    # Room for one more if the quarantine goes: it goes, and every good checkpoint stays.
    room = DiskCap(tmp_path, used + one // 2).make_room(one, [store])
    assert room.fits and used - room.used > one // 2
    assert store.rounds() == [2, 3] and not any((tmp_path / "ckpt" / CORRUPT_DIR).iterdir())

    # Room for one more only with the older ones gone: the newest good one stays.
    used = tree_bytes(tmp_path)
    room = DiskCap(tmp_path, used + one // 2).make_room(one, [store])
    assert room.fits and store.rounds() == [3]
    assert store.load_latest() is not None

    # No room even then: nothing more is deleted, and the caller is told.
    room = DiskCap(tmp_path, tree_bytes(tmp_path) + one // 2).make_room(one, [store])
    assert not room.fits and store.rounds() == [3]
    assert "skipped" in room.describe(tree_bytes(tmp_path))


def test_a_corrupt_newest_checkpoint_is_not_what_thinning_keeps(tmp_path: Path) -> None:
    store = _store_with(tmp_path / "ckpt", [1, 2, 3])
    data = tmp_path / "ckpt" / "ckpt-00000003.safetensors"
    data.write_bytes(data.read_bytes()[:-8])  # truncated behind the store's back
    room = DiskCap(tmp_path, 1).make_room(10**9, [store])
    assert not room.fits
    assert store.rounds() == [2]  # round 3 quarantined (then dropped), round 2 is the newest good one
    latest = store.load_latest()
    assert latest is not None and latest.round == 2


def test_a_capped_node_keeps_checkpointing_within_the_cap_and_skips_what_cannot_fit(
    tmp_path: Path, offline_run: MakeOfflineRun
) -> None:
    config = NodeConfig(data_dir=tmp_path / "node", listen=("/ip4/127.0.0.1/tcp/0",), max_disk_gb=1.0)
    run = offline_run(config)
    state, status = run.state, run.status
    cap_seen = state.checkpoints.disk
    assert cap_seen is not None and cap_seen.cap == 10**9  # the config's cap reaches the state

    def commit(r: int) -> None:
        run.commit(r, steps=1)

    before = tree_bytes(config.data_dir)
    commit(1)
    one_set = tree_bytes(config.data_dir) - before  # a global and a trainer checkpoint
    assert one_set > 1_000_000
    print(f"one round of checkpoints: {one_set} bytes")
    assert status.limits["max_disk_gb"].endswith("used of 1.00 GB")

    # Room for what is there plus one more set (two at most while one is written): rounds 2..4 each
    # make room by dropping the older set, and the directory never passes the cap.
    cap = tree_bytes(config.data_dir) + one_set + one_set // 10
    state.checkpoints.disk = DiskCap(config.data_dir, cap)
    for r in (2, 3, 4):
        commit(r)
        assert tree_bytes(config.data_dir) <= cap
        latest = state.global_store.load_latest()
        assert latest is not None and latest.round == r and latest.state_hash == state.state_hash
        assert state.trainer_store.rounds()[-1] == r
    assert len(state.global_store.rounds()) < 3  # the store alone would keep three
    assert status.checkpoints_skipped == 0 and status.checkpoint_errors == 0

    # A cap that leaves no room for a second set: the checkpoint is skipped, said so, and the last one
    # that fit stays whole; the state in memory moves on.
    older = len(state.global_store.rounds()) - 1  # sets that thinning may still drop
    left = tree_bytes(config.data_dir) - older * one_set + one_set // 2
    state.checkpoints.disk = DiskCap(config.data_dir, left)
    commit(5)
    assert status.checkpoints_skipped == 1 and status.checkpoint_errors == 0
    assert "skipped" in status.limits["max_disk_gb"]
    latest = state.global_store.load_latest()
    assert latest is not None and latest.round == 4
    assert state.round == 5 and state.state_hash != latest.state_hash


@pytest.mark.parametrize("cap", [0, -1])
def test_a_cap_must_be_positive(tmp_path: Path, cap: int) -> None:
    with pytest.raises(ValueError):
        DiskCap(tmp_path, cap)
