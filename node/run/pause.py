"""Pausing: a node that pauses leaves the run (a leaving notice, no membership record, no lobby intents),
keeps its state and checkpoint, and rejoins by the machine's ordinary catch-up when it resumes.

`PauseGate` holds why the node is paused, by source ("user" for `intellect-node pause`, and the volunteer
limits the app layer evaluates: schedule, idle, battery, transfer cap). The node is paused while any
source has a reason. The round machine checks the gate between rounds (`hold`) and between chunks of
inner steps (`train_round` abandons the round; its local copy is reset, never averaged).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from intellect.node.run.phase import Phase, PhaseTracker

logger = logging.getLogger(__name__)

#: The source of a pause asked for through the control API or `intellect-node pause`.
USER = "user"


class PauseGate:
    """Why the node is paused, by source; paused while any source has a reason."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}
        self._changed = asyncio.Event()
        #: Called after every change (the app layer mirrors the gate into the node's status).
        self.on_change: Callable[[PauseGate], None] = lambda gate: None

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    def closed(self) -> bool:
        """`paused`, as a function to pass around."""
        return self.paused

    @property
    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)

    @property
    def reason(self) -> str:
        """Every reason, in one line ("" when running)."""
        return "; ".join(self._reasons.values())

    def set(self, source: str, reason: str | None) -> bool:
        """Pause for `reason` on behalf of `source`, or lift its pause (None); True if that changed."""
        if reason is None:
            if source not in self._reasons:
                return False
            del self._reasons[source]
        else:
            if self._reasons.get(source) == reason:
                return False
            self._reasons[source] = reason
        self._changed.set()
        self.on_change(self)
        return True

    async def wait_resumed(self) -> None:
        while self.paused:
            self._changed.clear()
            await self._changed.wait()


class Leaver(Protocol):
    async def leaving(self, round_: int, reason: str = "shutdown") -> None: ...


async def hold(gate: PauseGate, phases: PhaseTracker, announcer: Leaver, round_: int) -> bool:
    """While the gate is closed: phase "paused", one leaving notice, then wait. True if we had paused."""
    if not gate.paused:
        return False
    phases.enter(Phase.PAUSED)
    logger.info("paused (%s): leaving the run, keeping our state of round %d", gate.reason, round_)
    await announcer.leaving(round_, "paused")
    await gate.wait_resumed()
    logger.info("resumed: rejoining the run (catching up with peers first)")
    return True
