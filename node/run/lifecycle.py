"""A run's lifecycle: where it ends, and the researcher's orders to pause, resume or end it.

Every member stops after committing the same round, so that they all stop on the same state:

    final round = min(rounds_total, the researcher's end_round)
    rounds_total = max(1, token_budget // (inner steps × batch × seq_len))     (what sizes the LR schedule)

The machine checks `RunLifecycle.ended` with its other limits; a member still behind syncs to the final
state first (the machine's ordinary catch-up), and a member that finished keeps serving its state a
bounded while (`linger`) as long as a member it knows of is still behind. The researcher's signed control
records (`intellect.protocol.control`) are read from the DHT by `watch_control`: pause and resume close
and open the node's `PauseGate` under the source "researcher"; end moves the final round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from intellect.node.run.events import EventSink, Rejected, RunReject
from intellect.node.run.pause import PauseGate
from intellect.protocol.codec import decode
from intellect.protocol.control import ControlReject, ControlRejected, RunControl, open_control
from intellect.protocol.errors import ProtocolError
from intellect.protocol.manifest import Manifest

logger = logging.getLogger(__name__)

#: The `PauseGate` source of a pause the researcher ordered.
RESEARCHER = "researcher"
#: How often a node reads the run's control records from the DHT.
CONTROL_POLL_S = 5.0
#: How long a finished node keeps serving the final state while members it knows of are still behind.
LINGER_S = 60.0
#: Distinct control records remembered (so that one read again from the DHT is not handled twice).
_MAX_SEEN = 256


def rounds_total(manifest: Manifest) -> int:
    """Rounds the token budget pays for: every member trains at most max_tokens_per_round per round."""
    return max(1, manifest.token_budget // max(1, manifest.max_tokens_per_round()))


class RunLifecycle:
    """The run's final round and the researcher's orders, as this node has heard them."""

    def __init__(self, manifest: Manifest, run_id: str, gate: PauseGate, emit: EventSink) -> None:
        self.run_id, self.researcher = run_id, manifest.researcher
        self.budget_round = rounds_total(manifest)
        #: The last round the researcher's `end` named (None: no end ordered).
        self.end_round: int | None = None
        self.gate = gate
        self._emit = emit
        #: The seq of the newest control record applied (-1: none).
        self.last_seq = -1
        #: Refused control records by reason.
        self.refused: dict[str, int] = {}
        self._seen: set[bytes] = set()

    @property
    def final_round(self) -> int:
        return min(self.budget_round, self.end_round or self.budget_round)

    def ended(self, round_: int) -> bool:
        """Whether a node holding the state of `round_` has nothing left to train."""
        return round_ >= self.final_round

    def why(self) -> str:
        if self.end_round is not None and self.end_round <= self.budget_round:
            return "ended by the researcher"
        return "token budget reached"

    def apply(self, data: bytes, now: float | None = None) -> RunControl | None:
        """Check one control record read from the DHT and act on it; None when refused or already seen."""
        if data in self._seen:
            return None
        if len(self._seen) >= _MAX_SEEN:
            self._seen.clear()
        self._seen.add(data)
        try:
            c = open_control(data, self.run_id, self.researcher, self.last_seq, now)
        except ControlRejected as e:
            self._refuse(e)
            return None
        self.last_seq = c.seq
        if c.action == "pause":
            self.gate.set(RESEARCHER, "paused by the run's researcher")
        elif c.action == "resume":
            self.gate.set(RESEARCHER, None)
        else:
            self.end_round = c.end_round
            self.gate.set(RESEARCHER, None)  # a paused node wakes up to finish
        logger.info("researcher's control record %d: %s%s", c.seq, c.action, _at(c))
        return c

    def _refuse(self, e: ControlRejected) -> None:
        self.refused[e.reason.value] = self.refused.get(e.reason.value, 0) + 1
        if e.reason is ControlReject.STALE:
            logger.info("%s", e)  # an older record of the researcher's, still in the DHT
            return
        logger.warning("%s", e)
        self._emit(Rejected(RunReject.REFUSED_CONTROL))


def _at(c: RunControl) -> str:
    return f" at round {c.end_round}" if c.action == "end" else ""


async def watch_control(
    life: RunLifecycle, read: Callable[[], Awaitable[list[bytes]]], poll_s: float = CONTROL_POLL_S
) -> None:
    """Read the run's control records every `poll_s` and apply them, newest seq last (runs until
    cancelled; a failed read is retried at the next poll)."""
    while True:
        try:
            found = await read()
        except Exception as e:  # the DHT is best effort; the next poll retries
            logger.debug("could not read the run's control records: %s", e)
            found = []
        for data in sorted(found, key=_seq_of):
            life.apply(data)
        await asyncio.sleep(poll_s)


def _seq_of(data: bytes) -> int:
    """A record's claimed seq, to apply records in order (0 when it does not decode: refused anyway)."""
    try:
        return decode(data, expected=RunControl).seq
    except (ProtocolError, ValueError, TypeError):
        return 0


async def linger(
    peer_rounds: Callable[[], dict[str, int]], final_round: int, timeout_s: float = LINGER_S
) -> None:
    """Keep serving (return late) while a member we know of holds a round before `final_round`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        behind = sorted(p for p, r in peer_rounds().items() if r < final_round)
        if not behind:
            return
        logger.info("run finished; serving the final state to %d members still behind", len(behind))
        await asyncio.sleep(2.0)


async def finish(
    life: RunLifecycle, round_: int, state_hash: str, peer_rounds: Callable[[], dict[str, int]]
) -> None:
    """The run is over here: say so in one line, then linger while members are still behind."""
    logger.info(
        "run finished at round %d, final state hash %s (%s)",
        round_,
        state_hash,
        life.why(),
        extra={"event": "run_finished", "round": round_, "state_hash": state_hash},
    )
    await linger(peer_rounds, life.final_round)
