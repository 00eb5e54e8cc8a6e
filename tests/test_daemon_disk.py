"""A full disk while the daemon checkpoints: a clear error, training goes on, nothing already saved is lost.

Uses a real, tiny tmpfs mounted for the test (root only; the CI machine runs as root) rather than a mock,
so the errors are the kernel's ENOSPC at whatever point of the atomic write they happen.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from intellect.node.app.config import NodeConfig
from intellect.node.app.roundlog import append_round_log

if TYPE_CHECKING:  # the fixture's type; conftest is pytest's to import, not ours
    from conftest import MakeOfflineRun


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write until the file system is full; the filler's path."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_full_disk_during_checkpoint_keeps_training_and_the_last_good_checkpoint(
    tmp_path: Path, offline_run: MakeOfflineRun
) -> None:
    with tmpfs(tmp_path / "disk", "48m") as disk:
        config = NodeConfig(data_dir=disk / "node", listen=("/ip4/127.0.0.1/tcp/0",))
        run = offline_run(config)
        state, status = run.state, run.status

        def commit(r: int) -> None:
            run.commit(r, steps=2)

        commit(1)
        first = state.global_store.load_latest()
        assert first is not None and first.meta["round"] == 1
        assert status.checkpoint_errors == 0

        filler = fill(disk)
        commit(2)  # must not raise: the disk is full
        assert status.checkpoint_errors == 1
        append_round_log(config.data_dir, {"round": 2})  # dropped and logged, no exception
        # The last good checkpoint is intact and verifies; no half-written file is taken for a checkpoint.
        latest = state.global_store.load_latest()
        assert latest is not None and latest.meta["round"] == 1
        assert latest.state_hash == first.state_hash
        # The state in memory moved on (round 2 was applied) and is what we hold.
        assert state.state_hash != first.state_hash
        held = state.state_hash

        filler.unlink()
        commit(3)
        latest = state.global_store.load_latest()
        assert latest is not None and latest.meta["round"] == 3
        assert status.checkpoint_errors == 1
        assert latest.state_hash == state.state_hash != held
        assert all(torch.isfinite(t).all() for t in latest.tensors.values())
