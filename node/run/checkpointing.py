"""Writing a node's two checkpoints (global state, trainer state) now, or behind the training.

A commit used to write both checkpoint files before the next inner step could run: at 23M parameters
that is 460 MB serialised, hashed twice (the file's sha256 and the Merkle chunks) and fsynced, about 2.6 s
on an idle core and 6 s with four peers on two cores, every round, with the model idle. `GlobalState`
now hands the commit's checkpoint to `Checkpointer.write_behind`, which writes it in a worker thread while
the next round trains; nothing waits for it except whatever must not overtake it:

* the next write (at most one checkpoint is behind, so a slow disk slows the commits rather than piling
  up snapshots in memory);
* anything that changes the global state in place (`GlobalState` awaits `flushed()` before an outer step
  or adopting a state from peers), for a snapshot that holds the outer optimizer's live tensors; a
  commit's snapshot holds its immutable serialization instead (`statehash.SerializedState`, made once
  for the state hash and shared with the state server), written as it is;
* shutdown (`GlobalState.settle`) and the end of a round machine's run.

The trainer's tensors (AdamW moments, the error-feedback residual) change at the next inner step, so the
snapshot clones them (0.15 s for 277 MB at the size above). Writes stay atomic (`CheckpointStore.save`),
so a crash mid-write leaves the previous checkpoint, and the state is served to peers from memory, never
from these files. A failed write (full disk, I/O error) is logged and emitted as `CheckpointFailed`, as a
synchronous one was, and the node trains on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from intellect.node.engine.checkpoint import CheckpointError, CheckpointStore
from intellect.node.engine.diskcap import DiskCap, Room
from intellect.node.engine.statehash import SerializedState, serialized_size
from intellect.node.run.events import CheckpointFailed, DiskChecked, EventSink

logger = logging.getLogger(__name__)

#: Room reserved for a checkpoint's two JSON sidecars when the disk cap reckons its size.
SIDECAR_ALLOWANCE = 64 << 10


@dataclass(frozen=True)
class Snapshot:
    """What one round's checkpoints hold: the global state's tensors and the trainer's, with their meta."""

    round: int
    state_hash: str
    global_tensors: dict[str, torch.Tensor]
    trainer_tensors: dict[str, torch.Tensor]
    trainer_meta: dict[str, Any]
    #: The global state as its commit serialised it (then `global_tensors` is empty): written as is.
    global_serialized: SerializedState | None = None


class Checkpointer:
    """The global and trainer checkpoint stores of one run, and the one write that may be behind."""

    def __init__(self, run_id: str, root: Path, emit: EventSink, disk: DiskCap | None = None) -> None:
        self.run_id = run_id
        self.global_store = CheckpointStore(root / "global", keep=3)
        self.trainer_store = CheckpointStore(root / "trainer", keep=3)
        self._emit = emit
        #: The volunteer's disk cap on the data directory (None: no cap).
        self.disk = disk
        self._behind: asyncio.Task[bool] | None = None
        #: Writes that were done behind the training (for the benchmark and the tests).
        self.written_behind = 0

    async def write(self, snap: Snapshot) -> bool:
        """Write `snap` now (after any write behind); False when it failed or did not fit (said so)."""
        await self.flushed()
        return await self._written(snap, asyncio.get_running_loop().run_in_executor(None, self._save, snap))

    def write_behind(self, snap: Snapshot) -> None:
        """Write `snap` in the background. The caller has awaited `flushed()` (one write behind at most),
        and leaves `snap`'s global tensors unchanged until `flushed()` returns again."""
        if self._behind is not None and not self._behind.done():
            raise RuntimeError("a checkpoint is still being written behind; await flushed() first")
        # The write goes to the executor now, not when a task first runs: a loop that ends right after a
        # commit (asyncio.run cancels its tasks, then waits for the executor's jobs) or a cancelled task
        # still gets the checkpoint written. Submitted from the task, a job still queued when the task was
        # cancelled was cancelled with it, and the commit's checkpoint was lost (seen in test_export.py).
        job = asyncio.get_running_loop().run_in_executor(None, self._save, snap)
        self._behind = asyncio.ensure_future(self._written(snap, job, behind=True))

    @property
    def pending(self) -> bool:
        return self._behind is not None and not self._behind.done()

    async def flushed(self, timeout: float | None = None) -> None:
        """Wait until the write behind (if any) is on disk, or failed and was reported; at most `timeout`
        seconds (the write goes on in its thread after a timeout, and stays atomic)."""
        task = self._behind
        if task is None:
            return
        if task.get_loop() is not asyncio.get_running_loop():  # (its loop ended; the thread finished it)
            self._behind = None
            return
        if not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        if task.done():
            self._behind = None

    async def _written(self, snap: Snapshot, job: asyncio.Future[Room | None], behind: bool = False) -> bool:
        try:
            room = await asyncio.shield(job)  # (cancelling the wait leaves the write running)
        except asyncio.CancelledError:
            job.add_done_callback(functools.partial(_orphan_done, snap.round))  # nobody else will say
            raise
        except (OSError, CheckpointError) as e:
            self._emit(CheckpointFailed(snap.round, str(e)))
            logger.error(
                "could not write the checkpoint of round %d (%s); training on with the state in memory, "
                "the next round retries",
                snap.round,
                e,
            )
            return False
        except Exception as e:  # a write behind has no caller to raise to: say it, count it, train on
            if not behind:
                raise
            logger.exception("writing the checkpoint of round %d failed", snap.round)
            self._emit(CheckpointFailed(snap.round, f"{type(e).__name__}: {e}"))
            return False
        if behind:
            self.written_behind += 1
        if room is None or self.disk is None:
            return True
        self._emit(DiskChecked(snap.round, room.used, self.disk.cap, room.fits, room.describe(self.disk.cap)))
        if not room.fits:
            logger.warning(
                "max_disk_gb: %s; training on with the state in memory (round %d)",
                room.describe(self.disk.cap),
                snap.round,
            )
        return room.fits

    def _save(self, snap: Snapshot) -> Room | None:
        """Both checkpoints of `snap`, after making room under the disk cap; the cap's verdict (None when
        there is no cap), whose `fits` is False when nothing was written."""
        meta = {"round": snap.round, "run_id": self.run_id, "state_hash": snap.state_hash}
        disk, room = self.disk, None
        ser = snap.global_serialized
        if disk is not None:
            need = len(ser.blob) if ser is not None else serialized_size(snap.global_tensors)
            need += serialized_size(snap.trainer_tensors) + SIDECAR_ALLOWANCE
            room = disk.make_room(need, (self.global_store, self.trainer_store))
            if not room.fits:
                return room
        if ser is not None:
            self.global_store.save_serialized(ser, meta)
        else:
            self.global_store.save(snap.global_tensors, meta)
        self.trainer_store.save(snap.trainer_tensors, {"round": snap.round, "trainer": snap.trainer_meta})
        if disk is not None:
            room = Room(True, disk.used(), 0)
        return room


__all__ = ["SIDECAR_ALLOWANCE", "Checkpointer", "Snapshot"]


def _orphan_done(round_: int, job: asyncio.Future[Room | None]) -> None:
    """A write whose waiter was cancelled (shutdown, the end of the loop) still ran: log how it ended."""
    if job.cancelled():
        logger.error("the checkpoint of round %d was not written: its job was cancelled", round_)
    elif job.exception() is not None:
        logger.error("could not write the checkpoint of round %d: %s", round_, job.exception())
