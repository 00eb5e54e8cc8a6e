"""Checkpoint store: atomic save, rotation, hash verification, fallback on corruption, disk-full errors."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from intellect.node.engine.checkpoint import CheckpointError, CheckpointStore
from intellect.node.engine.statehash import serialize_and_hash, state_hash


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).to(torch.bfloat16)}


def _meta(round_: int) -> dict[str, object]:
    return {"round": round_, "cursor": [round_, 17], "run_id": "ab" * 32}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_save_load_and_keep_last(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    assert store.load_latest() is None
    for r in range(1, 6):
        path = store.save(_state(r), _meta(r))
        assert path.name == f"ckpt-{r:08d}.safetensors"
    assert store.rounds() == [3, 4, 5]
    assert _visible(tmp_path) == [f"ckpt-{r:08d}.{ext}" for r in (3, 4, 5) for ext in ("json", "safetensors")]
    ckpt = store.load_latest()
    assert ckpt is not None
    assert ckpt.round == 5 and ckpt.meta == _meta(5)
    assert _equal(ckpt.tensors, _state(5))
    assert ckpt.state_hash == state_hash(_state(5))
    side = json.loads((tmp_path / "ckpt-00000005.json").read_text())
    assert side["size"] == (tmp_path / "ckpt-00000005.safetensors").stat().st_size


def test_a_serialized_state_is_saved_as_the_same_file_as_its_tensors(tmp_path: Path) -> None:
    """`save_serialized` (a commit's bytes, hashed once) writes what `save` writes for the tensors."""
    a, b = CheckpointStore(tmp_path / "a"), CheckpointStore(tmp_path / "b")
    ser = serialize_and_hash(_state(7), chunk_size=1024)  # (several chunks: the root is a real tree)
    assert ser.root == state_hash(_state(7), chunk_size=1024) and len(ser.hashes) > 1
    ser = serialize_and_hash(_state(7))
    a.save(_state(7), _meta(7))
    b.save_serialized(ser, _meta(7))
    name = "ckpt-00000007"
    assert (tmp_path / "a" / f"{name}.safetensors").read_bytes() == (
        tmp_path / "b" / f"{name}.safetensors"
    ).read_bytes()
    assert json.loads((tmp_path / "a" / f"{name}.json").read_text()) == json.loads(
        (tmp_path / "b" / f"{name}.json").read_text()
    )
    ckpt = b.load_latest()
    assert ckpt is not None and ckpt.state_hash == state_hash(_state(7)) and _equal(ckpt.tensors, _state(7))


def test_flipped_byte_is_detected_and_previous_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1), _meta(1))
    path = store.save(_state(2), _meta(2))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="intellect.node.engine.checkpoint"):
        ckpt = store.load_latest()
    assert ckpt is not None and ckpt.round == 1 and _equal(ckpt.tensors, _state(1))
    assert "sha256" in caplog.text and "round 2" in caplog.text


def test_truncated_file_is_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1), _meta(1))
    path = store.save(_state(2), _meta(2))
    os.truncate(path, path.stat().st_size - 100)
    with caplog.at_level(logging.WARNING, logger="intellect.node.engine.checkpoint"):
        ckpt = store.load_latest()
    assert ckpt is not None and ckpt.round == 1
    assert "truncated" in caplog.text
    with pytest.raises(CheckpointError, match="truncated"):
        store.load(2)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_any_flipped_byte_in_the_tensors_file_is_caught(tmp_path: Path, where: str) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1), _meta(1))
    path = store.save(_state(2), _meta(2))
    data = bytearray(path.read_bytes())
    index = {"start": 3, "middle": len(data) // 2, "end": len(data) - 1}[where]  # header, data, last byte
    data[index] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        store.load(2)
    ckpt = store.load_latest()
    assert ckpt is not None and ckpt.round == 1 and _equal(ckpt.tensors, _state(1))


def test_changed_metadata_in_the_sidecar_is_caught(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A flip that keeps the sidecar valid JSON (here the data cursor 17 -> 37) fails the sidecar's check."""
    store = CheckpointStore(tmp_path)
    store.save(_state(1), _meta(1))
    store.save(_state(2), _meta(2))
    side = tmp_path / "ckpt-00000002.json"
    text = side.read_text()
    assert text.count("17") == 1
    side.write_text(text.replace("17", "37"))
    with pytest.raises(CheckpointError, match="checksum"):
        store.load(2)
    with caplog.at_level(logging.WARNING, logger="intellect.node.engine.checkpoint"):
        ckpt = store.load_latest()
    assert ckpt is not None and ckpt.round == 1 and ckpt.meta == _meta(1)
    assert "checksum" in caplog.text


def test_corrupt_sidecar_is_skipped(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1), _meta(1))
    store.save(_state(2), _meta(2))
    (tmp_path / "ckpt-00000002.json").write_text("{not json")
    ckpt = store.load_latest()
    assert ckpt is not None and ckpt.round == 1


def test_all_corrupt_returns_none(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(_state(1), _meta(1))
    path.write_bytes(b"")
    assert store.load_latest() is None


def test_crash_between_write_and_rename_leaves_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1), _meta(1))
    before = _visible(tmp_path)

    def crash(src: object, dst: object) -> None:
        raise KeyboardInterrupt("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save(_state(2), _meta(2))
    monkeypatch.undo()
    assert _visible(tmp_path) == before  # no temp junk, no half-written round 2
    ckpt = store.load_latest()
    assert ckpt is not None and ckpt.round == 1 and _equal(ckpt.tensors, _state(1))


def test_crash_between_tensors_and_sidecar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1), _meta(1))
    real_replace = os.replace
    calls = []

    def replace_once(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:  # the tensors file landed; the sidecar rename "crashes"
            raise KeyboardInterrupt("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_once)
    with pytest.raises(KeyboardInterrupt):
        store.save(_state(2), _meta(2))
    monkeypatch.undo()
    ckpt = store.load_latest()
    assert ckpt is not None and ckpt.round == 1
    # The next save cleans up the orphaned tensors file.
    store.save(_state(3), _meta(3))
    assert _visible(tmp_path) == [f"ckpt-{r:08d}.{ext}" for r in (1, 3) for ext in ("json", "safetensors")]


_KILLED_SAVE = """
import os, sys, torch
from intellect.node.engine.checkpoint import CheckpointStore

calls = 0
real_fsync = os.fsync

def fsync(fd):
    global calls
    calls += 1
    if calls == int(sys.argv[2]):
        os._exit(9)  # killed: no cleanup handler, no rename, no further writes
    real_fsync(fd)

os.fsync = fsync
g = torch.Generator().manual_seed(2)
state = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).to(torch.bfloat16)}
CheckpointStore(sys.argv[1]).save(state, {"round": 2, "cursor": [2, 17], "run_id": "ab" * 32})
"""


@pytest.mark.parametrize(
    ("kill_at_fsync", "expected_round"),
    [(1, 1), (2, 1), (3, 2)],  # tensors temp written | tensors renamed, sidecar temp written | both renamed
)
def test_process_killed_during_save(tmp_path: Path, kill_at_fsync: int, expected_round: int) -> None:
    """A real process dies (os._exit) at each fsync of a save: the store always loads a whole checkpoint."""
    store = CheckpointStore(tmp_path)
    store.save(_state(1), _meta(1))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_SAVE), str(tmp_path), str(kill_at_fsync)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 9, proc.stderr
    # Left behind: the tensors temp file | the renamed tensors file and the sidecar temp | a whole round 2.
    assert len(_visible(tmp_path)) == {1: 3, 2: 4, 3: 4}[kill_at_fsync], _visible(tmp_path)
    ckpt = store.load_latest()
    assert ckpt is not None and ckpt.round == expected_round
    assert _equal(ckpt.tensors, _state(expected_round)) and ckpt.meta == _meta(expected_round)
    # The next save clears what the dead process left (temp files, a tensors file without a sidecar).
    store.save(_state(3), _meta(3))
    assert _visible(tmp_path) == [
        f"ckpt-{r:08d}.{ext}" for r in sorted({1, expected_round, 3}) for ext in ("json", "safetensors")
    ]
    assert store.load_latest() is not None


def test_disk_full_raises_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1), _meta(1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    class FullFile:
        def __init__(self, f: object) -> None:
            self._f = f

        def __enter__(self) -> FullFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()  # type: ignore[attr-defined]

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open

    def full_open(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        f = real_open(path, mode, *args, **kwargs)  # type: ignore[call-overload]
        return FullFile(f) if "w" in mode else f

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(CheckpointError, match="no space left"):
        store.save(_state(2), _meta(2))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    ckpt = store.load_latest()
    assert ckpt is not None and ckpt.round == 1


def test_bad_meta_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="round"):
        store.save(_state(1), {"cursor": 3})
    with pytest.raises(CheckpointError, match="JSON"):
        store.save(_state(1), {"round": 1, "x": object()})
    assert not any(tmp_path.iterdir())


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_checkpoints_never_crowd_out_the_newest_good_one(tmp_path: Path) -> None:
    """#16 finding 10: three checkpoints corrupted in a row used to hold all `keep=3` slots while pruning
    deleted the good one before them, so none of the kept ones could be loaded. Pruning now verifies and
    quarantines the corrupt ones first: the newest good checkpoint is always there to resume from."""
    store = CheckpointStore(tmp_path, keep=3)
    store.save(_state(1), _meta(1))
    for r in (2, 3, 4):  # a failing disk: each new checkpoint goes bad before the next save
        _flip(store.save(_state(r), _meta(r)))
    store.save(_state(5), _meta(5))
    _flip(tmp_path / "ckpt-00000005.safetensors")
    for r in (6, 7):
        (tmp_path / f"ckpt-{r:08d}.json").write_text("{torn")  # a corrupt sidecar counts the same
        store.save(_state(r), _meta(r))
        (tmp_path / f"ckpt-{r:08d}.json").write_text("{torn")
    ckpt = CheckpointStore(tmp_path, keep=3).load_latest()  # as a restarted node does
    assert ckpt is not None and ckpt.round == 1 and _equal(ckpt.tensors, _state(1))
    # The corrupt ones are out of the rotation, in corrupt/ with why, the last `keep` of them.
    assert store.rounds() == [1]
    quarantined = _visible(tmp_path / "corrupt")
    assert quarantined == [
        f"ckpt-{r:08d}.{ext}" for r in (5, 6, 7) for ext in ("json", "reason", "safetensors")
    ]
    assert "sha256" in (tmp_path / "corrupt" / "ckpt-00000005.reason").read_text()
    assert "sidecar" in (tmp_path / "corrupt" / "ckpt-00000007.reason").read_text()


def test_good_checkpoints_are_pruned_oldest_first_and_verified_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruning reads back only what it has not verified in its current form: what the store wrote
    itself, or verified before, unchanged since, is not read again at every save."""
    store = CheckpointStore(tmp_path, keep=2)
    verified: list[int] = []
    real = store.verify
    monkeypatch.setattr(store, "verify", lambda r: (verified.append(r), real(r))[1])
    for r in range(1, 5):
        store.save(_state(r), _meta(r))
    assert store.rounds() == [3, 4] and verified == []
    _flip(tmp_path / "ckpt-00000003.safetensors")  # bit rot in an older one: caught at the next save
    store.save(_state(5), _meta(5))
    assert verified == [3] and store.rounds() == [4, 5]
    assert (tmp_path / "corrupt" / "ckpt-00000003.safetensors").exists()
    fresh = CheckpointStore(tmp_path, keep=2)  # a restarted node verifies what it finds once
    monkeypatch.setattr(fresh, "verify", lambda r: (verified.append(r), real(r))[1])
    fresh.save(_state(6), _meta(6))
    fresh.save(_state(7), _meta(7))
    assert verified == [3, 4, 5] and fresh.rounds() == [6, 7]


def test_load_latest_moves_what_it_skips_out_of_the_rotation(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save(_state(1), _meta(1))
    _flip(store.save(_state(2), _meta(2)))
    ckpt = store.load_latest()
    assert ckpt is not None and ckpt.round == 1
    assert store.rounds() == [1]
    assert _visible(tmp_path / "corrupt") == [
        "ckpt-00000002.json",
        "ckpt-00000002.reason",
        "ckpt-00000002.safetensors",
    ]
