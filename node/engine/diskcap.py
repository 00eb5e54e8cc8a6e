"""The volunteer's disk cap (`max_disk_gb`) on the data directory, enforced when checkpoints are written.

Everything the node keeps lives under its data directory: checkpoints of each run (the global state and the
trainer state, `keep` of each), quarantined corrupt checkpoints, shards, pinned initial states, tickets,
the identity. Only checkpoints grow while a node runs, so the cap is enforced where they are written:

1. the new checkpoint's size is known exactly before a byte is written (`statehash.serialized_size`);
2. if the data directory plus the new checkpoint would pass the cap, room is made, cheapest loss first:
   quarantined corrupt checkpoints go (they are kept for a post-mortem only), then the older good
   checkpoints of each store, down to the newest good one, which is never deleted to make room (a write can
   still fail, and the node must always have a state to resume from);
3. if it still does not fit, the checkpoint is skipped and said so: the node trains on with the state in
   memory (peers serve it too), and a restart resumes from the last checkpoint that fit or syncs.

So the data directory never passes the cap because of a checkpoint. Files the node does not write while it
runs (shards the volunteer copied there, other runs' checkpoints) count toward the cap but are never
deleted: a cap smaller than they are means every checkpoint is skipped, and `status` says why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from intellect.node.engine.checkpoint import CheckpointStore

log = logging.getLogger(__name__)

GB = 1_000_000_000


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under `root` (apparent sizes; links are not followed; errors skipped)."""
    total = 0
    for directory, _dirs, files in os.walk(root, onerror=lambda e: None):
        for name in files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue  # removed while we walk (a temp file renamed into place)
            if not os.path.islink(os.path.join(directory, name)):
                total += st.st_size
    return total


def human(n: int) -> str:
    """Bytes for people, in decimal units as the cap is given (`max_disk_gb`)."""
    for unit, size in (("GB", GB), ("MB", 1_000_000), ("kB", 1000)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Room:
    """The outcome of `DiskCap.make_room`: whether the write may go ahead, and what the directory uses."""

    fits: bool
    used: int
    need: int

    def describe(self, cap: int) -> str:
        if self.fits:
            return f"{human(self.used)} used of {human(cap)}"
        return (
            f"checkpoint skipped: it needs {human(self.need)} and the data directory already uses "
            f"{human(self.used)} of {human(cap)} with only the newest checkpoint of each kind left"
        )


class DiskCap:
    """At most `cap` bytes under `root` (the data directory), kept by pruning checkpoint `stores`."""

    def __init__(self, root: Path, cap: int) -> None:
        if cap <= 0:
            raise ValueError(f"a disk cap must be positive, got {cap}")
        self.root, self.cap = root, cap

    def used(self) -> int:
        return tree_bytes(self.root)

    def make_room(self, need: int, stores: Sequence[CheckpointStore]) -> Room:
        """Free space until `need` more bytes fit under the cap, without deleting the newest good checkpoint
        of any store; `fits` is False when that is not enough."""
        used = self.used()
        if used + need <= self.cap:
            return Room(True, used, need)
        start = used
        for store in stores:  # cheapest first: corrupt checkpoints, kept for a post-mortem only
            store.clear_quarantine()
        used = self.used()
        if used + need > self.cap:
            for store in stores:
                store.prune(keep=1)
            used = self.used()
        if start > used:
            log.info("disk cap %s: freed %s of older checkpoints", human(self.cap), human(start - used))
        return Room(used + need <= self.cap, used, need)


__all__ = ["GB", "DiskCap", "Room", "human", "tree_bytes"]
