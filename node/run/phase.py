"""The phases of a node's life in a run, and which phase may follow which (docs/architecture.md).

`Phase` values are the strings the status API has always shown. `PhaseTracker` is the one writer of the
current phase: it refuses a transition the table does not list (a programming error, raised at once) and
emits a `PhaseChanged` event for every accepted one.
"""

from __future__ import annotations

from enum import StrEnum

from intellect.node.run.events import EventSink, PhaseChanged


class Phase(StrEnum):
    #: The daemon is starting its services.
    STARTING = "starting"
    #: Joining the DHT and looking for the run's manifest.
    JOINING = "joining"
    #: Building the model, data and trainer; restoring a checkpoint or the initial state.
    LOADING = "loading"
    #: Round 0: waiting (bounded) until the requested number of members is visible.
    WAITING_FOR_PEERS = "waiting-for-peers"
    #: Peers are ahead: waiting (bounded) for a fresh announcement of their next state.
    WAITING_FOR_ROUND = "waiting-for-round"
    #: Downloading and verifying the global state from peers.
    SYNCING = "syncing"
    #: Inner steps on this round's shards.
    TRAINING = "training"
    #: Matchmaking and all-reduce of the pseudo-gradient.
    AVERAGING = "averaging"
    #: Outer step, new state hash and checkpoint of a completed average.
    CHECKPOINTING = "checkpointing"
    #: Paused by the volunteer or a volunteer limit: out of the run, state kept; resumes by catching up.
    PAUSED = "paused"
    #: Orderly shutdown: finishing a commit in flight, leaving notice, closing services.
    STOPPING = "stopping"
    #: Everything is closed.
    STOPPED = "stopped"


_AFTER_LOAD = frozenset(
    {
        Phase.WAITING_FOR_PEERS,
        Phase.WAITING_FOR_ROUND,
        Phase.SYNCING,
        Phase.TRAINING,
        Phase.PAUSED,
        Phase.STOPPING,
    }
)
#: (AVERAGING: an overlapped run's last average in flight, settled before it stops; `run.overlap`.)
_NEXT_ROUND = frozenset(
    {Phase.WAITING_FOR_ROUND, Phase.SYNCING, Phase.TRAINING, Phase.PAUSED, Phase.AVERAGING}
)
#: Which phases may follow each phase. STOPPING may follow any phase (a signal can come at any time).
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.JOINING}),
    Phase.JOINING: frozenset({Phase.LOADING}),
    Phase.LOADING: _AFTER_LOAD,
    Phase.WAITING_FOR_PEERS: _AFTER_LOAD,
    Phase.WAITING_FOR_ROUND: frozenset({Phase.SYNCING, Phase.TRAINING, Phase.PAUSED}),
    # A failed sync goes back to deciding: wait again, sync again, or train on.
    Phase.SYNCING: _NEXT_ROUND,
    # A pause abandons the round between chunks of inner steps.
    Phase.TRAINING: frozenset({Phase.AVERAGING, Phase.PAUSED}),
    # A failed average starts the next round: catch up (wait or sync) or train.
    Phase.AVERAGING: _NEXT_ROUND | {Phase.CHECKPOINTING},
    Phase.CHECKPOINTING: _NEXT_ROUND,
    # Resuming catches up first (wait for or sync the run's state), then trains.
    Phase.PAUSED: frozenset({Phase.WAITING_FOR_ROUND, Phase.SYNCING, Phase.TRAINING}),
    Phase.STOPPING: frozenset({Phase.STOPPED}),
    Phase.STOPPED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A phase change the transition table does not allow: a bug in the round machine, never peer input."""


class PhaseTracker:
    """The current phase; `enter` checks the transition and emits it."""

    def __init__(self, emit: EventSink, start: Phase = Phase.STARTING) -> None:
        self._emit = emit
        self.phase = start

    def enter(self, phase: Phase) -> None:
        """Move to `phase` (staying in the same phase is a no-op, except SYNCING, which retries)."""
        if phase == self.phase and phase != Phase.SYNCING:
            return
        if phase != Phase.STOPPING and phase not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"{self.phase.value} -> {phase.value}")
        if self.phase == Phase.STOPPED:
            raise IllegalTransition(f"{self.phase.value} -> {phase.value}")
        self.phase = phase
        self._emit(PhaseChanged(phase.value))
