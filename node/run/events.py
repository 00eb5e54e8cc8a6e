"""Typed events of the round machine: the one stream that feeds the status API, the metrics and
`rounds.jsonl` (docs/architecture.md).

The run layer only emits; the app layer folds events into its status record and round log. Every event is
a frozen value, so a subscriber cannot change what another one sees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar


class RunReject(StrEnum):
    """Peer input the round machine dropped (gossip's own reasons are counted by the gossip service)."""

    #: A gossiped checkpoint announcement with a malformed hash or impossible sizes.
    BAD_CHECKPOINT_ANNOUNCE = "bad_checkpoint_announce"
    #: A peer served a state chunk that does not match the state's hash (we caught it syncing).
    BAD_STATE_CHUNK = "bad_state_chunk"
    #: Someone proved (gossiped, signed evidence) that a peer served a wrong chunk.
    BAD_STATE_CHUNK_REPORTED = "bad_state_chunk_reported"
    #: A synced state whose outer step count differs from the round its vouchers announced.
    STATE_ROUND_MISMATCH = "state_round_mismatch"
    #: A synced state that matches its hash but not the run's model (names, shapes, dtypes) or holds
    #: non-finite values: refused, and its vouchers distrusted.
    UNUSABLE_STATE = "unusable_state"
    #: A synced state our model can load whose loss on the held-out batches is not finite or too far above
    #: ours and the run's initial state's (`engine.losscheck`): refused, and its vouchers distrusted.
    FAILED_LOSS_CHECK = "failed_loss_check"
    #: An all-reduce owner that signed two different results of one attempt (we caught it, or someone
    #: gossiped the proof): distrusted and left out of every later group.
    EQUIVOCATION = "equivocation"
    #: A misbehaviour report whose evidence does not hold against the state we serve.
    FALSE_MISBEHAVIOUR_REPORT = "false_misbehaviour_report"
    #: A run control record (pause, resume, end) we refused: not the researcher's, forged, stale, expired
    #: or malformed (`protocol.control.ControlReject` says which, in the log).
    REFUSED_CONTROL = "refused_control"


@dataclass(frozen=True)
class PhaseChanged:
    phase: str


@dataclass(frozen=True)
class StateChanged:
    """The global state we hold: round and hash always change together, on the event loop."""

    round: int
    state_hash: str


@dataclass(frozen=True)
class TrainingProgress:
    """Throughput so far in this round's inner steps (after each chunk)."""

    tokens_per_s: float


@dataclass(frozen=True)
class Trained:
    """A round's inner steps finished."""

    round: int
    steps: int
    tokens: int
    mean_loss: float
    tokens_per_s: float


@dataclass(frozen=True)
class Averaged:
    """An averaging attempt ended, completed (`ok`) or not."""

    round: int
    ok: bool
    seconds: float
    group_size: int
    reason: str
    bytes_sent: int
    bytes_received: int


@dataclass(frozen=True)
class Committed:
    """A completed average was applied: outer step, new state, checkpoint attempted."""

    round: int
    state_hash: str
    loss: float
    tokens: int
    group_size: int
    allreduce_s: float
    #: An overlapped average landed while the next round's inner steps went on (`overlap.start_landing`).
    mid_round: bool = False


@dataclass(frozen=True)
class Synced:
    """We adopted a global state: from peers (`from_peers`) or our own checkpoint at start."""

    round: int
    state_hash: str
    source: str
    seconds: float
    from_peers: bool
    bytes_received: int = 0


@dataclass(frozen=True)
class SyncFailed:
    """A state download that did not produce a usable state."""

    round: int
    reason: str
    bytes_received: int = 0


@dataclass(frozen=True)
class Rejected:
    """One piece of peer input was dropped, for `reason`."""

    reason: RunReject
    peer: str = ""


@dataclass(frozen=True)
class MembersChanged:
    peers: tuple[str, ...]


@dataclass(frozen=True)
class PeerProgress:
    """Another member's signed PROGRESS gossip, as it says: the round it committed, that round's mean
    loss and its throughput (a claim, for display only: nothing decides on it)."""

    peer: str
    round: int
    loss: float
    tokens_per_s: float


@dataclass(frozen=True)
class MemberSeen:
    """A member's verified and admitted DHT membership record, as a refresh found it (us included):
    its round and throughput, and how it can be reached (`relayed`: True when it announced only relay
    circuit addresses, False with a direct one, None with no address at all)."""

    peer: str
    round: int
    tokens_per_s: float
    relayed: bool | None


@dataclass(frozen=True)
class GossipCounters:
    """The gossip service's counters (a snapshot): rejections by reason and deliveries (both monotone),
    the neighbours linked now, and how many distinct authors we have heard from."""

    rejected: Mapping[str, int] = field(default_factory=dict)
    delivered: int = 0
    neighbours: int = 0
    authors: int = 0


@dataclass(frozen=True)
class StateServed:
    """Cumulative bytes our state server sent to peers."""

    bytes_sent: int


@dataclass(frozen=True)
class CheckpointFailed:
    round: int
    error: str


@dataclass(frozen=True)
class DiskChecked:
    """The disk cap's verdict on a checkpoint: the data directory's bytes, the cap, and whether the
    checkpoint of `round` was written (`fits`) or skipped, in words (`note`)."""

    round: int
    used: int
    cap: int
    fits: bool
    note: str


Event = (
    PhaseChanged
    | StateChanged
    | TrainingProgress
    | Trained
    | Averaged
    | Committed
    | Synced
    | SyncFailed
    | Rejected
    | MembersChanged
    | PeerProgress
    | MemberSeen
    | GossipCounters
    | StateServed
    | CheckpointFailed
    | DiskChecked
)
EventSink = Callable[[Event], None]
E = TypeVar("E")


def discard(event: Event) -> None:
    """An event sink that drops everything (tools and tests that need no status)."""


class Recorder:
    """An event sink that keeps every event, for tests and tools."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]
