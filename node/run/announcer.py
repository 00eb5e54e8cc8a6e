"""Everything this node tells the run: state announcements, progress, leaving notices and misbehaviour
evidence by gossip, and its membership record in the DHT (through the one `MembershipService`).

Gossip is the fast path; the DHT record carries the same round and hash, so a lost gossip message is
repaired by the next refresh. Every publication takes a `StateView`, so a round is never paired with
another round's hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence

import torch
from intellect.node.engine.statehash import SerializedState
from intellect.node.net.gossip import GossipError, GossipService
from intellect.node.net.membership import MembershipService
from intellect.node.net.statesync import StateServer, StateSnapshot
from intellect.node.run.state import StateView
from intellect.protocol.averaging_messages import Equivocation
from intellect.protocol.gossip_messages import CheckpointAnnounce, Leaving, Progress
from intellect.protocol.keys import TopicKind
from intellect.protocol.sync_messages import BadChunkEvidence
from intellect.protocol.vouching import bad_chunk_report, equivocation_report

logger = logging.getLogger(__name__)


class Announcer:
    """Publishes on behalf of the round machine; failures are logged, never fatal (the DHT repairs)."""

    def __init__(self, gossip: GossipService, membership: MembershipService, server: StateServer) -> None:
        self.gossip = gossip
        self.membership = membership
        self.server = server

    async def state(
        self,
        view: StateView,
        tensors: Mapping[str, torch.Tensor],
        throughput: float,
        serialized: SerializedState | None = None,
    ) -> None:
        """Make the state servable and tell others: gossip CHECKPOINT, then the DHT membership record.
        `serialized`: the same state as its commit serialised it (not serialised again)."""
        ann = await self.server.publish(StateSnapshot(view.round, view.state_hash, tensors, serialized))
        msg = CheckpointAnnounce(view.round, view.state_hash, ann.total_bytes, ann.chunk_size)
        await self._gossip(TopicKind.CHECKPOINT, msg)
        await self.membership_record(view, throughput)

    async def membership_record(self, view: StateView, throughput: float) -> None:
        """Sign and store our record with this view's round and hash."""
        self.membership.update(round=view.round, state_hash=view.state_hash, throughput=throughput)
        try:
            await self.membership.refresh()
        except (TimeoutError, OSError) as e:
            logger.warning("could not store our membership record: %s", e)

    async def progress(
        self, view: StateView, step: int, tokens: int, loss: float, tokens_per_s: float
    ) -> None:
        await self._gossip(
            TopicKind.PROGRESS,
            Progress(view.round, step, tokens, float(loss), float(tokens_per_s), view.state_hash),
        )

    async def leaving(self, round_: int, reason: str = "shutdown", timeout_s: float = 3.0) -> None:
        """Tell the run we leave it (a shutdown, or a pause): others drop us from their groups at once."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._gossip(TopicKind.LEAVING, Leaving(round_, reason))

    async def misbehaviour(self, evidence: Sequence[BadChunkEvidence], round_: int) -> None:
        """Gossip each piece of transferable evidence a sync collected, so others stop trusting the server."""
        # One proof per liar is enough, and a liar that corrupted every chunk must not make us flood.
        first = {ev.server: ev for ev in reversed(evidence)}
        for ev in first.values():
            try:
                await self.gossip.publish(TopicKind.MISBEHAVIOUR, bad_chunk_report(ev, round_))
            except GossipError as e:
                logger.warning("could not gossip the evidence against %s: %s", ev.server, e)

    async def equivocation(self, evidence: Sequence[Equivocation], round_: int) -> None:
        """Gossip each proof that an all-reduce owner signed two different results, one per owner."""
        for ev in {ev.owner: ev for ev in evidence}.values():
            await self._gossip(TopicKind.MISBEHAVIOUR, equivocation_report(ev, round_))

    async def _gossip(self, kind: TopicKind, msg: object) -> None:
        try:
            await self.gossip.publish(kind, msg)
        except GossipError as e:
            logger.warning("could not gossip %s: %s", type(msg).__name__, e)
