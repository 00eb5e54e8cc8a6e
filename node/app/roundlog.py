"""The daemon's event recorder: every round-machine event updates the status record, and committed or
synced rounds are appended to `<data dir>/rounds.jsonl` (read by `intellect-node swarm` for its summary).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from intellect.node.app.status import NodeStatus
from intellect.node.run.events import Committed, Event, EventSink, Synced

logger = logging.getLogger(__name__)

#: One JSON line per completed round.
ROUNDS_LOG = "rounds.jsonl"


def append_round_log(data_dir: Path, entry: dict[str, Any]) -> None:
    """Append one completed round to `<data dir>/rounds.jsonl` (flushed, so a reader sees whole lines).

    The log is for people and the swarm's summary, not state: on a full disk the line is dropped (logged),
    training goes on."""
    try:
        with open(Path(data_dir) / ROUNDS_LOG, "a") as f:
            f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            f.flush()
    except OSError as e:
        logger.error("could not append round %s to %s: %s", entry.get("round"), ROUNDS_LOG, e)


class EventRecorder:
    """The daemon's event sink: fold into `status` (and pass to each of `also`, e.g. the run view's
    log), then log rounds (with the status's byte totals)."""

    def __init__(self, status: NodeStatus, data_dir: Path, also: Sequence[EventSink] = ()) -> None:
        self.status = status
        self.data_dir = data_dir
        self.also = tuple(also)

    def __call__(self, event: Event) -> None:
        self.status.apply(event)
        for sink in self.also:
            sink(event)
        entry = self._entry(event)
        if entry is not None:
            s = self.status
            entry.update(
                bytes_sent=s.bytes_sent,
                bytes_received=s.bytes_received,
                gossip_delivered=s.gossip_delivered,
                gossip_authors=s.gossip_authors,
                ts=time.time(),
            )
            append_round_log(self.data_dir, entry)

    @staticmethod
    def _entry(event: Event) -> dict[str, Any] | None:
        if isinstance(event, Committed):
            return {
                "round": event.round,
                "loss": event.loss,
                "state_hash": event.state_hash,
                "tokens": event.tokens,
                "group_size": event.group_size,
                "allreduce_s": round(event.allreduce_s, 3),
                "synced": False,
                "mid_round": event.mid_round,
            }
        if isinstance(event, Synced) and event.from_peers:
            return {"round": event.round, "state_hash": event.state_hash, "loss": None, "synced": True}
        return None
